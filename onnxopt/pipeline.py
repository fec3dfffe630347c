"""Pipelines: ``-p NAME[:key=value,...]`` strings or a TOML file -> configured passes.

CLI syntax: ``-p prune-channels:ratio=0.3,exclude=conv1,stem*`` — items are split on commas; an item without ``=``
continues the previous option's value (so list values may contain commas). Option values are converted to the types of
the pass's Options dataclass: bool (true/false/1/0/yes/no), int, float, str, Literal choices, tuples (comma-separated),
and ``dict[str, float]`` (``pattern:value`` items).

TOML syntax::

    [[pass]]
    name = "fold-bn"

    [[pass]]
    name = "prune-channels"
    ratio = 0.3
    exclude = ["conv1"]
"""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from onnxopt.errors import OptionsError
from onnxopt.pass_base import Pass
from onnxopt.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PIPELINE = ("fold-bn", "cleanup")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """``"name:a=1,b=x,y"`` -> ``("name", {"a": "1", "b": "x,y"})``."""
    name, _, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise OptionsError(f"bad pass spec {spec!r}: expected NAME[:key=value,...]")
    opts: dict[str, str] = {}
    last: str | None = None
    for item in rest.split(",") if rest.strip() else []:
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise OptionsError(f"bad pass spec {spec!r}: empty option name in {item!r}")
            if key in opts:
                raise OptionsError(f"bad pass spec {spec!r}: option {key!r} given twice")
            opts[key] = value.strip()
            last = key
        elif last is not None:
            opts[last] += "," + item.strip()
        else:
            raise OptionsError(f"bad pass spec {spec!r}: {item!r} is not key=value")
    return name, opts


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in ("none", ""))):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except OptionsError as e:
                errors.append(str(e))
        raise OptionsError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = get_args(tp)
        for c in choices:
            if value == c or (isinstance(value, str) and str(c) == value):
                return c
        raise OptionsError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        s = str(value).lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise OptionsError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise OptionsError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value) if not isinstance(value, float) or value.is_integer() else int("x")
        except (TypeError, ValueError):
            raise OptionsError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise OptionsError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise OptionsError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise OptionsError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin is tuple:
        args = get_args(tp)
        item_tp = args[0] if args else str
        items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
        return tuple(_convert(v.strip() if isinstance(v, str) else v, item_tp, where) for v in items)
    if origin is dict:
        kt, vt = get_args(tp)
        if isinstance(value, dict):
            pairs = list(value.items())
        else:
            pairs = []
            for item in str(value).split(","):
                if not item.strip():
                    continue
                k, sep, v = item.rpartition(":")
                if not sep:
                    raise OptionsError(f"{where}: expected pattern:value items, got {item!r}")
                pairs.append((k.strip(), v.strip()))
        return {_convert(k, kt, where): _convert(v, vt, where) for k, v in pairs}
    raise OptionsError(f"{where}: unsupported option type {tp!r}")


def build_options(cls: type[Pass], raw: dict[str, Any]) -> Any:
    """Convert raw option values (strings from the CLI or TOML values) into ``cls.Options``."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    unknown = sorted(k for k in raw if k not in fields)
    if unknown:
        raise OptionsError(
            f"pass {cls.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(fields)) or '(none)'}"
        )
    hints = get_type_hints(cls.Options, include_extras=False)
    kwargs = {k: _convert(v, hints[k], f"{cls.name}:{k}") for k, v in raw.items()}
    try:
        return cls.Options(**kwargs)
    except (TypeError, ValueError) as e:
        raise OptionsError(f"pass {cls.name!r}: {e}") from e


def from_specs(specs: list[str] | tuple[str, ...], registry: Registry) -> list[Pass]:
    passes = []
    for spec in specs:
        name, raw = split_spec(spec)
        cls = registry.get(name)
        passes.append(cls(build_options(cls, raw)))
    return passes


def from_toml(path: str | Path, registry: Registry) -> list[Pass]:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise OptionsError(f"--config {p}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise OptionsError(f"--config {p}: not valid TOML: {e}") from e
    unknown = sorted(set(doc) - {"pass"})
    if unknown:
        raise OptionsError(f"--config {p}: unknown table(s) {', '.join(unknown)}; expected [[pass]] entries")
    entries = doc.get("pass", [])
    if not isinstance(entries, list) or not entries:
        raise OptionsError(f"--config {p}: expected one or more [[pass]] tables")
    passes = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "name" not in entry:
            raise OptionsError(f"--config {p}: [[pass]] #{i} has no name")
        raw = {k.replace("-", "_"): v for k, v in entry.items() if k != "name"}
        cls = registry.get(str(entry["name"]))
        passes.append(cls(build_options(cls, raw)))
    return passes


def describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, get_args(tp)))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in get_args(tp) if a is not type(None)) + " (optional)"
    if origin is tuple:
        return "list of " + describe_type(get_args(tp)[0] if get_args(tp) else str)
    if origin is dict:
        return "pattern:value list"
    return getattr(tp, "__name__", str(tp))


def options_table(cls: type[Pass]) -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) rows for ``onnxopt passes``."""
    hints = get_type_hints(cls.Options)
    rows = []
    for f in dataclasses.fields(cls.Options):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "(required)"
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) or "(none)"
        rows.append((f.name, describe_type(hints[f.name]), str(default), f.metadata.get("help", "")))
    return rows


__all__ = [
    "DEFAULT_PIPELINE", "split_spec", "build_options", "from_specs", "from_toml", "options_table",
]
