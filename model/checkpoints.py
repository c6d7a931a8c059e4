"""Read checkpoints (official, this project's, timm, torchvision) safely, convert them to our names, load strictly."""
from __future__ import annotations

import argparse
import logging
import pickle
import pickletools
import re
import struct
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from convnext_files import SidecarError, recorded_sha256, sha256_file, sidecar_path

from .convnext import ACTIVATION_LAYERS
from .registry import get_config

logger = logging.getLogger(__name__)

# Wrappers that training code leaves on parameter names (DDP, torch.compile).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_MAX_NAMES_LISTED = 20
# torch.save's legacy (pre-1.6, non-zip) format starts by pickling this number (torch.serialization.MAGIC_NUMBER).
_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
# What torch.load raises on a cut-off or damaged file besides its own RuntimeError and the unpickler's refusal, found
# by cutting and flipping bytes of both formats: the unpickler's stack and memo (IndexError, KeyError, EOFError), its
# opcode arguments (struct.error, TypeError), the legacy loader's storage table (AssertionError, AttributeError), the
# zip reader (zipfile.BadZipFile, OSError). Any of them means the file's bytes are not what torch.save wrote.
_DAMAGED_FILE_ERRORS = (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, TypeError, AttributeError,
                        AssertionError, struct.error, zipfile.BadZipFile)

# timm's ConvNeXt names -> ours (official facebookresearch names). Applied in order, first match wins.
_TIMM_RULES = (
    (r"^stem\.0\.", "downsample_layers.0.0."),
    (r"^stem\.1\.", "downsample_layers.0.1."),
    (r"^stages\.(\d+)\.downsample\.(\d)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.conv_dw\.", r"stages.\1.\2.dwconv."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.\2.pwconv1."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.\2.pwconv2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),  # norm, gamma
    (r"^head\.norm\.", "norm."),
    (r"^head\.fc\.", "head."),
)
# Training scripts pickle their argparse flags into checkpoints as 'args' (the official ConvNeXt utils.save_model,
# timm's CheckpointSaver): a Namespace is plain data, its attributes unpickled under weights_only's rules like the
# rest. Anything else that is not a tensor or plain data (a function, a class, another object) is still refused.
_ALLOWED_CHECKPOINT_CLASSES = [argparse.Namespace]
# Where training code keeps EMA weights: the official ConvNeXt (and this project) 'model_ema', timm 'state_dict_ema'.
_EMA_KEYS = ("model_ema", "state_dict_ema")
# torchvision's CNBlock: block = [dwconv, Permute, LayerNorm, Linear, GELU, Linear, Permute].
_TORCHVISION_BLOCK_LAYERS = {"0": "dwconv", "2": "norm", "3": "pwconv1", "5": "pwconv2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (missing, truncated, modified, carrying code) or does not fit the model.

    The message names the file and says what to do; a refused file is never unpickled past the refusal.
    """


@dataclass(frozen=True)
class LoadResult:
    source_format: str  # "native" (official / this project), "timm" or "torchvision"
    head_reinitialised: bool


def read_checkpoint(path: str | Path) -> dict:
    """The raw checkpoint dict, verified against its sha256 sidecar when it has one, loaded with weights_only=True.

    The one reader of checkpoint files: training's --resume and --finetune, create_model(checkpoint=), the export.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}; pass the path of a .pth file")
    try:
        expected = recorded_sha256(path)
    except SidecarError as error:
        raise CheckpointError(str(error)) from None
    if expected is not None and sha256_file(path) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its recorded sha256 ({sidecar_path(path).name}): "
                              "it was modified or partly written; copy it again, or export or resume from an "
                              "earlier checkpoint")
    if not is_torch_save_file(path):  # a cut-off zip has lost its central directory
        if is_safetensors_file(path):
            raise CheckpointError(f"checkpoint {path} is a safetensors file, {SAFETENSORS_ADVICE}")
        raise CheckpointError(f"checkpoint {path} is not a readable torch checkpoint: truncated or not a torch.save "
                              f"file ({path.stat().st_size} bytes); {_advice_for_unreadable(path)}")
    try:
        with torch.serialization.safe_globals(_ALLOWED_CHECKPOINT_CLASSES):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        opcode = _unread_opcode(error)
        if opcode is not None:
            raise CheckpointError(f"checkpoint {path} uses pickle opcode {opcode} (pickle protocol 4 or 5), which "
                                  "torch's weights-only loader does not read; where you trust the file, load it and "
                                  "save it again with torch.save's default protocol (no pickle_protocol argument)"
                                  ) from None
        if _pickle_is_garbled(error):
            raise CheckpointError(f"checkpoint {path} is damaged or truncated ({_refused_global(error)}); "
                                  f"{_advice_for_unreadable(path)}") from None
        raise CheckpointError(f"checkpoint {path} holds objects other than tensors and plain data (possibly code), "
                              f"so it was refused unexecuted; use a checkpoint written by this project, or re-save "
                              f"it as a dict of tensors and plain values ({_refused_global(error)})") from None
    except _DAMAGED_FILE_ERRORS as error:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({_first_line(error)}); "
                              f"{_advice_for_unreadable(path)}") from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path} holds a {type(checkpoint).__name__}, expected a dict (state dict or checkpoint)")
    return checkpoint


