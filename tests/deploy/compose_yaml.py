"""Helpers for the deployment tests: the project root, and compose files read the way Docker Compose reads them."""
from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


class ComposeLoader(yaml.SafeLoader):
    """YAML as Docker Compose reads it: `!reset` / `!override` tags mark how an override file merges."""


class Reset:
    def __init__(self, value):
        self.value = value


class Override:
    def __init__(self, value):
        self.value = value


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset(None))
ComposeLoader.add_constructor(
    "!override",
    lambda loader, node: Override(
        loader.construct_mapping(node, deep=True) if isinstance(node, yaml.MappingNode)
        else loader.construct_sequence(node, deep=True) if isinstance(node, yaml.SequenceNode)
        else loader.construct_scalar(node)
    ),
)


def seconds(duration: str) -> float:
    """A Compose duration ('75s', '2m', '500ms') in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    for suffix in ("ms", "s", "m", "h"):
        if duration.endswith(suffix):
            return float(duration[: -len(suffix)]) * units[suffix]
    raise ValueError(duration)


def load_compose(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def merge_compose(base, override):
    """Compose's merge rules for the parts used here: mappings merge key by key, `!reset` removes, others replace."""
    if isinstance(override, Reset):
        return None
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge_compose(base.get(key), value)
            if result is None and isinstance(value, Reset):
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


def strip_tags(value):
    """An override file as plain data (for schema validation): `!reset` -> null, `!override` -> its value."""
    if isinstance(value, Reset):
        return None
    if isinstance(value, Override):
        return strip_tags(value.value)
    if isinstance(value, dict):
        return {k: strip_tags(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_tags(v) for v in value]
    return value


class MissingVariable(ValueError):
    """A `${VAR:?message}` whose variable is unset or empty: Compose refuses the whole file with the message."""


_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<name>\w+)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def interpolate(value, env: dict[str, str]):
    """`value` (a compose document or part of one) with ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error},
    ${VAR?error}, ${VAR:+alternative}, $VAR and $$ substituted from `env`, as Compose does before it reads the file."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        op, arg = match["op"] or "", match["arg"] or ""
        current = env.get(name, "")
        present = name in env and (current != "" or not op.startswith(":"))  # `:` also refuses an empty value
        if op in (":-", "-"):
            return current if present else arg
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current
        if op in (":+", "+"):
            return arg if present else ""
        return current

    return _VARIABLE.sub(substitute, value)


def container_environment(document: dict, service: str, shell: dict[str, str]) -> dict[str, str]:
    """The environment `service`'s container starts with: the file interpolated from `shell` (the shell and .env); a
    variable given no value passes the shell's through, and is unset when the shell has none."""
    environment = interpolate(document, shell)["services"][service]["environment"]
    return {name: shell[name] if value is None else str(value) for name, value in environment.items()
            if value is not None or name in shell}
