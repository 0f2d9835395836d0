"""Typed configuration: pydantic models with a docstring per field, YAML presets, dotted overrides.

Every stage has a config model (``IngestConfig``, ``PreprocessConfig``, ...). A config is built
from the model's defaults, then a YAML file (a diff on the defaults), then ``key.sub=value``
overrides from the command line; unknown keys are an error, so typos never pass silently. The
resolved config is written into every output folder as ``config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from umit.errors import InputError
from umit.utils.fileio import atomic_write_text

RESOLVED_CONFIG_NAME = "config.yaml"


class UmitConfig(BaseModel):
    """Base for every config model: field docstrings become descriptions, unknown keys fail."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, validate_assignment=True
    )


C = TypeVar("C", bound=UmitConfig)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["a.b=1", "c=[1,2]"]`` into a nested dict; values are parsed as YAML scalars/lists."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise InputError(
                None, f"override {item!r} is not of the form key=value (e.g. workers=4)"
            )
        key, raw = item.split("=", 1)
        if not key or any(not part for part in key.split(".")):
            raise InputError(None, f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as exc:
            raise InputError(None, f"override {item!r}: value is not valid YAML ({exc})") from exc
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InputError(None, f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` over ``base``, merging nested mappings key by key (neither is modified)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


PRESETS_DIR = Path(__file__).resolve().parent / "configs"
"""YAML presets shipped inside the package (``umit/configs/{pretrain,experiments}/*.yaml``)."""


def list_presets() -> list[str]:
    """Shipped presets as ``configs/<group>/<name>.yaml`` (the name ``--config`` accepts)."""
    return sorted(
        f"configs/{p.relative_to(PRESETS_DIR).as_posix()}" for p in PRESETS_DIR.rglob("*.yaml")
    )


def resolve_config_file(path: str | Path) -> Path:
    """A config file path as given, else the shipped preset of that name.

    ``configs/pretrain/mae_vit3d_tiny.yaml`` or ``pretrain/mae_vit3d_tiny.yaml`` finds the preset
    in an installed wheel as well as in a checkout; a file of that name in the working
    directory wins.
    """
    path = Path(path)
    if path.is_file() or path.is_absolute():
        return path
    rel = Path(*path.parts[1:]) if path.parts and path.parts[0] == "configs" else path
    preset = PRESETS_DIR / rel
    return preset if preset.is_file() else path


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping (a file, or a shipped preset by name) with a clear error naming it."""
    path = resolve_config_file(path)
    if not path.is_file():
        raise InputError(
            path, f"config file not found (shipped presets: {', '.join(list_presets())})"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(path, f"not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(path, f"config must be a mapping, got {type(data).__name__}")
    return data


def build_config(
    config_class: type[C],
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
    /,
    **values: Any,
) -> C:
    """Defaults <- YAML file <- ``values`` (named CLI arguments that are not None) <- overrides.

    The first three parameters are positional-only, so settings named ``model`` or
    ``config_file`` can be passed as ``values``.
    """
    data: dict[str, Any] = {}
    if config_file is not None:
        data = load_yaml(config_file)
    data = deep_merge(data, {k: v for k, v in values.items() if v is not None})
    data = deep_merge(data, parse_overrides(overrides or []))
    try:
        return config_class.model_validate(data)
    except ValidationError as exc:
        where = f" (from {config_file})" if config_file else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        )
        raise InputError(None, f"invalid {config_class.__name__}{where}: {problems}") from exc


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: BaseModel, out_dir: str | Path, name: str = RESOLVED_CONFIG_NAME) -> Path:
    """Write the resolved config into ``out_dir`` atomically and return its path."""
    path = Path(out_dir) / name
    atomic_write_text(path, config_text(cfg))
    return path


def config_text(cfg: BaseModel) -> str:
    """The resolved config as the YAML text :func:`save_config` writes."""
    return f"# resolved {type(cfg).__name__} written by umit\n" + yaml.safe_dump(
        config_to_dict(cfg), sort_keys=False
    )
