"""Schedules for beta (the weight of I(X;Z) in CE + beta * I(X;Z)) and for the learning rate.

A schedule is a small object whose value is a pure function of a count that the training code tracks and passes in
(timm `scheduler/scheduler.py`: "All epoch and update counts must be tracked in the training code and explicitly
passed in"). It holds no optimizer and no counter, so calling it twice with the same step gives the same value, and
`state_dict()` is just its constructor arguments.

Beta schedules (`BETA_SCHEDULES`, `create_beta_schedule`) map a step t = 0, 1, 2, ... (optimizer steps or epochs,
whichever the trainer counts) to beta_t >= 0. Every one takes the target `beta` and a `delay`: beta_t = 0 for
t < delay, and the remaining phases see t - delay.

Learning-rate schedules (`LR_SCHEDULES`, `create_lr_schedule`) map an epoch index e = 0, 1, 2, ... to a factor of
the base learning rate; `set_lr` writes base * factor into an optimizer's param groups.

The registries hold small factory functions, one per schedule class and with the class's signature: positional-only
parameters are supplied by the library (`beta` from the recipe's objective, `epochs` from the recipe's length) and the
keyword-only ones, each annotated and defaulted, are what a recipe may set (see `ib.registry`; the recipe reads the
annotations with `typing.get_type_hints(factory)`, which sees a function's parameters but not a class's `__init__`).
"""
import inspect
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, Dict, List, Mapping

import torch

from ib.errors import CheckpointError, ConfigError
from ib.registry import Registry

