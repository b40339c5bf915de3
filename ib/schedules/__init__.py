"""Schedules for beta (the weight of I(X;Z) in CE + beta * I(X;Z)) and for the learning rate.

A schedule is a small object whose value is a pure function of a count that the training code tracks and passes in
(timm `scheduler/scheduler.py`: "All epoch and update counts must be tracked in the training code and explicitly
passed in"). It holds no optimizer and no counter, so calling it twice with the same step gives the same value, and
`state_dict()` is just its constructor arguments (`ib.schedules.base`).

Beta schedules (`BETA_SCHEDULES`, `create_beta_schedule`, in `ib.schedules.beta`) map a step t = 0, 1, 2, ...
(optimizer steps or epochs, whichever the trainer counts) to beta_t >= 0. Every one takes the target `beta` and a
`delay`: beta_t = 0 for t < delay, and the remaining phases see t - delay.

Learning-rate schedules (`LR_SCHEDULES`, `create_lr_schedule`, in `ib.schedules.lr`) map an epoch index
e = 0, 1, 2, ... to a factor of the base learning rate; `set_lr` writes base * factor into an optimizer's param groups.

The registries hold the schedule classes themselves, with the convention of `ib.registry`: positional-only
parameters are supplied by the library (`beta` from the recipe's objective, `epochs` from the recipe's length) and
the keyword-only ones, each annotated and defaulted, are what a recipe may set. The recipe reads their annotations
with `typing.get_type_hints(cls.__init__)` (`Registry.option_hints`).
"""
from ib.schedules.base import Schedule
from ib.schedules.beta import (
    BETA_SCHEDULES,
    BetaSchedule,
    ConstantBeta,
    CosineBeta,
    ExponentialBeta,
    LinearBeta,
    StepBeta,
    create_beta_schedule,
)
from ib.schedules.lr import LR_SCHEDULES, ConstantLR, CosineLR, LRSchedule, StepLR, create_lr_schedule, set_lr

__all__ = [
    "BETA_SCHEDULES",
    "LR_SCHEDULES",
    "Schedule",
    "BetaSchedule",
    "ConstantBeta",
    "LinearBeta",
    "CosineBeta",
    "ExponentialBeta",
    "StepBeta",
    "LRSchedule",
    "ConstantLR",
    "StepLR",
    "CosineLR",
    "create_beta_schedule",
    "create_lr_schedule",
    "set_lr",
]
