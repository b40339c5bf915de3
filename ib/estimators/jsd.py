"""Jensen-Shannon training of the critic (Hjelm et al. 2019; Poole et al. 2019), with the DV bound reported.

The critic maximises the f-GAN Jensen-Shannon objective E_P[-softplus(-T)] - E_Q[softplus(T)]: a logistic
regression of joint against marginal pairs, whose optimum is T* = log p(x, z) / (p(x) p(z)), the log density
ratio. The objective is bounded and its minibatch gradient unbiased, so training is stable; its value is not an
estimate of MI, so the reported number (and the encoder's penalty) is the DV bound E_P[T] - log E_Q[e^T] of the
same critic, which is the MI itself at T*.

The training loss has the gradient of minus the JS objective and the value of minus the reported bound (on the
batch): `-(js + (bound - js).detach())`, the construction of Song and Ermon's code. So, as for every estimator,
minus the loss is the bound on the training batch, which the trainer logs as `mi/I_XZ_train`.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ib.estimators.base import ESTIMATORS, CriticEstimator
from ib.models.bottlenecks import Code


def js_objective(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """E_P[-softplus(-T)] - E_Q[softplus(T)] (finite for any finite scores: softplus is linear at large inputs)."""
    return -F.softplus(-t_joint).mean() - F.softplus(t_marginal).mean()


@ESTIMATORS.register("jsd")
class JSD(CriticEstimator):
    """Critic trained with the Jensen-Shannon objective; DV bound as penalty and estimate.

    Args:
        critic: statistics network T(x, z).
        marginals: shuffled pairings per sample and step (see CriticEstimator).
    """

    label = "JSD"
    loss_is_minus_penalty = False  # the critic follows JS, the encoder the DV bound

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        """Gradient of -JS, value of -report (the bound) on the batch."""
        t_joint, t_marginal = self.scores(x, z)
        js = js_objective(t_joint, t_marginal)
        return -(js + (self.report(t_joint.detach(), t_marginal.detach()) - js.detach()))

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        return self.report(*self.scores(x, z))
