"""ib.checks: what each check accepts (and returns), what it refuses, and the one-line message it gives."""
import math

import numpy as np
import pytest

from ib import checks
from ib.errors import ConfigError

ACCEPTED = [
    (lambda: checks.integer("n", 3, minimum=1), 3),
    (lambda: checks.integer("n", 0, minimum=0), 0),
    (lambda: checks.non_negative("sigma", 0), 0.0),
    (lambda: checks.non_negative("sigma", 0.5), 0.5),
    (lambda: checks.finite("offset", -5), -5.0),
    (lambda: checks.widths("hidden", [8, 4]), (8, 4)),
    (lambda: checks.widths("hidden", ()), ()),
    (lambda: checks.choice("layout", "channels", ("channels", "features")), "channels"),
    (lambda: checks.image_shape("convnet", [1, 8, 8]), (1, 8, 8)),
    (lambda: checks.integer_argument("s", "delay", np.int64(2), 0), 2),
    (lambda: checks.real_argument("s", "gamma", np.float32(2.0), "> 1", lambda v: v > 1), 2.0),
    (lambda: checks.count(np.int64(7), "step"), 7),
]


@pytest.mark.parametrize("check, expected", ACCEPTED)
def test_accepted_values_come_back_as_the_caller_computes_with_them(check, expected):
    value = check()
    assert value == expected and type(value) is type(expected)


REFUSED = [
    # (check, exception, the whole message)
    (lambda: checks.integer("z_dim", 0, minimum=1), ConfigError, "z_dim must be a positive integer, got 0"),
    (lambda: checks.integer("z_dim", True, minimum=1), ConfigError, "z_dim must be a positive integer, got True"),
    (lambda: checks.integer("z_dim", 2.0, minimum=1), ConfigError, "z_dim must be a positive integer, got 2.0"),
    (lambda: checks.integer("samples", -1, minimum=0, error=ValueError), ValueError,
     "samples must be an integer >= 0, got -1"),
    (lambda: checks.non_negative("eps", math.nan, error=ValueError), ValueError,
     "eps must be a finite number >= 0, got nan"),
    (lambda: checks.non_negative("eps", math.inf, error=ValueError), ValueError,
     "eps must be a finite number >= 0, got inf"),
    (lambda: checks.non_negative("sigma", -0.5), ConfigError, "sigma must be a finite number >= 0, got -0.5"),
    (lambda: checks.finite("std_offset", "5"), ConfigError, "std_offset must be a finite number, got '5'"),
    (lambda: checks.widths("hidden", [8, 0]), ConfigError, "hidden must be positive widths, got (8, 0)"),
    (lambda: checks.widths("hidden", "8"), ConfigError, "hidden must be positive widths, got '8'"),
    (lambda: checks.widths("hidden", [], allow_empty=False), ConfigError,
     "hidden must be a non-empty sequence of positive widths, got ()"),
    (lambda: checks.choice("layout", "rows", ("features", "channels")), ConfigError,
     "layout must be one of 'channels', 'features', got 'rows'"),
    (lambda: checks.image_shape("convnet", (784,)), ConfigError,
     "convnet needs an image input shape (C, H, W), got (784,)"),
    (lambda: checks.integer_argument("cosine beta schedule", "warmup", 0, 1), ConfigError,
     "cosine beta schedule: warmup=0 is invalid; must be an integer >= 1"),
    (lambda: checks.integer_argument("cosine beta schedule", "warmup", 1.5, 1), ConfigError,
     "cosine beta schedule: warmup=1.5 is invalid; must be an integer >= 1"),
    (lambda: checks.real_argument("step beta schedule", "gamma", 0.5, "> 1", lambda v: v > 1), ConfigError,
     "step beta schedule: gamma=0.5 is invalid; must be a finite number > 1"),
    (lambda: checks.real_argument("step beta schedule", "gamma", math.nan, "> 1", lambda v: v > 1), ConfigError,
     "step beta schedule: gamma=nan is invalid; must be a finite number > 1"),
    (lambda: checks.count(1.5, "step"), TypeError, "step must be an int, got float 1.5"),
    (lambda: checks.count(-1, "epoch"), ValueError, "epoch must be >= 0, got -1"),
]


@pytest.mark.parametrize("check, error, message", REFUSED, ids=[r[2] for r in REFUSED])
def test_refused_values_raise_one_line_naming_the_argument(check, error, message):
    with pytest.raises(error) as info:
        check()
    assert type(info.value) is error
    assert str(info.value) == message
