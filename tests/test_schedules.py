"""The schedules' registries (names, unknown names and options, the registered classes' signatures), their shared
state_dict, and the beta schedules: closed forms, shape, round trips, argument checks (learning rate:
test_lr_schedules.py)."""
import inspect
import math
import random
import typing

import pytest

from helpers import through_a_checkpoint
from ib.errors import CheckpointError, ConfigError
from ib.schedules import (
    BETA_SCHEDULES,
    LR_SCHEDULES,
    BetaSchedule,
    LRSchedule,
    create_beta_schedule,
    create_lr_schedule,
)

# A non-default configuration of every beta schedule, used where a test runs over all of them.
BETA_EXAMPLES = {
    "constant": (0.1, dict(delay=7)),
    "linear": (1e-2, dict(warmup=100, start=1e-3, delay=20)),
    "cosine": (1e-2, dict(warmup=100, start=1e-3, delay=20)),
    "exponential": (1e-2, dict(warmup=100, start=1e-6, delay=20)),
    "step": (5e-4, dict(step_size=10, gamma=10.0, start=1e-6, delay=20)),
}
STEPS = list(range(0, 400)) + [1_000, 10**6, 10**12]


def test_registries_hold_the_documented_schedules():
    assert BETA_SCHEDULES.names() == ["constant", "cosine", "exponential", "linear", "step"]
    assert LR_SCHEDULES.names() == ["constant", "cosine", "step"]
    assert set(BETA_EXAMPLES) == set(BETA_SCHEDULES.names())  # a new entry needs an example here


# ----------------------------------------------------------------------------------------------------------------------
# Beta: closed forms

_C = (1 - math.cos(math.pi / 4)) / 2  # the half-cosine ramp a quarter of the way


@pytest.mark.parametrize(
    "name, beta, kwargs, step, expected",
    [
        # constant
        ("constant", 0.1, {}, 0, 0.1),
        ("constant", 0.1, {}, 10**9, 0.1),
        ("constant", 0.1, dict(delay=3), 2, 0.0),
        ("constant", 0.1, dict(delay=3), 3, 0.1),
        ("constant", 0.0, {}, 5, 0.0),
        # linear: start + (beta - start) * t / warmup
        ("linear", 1e-2, dict(warmup=100, start=1e-3), 0, 1e-3),
        ("linear", 1e-2, dict(warmup=100, start=1e-3), 50, 1e-3 + 9e-3 * 0.5),
        ("linear", 1e-2, dict(warmup=100, start=1e-3), 99, 1e-3 + 9e-3 * 0.99),
        ("linear", 1e-2, dict(warmup=100, start=1e-3), 100, 1e-2),
        ("linear", 1e-2, dict(warmup=100, start=1e-3), 10**9, 1e-2),
        ("linear", 1e-2, dict(warmup=100, start=1e-3, delay=20), 19, 0.0),
        ("linear", 1e-2, dict(warmup=100, start=1e-3, delay=20), 20, 1e-3),
        ("linear", 1e-2, dict(warmup=100, start=1e-3, delay=20), 70, 1e-3 + 9e-3 * 0.5),
        ("linear", 1e-2, dict(warmup=100, start=1e-3, delay=20), 120, 1e-2),
        ("linear", 1.0, {}, 250, 0.25),  # defaults: warmup=1000, start=0
        ("linear", 0.5, dict(warmup=4, start=0.5), 1, 0.5),  # start == beta: flat
        # cosine: start + (beta - start) * (1 - cos(pi * t / warmup)) / 2
        ("cosine", 1e-2, dict(warmup=100, start=1e-3), 0, 1e-3),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3), 25, 1e-3 + 9e-3 * _C),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3), 50, 1e-3 + 9e-3 * 0.5),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3), 100, 1e-2),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3), 10**9, 1e-2),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3, delay=20), 19, 0.0),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3, delay=20), 20, 1e-3),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3, delay=20), 45, 1e-3 + 9e-3 * _C),
        ("cosine", 1e-2, dict(warmup=100, start=1e-3, delay=20), 120, 1e-2),
        # exponential: start * (beta / start) ** (t / warmup); here one decade per 25 steps
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 0, 1e-6),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 25, 1e-5),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 50, 1e-4),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 75, 1e-3),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 100, 1e-2),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6), 10**9, 1e-2),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6, delay=20), 19, 0.0),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6, delay=20), 20, 1e-6),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6, delay=20), 70, 1e-4),
        ("exponential", 1e-2, dict(warmup=100, start=1e-6, delay=20), 120, 1e-2),
        # step: min(beta, start * gamma ** (t // step_size))
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 0, 1e-6),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 9, 1e-6),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 10, 1e-5),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 29, 1e-4),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 30, 1e-3),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6), 10**9, 1e-3),
        ("step", 5e-4, dict(step_size=10, gamma=10.0, start=1e-6), 30, 5e-4),  # capped at beta
        ("step", 5e-4, dict(step_size=10, gamma=10.0, start=1e-6), 29, 1e-4),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6, delay=5), 4, 0.0),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6, delay=5), 5, 1e-6),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6, delay=5), 15, 1e-5),
        ("step", 1e-3, dict(step_size=10, gamma=10.0, start=1e-6, delay=5), 35, 1e-3),
        ("step", 1e-3, dict(step_size=1, gamma=2.0, start=1e-3), 0, 1e-3),  # start == beta: flat
    ],
)
def test_beta_closed_form(name, beta, kwargs, step, expected):
    schedule = create_beta_schedule(name, beta, **kwargs)
    assert schedule.value(step) == pytest.approx(expected, rel=1e-12, abs=0.0)
    assert schedule(step) == schedule.value(step)