def source_url_path(path: str | Path) -> Path:
    """`x.pth` -> `x.pth.url`: the URL a downloaded file came from (model/pretrained.py's cache writes it)."""
    path = Path(path)
    return path.with_name(path.name + ".url")


def recorded_source_url(path: str | Path) -> str | None:
    """The URL `path` was downloaded from, or None for a file the download cache did not write (or an empty record)."""
    record = source_url_path(path)
    return (record.read_text(errors="replace").strip() or None) if record.is_file() else None


def _advice_for_unreadable(path: Path) -> str:
    """What to do about a file that cannot be read. A downloaded one is named for deletion: its sidecar holds the
    damaged bytes' hash, so nothing else makes the next download fetch it again."""
    url = recorded_source_url(path)
    if url is None:
        return "use an earlier checkpoint, or copy or download it again"
    return f"it was downloaded from {url}: delete {path} and download it again"


def _first_line(error: BaseException) -> str:
    """`KeyError: 215`, `RuntimeError: PytorchStreamReader failed ...`: the type, and the message's first line if any
    (an EOFError of a cut-off legacy file has none)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}"[:200] if lines else type(error).__name__


SAFETENSORS_ADVICE = ("which is not supported (torch.save files only); convert it: "
                      "torch.save(safetensors.torch.load_file(path), 'model.pth'), then pass the .pth")


def is_safetensors_file(path: Path) -> bool:
    """By name, or by safetensors' layout: an 8-byte little-endian header size, then a JSON header ('{')."""
    with path.open("rb") as file:
        head = file.read(9)
    header_bytes = int.from_bytes(head[:8], "little")
    return path.suffix == ".safetensors" or (head[8:9] == b"{" and header_bytes <= path.stat().st_size - 8)


def _newer_protocol_opcode(code: int) -> str | None:
    """The name of `code` when it is an opcode of pickle protocol 4 or 5 (FRAME, MEMOIZE...: a file saved with
    pickle_protocol=4/5, which the weights-only loader does not read), else None (pickletools' table)."""
    found = [op.name for op in pickletools.opcodes if op.proto >= 4 and 0 <= code < 256 and op.code == chr(code)]
    return found[0] if found else None


def _unread_opcode(error: pickle.UnpicklingError) -> str | None:
    """The protocol-4/5 opcode the weights-only unpickler refused, or None."""
    operand = re.search(r"Unsupported operand (\d+)", str(error))
    return _newer_protocol_opcode(int(operand.group(1))) if operand is not None else None


def _pickle_is_garbled(error: pickle.UnpicklingError) -> bool:
    """Whether the weights-only unpickler refused bytes no pickle writer makes (an opcode that does not exist, a
    GLOBAL that names no Python object): a damaged file, not one holding code or objects."""
    text = str(error)
    if "Unsupported operand" in text:  # protocol 4/5's opcodes are asked about first (_unread_opcode)
        return True
    named = re.search(r"GLOBAL (.*?) was not an allowed global", text, re.DOTALL)
    return named is not None and re.fullmatch(r"[A-Za-z_][\w.]*", named.group(1).strip()) is None


def _refused_global(error: pickle.UnpicklingError) -> str:
    """The line of torch's refusal that names what the file holds ("Trying to load unsupported GLOBAL posix.system
    ...", "Unsupported operand 255"), not its advice to load with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or "Unsupported operand" in line),
                lines[-1] if lines else "")[:200]


def is_torch_save_file(path: Path) -> bool:
    """A zip (torch.save since 1.6) or the legacy format's header (pickle protocol 2, then torch's magic number).

    Only the frame: a zip's end record, a legacy file's first bytes (a legacy file cut short passes, torch.load
    finds it)."""
    try:
        if zipfile.is_zipfile(path):
            return True
    except zipfile.BadZipFile:  # an end record that names other disks: a damaged zip
        return False
    with path.open("rb") as file:
        header = file.read(16)
    return header[:1] == b"\x80" and _LEGACY_MAGIC in header


def select_state_dict(checkpoint: Mapping, *, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """The weights inside a checkpoint: the EMA weights if asked (`model_ema`, timm's `state_dict_ema`), else `model` /
    `state_dict`, else the dict itself."""
    if use_ema:
        for key in _EMA_KEYS:
            if isinstance(checkpoint.get(key), Mapping):
                return checkpoint[key]
        raise CheckpointError(
            f"use_ema=True but the checkpoint has no 'model_ema' entry, nor timm's 'state_dict_ema' (keys: "
            f"{_listed(checkpoint)}); load without use_ema"
        )
    for key in ("model", "state_dict"):
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return checkpoint[key]
    if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint)
    raise CheckpointError(
        f"cannot find weights in the checkpoint (keys: {_listed(checkpoint)}); expected a state dict "
        "or a dict with a 'model' entry"
    )


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> tuple[dict, str]:
    """Detect the naming (native, timm, torchvision) and return a new state dict in `model`'s names.

    Pure: the input is not modified. Native covers the official facebookresearch checkpoints and this project's.
    torchvision's ResNet needs no conversion (our ResNet-50 *is* torchvision's module).
    """
    state_dict = {_strip_wrappers(k): v for k, v in state_dict.items()}
    naming = _naming_of(state_dict)
    is_convnext = any(k.startswith("downsample_layers.") for k in model.state_dict())
    if is_convnext and naming == "timm":
        return _from_timm(state_dict), naming
    if is_convnext and any(k.startswith("features.") for k in state_dict):
        return _from_torchvision(state_dict), naming
    return state_dict, naming


def _naming_of(state_dict: Mapping) -> str:
    """Whose names a state dict uses, by its keys alone: a ConvNeXt file given for resnet50 is not torchvision's,
    whatever the model (the format a message names when the file does not fit)."""
    if any(k.startswith(("stem.0.", "stages.0.blocks.")) for k in state_dict):
        return "timm"
    if "conv1.weight" in state_dict or any(k.startswith("features.") for k in state_dict):
        return "torchvision"  # its ResNet (timm's ResNet uses the same names) or its ConvNeXt
    return "native"


def load_checkpoint(
    model: nn.Module, path_or_state_dict: str | Path | Mapping, *, use_ema: bool = False
) -> LoadResult:
    """Load weights strictly; only a head of another shape (another class count) is re-initialised, with a warning.

    A checkpoint that names another model than `model` (create_model's `model_name`) and does not fit says so first;
    the activation is compared only once the weights fit (another model's activation advice would mislead)."""
    checkpoint = (
        path_or_state_dict if isinstance(path_or_state_dict, Mapping) else read_checkpoint(path_or_state_dict)
    )
    other_model = _other_model(model, checkpoint)
    state_dict, source_format = convert_state_dict(select_state_dict(checkpoint, use_ema=use_ema), model)
    expected = model.state_dict()
    missing = sorted(k for k in set(expected) - set(state_dict) if not _is_filled_in_by_torch(k))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        k for k in set(expected) & set(state_dict) if tuple(expected[k].shape) != tuple(state_dict[k].shape)
    )
    head = _head_name(model)
    head_mismatch = [k for k in mismatched if k.startswith(head + ".")]
    other_mismatch = [k for k in mismatched if k not in head_mismatch]
    if missing or unexpected or other_mismatch:
        described = _describe(source_format, missing, unexpected, other_mismatch, expected, state_dict)
        raise CheckpointError(described if other_model is None else f"{other_model}\n{described}")
    _check_activation(model, checkpoint, other_model)
    if head_mismatch:
        key = head_mismatch[0]
        shapes = f"checkpoint {tuple(state_dict[key].shape)}, model {tuple(expected[key].shape)}"
        model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith(head + ".")}, strict=False)
        _reset_head(model, head)
        logger.warning(
            "the checkpoint's head does not fit the model (%s: %s): re-initialised the head '%s' only, "
            "every other weight was loaded from the checkpoint", key, shapes, head,
        )
        return LoadResult(source_format, head_reinitialised=True)
    model.load_state_dict(state_dict, strict=True)
    return LoadResult(source_format, head_reinitialised=False)


