"""The variational upper bound of VIB (Alemi et al., ICLR 2017) for Gaussian encoders.

For p(z|x) = N(mean(x), diag(std(x)^2)) and any prior r(z),

    I(X;Z) = E_x KL(p(z|x) || p(z)) <= E_x KL(p(z|x) || r(z)),

here with r = N(0, I) and the KL in closed form, summed over the K code dimensions:

    KL = 1/2 sum_k (mean_k^2 + std_k^2 - 1 - 2 log std_k).

No critic and no parameters: the trainer gives it no optimiser and skips the critic's step, and `ib train
RECIPE mi.estimator=vib_kl` runs the VIB baseline from the same recipes. It needs the encoder's mean and std, so it
applies to the `gaussian` bottleneck only (other bottlenecks are rejected before training) and not to
`ib.estimate_mi` on samples.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ib import distributed
from ib.errors import ConfigError
from ib.estimators.base import ESTIMATORS, MIEstimate, MIEstimator, jackknife_se
from ib.models.bottlenecks import Code

GAUSSIAN_BOTTLENECKS = ("gaussian",)  # bottlenecks whose Code carries mean and std


def gaussian_kl(mean: Tensor, std: Tensor) -> Tensor:
    """KL(N(mean, diag(std^2)) || N(0, I)) per row, summed over the last dimension: [N, K] -> [N].

    log std is taken of std clamped at the dtype's smallest normal number, so an underflowed std (softplus of a
    very negative input) gives a large finite KL rather than inf.
    """
    log_std = std.clamp_min(torch.finfo(std.dtype).tiny).log()
    return 0.5 * (mean.pow(2) + std.pow(2) - 1.0).sum(-1) - log_std.sum(-1)


def gaussian_code(code: Code | None) -> Code:
    """`code`, checked to carry the Gaussian encoder's mean and std (which the KL-based bounds read)."""
    if code is None or code.mean is None or code.std is None:
        raise ConfigError("vib_kl and pairwise_kl need the Gaussian encoder's mean and std (model.bottleneck=gaussian)")
    return code


def require_gaussian(estimator: str, bottleneck: str) -> None:
    """Refuse, in one line naming the encoders that have one, a bottleneck without a Gaussian p(z|x)."""
    if bottleneck not in GAUSSIAN_BOTTLENECKS:
        raise ConfigError(f"mi.estimator: {estimator} needs a Gaussian p(z|x) (model.bottleneck="
                          f"{' or '.join(GAUSSIAN_BOTTLENECKS)}), got model.bottleneck={bottleneck}; use a "
                          f"critic-based estimator (mine, smile, ...) instead")


class GaussianCodeBound(MIEstimator):
    """Base of the upper bounds read off a Gaussian encoder's mean and std (`vib_kl`, `pairwise_kl`): no critic and
    nothing to train; the library passes the bottleneck's registry name in place of a critic.

    Args:
        bottleneck: registry name of the model's bottleneck; only a Gaussian one has the mean and std the bound
            needs.

    Raises:
        ConfigError: `bottleneck` is not Gaussian.
    """

    name: ClassVar[str]  # the registry name, for messages
    upper_bound = True
    lower_bound = False
    needs_critic = False
    loss_is_minus_penalty = False  # nothing to train; the penalty needs the Code

    def __init__(self, bottleneck: str, /) -> None:
        super().__init__()
        require_gaussian(self.name, bottleneck)

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        """Nothing to train: a zero that needs no gradient."""
        return torch.zeros((), device=z.device, dtype=z.dtype)


@ESTIMATORS.register("vib_kl")
class VariationalKL(GaussianCodeBound):
    """E_x KL(N(mean, std^2) || N(0, I)), the VIB upper bound on I(X;Z), from the encoder's `Code`."""

    name = "vib_kl"
    label = "KL upper bound"

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        """The batch average of the KL (of the global batch with `sync`), differentiable in the mean and std."""
        code = gaussian_code(code)
        return self.mean(gaussian_kl(code.mean, code.std))

    @torch.no_grad()
    def estimate(self, x: Tensor, z: Tensor, *, code: Code | None = None, batch_size: int = 1024,
                 permutations: int = 10, generator: torch.Generator | None = None) -> MIEstimate:
        """The average KL over the (held-out) set, in nats, with the jackknife standard error of that mean; the
        other arguments are unused."""
        code = gaussian_code(code)
        kl = gaussian_kl(code.mean, code.std).double()  # [N]
        if self.sync:  # every process's rows (equal shares)
            kl = distributed.gather(kl)[0]
        return MIEstimate(float(kl.mean()), jackknife_se(lambda keep: kl[keep].mean(), kl.shape[0], device=kl.device))
