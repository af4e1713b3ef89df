"""Command line and YAML -> a validated `Config`.

    train.py --ds_config ds_configs/zero3.json [--preset NAME] [--config FILE.yaml]
             [--output_dir DIR] [--max_steps N] [--resume auto|none|PATH] [--any.dotted.key VALUE ...]

Merge order: dataclass defaults < preset < YAML file < command line. Unknown keys, values of the
wrong type and impossible values raise ConfigError naming the key and the value.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import types
import typing

import yaml

from .config import DEFAULT_PRESET, PRESETS, Config, ConfigError

SHORTCUTS = {"output_dir": "train.output_dir", "max_steps": "train.max_steps", "resume": "train.resume"}


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value, typ):
    """Convert `value` (from YAML or a command-line string) to `typ`, or raise ConfigError."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = typing.get_args(typ)
        if len(items) != len(inner):
            raise ConfigError(f"{key}={value!r}: expected {len(inner)} comma-separated values")
        return tuple(_coerce(key, v, t) for v, t in zip(items, inner))
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}={value!r}: expected true or false")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected an integer") from None
        if f != int(f):
            raise ConfigError(f"{key}={value!r}: expected an integer")
        return int(f)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r}: expected a number") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r}: expected a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def _merge(tree: dict, updates: dict, prefix: str = "") -> None:
    """Merge nested `updates` into the nested dict `tree`, rejecting unknown keys."""
    for k, v in updates.items():
        key = f"{prefix}{k}"
        if k not in tree:
            while isinstance(v, dict) and v:  # name the whole dotted key the user wrote
                k2, v = next(iter(v.items()))
                key += f".{k2}"
            raise ConfigError(f"unknown config key {key!r}")
        if isinstance(tree[k], dict):
            if not isinstance(v, dict):
                raise ConfigError(f"{key}={v!r}: expected a mapping of {sorted(tree[k])}")
            _merge(tree[k], v, key + ".")
        else:
            tree[k] = v


def _build(cls, values: dict, prefix: str = ""):
    """Instantiate dataclass `cls` from a nested dict, coercing every leaf to its field type."""
    types_ = _field_types(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        v = values[f.name]
        if dataclasses.is_dataclass(types_[f.name]):
            kwargs[f.name] = _build(types_[f.name], v, key + ".")
        else:
            kwargs[f.name] = _coerce(key, v, types_[f.name])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        # sub-configs name their own keys without the section: add it
        if prefix and not msg.startswith(prefix) and msg.split("=")[0] in {f.name for f in dataclasses.fields(cls)}:
            msg = prefix + msg
        raise ConfigError(msg) from None


def defaults_tree() -> dict:
    return dataclasses.asdict(Config())


def dotted_to_nested(pairs: dict[str, object]) -> dict:
    out: dict = {}
    for key, v in pairs.items():
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"unknown config key {key!r}")
        node[parts[-1]] = v
    return out


def make_config(preset: str | None = None, yaml_file: str | None = None,
                overrides: dict[str, object] | None = None) -> Config:
    tree = defaults_tree()
    name = preset or DEFAULT_PRESET
    if name not in PRESETS:
        raise ConfigError(f"preset={name!r}: unknown; known presets: {sorted(PRESETS)}")
    _merge(tree, copy.deepcopy(PRESETS[name]))
    if yaml_file:
        try:
            with open(yaml_file) as f:
                loaded = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"config={yaml_file!r}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config={yaml_file!r}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config={yaml_file!r}: expected a mapping at the top level")
        loaded.pop("preset", None)
        _merge(tree, loaded)
    if overrides:
        _merge(tree, dotted_to_nested(overrides))
    return _build(Config, tree)


def parse_args(argv: list[str] | None = None) -> tuple[Config, str]:
    """-> (config, preset name). Raises ConfigError for any bad input."""
    ap = argparse.ArgumentParser(prog="qstar_ds/train.py", add_help=True,
                                 description="Quiet-STaR training with DeepSpeed ZeRO-3.")
    ap.add_argument("--ds_config", help="DeepSpeed JSON config")
    ap.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of {sorted(PRESETS)}")
    ap.add_argument("--config", help="YAML file of overrides")
    ap.add_argument("--output_dir")
    ap.add_argument("--max_steps")
    ap.add_argument("--resume", help="auto | none | PATH")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = ap.parse_known_args(argv)
    overrides: dict[str, object] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if not tok.startswith("--") or len(tok) == 2:
            raise ConfigError(f"unexpected argument {tok!r}: overrides look like --section.key VALUE")
        key, eq, val = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                raise ConfigError(f"--{key}: missing value")
            val = rest[i + 1]
            i += 1
        overrides[key] = val
        i += 1
    for short, full in SHORTCUTS.items():
        if getattr(args, short) is not None:
            overrides[full] = getattr(args, short)
    if args.ds_config is not None:
        overrides["ds_config"] = args.ds_config
    return make_config(args.preset, args.config, overrides), args.preset


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (the attribute-docstring convention)."""
    import ast
    import inspect
    import textwrap
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    return {a.target.id: " ".join(b.value.value.split()) for a, b in zip(body, body[1:])
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and isinstance(b, ast.Expr)
            and isinstance(b.value, ast.Constant) and isinstance(b.value.value, str)}


def add_dataclass_options(ap: argparse.ArgumentParser, cls, names: list[str] | None = None,
                          defaults: dict | None = None) -> None:
    """--<field> options for the fields `names` (default: all) of dataclass `cls`: the dataclass
    is the one source of their types, defaults (`defaults` overrides some) and help texts. A list
    field is repeatable; a value of the wrong type fails in argparse, naming the option."""
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        default = (defaults or {}).get(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory())
        typ = hints[f.name]
        if typing.get_origin(typ) is list:
            ap.add_argument(f"--{f.name}", action="append", default=default, help=docs.get(f.name))
            continue
        convert = lambda v, k=f.name, t=typ: _coerce(k, v, t)   # noqa: E731
        convert.__name__ = getattr(typ, "__name__", str(typ))    # argparse names it in its error
        ap.add_argument(f"--{f.name}", type=convert, default=default, help=docs.get(f.name))


def from_options(cls, args: argparse.Namespace, **overrides):
    """Dataclass `cls` built from the parsed options of its fields (others keep their defaults)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