def trained_activation(model_name: object, model_kwargs: object) -> str | None:
    """The activation a project checkpoint's weights were trained with: its model_kwargs' (else, for a checkpoint from
    before the activation was recorded, its model's own); None when it records neither, or a model unknown here."""
    recorded = model_kwargs.get("activation") if isinstance(model_kwargs, Mapping) else None
    if recorded is not None or not isinstance(model_name, str):
        return recorded
    try:
        return get_config(model_name).default_activation
    except ValueError:
        return None


def _other_model(model: nn.Module, checkpoint: Mapping) -> str | None:
    """What to say first when a project checkpoint names another model than the one create_model built ("a checkpoint
    of convnext_atto, the model is resnet50: ..."); None when they match, or either is not named."""
    named, built = checkpoint.get("model_name"), getattr(model, "model_name", None)
    if not isinstance(named, str) or not isinstance(built, str) or named == built:
        return None
    return (f"a checkpoint of {named}, the model is {built}: build {named} to load it (create_model({named!r}); "
            f"python -m training / export: --model {named})")


def _check_activation(model: nn.Module, checkpoint: Mapping, other_model: str | None) -> None:
    """A project checkpoint records the activation its weights were trained with (its model_kwargs, else its model's
    own): a model that runs another one has the same weight shapes, would load them strictly, and change every output.
    Official, timm and torchvision files record none (their models' defaults are GELU for ConvNeXt, ReLU for ResNet).
    A model named differently is advised to be the checkpoint's (`other_model`), not to take its activation."""
    name = checkpoint.get("model_name")
    trained = trained_activation(name, checkpoint.get("model_kwargs"))
    if trained not in ACTIVATION_LAYERS:  # none recorded, or a model this version does not know: nothing to compare
        return
    running = sorted(key for key, layer in ACTIVATION_LAYERS.items()
                     if any(isinstance(module, layer) for module in model.modules()))
    if not running or running == [trained]:
        return
    problem = (f"the checkpoint's weights ({name or 'this project'}) were trained with {trained}, and this model runs "
               f"{' and '.join(running)}: loading them would change every output")
    if other_model is not None:
        raise CheckpointError(f"{other_model}; {problem}")
    # A roadmap step's activation is fixed, so there the fix is another step: only said when the model is not named
    # (a named one is the checkpoint's own model here, and a roadmap step of the checkpoint's name has its activation).
    named = isinstance(getattr(model, "model_name", None), str)
    roadmap = "" if named else ", or for a roadmap step, the step it names"
    raise CheckpointError(f"{problem}. Build the model with activation={trained!r} (python -m training / export: "
                          f"--activation {trained}){roadmap}")