@pytest.mark.parametrize("name", sorted(BETA_EXAMPLES))
def test_beta_reaches_target_exactly(name):
    beta, kwargs = BETA_EXAMPLES[name]
    schedule = create_beta_schedule(name, beta, **kwargs)
    assert schedule.value(10**12) == beta  # exactly, not to within rounding


@pytest.mark.parametrize("name", sorted(BETA_EXAMPLES))
def test_beta_zero_during_delay(name):
    beta, kwargs = BETA_EXAMPLES[name]
    schedule = create_beta_schedule(name, beta, **kwargs)
    assert all(schedule.value(s) == 0.0 for s in range(kwargs["delay"]))
    assert schedule.value(kwargs["delay"]) > 0.0


@pytest.mark.parametrize("name", sorted(BETA_EXAMPLES))
def test_beta_monotone_and_within_bounds(name):
    beta, kwargs = BETA_EXAMPLES[name]
    schedule = create_beta_schedule(name, beta, **kwargs)
    values = [schedule.value(s) for s in STEPS]
    assert all(0.0 <= v <= beta for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("name", BETA_SCHEDULES.names())
def test_beta_defaults_monotone_and_within_bounds(name):
    # The defaults alone (warm-ups of 1000 steps) also build, ramp up and land on beta.
    schedule = create_beta_schedule(name, 1e-3)
    values = [schedule.value(s) for s in range(0, 3000)]
    assert all(0.0 <= v <= 1e-3 for v in values)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[-1] == 1e-3


@pytest.mark.parametrize("name", sorted(BETA_EXAMPLES))
def test_beta_value_is_pure(name):
    beta, kwargs = BETA_EXAMPLES[name]
    schedule = create_beta_schedule(name, beta, **kwargs)
    in_order = {s: schedule.value(s) for s in STEPS}
    shuffled = STEPS[:]
    random.Random(0).shuffle(shuffled)
    assert {s: schedule.value(s) for s in shuffled} == in_order


@pytest.mark.parametrize("step, error", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_beta_rejects_bad_steps(step, error):
    with pytest.raises(error):
        create_beta_schedule("linear", 1.0).value(step)


# ----------------------------------------------------------------------------------------------------------------------
# state_dict round trips (the shared base, through the beta schedules)


@pytest.mark.parametrize("name", sorted(BETA_EXAMPLES))
def test_beta_state_dict_round_trip(name, tmp_path):
    beta, kwargs = BETA_EXAMPLES[name]
    schedule = create_beta_schedule(name, beta, **kwargs)
    state = schedule.state_dict()
    loaded = through_a_checkpoint(state, tmp_path)
    restored = create_beta_schedule(name, 0.5)  # other settings, overwritten by the load
    restored.load_state_dict(loaded)
    assert restored.state_dict() == state
    assert [restored.value(s) for s in STEPS] == [schedule.value(s) for s in STEPS]


def test_load_state_dict_of_another_schedule_raises():
    linear = create_beta_schedule("linear", 1.0)
    with pytest.raises(CheckpointError, match="cosine"):
        linear.load_state_dict(create_beta_schedule("cosine", 1.0).state_dict())


def test_load_state_dict_with_missing_key_raises():
    state = create_beta_schedule("linear", 1.0).state_dict()
    del state["warmup"]
    with pytest.raises(CheckpointError, match="warmup"):
        create_beta_schedule("linear", 1.0).load_state_dict(state)


def test_load_state_dict_checks_values():
    schedule = create_beta_schedule("linear", 1.0, warmup=10)
    state = schedule.state_dict()
    state["warmup"] = 0
    with pytest.raises(ConfigError, match="warmup"):
        schedule.load_state_dict(state)
    assert schedule.warmup == 10  # left as it was


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks: each invalid value raises ConfigError naming the parameter

_NAN, _INF = float("nan"), float("inf")
_WARMUPS = ["linear", "cosine", "exponential"]


def _bad_beta_cases():
    for name in BETA_SCHEDULES.names():
        for value in (-1.0, _NAN, _INF, "0.1", None):
            yield name, value, {}, "beta"
        for value in (-1, 1.5, True):
            yield name, 1.0, dict(delay=value), "delay"
    for name in _WARMUPS:
        for value in (0, -5, 10.0):
            yield name, 1.0, dict(warmup=value), "warmup"
        for value in (-0.1, _NAN, _INF):
            yield name, 1.0, dict(start=value), "start"
        yield name, 1.0, dict(start=2.0), "start"  # start > beta: a warm-up ramps up
    for name in ("exponential", "step"):
        yield name, 0.0, {}, "beta"  # multiplicative: use 'constant'
        yield name, 1.0, dict(start=0.0), "start"
        yield name, 1.0, dict(start=-1e-3), "start"
    yield "step", 1.0, dict(start=2.0), "start"
    for value in (0, -1, 2.5):
        yield "step", 1.0, dict(step_size=value), "step_size"
    for value in (1.0, 0.5, 0.0, -2.0, _NAN, _INF):
        yield "step", 1.0, dict(gamma=value), "gamma"


@pytest.mark.parametrize("name, beta, kwargs, param", list(_bad_beta_cases()))
def test_beta_invalid_argument(name, beta, kwargs, param):
    with pytest.raises(ConfigError) as info:
        create_beta_schedule(name, beta, **kwargs)
    message = str(info.value)
    assert f"{param}=" in message and name in message
    assert "\n" not in message


def test_start_above_beta_says_warmup_ramps_up():
    with pytest.raises(ConfigError, match="ramps up"):
        create_beta_schedule("linear", 0.1, start=0.2)


def test_zero_beta_for_multiplicative_schedule_points_to_constant():
    with pytest.raises(ConfigError, match="constant"):
        create_beta_schedule("exponential", 0.0)


@pytest.mark.parametrize(
    "create, registry",
    [(lambda n: create_beta_schedule(n, 1.0), BETA_SCHEDULES), (lambda n: create_lr_schedule(n, 10), LR_SCHEDULES)],
    ids=["beta", "lr"],
)
def test_unknown_name_lists_valid_names(create, registry):
    with pytest.raises(ConfigError) as info:
        create("nope")
    message = str(info.value)
    assert "'nope'" in message
    assert all(name in message for name in registry.names())


@pytest.mark.parametrize(
    "create, valid",
    [
        (lambda: create_beta_schedule("linear", 1.0, warmpu=10), ["delay", "start", "warmup"]),
        (lambda: create_beta_schedule("step", 1.0, warmup=10), ["delay", "gamma", "start", "step_size"]),
        (lambda: create_lr_schedule("cosine", 10, min_lr=0.1), ["min_factor", "warmup"]),
        (lambda: create_lr_schedule("constant", 10, gamma=0.1), []),
    ],
)
def test_unknown_option_is_named_with_valid_ones(create, valid):
    with pytest.raises(ConfigError) as info:
        create()
    message = str(info.value)
    assert "unknown option" in message
    assert ", ".join(valid) in message


# ----------------------------------------------------------------------------------------------------------------------
# Signatures: what the recipe validator reads

_ALLOWED = (int, float, bool, str)


def _allowed_annotation(annotation):
    if annotation in _ALLOWED:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return True
    if origin is typing.Union and type(None) in args:  # Optional[X]
        return all(a is type(None) or _allowed_annotation(a) for a in args)
    return False


def _registry_entries():
    kinds = ((BETA_SCHEDULES, ["beta"], BetaSchedule), (LR_SCHEDULES, ["epochs"], LRSchedule))
    for registry, positional, base in kinds:
        for name in registry.names():
            yield pytest.param(registry, name, positional, base, id=f"{registry.kind}-{name}")


@pytest.mark.parametrize("registry, name, positional, base", list(_registry_entries()))
def test_registered_class_follows_the_convention(registry, name, positional, base):
    cls = registry.get(name)
    assert inspect.isclass(cls) and issubclass(cls, base)
    assert cls.name == name  # the key its state_dict() carries
    params = list(inspect.signature(cls).parameters.values())
    hints = registry.option_hints(name)  # as the recipe reads them: typing.get_type_hints(cls.__init__)
    assert [p.name for p in params if p.kind is p.POSITIONAL_ONLY] == positional
    assert all(p.kind in (p.POSITIONAL_ONLY, p.KEYWORD_ONLY) for p in params)  # no *args, **kwargs, or both-ways
    for p in params:
        if p.kind is not p.KEYWORD_ONLY:
            continue
        assert p.default is not p.empty, f"{name}: {p.name} has no default"
        assert p.name in hints, f"{name}: {p.name} has no annotation"
        assert _allowed_annotation(hints[p.name]), f"{name}: {p.name}: {hints[p.name]}"
        if hints[p.name] in _ALLOWED:
            assert type(p.default) is hints[p.name], f"{name}: {p.name}: default {p.default!r}"
    assert set(registry.options(name)) == {p.name for p in params if p.kind is p.KEYWORD_ONLY}
