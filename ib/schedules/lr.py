"""Learning-rate schedules: a factor of the base learning rate at an epoch index e = 0, 1, 2, ..., and `set_lr`,
which writes base * factor into an optimizer's param groups.

Every one takes the run's total `epochs` (positional-only: the recipe's length supplies it).
"""
import math
from abc import ABC, abstractmethod
from typing import Any, List

import torch

from ib.checks import count, integer_argument, real_argument
from ib.errors import ConfigError
from ib.registry import Registry
from ib.schedules.base import Schedule

LR_SCHEDULES = Registry("lr schedule")


class LRSchedule(Schedule, ABC):
    """Base of learning-rate schedules: a factor of the base learning rate, a pure function of the epoch index.

    Every schedule takes the run's total `epochs` (positional-only, supplied by the trainer) so that all share one
    signature, even those that do not use it.

    Args:
        epochs: Total epochs of the run, >= 1.
    """

    _kind = "lr schedule"

    def __init__(self, epochs: int, /) -> None:
        self.epochs = integer_argument(self._where, "epochs", epochs, 1)

    def factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate during `epoch` (counted from 0)."""
        return self._factor(count(epoch, "epoch"))

    __call__ = factor

    @abstractmethod
    def _factor(self, epoch: int) -> float:
        """The factor at a validated `epoch`."""


@LR_SCHEDULES.register("constant")
class ConstantLR(LRSchedule):
    """factor_e = 1.

    Args:
        epochs: Total epochs of the run (unused).
    """

    name = "constant"

    def __init__(self, epochs: int, /) -> None:
        super().__init__(epochs)

    def _factor(self, epoch: int) -> float:
        return 1.0


@LR_SCHEDULES.register("step")
class StepLR(LRSchedule):
    """factor_e = gamma ** (epoch // step_size).

    The defaults are the VIB / MINE MNIST setup: the learning rate times 0.97 every 2 epochs.

    Args:
        epochs: Total epochs of the run (unused).
        step_size: Epochs per stage, >= 1.
        gamma: Multiplier per stage, > 0 (1 keeps the rate constant).
    """

    name = "step"

    def __init__(self, epochs: int, /, *, step_size: int = 2, gamma: float = 0.97) -> None:
        super().__init__(epochs)
        self.step_size = integer_argument(self._where, "step_size", step_size, 1)
        self.gamma = real_argument(self._where, "gamma", gamma, "> 0", lambda v: v > 0)

    def _factor(self, epoch: int) -> float:
        # float ** int underflows to 0.0 for huge epochs rather than raising
        return self.gamma ** (epoch // self.step_size)


@LR_SCHEDULES.register("cosine")
class CosineLR(LRSchedule):
    """Linear warm-up, then cosine decay to `min_factor` at `epochs` (nanoGPT `get_lr`, per epoch).

    factor_e = (e + 1) / (warmup + 1)                                              for e < warmup
             = m + (1 - m) * (1 + cos(pi * (e - warmup) / (epochs - warmup))) / 2  for warmup <= e < epochs
             = m                                                                   for e >= epochs
    with m = min_factor. The first epoch already trains (factor > 0), the factor is 1 at e = warmup, and it would reach
    m at e = epochs, one past the last epoch (like `torch.optim.lr_scheduler.CosineAnnealingLR` with T_max = epochs).

    Args:
        epochs: Total epochs of the run, >= 1.
        warmup: Epochs of linear warm-up, 0 <= warmup < epochs.
        min_factor: The factor the cosine decays to, in [0, 1].
    """

    name = "cosine"

    def __init__(self, epochs: int, /, *, warmup: int = 0, min_factor: float = 0.0) -> None:
        super().__init__(epochs)
        self.warmup = integer_argument(self._where, "warmup", warmup, 0)
        if self.warmup >= self.epochs:
            raise ConfigError(
                f"{self._where}: warmup={self.warmup} is invalid; must be < epochs={self.epochs} "
                f"(leave epochs for the cosine decay)"
            )
        self.min_factor = real_argument(self._where, "min_factor", min_factor, "in [0, 1]", lambda v: 0 <= v <= 1)

    def _factor(self, epoch: int) -> float:
        # 1) linear warm-up: (e + 1) / (warmup + 1), so the first epoch is not wasted at lr = 0
        if epoch < self.warmup:
            return (epoch + 1) / (self.warmup + 1)
        # 2) past the end: min_factor
        if epoch >= self.epochs:
            return self.min_factor
        # 3) in between: cosine from 1 (e = warmup) down towards min_factor (e = epochs)
        ratio = (epoch - self.warmup) / (self.epochs - self.warmup)  # in [0, 1)
        coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
        return self.min_factor + coeff * (1.0 - self.min_factor)


def create_lr_schedule(name: str, epochs: int, **kwargs: Any) -> LRSchedule:
    """Build the learning-rate schedule registered as `name`.

    Args:
        name: A key of `LR_SCHEDULES`.
        epochs: Total epochs of the run.
        **kwargs: The schedule's keyword-only settings.

    Raises:
        ConfigError: unknown name or setting (the message lists the valid ones), or an invalid value.
    """
    return LR_SCHEDULES.create(name, epochs, **kwargs)


def set_lr(optimizer: torch.optim.Optimizer, base_lrs: List[float], factor: float) -> None:
    """Set each param group's learning rate to its base rate times `factor`.

    Args:
        optimizer: Any torch optimizer.
        base_lrs: One base learning rate per param group, e.g. `[g["lr"] for g in optimizer.param_groups]` taken once
            before training (and saved with the checkpoint).
        factor: The schedule's factor, e.g. `schedule.factor(epoch)`.

    Raises:
        ValueError: `base_lrs` does not match the param groups, or `factor` is negative or not finite.
    """
    groups = optimizer.param_groups
    if len(base_lrs) != len(groups):
        raise ValueError(f"got {len(base_lrs)} base learning rates for {len(groups)} param groups")
    if not math.isfinite(factor) or factor < 0:
        raise ValueError(f"learning-rate factor must be finite and >= 0, got {factor!r}")
    for group, base in zip(groups, base_lrs):
        lr = float(base) * factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # a tensor lr (capturable / fused optimizers) must keep its identity
        else:
            group["lr"] = lr
