"""What a config field accepts, and setting and checking fields by their dotted names.

A field declares what it accepts beside its default: a choice set (`Literal[...]`), a range written
as the error message reads it (`Annotated[int, Range(">= 1")]`), or another `Rule`; bools take
true/false. `check_fields` checks one config dataclass's fields against those declarations and
raises a one-line `UserError` naming `section.key=value` and what is allowed. `set_field` sets a
dotted name (`train.lr`, `model.rope.theta`: sections nest to any depth) from a CLI string or a
JSON value, coerced to the field's type; an unknown name fails with the close matches listed.

Nothing here knows the sections or the model families: those are `sections.py` and `model.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from scratchlm.errors import UserError

# ----------------------------------------------------------------------------------------------
# what a field accepts


@dataclass(frozen=True)
class Rule:
    """What one field accepts: `ok(value)` says whether a value passes; `allowed` completes the error
    "section.key=value must be ..."; `note` says what special values mean, as the fix."""

    ok: Callable[[Any], bool]
    allowed: str
    note: str = ""


def Range(interval: str, note: str = "") -> Rule:  # capitalised: it reads as a type inside Annotated[...]
    """A numeric range as it reads in the error: ">= 1", "> 0", "[0, 1)", "[1, 1048576]". Floats
    must also be finite: nan and inf pass no range."""
    if m := re.fullmatch(r"(>=?) (\S+)", interval):
        lo, hi, lo_open, hi_open, allowed = float(m[2]), math.inf, m[1] == ">", True, interval
    else:
        m = re.fullmatch(r"([\[(])(\S+), (\S+)([\])])", interval)
        if m is None:
            raise ValueError(f"not a range: {interval!r}")
        lo, hi, lo_open, hi_open, allowed = float(m[2]), float(m[3]), m[1] == "(", m[4] == ")", "in " + interval

    def ok(v: float) -> bool:
        return math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)

    return Rule(ok, allowed, note)


def _is_pattern(v: str) -> bool:
    import regex  # the BPE pre-tokenizer's regex dialect (\p{L} classes)

    if v in ("gpt2", "gpt4"):
        return True
    try:
        regex.compile(v)
    except regex.error:
        return False
    return bool(v)


TEXT = Rule(bool, "a non-empty string")
TEXTS = Rule(all, "a list of non-empty strings")
DISTINCT_TEXTS = Rule(lambda v: all(v) and len(set(v)) == len(v),
                      "a list of distinct non-empty strings")
PATTERN = Rule(_is_pattern, "gpt2, gpt4 or a regular expression")
DEVICE = Rule(lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, "auto, cpu, cuda, cuda:N or mps")
SEED = Range("[0, 4294967295]")  # 32 bits: every RNG we seed (random, torch, numpy) takes it
# Caps on the sizes that allocate tables, far above any real model, so a typo (1e10) is refused
# instead of failing deep inside an allocation.
VOCAB_CAP, CONTEXT_CAP = 16_777_216, 1_048_576


# ----------------------------------------------------------------------------------------------
# suggestions


def suggest(word: str, options: Iterable[str], what: str) -> str:
    """The fix for an unknown name: its close matches among `options`, else all of them."""
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return f"known {what}: " + ", ".join(options)


def _close_match(value: Any, choices: Iterable[Any]) -> str | None:
    close = difflib.get_close_matches(str(value), list(map(str, choices)), n=1, cutoff=0.5)
    return f"did you mean {close[0]}?" if close else None


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str | list) else str(value)


def not_one_of(key: str, value: Any, choices: Iterable[Any]) -> UserError:
    """The error for a value outside a choice set: "key='x' must be one of a, b (did you mean a?)"."""
    choices = list(choices)
    return UserError(f"{key}={_show(value)} must be one of {', '.join(map(str, choices))}",
                     fix=_close_match(value, choices))


# ----------------------------------------------------------------------------------------------
# setting a field by its dotted name


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Turn a CLI string (or JSON value) into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name, source)
    if origin is Literal:  # a choice set: coerced to the choices' type here, checked by validate()
        return _coerce(value, type(typing.get_args(tp)[0]), name, source)
    try:
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            return [_coerce(v, item_tp, name, source) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        tname = getattr(tp, "__name__", str(tp))
        raise UserError(f"{source}: {name}={value!r} is not a valid {tname}") from None
    return value


def set_field(cfg: Any, dotted: str, value: Any, *, source: str = "override") -> None:
    """Set `section.key` (sections nest: `model.rope.theta`; or a top-level `key`) on a config, with
    type checks and suggestions."""
    obj = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            raise UserError(
                f"{source}: unknown key {dotted!r} in {where}",
                fix=suggest(part, fields, "keys"),
            )
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(obj))
            if dataclasses.is_dataclass(hints[part]):
                raise UserError(f"{source}: {dotted!r} is a section; set one of its keys, e.g. {dotted}.KEY=VALUE")
            setattr(obj, part, _coerce(value, hints[part], dotted, source))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise UserError(f"{source}: {'.'.join(parts[: i + 1])!r} is not a section")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict (a config's `asdict`, a config.json) as dotted leaf names -> values, in order."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


# ----------------------------------------------------------------------------------------------
# checking


class _Field(typing.NamedTuple):
    """One field of a config dataclass, as `check_fields` needs it (worked out once per class)."""

    name: str
    type_name: str
    types: frozenset[type]  # exact types accepted: bool is not an int here, an int is a float
    item_types: frozenset[type]  # for lists: the items' types; else empty
    choices: tuple[Any, ...]  # for Literal fields; else empty
    rules: tuple[Rule, ...]
    is_section: bool


def _accepted_types(tp: Any) -> frozenset[type]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*map(_accepted_types, typing.get_args(tp)))
    if origin is Literal:
        return frozenset(type(c) for c in typing.get_args(tp))
    return frozenset({int, float}) if tp is float else frozenset({origin or tp})


@functools.cache
def _fields(cls: type, own: bool) -> list[_Field]:
    """The fields of `cls`; with `own`, only those its own body declares (not its parents')."""
    declared = inspect.get_annotations(cls)
    out = []
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        if own and name not in declared:
            continue
        rules: tuple[Rule, ...] = ()
        if typing.get_origin(hint) is Annotated:
            hint, *meta = typing.get_args(hint)
            rules = tuple(m for m in meta if isinstance(m, Rule))
        is_list = typing.get_origin(hint) is list
        out.append(_Field(
            name, getattr(hint, "__name__", str(hint)), _accepted_types(hint),
            _accepted_types(typing.get_args(hint)[0]) if is_list else frozenset(),
            typing.get_args(hint) if typing.get_origin(hint) is Literal else (), rules, dataclasses.is_dataclass(hint),
        ))
    return out


def check_fields(obj: Any, prefix: str, owner: type | None = None) -> None:
    """Check each (non-section) field of one config dataclass against its type, choices and rules;
    given `owner` (a class of `obj`'s), only the fields that class itself declares."""
    for f in _fields(owner or type(obj), owner is not None):
        if f.is_section:
            continue
        key, value = prefix + f.name, getattr(obj, f.name)
        if type(value) not in f.types or (f.item_types and any(type(v) not in f.item_types for v in value)):
            raise UserError(f"{key}={_show(value)} is not a valid {f.type_name}")
        if f.choices and value not in f.choices:
            raise not_one_of(key, value, f.choices)
        if value is None:
            continue  # an optional field left unset
        finite = "" if not isinstance(value, float) or math.isfinite(value) else "finite and "
        for rule in f.rules:
            if not rule.ok(value):
                raise UserError(f"{key}={_show(value)} must be {finite}{rule.allowed}", fix=rule.note or None)
