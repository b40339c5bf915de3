"""Learning-rate schedules: closed forms, state_dict round trips, argument checks, `set_lr`, and agreement with
torch's own schedulers in a training loop."""
import math

import pytest
import torch

from helpers import through_a_checkpoint
from ib.errors import ConfigError
from ib.schedules import LR_SCHEDULES, create_lr_schedule, set_lr

# A non-default configuration of every learning-rate schedule, used where a test runs over all of them.
LR_EXAMPLES = {
    "constant": (10, dict()),
    "step": (10, dict(step_size=3, gamma=0.5)),
    "cosine": (10, dict(warmup=2, min_factor=0.1)),
}


def test_every_schedule_has_an_example():
    assert set(LR_EXAMPLES) == set(LR_SCHEDULES.names())  # a new entry needs an example here


@pytest.mark.parametrize("name", sorted(LR_EXAMPLES))
def test_lr_state_dict_round_trip(name, tmp_path):
    epochs, kwargs = LR_EXAMPLES[name]
    schedule = create_lr_schedule(name, epochs, **kwargs)
    state = schedule.state_dict()
    loaded = through_a_checkpoint(state, tmp_path)
    restored = create_lr_schedule(name, 3)
    restored.load_state_dict(loaded)
    assert restored.state_dict() == state
    assert [restored.factor(e) for e in range(30)] == [schedule.factor(e) for e in range(30)]


_NAN, _INF = float("nan"), float("inf")


def _bad_lr_cases():
    for name in LR_SCHEDULES.names():
        for value in (0, -1, 2.5):
            yield name, value, {}, "epochs"
    for value in (0, -1, 1.5):
        yield "step", 10, dict(step_size=value), "step_size"
    for value in (0.0, -0.5, _NAN, _INF):
        yield "step", 10, dict(gamma=value), "gamma"
    for value in (-1, 10, 11, 1.5):
        yield "cosine", 10, dict(warmup=value), "warmup"
    for value in (-0.1, 1.5, _NAN):
        yield "cosine", 10, dict(min_factor=value), "min_factor"


@pytest.mark.parametrize("name, epochs, kwargs, param", list(_bad_lr_cases()))
def test_lr_invalid_argument(name, epochs, kwargs, param):
    with pytest.raises(ConfigError) as info:
        create_lr_schedule(name, epochs, **kwargs)
    message = str(info.value)
    assert f"{param}=" in message and name in message
    assert "\n" not in message


def _cosine(e, epochs, warmup, m):
    return m + (1 - m) * (1 + math.cos(math.pi * (e - warmup) / (epochs - warmup))) / 2


@pytest.mark.parametrize(
    "name, epochs, kwargs, epoch, expected",
    [
        ("constant", 10, {}, 0, 1.0),
        ("constant", 10, {}, 1000, 1.0),
        # step, defaults (VIB / MINE MNIST): x0.97 every 2 epochs
        ("step", 10, {}, 0, 1.0),
        ("step", 10, {}, 1, 1.0),
        ("step", 10, {}, 2, 0.97),
        ("step", 10, {}, 3, 0.97),
        ("step", 10, {}, 10, 0.97**5),
        ("step", 10, dict(step_size=3, gamma=0.5), 7, 0.25),
        # cosine with a 2-epoch warm-up: (e + 1) / (warmup + 1), then cosine to min_factor at e = epochs
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 0, 1 / 3),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 1, 2 / 3),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 2, 1.0),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 6, 0.55),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 9, _cosine(9, 10, 2, 0.1)),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 10, 0.1),
        ("cosine", 10, dict(warmup=2, min_factor=0.1), 100, 0.1),
        # cosine without warm-up
        ("cosine", 4, {}, 0, 1.0),
        ("cosine", 4, {}, 2, 0.5),
        ("cosine", 4, {}, 3, _cosine(3, 4, 0, 0.0)),
        ("cosine", 4, {}, 4, 0.0),
        ("cosine", 1, {}, 0, 1.0),
    ],
)
def test_lr_closed_form(name, epochs, kwargs, epoch, expected):
    schedule = create_lr_schedule(name, epochs, **kwargs)
    assert schedule.factor(epoch) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert schedule(epoch) == schedule.factor(epoch)


@pytest.mark.parametrize("epoch, error", [(-1, ValueError), (0.5, TypeError)])
def test_lr_rejects_bad_epochs(epoch, error):
    with pytest.raises(error):
        create_lr_schedule("step", 10).factor(epoch)


def _adam(lrs, **kwargs):
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(3))], "lr": lr} for lr in lrs]
    return torch.optim.Adam(groups, **kwargs)


def test_set_lr_writes_each_group():
    optimizer = _adam([1e-3, 1e-2])
    base = [g["lr"] for g in optimizer.param_groups]
    set_lr(optimizer, base, 0.5)
    assert [g["lr"] for g in optimizer.param_groups] == [5e-4, 5e-3]
    set_lr(optimizer, base, 1.0)  # from the base, not compounding
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 1e-2]


def test_set_lr_keeps_a_tensor_lr_in_place():
    optimizer = _adam([torch.tensor(1e-3)], foreach=False)
    lr = optimizer.param_groups[0]["lr"]
    set_lr(optimizer, [1e-3], 0.25)
    assert optimizer.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(2.5e-4)


@pytest.mark.parametrize(
    "base, factor", [([1e-3], 0.5), ([1e-3, 1e-3, 1e-3], 0.5), ([1e-3, 1e-3], -0.1), ([1e-3, 1e-3], _NAN)]
)
def test_set_lr_rejects_mismatch_and_bad_factor(base, factor):
    with pytest.raises(ValueError):
        set_lr(_adam([1e-3, 1e-3]), base, factor)


@pytest.mark.parametrize(
    "name, kwargs, reference",
    [
        ("step", {}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.97)),
        ("cosine", dict(min_factor=0.1), lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, 12, eta_min=1e-4)),
    ],
)
def test_lr_schedule_matches_torch_in_a_training_loop(name, kwargs, reference):
    # Ours, driven by the epoch index, against torch's stateful scheduler on a twin Adam.
    epochs = 12
    ours, theirs = _adam([1e-3]), _adam([1e-3])
    scheduler = reference(theirs)
    schedule = create_lr_schedule(name, epochs, **kwargs)
    base = [g["lr"] for g in ours.param_groups]
    for epoch in range(epochs):
        set_lr(ours, base, schedule.factor(epoch))
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-9)
        for optimizer in (ours, theirs):
            optimizer.param_groups[0]["params"][0].sum().backward()
            optimizer.step()
            optimizer.zero_grad()
        scheduler.step()
