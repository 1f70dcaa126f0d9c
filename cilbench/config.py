"""Typed configuration: dataclasses with defaults, loaded from plain dicts with strict checking.

Every config object in cilbench (protocol card, training budget, method options) is a dataclass. `build`
turns a nested dict (from YAML or `--set key=value`) into that dataclass, rejecting unknown keys and
ill-typed values with a message that names the source file and the dotted key.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from cilbench.errors import UserError
from cilbench.safeio import safe_yaml_load, safe_yaml_loads  # noqa: F401  (the bounded YAML readers, for callers)

INT_LIMIT = 2 ** 63 - 1   # every int key must fit a 64-bit tensor / numpy seed arithmetic


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


# a decimal number in any ordinary notation: 1e-3, 1E-3, .5, 5., +2.5e+3 (YAML 1.1 reads the ones without a
# dot, or with an unsigned exponent, as strings)
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _float_text(value: Any) -> Any:
    """A string that is an ordinary decimal number becomes that float; anything else comes back as it was."""
    if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    """Check `value` against annotation `tp`, converting the harmless cases (int -> float).

    `where` names the source (a card file, "--set ..."), `key` the dotted key inside it."""
    origin = get_origin(tp)
    fail = lambda what: UserError(f"{where}: key '{key}': expected {what}, got {value!r}")  # noqa: E731
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, key)
            except UserError:
                pass
        raise fail(" or ".join(_type_name(o) for o in options if o is not type(None)))
    if origin is Literal:
        if isinstance(value, bool) and ("on" if value else "off") in get_args(tp):
            value = "on" if value else "off"   # YAML 1.1 reads a bare on/off as a boolean
        if value not in get_args(tp):
            raise fail(f"one of {_type_name(tp)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail("a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_coerce(v, item_tp, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise fail("a mapping")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, where, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail(f"a mapping of {tp.__name__} options")
        return build(tp, value, where, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) > INT_LIMIT:
                raise fail("an integer of at most 64 bits")
            return value
    elif tp is float:
        value = _float_text(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise fail("a finite number")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise fail(_type_name(tp))


def build(cls: type, data: dict | None, where: str, prefix: str = "") -> Any:
    """Instantiate dataclass `cls` from `data`; unknown keys and wrong types raise UserError naming the
    source `where` and the dotted key (`prefix` is the key path of a nested section)."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise UserError(f"{where}: unknown key '{prefix}{unknown[0]}'{did_you_mean(unknown[0], fields, prefix)} "
                        f"(known in {prefix.rstrip('.') or 'this section'}: {', '.join(sorted(fields))})")
    missing = [name for name, f in fields.items() if name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise UserError(f"{where}: missing key '{prefix}{missing[0]}'; add it to the card or give it with "
                        f"--set {prefix}{missing[0]}=<value>")
    kwargs = {name: _coerce(value, hints[name], where, f"{prefix}{name}") for name, value in data.items()}
    obj = cls(**kwargs)
    check_bounds(obj, where, prefix)
    check = getattr(obj, "validate", None)
    if check is not None:   # messages read "<source>: <section>...", e.g. "--set: tsd_grc.n_extractors: ..."
        check(f"{where}: {prefix.rstrip('.')}" if prefix else where)
    return obj


def _declared_bounds(cls: type) -> dict:
    """{field: (low, high)} from the `BOUNDS` ClassVar and from each field's `option(..., bounds=...)` metadata
    (the ClassVar wins where both name a field)."""
    declared = {f.name: tuple(f.metadata["bounds"]) for f in dataclasses.fields(cls)
                if f.metadata.get("bounds") is not None} if dataclasses.is_dataclass(cls) else {}
    declared.update(getattr(cls, "BOUNDS", {}))
    return declared


def did_you_mean(name: str, known, prefix: str = "") -> str:
    """" (did you mean 'x'?)" for the closest known name, or an empty string when none is close."""
    import difflib
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def check_bounds(obj: Any, where: str, prefix: str = "") -> None:
    """Range checks declared on the config class: `BOUNDS: ClassVar[dict] = {"total": (0, None)}` or a field's
    `option(..., bounds=(0, None))` means 0 <= total (inclusive; None = unbounded; a callable is asked for the
    bound when checked). Applies to every list item too. A config class states its ranges once here instead of
    each check being an `if`."""
    for name, (low, high) in _declared_bounds(type(obj)).items():
        high = high() if callable(high) else high      # a bound of this machine (threads: its cores)
        low = low() if callable(low) else low
        value = getattr(obj, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is None or isinstance(item, (str, bool)):
                continue
            if (low is not None and item < low) or (high is not None and item > high):
                rng = (f"between {low} and {high}" if low is not None and high is not None
                       else f">= {low}" if low is not None else f"<= {high}")
                raise UserError(f"{where}: key '{prefix}{name}': must be {rng}, got {item!r}")


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dict (for config.yaml and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(tree: Any, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: nested mappings as dotted keys (leaves keep their values)."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=0.05' -> (['train', 'lr'], 0.05). The value is read as YAML so types come out right."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set train.lr=0.05")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise UserError(f"--set {'.'.join(path)}: '{part}' is not a section")
        node = nxt
    node[path[-1]] = value


def load_yaml(path: str) -> dict:
    data = safe_yaml_load(path)   # bounded: no alias bombs, UTF-8 only, one-line errors naming the file
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping at the top level")
    return data
