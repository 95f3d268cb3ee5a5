"""Typed configs: pydantic models, filled from defaults < YAML file < command-line flags.

Each command owns one flat config class. `add_config_args` turns its fields into
`--field-name` flags (so `--help` lists every setting with its default and description),
and `resolve_config` merges a YAML file and the flags that were actually given.
Unknown keys and wrong types fail with a message naming the key.
"""

from __future__ import annotations

import argparse
import json
import types
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

C = TypeVar("C", bound=BaseModel)


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class ConfigError(ValueError):
    pass


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional_bool(ann: Any) -> bool:
    """`bool | None` (None = decided later, e.g. bf16 by the hardware)."""
    return get_origin(ann) in (Union, types.UnionType) and set(get_args(ann)) == {bool, type(None)}


def add_config_args(parser: argparse.ArgumentParser, cls: type[Config]) -> None:
    parser.add_argument("--config", type=Path, default=None, help="YAML file with settings (flags override it)")
    for name, field in cls.model_fields.items():
        if field.is_required():
            tail = " (required)"
        else:
            tail = f" (default: {field.default if field.default_factory is None else field.default_factory()!r})"
        # argparse %-formats help strings: a literal '%' in a description must be doubled
        help_text = ((field.description or "") + tail).replace("%", "%%")
        ann = field.annotation
        if ann is bool or _optional_bool(ann):
            # --flag / --no-flag, default None so we can tell "given" from "not given"
            parser.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif getattr(ann, "__origin__", None) is list or ann is list:
            parser.add_argument(_flag(name), dest=name, action="append", default=None, help=help_text + "; repeat the flag for several")
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)


def resolve_config(cls: type[C], args: argparse.Namespace | None = None, yaml_path: Path | None = None, **overrides: Any) -> C:
    """defaults < YAML < flags given on the command line < keyword overrides."""
    values: dict[str, Any] = {}
    yaml_path = yaml_path or (getattr(args, "config", None) if args is not None else None)
    if yaml_path is not None:
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {yaml_path}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{yaml_path}: invalid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    if args is not None:
        for name in cls.model_fields:
            v = getattr(args, name, None)
            if v is not None:
                values[name] = v
    values.update(overrides)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"invalid {cls.__name__}: " + "; ".join(lines)) from None


def dump_config(cfg: Config, path: Path) -> None:
    """Write the resolved config (what actually ran) as YAML."""
    path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
