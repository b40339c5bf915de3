"""MINE (Belghazi et al., ICML 2018): the Donsker-Varadhan bound with a bias-corrected gradient, and MINE-f.

The minibatch gradient of log E_Q[e^T] is biased: it is E_Q[e^T grad T] / E_Q[e^T] with both expectations taken on
the same batch. MINE replaces the denominator by an exponential moving average of E_Q[e^T] over batches. We keep the
average in log space (a registered buffer, so it moves with `.to(device)` and lands in `state_dict()`), and write
the corrected gradient as the gradient of the surrogate

    S = E_P[T] - exp(log E_Q[e^T] - log_ema) + 1 - log_ema,      (log_ema held constant)

whose gradient is E_P[grad T] - E_Q[e^T grad T] / ema, and whose value equals the DV bound when the average is
up to date. Updating the average with the current batch before use bounds the exponent by log(1 / rate) in the
loss; the penalty reads the average without updating it, so there e^(...) goes through `exp_capped` (equal to exp
for exponents up to 30), as does MINE-f's E_Q[e^(T-1)] = exp(log E_Q[e^T] - 1): finite for critic outputs of 1e4.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ib.errors import ConfigError
from ib.estimators.base import ESTIMATORS, CriticEstimator, exp_capped
from ib.models.bottlenecks import Code


@ESTIMATORS.register("mine")
class MINE(CriticEstimator):
    """Donsker-Varadhan bound trained with MINE's moving-average gradient correction.

    Args:
        critic: statistics network T(x, z).
        ema_rate: weight of the newest batch in the moving average of E_Q[e^T]. The MINE paper and its public
            ports use 0.01 (an average over roughly the last 100 critic steps).
        marginals: shuffled pairings per sample and step (see CriticEstimator).
    """

    label = "MINE"

    def __init__(self, critic: nn.Module, /, *, ema_rate: float = 0.01, marginals: int = 1) -> None:
        super().__init__(critic, marginals=marginals)
        if not 0.0 < ema_rate <= 1.0:
            raise ConfigError(f"ema_rate must be in (0, 1], got {ema_rate}")
        self.ema_rate = ema_rate
        self.register_buffer("log_ema", torch.zeros(()))  # log of the moving average of E_Q[e^T]
        self.register_buffer("ema_steps", torch.zeros((), dtype=torch.long))  # updates so far; 0 = not started

    @torch.no_grad()
    def _update_ema(self, lme: Tensor) -> None:
        """Blend lme = log E_Q[e^T] of a batch into the average; the first batch starts it, and a non-finite one
        leaves it alone (it must not poison the average). Decided on the device: no host sync per step."""
        a = self.ema_rate
        blended = torch.logaddexp(self.log_ema + math.log1p(-a), lme + math.log(a)) if a < 1 else lme
        finite = torch.isfinite(lme)
        self.log_ema.copy_(torch.where(finite, torch.where(self.ema_steps > 0, blended, lme), self.log_ema))
        self.ema_steps.add_(finite.long())

    def _surrogate(self, mean_joint: Tensor, lme: Tensor) -> Tensor:
        """S from E_P[T] and lme = log E_Q[e^T] of the batch (differentiable)."""
        log_ema = self.log_ema.detach()
        return mean_joint - exp_capped(lme - log_ema) + 1.0 - log_ema

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        """Minus the bias-corrected bound, for the critic's optimiser; updates the moving average first (with
        `sync`, from the global batch, so that it is the same on every process)."""
        t_joint, t_marginal = self.scores(x, z)
        lme = self.log_mean_exp(t_marginal)
        self._update_ema(lme.detach())
        return -self._surrogate(self.mean(t_joint), lme)

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        """The bias-corrected bound for the encoder to minimise; the moving average is read, not updated."""
        t_joint, t_marginal = self.scores(x, z)
        mean_joint, lme = self.mean(t_joint), self.log_mean_exp(t_marginal)
        # no average yet: the plain DV bound (chosen on the device, without a host sync)
        return torch.where(self.ema_steps > 0, self._surrogate(mean_joint, lme), mean_joint - lme)


@ESTIMATORS.register("mine_f")
class MINEf(CriticEstimator):
    """MINE-f: the f-divergence (NWJ) bound E_P[T] - E_Q[e^(T - 1)], whose minibatch gradient is unbiased.

    E_Q[e^(T-1)] is computed as exp(log-mean-exp(T) - 1) (`exp_capped`: finite for extreme scores, exact below).
    The reported estimate is the DV bound of the same critic (never below the f-bound for the same T).

    Args:
        critic: statistics network T(x, z).
        marginals: shuffled pairings per sample and step (see CriticEstimator).
    """

    label = "MINE-f"

    def _bound(self, x: Tensor, z: Tensor) -> Tensor:
        t_joint, t_marginal = self.scores(x, z)
        return self.mean(t_joint) - exp_capped(self.log_mean_exp(t_marginal) - 1.0)  # E_Q[e^(T-1)] by logsumexp

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        return -self._bound(x, z)

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        return self._bound(x, z)
