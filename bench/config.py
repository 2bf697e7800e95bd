"""Resolve a trial's config: method defaults, then ``--set key=value`` overrides, then validation.

Configs are plain dataclasses (one per method); the resolved one is saved as ``args.yaml`` beside every
run, as timm does, and hashed for the leaderboard.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from bench.files import atomic_write
from methods import get_method, list_methods
from methods.base import ROLES, BaseConfig, field_roles

_FRACTION = re.compile(r"^\s*([-+]?[0-9.eE+-]+)\s*/\s*([0-9.eE+-]+)\s*$")


class ConfigError(ValueError):
    """A one-line, user-facing config error."""


def parse_value(text: Any) -> Any:
    """YAML scalars and lists, plus fractions such as ``8/255``."""
    if not isinstance(text, str):
        return text
    m = _FRACTION.match(text)
    if m:
        return float(m.group(1)) / float(m.group(2))
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in typing.get_args(hint):
            return None
        raise ConfigError(f"{name} may not be null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and args:
        hint = args[0]
        origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            value = [value]
        (inner,) = typing.get_args(hint) or (Any,)
        return [_coerce(name, parse_value(v), inner) for v in value]
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError
            return bool(value)
        if hint is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            return float(parse_value(value))
        if hint is str:
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r} is not a valid {getattr(hint, '__name__', hint)}") from None
    return value


def config_fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def resolve_config(method: str, overrides: dict[str, Any] | None = None) -> BaseConfig:
    """Build and validate the config of ``method`` with ``overrides`` applied (values may be strings)."""
    try:
        cls = get_method(method).Config
    except KeyError:
        raise ConfigError(f"unknown method {method!r}; valid: {', '.join(list_methods())}") from None
    fields = config_fields(cls)
    values: dict[str, Any] = {"method": method}
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(f"unknown config field {key!r} for method {method}; valid: {', '.join(sorted(fields))}")
        # str fields take the text as is (YAML would turn "off" into False)
        value = raw if fields[key] is str and isinstance(raw, str) else parse_value(raw)
        values[key] = _coerce(key, value, fields[key])
    cfg = cls(**values)
    try:
        cfg.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cfg


def with_overrides(cfg: BaseConfig, overrides: dict[str, Any]) -> BaseConfig:
    """``cfg`` with some fields changed, coerced and validated as any resolved config."""
    return resolve_config(cfg.method, {**{k: v for k, v in cfg.to_dict().items() if k != "method"}, **overrides})


# Config fields that may hold local paths: a trial of a sweep runs in Tune's own folder, so a relative path is
# made absolute once, in the process the user started, against the folder it was started in.
PATH_FIELDS = ("backbone", "dataset", "target_datasets", "pool_dir", "adapter_path")


def absolute_path(key: str, value: Any, cwd: str | Path | None = None) -> Any:
    """``value`` of config field ``key`` with a relative local path in it made absolute against ``cwd``
    (default: the current folder); anything else unchanged. ``backbone``: the weights of ``NAME@PATH``;
    ``dataset``, ``target_datasets``: a folder holding shards (a name under the shards root stays a name);
    ``pool_dir``, ``adapter_path``: any path but a ``{run_dir}`` template."""
    from data_shards.manifest import MANIFEST
    from data_shards.paths import is_remote

    base = Path(cwd) if cwd is not None else Path.cwd()

    def absolute(p: str) -> str:
        path = Path(p).expanduser()
        return str(path if path.is_absolute() else (base / path).resolve())

    if not isinstance(value, str) and not (key == "target_datasets" and isinstance(value, list)):
        return value
    if key == "backbone" and "@" in value:
        arch, weights = value.split("@", 1)
        return f"{arch}@{absolute(weights)}" if not is_remote(weights) else value
    if key in ("dataset", "target_datasets"):
        def shards(v):
            found = isinstance(v, str) and not is_remote(v) and (base / Path(v).expanduser() / MANIFEST).is_file()
            return absolute(v) if found else v
        return [shards(v) for v in value] if isinstance(value, list) else shards(value)
    if key in ("pool_dir", "adapter_path") and "{" not in value and not is_remote(value):
        return absolute(value)
    return value


def absolute_paths(overrides: dict[str, Any], cwd: str | Path | None = None) -> dict[str, Any]:
    """``overrides`` with :func:`absolute_path` applied to each of :data:`PATH_FIELDS`."""
    return {k: absolute_path(k, v, cwd) if k in PATH_FIELDS else v for k, v in overrides.items()}


def parse_set_args(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_hash(cfg: BaseConfig | dict, *, ignore: tuple[str, ...] = ("seed", "speed")) -> str:
    """Hash of the config fields whose role (``methods.base.ROLES``) is not in ``ignore``; by default the
    settings that determine a result (seed and speed switches left out), as recorded in result.json.

    A dict (a result's ``config``, an args.yaml) is read with the roles of its method's config class; keys
    that are not fields of that class (bookkeeping such as out_dir) are left out. For a method that is no
    longer registered, BaseConfig's roles apply and every other key counts."""
    bad = set(ignore) - set(ROLES)
    if bad:
        raise ValueError(f"ignore={tuple(ignore)}: unknown role(s) {sorted(bad)}; valid: {', '.join(ROLES)}")
    if isinstance(cfg, dict):
        try:
            roles = field_roles(get_method(cfg.get("method")).Config)
        except KeyError:
            roles = {**{k: "result" for k in cfg}, **field_roles(BaseConfig)}
        values = cfg
    else:
        roles, values = field_roles(cfg), cfg.to_dict()
    kept = {k: v for k, v in values.items() if k in roles and roles[k] not in ignore}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:12]


def save_config(cfg: BaseConfig, path: Path) -> None:
    atomic_write(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def load_config(path: Path) -> BaseConfig:
    data = yaml.safe_load(Path(path).read_text())
    return resolve_config(data.pop("method"), data)
