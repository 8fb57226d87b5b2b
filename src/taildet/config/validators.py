"""Validators of config values: each takes a value and returns it normalised, or raises
:class:`_Invalid` with what was expected (turned into a ConfigError naming the key and file by
:func:`_err`). :func:`_f` makes a dataclass field that carries its validator."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import field
from typing import Any

from taildet.errors import ConfigError

# A validator takes (value, dotted_key) and returns the normalised value or raises ConfigError.


class _Invalid(Exception):
    """Raised by validators; turned into a ConfigError naming key and file."""


def _fmt(v: Any) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def v_any(v):
    return v


def v_bool(v):
    if not isinstance(v, bool):
        raise _Invalid(f"expected true or false, got {_fmt(v)}")
    return v


def v_str(v):
    if not isinstance(v, str) or not v:
        raise _Invalid(f"expected a non-empty string, got {_fmt(v)}")
    return v


def v_opt(inner):
    def check(v):
        return None if v is None else inner(v)

    return check


def v_enum(*choices):
    def check(v):
        if v not in choices:
            raise _Invalid(f"expected one of {', '.join(map(str, choices))}, got {_fmt(v)}")
        return v

    return check


def v_pos_num(v):
    if not _is_num(v) or v <= 0:
        raise _Invalid(f"expected a positive number, got {_fmt(v)}")
    return float(v)


def v_nonneg_num(v):
    if not _is_num(v) or v < 0:
        raise _Invalid(f"expected a non-negative number, got {_fmt(v)}")
    return float(v)


def v_fraction(v):
    if not _is_num(v) or not 0 <= v <= 1:
        raise _Invalid(f"expected a number in [0, 1], got {_fmt(v)}")
    return float(v)


def v_open_fraction(v):
    if not _is_num(v) or not 0 < v <= 1:
        raise _Invalid(f"expected a number in (0, 1], got {_fmt(v)}")
    return float(v)


def _int(v, minimum):
    if isinstance(v, bool) or not isinstance(v, int):
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        else:
            raise _Invalid(f"expected an integer >= {minimum}, got {_fmt(v)}")
    if v < minimum:
        raise _Invalid(f"expected an integer >= {minimum}, got {_fmt(v)}")
    return v


def v_pos_int(v):
    return _int(v, 1)


def v_nonneg_int(v):
    return _int(v, 0)


def v_int(v):
    return _int(v, -(2**63))


def v_list(inner, min_len=0):
    def check(v):
        if isinstance(v, tuple):
            v = list(v)
        if not isinstance(v, list):
            v = [v]
        if len(v) < min_len:
            raise _Invalid(f"expected a list of at least {min_len} item(s), got {_fmt(v)}")
        out = []
        for i, item in enumerate(v):
            try:
                out.append(inner(item))
            except _Invalid as e:
                raise _Invalid(f"item {i}: {e}") from None
        return out

    return check


def v_dict(v):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise _Invalid(f"expected a mapping, got {_fmt(v)}")
    return dict(v)


def v_regex(v):
    v = v_str(v)
    try:
        re.compile(v)
    except re.error as e:
        raise _Invalid(f"invalid regular expression {v!r}: {e}") from None
    return v


def v_rfs_threshold(v):
    if v == "auto":
        return v
    if not _is_num(v) or not 0 < v <= 1:
        raise _Invalid(f'expected "auto" or a number in (0, 1], got {_fmt(v)}')
    return float(v)


def v_steps(v):
    v = v_list(lambda x: x)(v)
    out = []
    for i, s in enumerate(v):
        if not _is_num(s) or s <= 0:
            raise _Invalid(f"item {i}: expected a fraction in (0, 1) or an iteration >= 1, got {_fmt(s)}")
        if isinstance(s, float) and s >= 1 and not s.is_integer():
            raise _Invalid(f"item {i}: expected a fraction in (0, 1) or a whole iteration, got {_fmt(s)}")
        out.append(s if s < 1 else int(s))
    if out != sorted(out):
        raise _Invalid(f"expected increasing values, got {_fmt(out)}")
    return out


def v_sizes(v):
    return v_list(v_pos_int, min_len=1)(v)


def v_int_or_ints(v):
    if isinstance(v, (list, tuple)):
        return v_list(v_pos_int, min_len=1)(v)
    return v_pos_int(v)


def v_path(v):
    return v_str(v)


def v_lr(v):
    """A learning rate: finite, > 0 and at most :data:`MAX_LR` (a larger one overflows inside the
    optimizer or diverges on the first step)."""
    v = v_pos_num(v)
    if v > MAX_LR:
        raise _Invalid(f"expected a learning rate of at most {MAX_LR:g} (a larger one overflows or diverges "
                       f"at once), got {_fmt(v)}")
    return v


#: Largest learning rate the config accepts.
MAX_LR = 10.0


def v_pos_num_list(v):
    if isinstance(v, tuple):
        v = list(v)
    if not isinstance(v, list) or not v:
        raise _Invalid(f"expected a non-empty list of positive numbers, got {_fmt(v)}")
    for i, x in enumerate(v):
        if not _is_num(x) or x <= 0:
            raise _Invalid(f"item {i}: expected a positive number, got {_fmt(x)}")
    return list(v)


def v_anchor_sizes(v):
    """``null`` or one list of positive integer sizes per feature level, e.g. ``[[32], [64]]``."""
    if v is None:
        return None
    if isinstance(v, tuple):
        v = list(v)
    if not isinstance(v, list) or not v or not all(isinstance(level, (list, tuple)) for level in v):
        raise _Invalid(f"expected one list of anchor sizes per feature level, e.g. [[32], [64, 128]], got {_fmt(v)}")
    out = []
    for i, level in enumerate(v):
        try:
            out.append(v_list(v_pos_int, min_len=1)(list(level)))
        except _Invalid as e:
            raise _Invalid(f"level {i}: {e}") from None
    return out


def v_aspect_ratios(v):
    """Positive numbers, or one list of them per feature level."""
    if isinstance(v, (list, tuple)) and v and all(isinstance(level, (list, tuple)) for level in v):
        out = []
        for i, level in enumerate(v):
            try:
                out.append(v_pos_num_list(level))
            except _Invalid as e:
                raise _Invalid(f"level {i}: {e}") from None
        return out
    return v_pos_num_list(v)


def v_rgb(v):
    if v is None:
        return None
    out = v_pos_num_list(v) if isinstance(v, (list, tuple)) else None
    if out is None or len(out) != 3:
        raise _Invalid(f"expected null or 3 positive numbers (R, G, B), got {_fmt(v)}")
    return out


def v_rgb_mean(v):
    if v is None:
        return None
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(_is_num(x) for x in v):
        raise _Invalid(f"expected null or 3 numbers (R, G, B), got {_fmt(v)}")
    return list(v)


def v_trainable_layers(v):
    v = v_nonneg_int(v)
    if v > 5:
        raise _Invalid(f"expected an integer in 0..5 (stages that train, counted from the last; "
                       f"5 = all, tiny: 4 or more = all), got {_fmt(v)}")
    return v


def _f(default, check, help=""):
    """A dataclass field with a validator (and a default; lists/dicts are copied)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata={"check": check, "help": help})
    return field(default=default, metadata={"check": check, "help": help})



def _err(file: str | None, key: str, msg: str) -> ConfigError:
    where = f"{file}: " if file else ""
    return ConfigError(f"{where}{key}: {msg}")