def _is_filled_in_by_torch(key: str) -> bool:
    """BatchNorm's `num_batches_tracked` came with PyTorch 0.4.1: files saved before lack it, and BatchNorm's own load
    hook puts it in (strict=True accepts them). The hook does so for a state dict without version metadata, which
    ours always is (convert_state_dict builds a new dict)."""
    return key.endswith(".num_batches_tracked")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def _from_timm(state_dict: dict) -> dict:
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in _TIMM_RULES:
            new_key, count = re.subn(pattern, replacement, key)
            if count:
                key = new_key
                break
        if re.search(r"\.pwconv[12]\.weight$", key) and value.ndim == 4:
            value = value.flatten(1)  # timm's conv_mlp variants (atto..nano): 1x1 Conv2d (O, I, 1, 1) -> Linear (O, I)
        converted[key] = value
    return converted


def _from_torchvision(state_dict: dict) -> dict:
    converted = {}
    for key, value in state_dict.items():
        new_key = key
        if match := re.match(r"^features\.0\.([01])\.(.+)$", key):  # stem: conv + LayerNorm2d
            new_key = f"downsample_layers.0.{match[1]}.{match[2]}"
        elif match := re.match(r"^features\.(\d+)\.(\d+)\.(.+)$", key):
            index, position, rest = int(match[1]), match[2], match[3]
            if index % 2 == 0:  # features.2i = downsampling (LayerNorm2d, Conv2d) before stage i
                new_key = f"downsample_layers.{index // 2}.{position}.{rest}"
            elif rest == "layer_scale":
                new_key, value = f"stages.{index // 2}.{position}.gamma", value.reshape(-1)  # (C, 1, 1) -> (C,)
            elif block := re.match(r"^block\.(\d+)\.(.+)$", rest):
                layer = _TORCHVISION_BLOCK_LAYERS.get(block[1], f"block.{block[1]}")
                new_key = f"stages.{index // 2}.{position}.{layer}.{block[2]}"
        elif match := re.match(r"^classifier\.([02])\.(.+)$", key):
            new_key = f"{'norm' if match[1] == '0' else 'head'}.{match[2]}"
        converted[new_key] = value
    return converted


def _head_name(model: nn.Module) -> str:
    return "head" if isinstance(getattr(model, "head", None), nn.Linear) else "fc"


def _reset_head(model: nn.Module, head: str) -> None:
    if hasattr(model, "reset_head"):
        model.reset_head()  # ConvNeXt: trunc-normal scaled by head_init_scale, as at construction
    else:
        getattr(model, head).reset_parameters()  # torchvision ResNet: nn.Linear's own init


def _listed(names) -> str:
    names = list(names)
    shown = ", ".join(str(n) for n in names[:_MAX_NAMES_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_NAMES_LISTED else "")


def _describe(source_format, missing, unexpected, mismatched, expected, state_dict) -> str:
    lines = [f"checkpoint ({source_format} format) does not fit the model:"]
    if missing:
        lines.append(f"  missing keys: {_listed(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {_listed(unexpected)}")
    if mismatched:
        shapes = [f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(expected[k].shape)})"
                  for k in mismatched]
        lines.append(f"  shape mismatches: {_listed(shapes)}")
    lines.append("check that the checkpoint was made for this model name and options (in_chans, activation, ...)")
    return "\n".join(lines)
