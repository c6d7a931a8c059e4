"""Service settings: one immutable object, from CONVNEXT_* environment variables, overridden by CLI flags."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from convnext_common import usable_cpus
from runtime.decode import FAST_DECODE_HEADROOM, HEADROOM_RANGE
from runtime.decode_memory import common_peak_bytes
from runtime.preprocess import PILLOW_MAX_PIXELS

# What an API key may hold: a header carries these bytes the same from every client (RFC 9110 field-value, no spaces).
VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
# A DNS name as a Host header carries it (underscores too: a compose service may have one), lower case.
HOST_NAME = re.compile(r"[a-z0-9_-]+(?:\.[a-z0-9_-]+)*")
C_INT_MAX = 2**31 - 1  # settings that reach a C int (grpc core's channel args, listen(), the engines' thread counts)


def _key_from_file(data: dict, name: str) -> dict:
    """data with `name` read from `name`_file when that is set, and stripped either way (a secret made with
    `kubectl create secret --from-file` ends in the file's newline, in a variable too); a ValueError for both, an
    unreadable file, "", or a character no header can carry as it is."""
    file_name = f"{name}_file"
    origin = f"CONVNEXT_{name.upper()}"
    if data.get(file_name) is not None:
        if data.get(name) is not None:
            raise ValueError(f"set {name} or {file_name}, not both")
        origin = f"CONVNEXT_{file_name.upper()} ({data[file_name]})"
        try:
            data = {**data, name: Path(data[file_name]).read_bytes().decode("ascii")}
        except OSError as err:
            raise ValueError(f"{file_name}: cannot read {data[file_name]} ({err.strerror}); point it at the file "
                             "holding the key") from None
        except UnicodeDecodeError:  # its message would quote a byte of the key
            raise ValueError(not_a_header_key(origin)) from None
    key = data.get(name)
    if key is None:
        return data
    key = (key.get_secret_value() if isinstance(key, SecretStr) else str(key)).strip()
    if not key:
        raise ValueError(f"{name} is empty; set a key, or leave it unset")
    if not VISIBLE_ASCII.fullmatch(key):
        raise ValueError(not_a_header_key(origin))
    return {**data, name: key}


def not_a_header_key(origin: str) -> str:
    return (f"{origin}: the key holds a space, a control or a non-ASCII character, which request headers do not carry "
            "alike (browsers send Latin-1, curl UTF-8: the key would never match); use visible ASCII only (letters, "
            "digits, punctuation), e.g. `openssl rand -hex 32`")


class Settings(BaseSettings):
    # hide_input_in_errors: a validation error never prints the api_key it was given. allow_inf_nan: no float setting
    # takes inf or nan (an infinite timeout would end the start in a traceback, once the model is loaded).
    model_config = SettingsConfigDict(env_prefix="CONVNEXT_", frozen=True, extra="forbid", hide_input_in_errors=True,
                                      allow_inf_nan=False)

    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(8000, ge=0, le=65535, description="listen port")
    grpc_port: int = Field(8001, ge=0, le=65535, description=(
        "the Open Inference Protocol over gRPC (inference.GRPCInferenceService, as Triton's) listens on host:grpc_port "
        "with the same API key, limits and batcher as HTTP; 0: no gRPC server"))
    repository: str = Field("models", description="model repository root")
    model: str | None = Field(None, description="model name in the repository (default: the first model)")
    version: int | None = Field(None, ge=1, description="model version to serve (default: the latest)")
    engine: Literal["onnxruntime", "tensorrt", "openvino", "auto"] = Field(
        "onnxruntime", description="tensorrt builds and caches its engine on first start; openvino runs on CPU; auto: "
        "the faster fp32 CPU engine, ONNX Runtime or OpenVINO, measured on the served model at start (README)")
    provider: Literal["cpu", "cuda", "tensorrt"] = Field(
        "cpu", description="ONNX Runtime execution provider; a GPU provider that does not load stops the start")
    precision: Literal["fp32", "fp16", "bf16", "int8"] = Field("fp32", description="artifact precision to serve")
    max_batch_size: int = Field(8, ge=1, description=(
        "images per engine batch; on CPU 8 already saturates the cores and larger batches only add latency "
        "(on 2 cores, 2 is better still: README, Settings)"))
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="how long a batch stays open while more requests keep arriving")
    queue_size: int = Field(256, ge=1, description="queued images before 503 queue_full")
    intra_op_threads: int = Field(default_factory=usable_cpus, ge=1, le=C_INT_MAX, description=(
        "ONNX Runtime threads (OpenVINO's inference_num_threads); default: the CPUs this process may run on"))
    ort_spinning: bool = Field(True, description=(
        "ONNX Runtime CPU threads spin-wait between ops: a lone ConvNeXt-T request is ~2.5 ms faster here; off, "
        "idle engine threads sleep and leave the cores to image decoding (~2% more images/s at saturation on 2 cores)"))
    ort_streams: int = Field(1, ge=1, description=(
        "ONNX Runtime CPU: batches run at once on the one session, sharing its intra_op_threads (each batch's own "
        "thread plus the pool's); 2 on 2 cores keeps both busy while images decode (more images/s under load, "
        "README) but runs a lone request on one core"))
    access_log: bool = Field(True, description=(
        "one line per HTTP request on stdout (uvicorn's format), written by a thread off the event loop"))
    request_timeout_ms: float = Field(30_000.0, gt=0, description=(
        "per-request deadline, from when the body has arrived to the answer, decoding included (504 deadline)"))
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1, le=C_INT_MAX, description="request body limit (413 above it)")
    max_buffered_body_bytes: int = Field(256 * 1024 * 1024, ge=1, description=(
        "request bodies held in memory at once, all requests together, counted as they arrive, with what they become "
        "(decompressed, a form's files); beyond it, 503 body_buffer_full + Retry-After (max_connections x "
        "max_body_bytes could exceed the container's memory); at least twice max_body_bytes"))
    grpc_messages_per_client: int = Field(4, ge=0, description=(
        "gRPC request messages one client address may have arriving at once, each holding max_body_bytes of "
        "max_buffered_body_bytes until it has arrived; its further calls wait, holding none, until one of its messages "
        "has arrived or its call ended: a client that opens calls and sends nothing holds at most this many "
        "messages' room (0: no per-client limit; raise it behind a proxy, whose calls all come from one address)"))
    max_pixels: int = Field(40_000_000, ge=1, le=PILLOW_MAX_PIXELS, description=(
        "decompression-bomb limit per image (413 too_many_pixels); at most 89,478,485, Pillow's own limit, which also "
        "guards what Pillow allocates while it reads a header (README)"))
    decode_memory_mb: int = Field(1024, ge=1, description=(
        "MiB that images being decoded may hold at once, all requests together (each reserves its peak, known from "
        "its header: ~4 bytes a pixel for a JPEG, 8 for an RGB or RGBA PNG); an image waits for its share within the "
        "request's deadline (504) or until its client leaves (499), one that needs more than all of it is refused "
        "(413 too_many_pixels); at least 8 bytes x max_pixels + 5 MiB"))
    max_files_per_request: int = Field(32, ge=1, description="multipart files per request (413 too_many_files)")
    preprocess_workers: int = Field(default_factory=usable_cpus, ge=1, description=(
        "decode/transform threads; default: the CPUs this process may use (its affinity mask)"))
    warmup_runs: int = Field(2, ge=0, description="warm-up runs at batch 1 and at max batch before ready")
    # The HTTP edge (service/security.py, service/server.py).
    api_key: SecretStr | None = Field(None, description=(
        "when set, endpoints (except the open ones) need `Authorization: Bearer <key>` or `X-API-Key: <key>`; visible "
        "ASCII only, surrounding whitespace stripped; no flag, as a command line is visible to every user of the host"))
    api_key_file: str | None = Field(None, description="a file holding the api key (a mounted secret), not both")
    admin_api_key: SecretStr | None = Field(None, description=(
        "when set, /admin/* needs this key instead of api_key (inference keys cannot reload the model); no flag"))
    admin_api_key_file: str | None = Field(None, description="a file holding the admin api key, not both")
    cors_origins: list[str] = Field([], description="JSON list of browser origins allowed; empty: no CORS headers")
    allowed_hosts: str = Field("", description=(
        "comma-separated host names that /admin answers to while it needs no key (neither api_key nor admin_api_key "
        "set), e.g. the Kubernetes Service's or the compose service's name; an IP address or localhost always passes, "
        "another Host, or a browser's Origin naming another site, gets 403 host_not_allowed: a web page can reach the "
        "service under its own site's name by DNS rebinding (README, Security)"))
    header_timeout_s: float = Field(
        10.0, gt=0, description="request headers (gRPC: the HTTP/2 preface) complete within this, or the connection "
        "closes")
    body_timeout_s: float = Field(30.0, gt=0, description="each chunk of a request body within this, or 408")
    body_deadline_s: float = Field(120.0, gt=0, description=(
        "the whole request body within this, or 408 (a client sending a byte per body_timeout_s holds its connection "
        "and buffer no longer)"))
    max_connections: int = Field(512, ge=1, le=C_INT_MAX, description="open connections; beyond this, 503 at once")
    backlog: int = Field(2048, ge=1, le=C_INT_MAX, description="listen backlog")
    timeout_keep_alive_s: float = Field(5.0, gt=0, description="idle keep-alive connections (gRPC: without a call) "
                                        "close after this")
    engine_timeout_ms: float = Field(10_000.0, gt=0, description=(
        "a batch running longer is failed (504) and its engine abandoned and rebuilt: keep it well above a batch's "
        "normal time (TensorRT's first batch on a cold GPU included)"))
    engine_max_consecutive_failures: int = Field(
        5, ge=1, description="failed batches in a row before the engine is rebuilt")
    engine_max_rebuild_attempts: int = Field(5, ge=1, description=(
        "failed rebuilds in a row of a broken engine before /healthz answers 503, so the orchestrator restarts the "
        "container: a sticky GPU fault outlives every rebuild inside the process (rebuilds go on meanwhile)"))
    watch_interval_s: float = Field(
        0.0, ge=0, description=("poll the repository this often for a newer version (none while `version` pins one) "
                                "or the served one exported again; 0: off"))
    decode_mode: Literal["exact", "fast"] = Field(
        "exact", description="exact: training's transform bit for bit; fast: large JPEGs decode at 1/2-1/8 scale in "
        "the DCT (short side kept >= fast_decode_headroom x the resize target), then the same resize + crop (README, "
        "Settings)")
    fast_decode_headroom: float = Field(
        FAST_DECODE_HEADROOM, ge=HEADROOM_RANGE[0], le=HEADROOM_RANGE[1], description=(
            "decode_mode fast: a JPEG's decoded short side stays >= this x the model's resize target. 2: 12-MP photos "
            "decode at 1/4 scale, 97.9% top-1 agreement with exact on real photos; 1: at 1/8, the least work, 88.7% "
            "(README, Fast decoding)"))
    openvino_performance_hint: Literal["LATENCY", "THROUGHPUT"] = Field(
        "LATENCY", description="--engine openvino: LATENCY runs each batch on every thread, one batch at a time; "
        "THROUGHPUT splits the cores into streams and the batcher keeps as many batches in flight as OpenVINO's "
        "optimal number of infer requests")

    @field_validator("allowed_hosts")
    @classmethod
    def _host_names(cls, value: str) -> str:
        """Lower case, without a trailing dot (as service.security compares a Host), comma-separated."""
        names = [name.strip().lower().removesuffix(".") for name in value.split(",") if name.strip()]
        for name in names:
            if not HOST_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a host name: list names only, no scheme, port or wildcard, "
                                 "comma-separated (e.g. convnext-serve,convnext-serve.default.svc.cluster.local)")
        return ",".join(names)

    @model_validator(mode="after")
    def _ports_differ(self):
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"port and grpc_port are both {self.port}: HTTP and gRPC need a port each (grpc_port 0: "
                             "no gRPC server)")
        return self

    @model_validator(mode="after")
    def _one_body_fits_the_buffer(self):
        if self.max_buffered_body_bytes < 2 * self.max_body_bytes:
            raise ValueError(f"max_buffered_body_bytes ({self.max_buffered_body_bytes}) is under twice max_body_bytes "
                             f"({self.max_body_bytes}): a multipart body of the allowed size, held with its files, "
                             "could never be read")
        return self

    @model_validator(mode="after")
    def _largest_image_fits_the_decode_budget(self):
        needed_mb = math.ceil(common_peak_bytes(self.max_pixels) / 2**20)
        if self.decode_memory_mb < needed_mb:
            raise ValueError(f"decode_memory_mb ({self.decode_memory_mb}) is under {needed_mb}: a PNG with alpha or "
                             f"a rotated JPEG of max_pixels ({self.max_pixels}) could never be decoded")
        return self

    @model_validator(mode="before")
    @classmethod
    def _read_api_key_files(cls, data):
        """<key>_file (a path the operator gives, e.g. a Docker/K8s secret) holds api_key / admin_api_key; empty keys
        are refused."""
        if not isinstance(data, dict):
            return data
        for name in ("api_key", "admin_api_key"):
            data = _key_from_file(data, name)
        return data
