"""Checks of argument values, shared by the models, the schedules and the attacks.

Each check returns the value as the caller computes with it (a float, a tuple) or raises an error of one line
naming the argument, the value given and what is allowed. Messages take one of two forms:

- a setting on its own: "z_dim must be a positive integer, got 0" (`integer`, `non_negative`, `finite`, `widths`,
  `choice`, `image_shape`);
- an argument of a named object, the schedules' form: "cosine beta schedule: warmup=0 is invalid; must be an
  integer >= 1" (`integer_argument`, `real_argument`).

A setting that comes from a recipe raises `ConfigError`. The attacks pass `error=ValueError`: their arguments come
from code, and a bad one is the caller's bug, not the user's (the command line reports the two differently).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Collection, Sequence, Type

from ib.errors import ConfigError

__all__ = [
    "integer",
    "non_negative",
    "finite",
    "widths",
    "choice",
    "image_shape",
    "integer_argument",
    "real_argument",
    "count",
]


# ---------------------------------------------------------------------------------------------------------------------
# Settings: "<name> must be <allowed>, got <value>"


def integer(name: str, value: Any, *, minimum: int, error: Type[Exception] = ConfigError) -> int:
    """`value`, a Python int >= `minimum` (a bool is refused).

    Args:
        name: The argument, for the message.
        value: What was given.
        minimum: The smallest allowed value; the message says "a positive integer" for 1.
        error: The exception raised.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise error(f"{name} must be {allowed}, got {value!r}")
    return value


def non_negative(name: str, value: Any, *, error: Type[Exception] = ConfigError) -> float:
    """`value` as a float: an int or float, finite and >= 0 (a noise level, a radius)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise error(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def probability(name: str, value: Any) -> float:
    """`value` as a float in [0, 1) (a dropout rate); ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def finite(name: str, value: Any) -> float:
    """`value` as a float: an int or float, finite; ConfigError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def widths(name: str, value: Any, allow_empty: bool = True) -> tuple[int, ...]:
    """A sequence of layer widths, each a positive int, as a tuple (a YAML list arrives as a list).

    Args:
        name: The argument, for the message.
        value: What was given.
        allow_empty: Whether no layer at all is allowed.

    Raises:
        ConfigError: not a sequence of positive ints (a string is not one), or empty where `allow_empty` is False.
    """
    ok = isinstance(value, Sequence) and not isinstance(value, str)
    ok = ok and all(not isinstance(w, bool) and isinstance(w, int) and w > 0 for w in value)
    if not ok or (not allow_empty and len(value) == 0):
        allowed = "a non-empty sequence of positive widths" if not allow_empty else "positive widths"
        shown = tuple(value) if isinstance(value, list) else value
        raise ConfigError(f"{name} must be {allowed}, got {shown!r}")
    return tuple(value)


def choice(name: str, value: Any, choices: Collection[str]) -> str:
    """`value`, one of `choices`; the ConfigError lists them sorted."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, sorted(choices)))}, got {value!r}")
    return value


def image_shape(who: str, in_shape: Sequence[int]) -> tuple[int, int, int]:
    """(C, H, W) of an image input; ConfigError naming `who` (what needs an image) for any other shape."""
    if len(in_shape) != 3:
        raise ConfigError(f"{who} needs an image input shape (C, H, W), got {tuple(in_shape)!r}")
    c, h, w = in_shape
    return c, h, w


# ---------------------------------------------------------------------------------------------------------------------
# Arguments of a named object: "<where>: <name>=<value> is invalid; must be <allowed>"


def integer_argument(where: str, name: str, value: Any, minimum: int) -> int:
    """`value` as an int: any integral number but a bool, >= `minimum`; ConfigError naming `where` otherwise.

    Args:
        where: The object whose argument it is, e.g. "cosine beta schedule".
        name: The argument.
        value: What was given.
        minimum: The smallest allowed value.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ConfigError(f"{where}: {name}={value!r} is invalid; must be an integer >= {minimum}")
    return int(value)


def real_argument(where: str, name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float: a finite real number (not a bool) for which `ok` holds; ConfigError naming `where`.

    Args:
        where: The object whose argument it is, e.g. "step beta schedule".
        name: The argument.
        value: What was given.
        allowed: What `ok` accepts, in words, for the message: "> 0", "in [0, 1]".
        ok: The test of the value, given as a float.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}: {name}={value!r} is invalid; must be a finite number {allowed}")
    value = float(value)
    if not ok(value):
        raise ConfigError(f"{where}: {name}={value!r} is invalid; must be a finite number {allowed}")
    return value


def count(value: Any, what: str) -> int:
    """A step or epoch index passed in by the trainer: an integral number >= 0, as an int.

    Raises:
        TypeError: not an integral number (or a bool); ValueError: negative. Either is a bug in the caller.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)