__all__ = [
    "BETA_SCHEDULES",
    "LR_SCHEDULES",
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

BETA_SCHEDULES = Registry("beta schedule")
LR_SCHEDULES = Registry("lr schedule")


# ----------------------------------------------------------------------------------------------------------------------
# Argument checks: each raises ConfigError with one line naming the schedule, the parameter, the value and what is
# allowed.


def _check_int(where: str, param: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{where}: {param}={value!r} is invalid; must be an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(f"{where}: {param}={value!r} is invalid; must be an integer >= {minimum}")
    return int(value)


def _check_float(where: str, param: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"{where}: {param}={value!r} is invalid; must be a finite number {allowed}")
    value = float(value)
    if not ok(value):
        raise ConfigError(f"{where}: {param}={value!r} is invalid; must be a finite number {allowed}")
    return value


def _check_count(value: Any, what: str) -> int:
    """The step or epoch passed to a schedule: a non-negative integer (a bug in the caller otherwise)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------------
# Shared base: state_dict() is the constructor's arguments; load_state_dict() re-validates them by constructing.


class _Schedule:
    name: ClassVar[str]  # the registry key, also stored in state_dict()
    _kind: ClassVar[str]  # "beta schedule" / "lr schedule", for messages

    @property
    def _where(self) -> str:
        return f"{getattr(self, 'name', type(self).__name__)} {self._kind}"

    @classmethod
    def _param_names(cls) -> List[str]:
        # Every constructor argument is stored under its own name, so the signature is the state's schema.
        return list(inspect.signature(cls).parameters)

    def state_dict(self) -> Dict[str, Any]:
        """The schedule's name and constructor arguments, as plain Python numbers and strings.

        Safe for `torch.save` and `torch.load(..., weights_only=True)`.
        """
        return {"name": self.name, **{p: getattr(self, p) for p in self._param_names()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Take the arguments in `state_dict` (from `state_dict()` of the same kind of schedule), checking them.

        Raises:
            CheckpointError: `state_dict` belongs to another schedule or lacks / adds keys.
            ConfigError: a value is invalid (as the constructor would say).
        """
        state = dict(state_dict)
        name = state.pop("name", None)
        if name != self.name:
            raise CheckpointError(f"state_dict is for {name!r}, not for the {self._where}")
        expected = self._param_names()
        if set(state) != set(expected):
            raise CheckpointError(
                f"{self._where} state_dict has keys {sorted(state)}; expected {sorted(expected)}"
            )
        sig = inspect.signature(type(self))
        args = [state[p.name] for p in sig.parameters.values() if p.kind is p.POSITIONAL_ONLY]
        kwargs = {p.name: state[p.name] for p in sig.parameters.values() if p.kind is p.KEYWORD_ONLY}
        fresh = type(self)(*args, **kwargs)  # re-runs every check
        self.__dict__.update(fresh.__dict__)

    def __repr__(self) -> str:
        args = ", ".join(f"{p}={getattr(self, p)!r}" for p in self._param_names())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.state_dict() == self.state_dict()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable through load_state_dict


def _create(registry: Registry, name: str, args: tuple, kwargs: Dict[str, Any]) -> Any:
    factory = registry.get(name)  # unknown name -> ConfigError listing the valid ones
    valid = registry.options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        listed = ", ".join(sorted(valid)) or "(none)"
        raise ConfigError(f"unknown option {unknown[0]!r} for {registry.kind} '{name}'; valid: {listed}")
    return factory(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Beta schedules


class BetaSchedule(_Schedule, ABC):
    """Base of beta schedules: beta_t = 0 for t < delay, then `_after_delay(t - delay)`.

    Args:
        beta: The target value, finite and >= 0.
        delay: Steps at the start with beta = 0 (plain cross-entropy training), >= 0.
    """

    _kind = "beta schedule"

    def __init__(self, beta: float, /, *, delay: int = 0) -> None:
        self.beta = _check_float(self._where, "beta", beta, ">= 0", lambda v: v >= 0)
        self.delay = _check_int(self._where, "delay", delay, 0)

    def value(self, step: int) -> float:
        """beta at `step` (counted from 0 in the trainer's unit); a pure function of `step`."""
        step = _check_count(step, "step")
        # 1) delay: no bottleneck yet
        if step < self.delay:
            return 0.0
        # 2) the schedule proper, counting from the end of the delay
        return self._after_delay(step - self.delay)

    __call__ = value

    @abstractmethod
    def _after_delay(self, t: int) -> float:
        """beta at `t` steps after the delay."""


class ConstantBeta(BetaSchedule):
    """beta_t = beta (after the delay).

    Args:
        beta: The value, >= 0.
        delay: Steps with beta = 0 first.
    """

    name = "constant"

    def __init__(self, beta: float, /, *, delay: int = 0) -> None:
        super().__init__(beta, delay=delay)

    def _after_delay(self, t: int) -> float:
        return self.beta


class _WarmupBeta(BetaSchedule):
    """A ramp from `start` up to `beta` over `warmup` steps, then `beta`: subclasses give the ramp's shape."""

    def __init__(self, beta: float, /, *, warmup: int, start: float, delay: int) -> None:
        super().__init__(beta, delay=delay)
        self.warmup = _check_int(self._where, "warmup", warmup, 1)
        self.start = self._check_start(start)
        if self.start > self.beta:
            raise ConfigError(
                f"{self._where}: start={self.start!r} > beta={self.beta!r}; a warm-up ramps up, "
                f"so start must be <= beta"
            )

    def _check_start(self, start: Any) -> float:
        return _check_float(self._where, "start", start, ">= 0", lambda v: v >= 0)

    def _after_delay(self, t: int) -> float:
        # 1) warm-up: from start (t = 0) towards beta; clamped so rounding cannot overshoot beta
        if t < self.warmup:
            return min(self.beta, self._ramp(t / self.warmup))
        # 2) after the warm-up: hold beta
        return self.beta

    @abstractmethod
    def _ramp(self, progress: float) -> float:
        """The value at `progress` = t / warmup in [0, 1): start at 0, reaching beta as progress -> 1."""


class LinearBeta(_WarmupBeta):
    """Linear warm-up: beta_t = start + (beta - start) * t / warmup for t < warmup, then beta.

    (t counts from the end of the delay; beta_t = 0 during the delay.)

    Args:
        beta: The target value, >= 0.
        warmup: Length of the ramp in steps, >= 1.
        start: Value at the first step after the delay, 0 <= start <= beta.
        delay: Steps with beta = 0 first.
    """

    name = "linear"

    def __init__(self, beta: float, /, *, warmup: int = 1000, start: float = 0.0, delay: int = 0) -> None:
        super().__init__(beta, warmup=warmup, start=start, delay=delay)

    def _ramp(self, progress: float) -> float:
        return self.start + (self.beta - self.start) * progress


class CosineBeta(_WarmupBeta):
    """Half-cosine warm-up: beta_t = start + (beta - start) * (1 - cos(pi * t / warmup)) / 2 for t < warmup, then beta.

    Flat at both ends, steepest mid-ramp. (t counts from the end of the delay; beta_t = 0 during the delay.)

    Args:
        beta: The target value, >= 0.
        warmup: Length of the ramp in steps, >= 1.
        start: Value at the first step after the delay, 0 <= start <= beta.
        delay: Steps with beta = 0 first.
    """

    name = "cosine"

    def __init__(self, beta: float, /, *, warmup: int = 1000, start: float = 0.0, delay: int = 0) -> None:
        super().__init__(beta, warmup=warmup, start=start, delay=delay)

    def _ramp(self, progress: float) -> float:
        return self.start + (self.beta - self.start) * (1.0 - math.cos(math.pi * progress)) / 2.0


class ExponentialBeta(_WarmupBeta):
    """Log-linear warm-up: beta_t = start * (beta / start) ** (t / warmup) for t < warmup, then beta.

    log(beta_t) moves linearly from log(start) to log(beta), so each decade takes the same number of steps.
    (t counts from the end of the delay; beta_t = 0 during the delay.)

    Args:
        beta: The target value, > 0 (a log ramp cannot reach 0; for beta = 0 use 'constant').
        warmup: Length of the ramp in steps, >= 1.
        start: Value at the first step after the delay, 0 < start <= beta.
        delay: Steps with beta = 0 first.
    """

    name = "exponential"

    def __init__(self, beta: float, /, *, warmup: int = 1000, start: float = 1e-6, delay: int = 0) -> None:
        _check_positive_beta(self, beta)
        super().__init__(beta, warmup=warmup, start=start, delay=delay)

    def _check_start(self, start: Any) -> float:
        return _check_float(self._where, "start", start, "> 0", lambda v: v > 0)

    def _ramp(self, progress: float) -> float:
        return self.start * (self.beta / self.start) ** progress


def _check_positive_beta(schedule: BetaSchedule, beta: Any) -> None:
    # A multiplicative schedule cannot have 0 as its target; say what to use instead.
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta == 0:
        raise ConfigError(
            f"{schedule._where}: beta=0 is invalid; a multiplicative ramp needs beta > 0 "
            f"(for beta = 0 use the 'constant' schedule)"
        )


class StepBeta(BetaSchedule):
    """Staircase growth: beta_t = min(beta, start * gamma ** (t // step_size)).

    beta is multiplied by `gamma` every `step_size` steps, from `start`, until it reaches `beta`; that happens at
    t = K * step_size with K = ceil(log(beta / start) / log(gamma)), and beta_t = beta from then on. A stage that lands
    within rounding of `beta` (e.g. 1e-6 * 10 ** 3 for beta = 1e-3) counts as reaching it, so `beta` is returned
    exactly. (t counts from the end of the delay; beta_t = 0 during the delay.)

    Args:
        beta: The target value, > 0 (for beta = 0 use 'constant').
        step_size: Steps per stage, >= 1.
        gamma: Growth per stage, > 1.
        start: Value of the first stage, 0 < start <= beta.
        delay: Steps with beta = 0 first.
    """

    name = "step"

    def __init__(
        self, beta: float, /, *, step_size: int = 10, gamma: float = 10.0, start: float = 1e-6, delay: int = 0
    ) -> None:
        _check_positive_beta(self, beta)
        super().__init__(beta, delay=delay)
        self.step_size = _check_int(self._where, "step_size", step_size, 1)
        self.gamma = _check_float(
            self._where, "gamma", gamma, "> 1 (beta grows by gamma each stage until it reaches beta)", lambda v: v > 1
        )
        self.start = _check_float(self._where, "start", start, "> 0", lambda v: v > 0)
        if self.start > self.beta:
            raise ConfigError(
                f"{self._where}: start={self.start!r} > beta={self.beta!r}; the steps ramp up, "
                f"so start must be <= beta"
            )
        # Number of stages before beta is reached; the 1e-9 absorbs rounding in the log ratio.
        self._stages = max(0, math.ceil(math.log(self.beta / self.start) / math.log(self.gamma) - 1e-9))

    def _after_delay(self, t: int) -> float:
        stage = t // self.step_size
        # 1) growing stages: start * gamma ** stage (< beta)
        if stage < self._stages:
            return min(self.beta, self.start * self.gamma**stage)
        # 2) reached: hold beta
        return self.beta


# The registry entries: one factory per class, with the class's signature (tests check that they agree).


@BETA_SCHEDULES.register("constant")
def _constant_beta(beta: float, /, *, delay: int = 0) -> ConstantBeta:
    """beta after `delay` steps of 0 (`ConstantBeta`)."""
    return ConstantBeta(beta, delay=delay)


@BETA_SCHEDULES.register("linear")
def _linear_beta(beta: float, /, *, warmup: int = 1000, start: float = 0.0, delay: int = 0) -> LinearBeta:
    """Linear warm-up from `start` to `beta` over `warmup` steps (`LinearBeta`)."""
    return LinearBeta(beta, warmup=warmup, start=start, delay=delay)


@BETA_SCHEDULES.register("cosine")
def _cosine_beta(beta: float, /, *, warmup: int = 1000, start: float = 0.0, delay: int = 0) -> CosineBeta:
    """Half-cosine warm-up from `start` to `beta` over `warmup` steps (`CosineBeta`)."""
    return CosineBeta(beta, warmup=warmup, start=start, delay=delay)


@BETA_SCHEDULES.register("exponential")
def _exponential_beta(beta: float, /, *, warmup: int = 1000, start: float = 1e-6, delay: int = 0) -> ExponentialBeta:
    """Log-linear warm-up from `start` to `beta` over `warmup` steps (`ExponentialBeta`)."""
    return ExponentialBeta(beta, warmup=warmup, start=start, delay=delay)


@BETA_SCHEDULES.register("step")
def _step_beta(
    beta: float, /, *, step_size: int = 10, gamma: float = 10.0, start: float = 1e-6, delay: int = 0
) -> StepBeta:
    """`start` times `gamma` every `step_size` steps, capped at `beta` (`StepBeta`)."""
    return StepBeta(beta, step_size=step_size, gamma=gamma, start=start, delay=delay)


def create_beta_schedule(name: str, beta: float, **kwargs: Any) -> BetaSchedule:
    """Build the beta schedule registered as `name`.

    Args:
        name: A key of `BETA_SCHEDULES`.
        beta: The target beta.
        **kwargs: The schedule's keyword-only settings.

    Raises:
        ConfigError: unknown name or setting (the message lists the valid ones), or an invalid value.
    """
    return _create(BETA_SCHEDULES, name, (beta,), kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules


class LRSchedule(_Schedule, ABC):
    """Base of learning-rate schedules: a factor of the base learning rate, a pure function of the epoch index.

    Every schedule takes the run's total `epochs` (positional-only, supplied by the trainer) so that all share one
    signature, even those that do not use it.

    Args:
        epochs: Total epochs of the run, >= 1.
    """

    _kind = "lr schedule"

    def __init__(self, epochs: int, /) -> None:
        self.epochs = _check_int(self._where, "epochs", epochs, 1)

    def factor(self, epoch: int) -> float:
        """Multiplier of the base learning rate during `epoch` (counted from 0)."""
        return self._factor(_check_count(epoch, "epoch"))

    __call__ = factor

    @abstractmethod
    def _factor(self, epoch: int) -> float:
        """The factor at a validated `epoch`."""


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
        self.step_size = _check_int(self._where, "step_size", step_size, 1)
        self.gamma = _check_float(self._where, "gamma", gamma, "> 0", lambda v: v > 0)

    def _factor(self, epoch: int) -> float:
        # float ** int underflows to 0.0 for huge epochs rather than raising
        return self.gamma ** (epoch // self.step_size)


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
        self.warmup = _check_int(self._where, "warmup", warmup, 0)
        if self.warmup >= self.epochs:
            raise ConfigError(
                f"{self._where}: warmup={self.warmup} is invalid; must be < epochs={self.epochs} "
                f"(leave epochs for the cosine decay)"
            )
        self.min_factor = _check_float(self._where, "min_factor", min_factor, "in [0, 1]", lambda v: 0 <= v <= 1)

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


# The registry entries: one factory per class, with the class's signature (tests check that they agree).


@LR_SCHEDULES.register("constant")
def _constant_lr(epochs: int, /) -> ConstantLR:
    """Factor 1 (`ConstantLR`)."""
    return ConstantLR(epochs)


@LR_SCHEDULES.register("step")
def _step_lr(epochs: int, /, *, step_size: int = 2, gamma: float = 0.97) -> StepLR:
    """Factor times `gamma` every `step_size` epochs (`StepLR`)."""
    return StepLR(epochs, step_size=step_size, gamma=gamma)


@LR_SCHEDULES.register("cosine")
def _cosine_lr(epochs: int, /, *, warmup: int = 0, min_factor: float = 0.0) -> CosineLR:
    """Linear warm-up, then cosine decay to `min_factor` at `epochs` (`CosineLR`)."""
    return CosineLR(epochs, warmup=warmup, min_factor=min_factor)


def create_lr_schedule(name: str, epochs: int, **kwargs: Any) -> LRSchedule:
    """Build the learning-rate schedule registered as `name`.

    Args:
        name: A key of `LR_SCHEDULES`.
        epochs: Total epochs of the run.
        **kwargs: The schedule's keyword-only settings.

    Raises:
        ConfigError: unknown name or setting (the message lists the valid ones), or an invalid value.
    """
    return _create(LR_SCHEDULES, name, (epochs,), kwargs)


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
