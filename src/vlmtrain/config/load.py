"""YAML + dotted overrides → validated pydantic objects, with errors that name the file and the field.

OmegaConf does the dotlist merging (a kept library); pydantic does typing. What is written here is only the glue
that turns their exceptions into one line per bad field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from vlmtrain.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def parse_overrides(args: list[str]) -> list[str]:
    """Accept `a.b=1`, `--a.b=1` and `--a.b 1`; return an OmegaConf dotlist (`a.b=1`)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        key = a[2:] if a.startswith("--") else a
        if "=" in key:
            out.append(key)
            i += 1
        elif a.startswith("--") and i + 1 < len(args):
            out.append(f"{key}={args[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"override {a!r}: expected key.path=value or --key.path value")
    return out


def load_yaml_with_overrides(path: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"invalid YAML{where}: {getattr(e, 'problem', e)}", source=str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError("top level must be a mapping", source=str(path))
    if overrides:
        data = apply_overrides(data, parse_overrides(overrides), source=str(path))
    return data


def apply_overrides(data: dict[str, Any], dotlist: list[str], source: str | None = None) -> dict[str, Any]:
    """Set each `a.b.c=value` (value parsed as YAML). A mapping or list value *replaces* what was there, so
    `connector.args={}` clears the old connector's arguments instead of merging into them."""
    from omegaconf import OmegaConf  # lazy: omegaconf costs ~45 ms of start-up; only overrides need it
    from omegaconf.errors import OmegaConfBaseException  # lazy: as the line above

    conf = OmegaConf.create(data)
    for item in dotlist:
        key, _, raw = item.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        try:
            OmegaConf.update(conf, key, value, merge=False, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}", source=source) from None
    return OmegaConf.to_container(conf, resolve=True)


def validate(schema: type[T], data: dict[str, Any], source: str | None = None, prefix: str = "") -> T:
    """Validate `data` against `schema`; raise ConfigError with one `field: message` line per problem."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            field = ".".join(p for p in (prefix, loc) if p) or "(top level)"
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            problems.append(f"{field}: {msg}")
        raise ConfigError(problems, source=source) from None


def load_model_config(path: str | Path, overrides: list[str] | None = None):
    """Load a model config from a model YAML, or from a stage/recipe YAML with a `model:` section.

    `model:` may be inline or a path to a model YAML (relative to the referring file, then to the CWD).
    Overrides address the model's fields (`connector.name=linear`), with or without a leading `model.`.
    """
    from vlmtrain.config.model import ModelConfig, NativeModelConfig, is_native_config

    path = Path(path)
    data = load_yaml_with_overrides(path, None)
    prefix = ""
    if "model" in data and isinstance(data["model"], (dict, str)):
        prefix = "model"
        ref = data["model"]
        if isinstance(ref, str):
            cand = [path.parent / ref, Path(ref)]
            found = next((c for c in cand if c.is_file()), None)
            if found is None:
                raise ConfigError(f"model: file not found: {ref}", source=str(path))
            path, data, prefix = found, load_yaml_with_overrides(found), ""
        else:
            data = ref
    if overrides:
        data = apply_overrides(data, [o.removeprefix("model.") for o in parse_overrides(overrides)], str(path))
    if is_native_config(data):
        pre = data.get("pretrained")
        if isinstance(pre, str) and not Path(pre).is_absolute() and (path.parent / pre).is_dir():
            data = {**data, "pretrained": str((path.parent / pre).resolve())}  # relative to the YAML
        return validate(NativeModelConfig, data, source=str(path), prefix=prefix)
    return validate(ModelConfig, data, source=str(path), prefix=prefix)
