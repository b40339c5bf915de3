"""Beta schedules: beta_t >= 0 at a step t = 0, 1, 2, ... (optimizer steps or epochs, whichever the trainer counts).

Every one takes the target `beta` (positional-only: the recipe's objective supplies it) and a `delay`: beta_t = 0 for
t < delay, and the remaining phases see t - delay.
"""
import math
import numbers
from abc import ABC, abstractmethod
from typing import Any

from ib.checks import count, integer_argument, real_argument
from ib.errors import ConfigError
from ib.registry import Registry
from ib.schedules.base import Schedule

BETA_SCHEDULES = Registry("beta schedule")


class BetaSchedule(Schedule, ABC):
    """Base of beta schedules: beta_t = 0 for t < delay, then `_after_delay(t - delay)`.

    Args:
        beta: The target value, finite and >= 0.
        delay: Steps at the start with beta = 0 (plain cross-entropy training), >= 0.
    """

    _kind = "beta schedule"

    def __init__(self, beta: float, /, *, delay: int = 0) -> None:
        self.beta = real_argument(self._where, "beta", beta, ">= 0", lambda v: v >= 0)
        self.delay = integer_argument(self._where, "delay", delay, 0)

    def value(self, step: int) -> float:
        """beta at `step` (counted from 0 in the trainer's unit); a pure function of `step`."""
        step = count(step, "step")
        # 1) delay: no bottleneck yet
        if step < self.delay:
            return 0.0
        # 2) the schedule proper, counting from the end of the delay
        return self._after_delay(step - self.delay)

    __call__ = value

    @abstractmethod
    def _after_delay(self, t: int) -> float:
        """beta at `t` steps after the delay."""


@BETA_SCHEDULES.register("constant")
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
        self.warmup = integer_argument(self._where, "warmup", warmup, 1)
        self.start = self._check_start(start)
        if self.start > self.beta:
            raise ConfigError(
                f"{self._where}: start={self.start!r} > beta={self.beta!r}; a warm-up ramps up, "
                f"so start must be <= beta"
            )

    def _check_start(self, start: Any) -> float:
        return real_argument(self._where, "start", start, ">= 0", lambda v: v >= 0)

    def _after_delay(self, t: int) -> float:
        # 1) warm-up: from start (t = 0) towards beta; clamped so rounding cannot overshoot beta
        if t < self.warmup:
            return min(self.beta, self._ramp(t / self.warmup))
        # 2) after the warm-up: hold beta
        return self.beta

    @abstractmethod
    def _ramp(self, progress: float) -> float:
        """The value at `progress` = t / warmup in [0, 1): start at 0, reaching beta as progress -> 1."""


@BETA_SCHEDULES.register("linear")
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


@BETA_SCHEDULES.register("cosine")
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


@BETA_SCHEDULES.register("exponential")
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
        return real_argument(self._where, "start", start, "> 0", lambda v: v > 0)

    def _ramp(self, progress: float) -> float:
        return self.start * (self.beta / self.start) ** progress


def _check_positive_beta(schedule: BetaSchedule, beta: Any) -> None:
    # A multiplicative schedule cannot have 0 as its target; say what to use instead.
    if isinstance(beta, numbers.Real) and not isinstance(beta, bool) and beta == 0:
        raise ConfigError(
            f"{schedule._where}: beta=0 is invalid; a multiplicative ramp needs beta > 0 "
            f"(for beta = 0 use the 'constant' schedule)"
        )


@BETA_SCHEDULES.register("step")
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
        self.step_size = integer_argument(self._where, "step_size", step_size, 1)
        self.gamma = real_argument(
            self._where, "gamma", gamma, "> 1 (beta grows by gamma each stage until it reaches beta)", lambda v: v > 1
        )
        self.start = real_argument(self._where, "start", start, "> 0", lambda v: v > 0)
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


def create_beta_schedule(name: str, beta: float, **kwargs: Any) -> BetaSchedule:
    """Build the beta schedule registered as `name`.

    Args:
        name: A key of `BETA_SCHEDULES`.
        beta: The target beta.
        **kwargs: The schedule's keyword-only settings.

    Raises:
        ConfigError: unknown name or setting (the message lists the valid ones), or an invalid value.
    """
    return BETA_SCHEDULES.create(name, beta, **kwargs)
