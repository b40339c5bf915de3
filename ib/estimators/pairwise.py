"""Pairwise-distance bounds on I(X;Z) for Gaussian encoders (Kolchinsky & Tracey, Entropy 2017; the measure of the
nonlinear IB, Kolchinsky, Tracey & Wolpert, Entropy 2019).

With X uniform over N inputs and p(z|x_i) = p_i = N(mean_i, diag(std_i^2)), Z is the mixture (1/N) sum_i p_i and
I(X;Z) = H(Z) - H(Z|X). For any pairwise divergence D,

    I_D = -(1/N) sum_i log (1/N) sum_j exp(-D(p_i, p_j))

is an upper bound on I(X;Z) with D = KL and a lower bound with D = the Bhattacharyya distance (Chernoff-1/2).
Both lie in [0, log N]: 0 when every p_i is the same, log N when every pair is far apart (the code separates every
input). Closed forms per pair of diagonal Gaussians, summed over the K code dimensions:

    KL(p_i || p_j) = 1/2 sum_k [ s_i^2 / s_j^2 + (m_i - m_j)^2 / s_j^2 - 1 + 2 log(s_j / s_i) ]
    B(p_i, p_j)    = 1/8 sum_k (m_i - m_j)^2 / s^2 + 1/2 sum_k log( s^2 / (s_i s_j) ),   s^2 = (s_i^2 + s_j^2) / 2

Numerics: the squared differences are taken of the differences themselves, in float64 (expanding the square cancels
catastrophically when std ~ 1e-3 and the means spread over ~10), row block by row block: O(N^2 K) work, memory of
one block.
"""
from __future__ import annotations

import math
from typing import Dict, Literal, Sequence

import torch
from torch import Tensor

from ib import distributed
from ib.estimators.base import ESTIMATORS, MIEstimate
from ib.estimators.vib import GaussianCodeBound, gaussian_code
from ib.models.bottlenecks import Code

Divergence = Literal["kl", "bhattacharyya"]
BLOCK_ELEMENTS = 1 << 17  # float64 elements of one [rows, cols, K] block (1 MiB: its passes stay in cache)
BLOCK_ROWS = 8  # rows of a block at least (the columns are then split)


def pairwise_divergences(mean_a: Tensor, std_a: Tensor, mean_b: Tensor, std_b: Tensor,
                         kinds: Sequence[Divergence]) -> Dict[str, Tensor]:
    """Each divergence of `kinds` for every pair of rows, [A, B] each, in float64: "kl" is KL(p_a || p_b),
    "bhattacharyya" the Bhattacharyya distance. The squared differences are formed once for all of them.

    The terms that depend on one row only (the log-variances) are summed per row; what depends on the pair is
    formed in place (out of place when a gradient is wanted), about ten passes over an [A, B, K] block for both kinds:

        KL = 1/2 [ sum_k (d^2 + v_a) / v_b + L_b - L_a - K ],                    d = m_a - m_b, L = sum_k log v
        B  = sum_k [ d^2 / (4 s) + 1/2 log s ] - K/2 log 2 - (L_a + L_b) / 4,   s = v_a + v_b
    """
    for kind in kinds:
        if kind not in ("kl", "bhattacharyya"):
            raise ValueError(f"kind must be 'kl' or 'bhattacharyya', got {kind!r}")
    k = mean_a.shape[-1]
    tiny = torch.finfo(torch.float64).tiny
    v_a, v_b = std_a.double().square().clamp_min(tiny), std_b.double().square().clamp_min(tiny)  # [A, K], [B, K]
    log_a, log_b = v_a.log().sum(-1)[:, None], v_b.log().sum(-1)[None, :]  # [A, 1], [1, B]
    v1, v2 = v_a[:, None, :], v_b[None, :, :]  # [A, 1, K], [1, B, K]
    # In place where nothing needs a gradient (the plane's band); out of place for the penalty's backward pass.
    inplace = not (torch.is_grad_enabled() and any(t.requires_grad for t in (mean_a, std_a, mean_b, std_b)))
    d = mean_a.double()[:, None, :] - mean_b.double()[None, :, :]
    d2 = d.square_() if inplace else d.square()  # [A, B, K]
    out: Dict[str, Tensor] = {}
    if "kl" in kinds:
        quad = (d2 + v1).div_(v2) if inplace else (d2 + v1) / v2
        out["kl"] = 0.5 * (quad.sum(-1) + log_b - log_a - k)  # [A, B]
    if "bhattacharyya" in kinds:
        s = v1 + v2  # [A, B, K]
        quad = d2.div_(s) if inplace else d2 / s  # d2 is not needed any more
        log_s = s.log_() if inplace else s.log()
        out["bhattacharyya"] = (0.25 * quad.sum(-1) + 0.5 * log_s.sum(-1) - 0.5 * k * math.log(2.0)
                                - 0.25 * (log_a + log_b))
    return {kind: out[kind] for kind in kinds}


def pairwise_divergence(mean_a: Tensor, std_a: Tensor, mean_b: Tensor, std_b: Tensor, kind: Divergence) -> Tensor:
    """D(p_a, p_b) for every pair of rows, [A, B], in float64 (`pairwise_divergences` of one kind)."""
    return pairwise_divergences(mean_a, std_a, mean_b, std_b, (kind,))[kind]


def pairwise_bounds(mean: Tensor, std: Tensor, kinds: Sequence[Divergence] = ("bhattacharyya", "kl")
                    ) -> Dict[str, float]:
    """-(1/N) sum_i log (1/N) sum_j exp(-D(p_i, p_j)) over the N rows of `mean` and `std` [N, K], in nats, for each
    divergence of `kinds` (one pass over the pairs for all): an upper bound on I(X;Z) with "kl", a lower bound with
    "bhattacharyya" (X uniform over the N inputs)."""
    n, k = mean.shape
    if n < 2:
        raise ValueError(f"pairwise bounds need at least 2 codes, got {n}")
    rows = max(BLOCK_ROWS, BLOCK_ELEMENTS // max(n * k, 1))  # several whole rows of pairs when they fit
    cols = max(1, BLOCK_ELEMENTS // (rows * k))
    totals = dict.fromkeys(kinds, 0.0)
    for start in range(0, n, rows):
        parts: Dict[str, list] = {kind: [] for kind in kinds}
        for col in range(0, n, cols):  # [rows, cols, K] blocks small enough to stay in cache
            blocks = pairwise_divergences(mean[start:start + rows], std[start:start + rows], mean[col:col + cols],
                                          std[col:col + cols], kinds)
            for kind, d in blocks.items():
                parts[kind].append(d)
        for kind, ds in parts.items():
            d = torch.cat(ds, dim=1)  # [rows, N]
            totals[kind] += float((torch.logsumexp(-d, dim=1) - math.log(n)).sum())
    out = {kind: -total / n for kind, total in totals.items()}
    if "kl" in out and "bhattacharyya" in out:  # B <= KL pair by pair, so the lower end is at most the upper; at
        out["bhattacharyya"] = min(out["bhattacharyya"], out["kl"])  # the ceiling their roundings may cross
    return out


def pairwise_bound(mean: Tensor, std: Tensor, kind: Divergence) -> float:
    """`pairwise_bounds` of one divergence."""
    return pairwise_bounds(mean, std, (kind,))[kind]


@ESTIMATORS.register("pairwise_kl")
class PairwiseKL(GaussianCodeBound):
    """The nonlinear IB's penalty (Kolchinsky, Tracey & Wolpert, Entropy 2019): the pairwise KL upper bound on
    I(X;Z) over the batch, -(1/B) sum_i log (1/B) sum_j exp(-KL(p_i || p_j)), differentiable in the encoder's means
    and stds. An upper bound, so a sound thing to minimise; at most log B."""

    name = "pairwise_kl"
    label = "pairwise KL bound"

    def _codes(self, code: Code | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """This process's means and stds [B, K], and those of every process's batch (with `sync`) to pair them with."""
        code = gaussian_code(code)
        pool_mean, _ = distributed.gather(code.mean) if self.sync else (code.mean, 0)
        pool_std, _ = distributed.gather(code.std) if self.sync else (code.std, 0)
        return code.mean, code.std, pool_mean, pool_std

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        """The bound on the (global) batch, in nats: each row's -log mean_j exp(-KL_ij), averaged."""
        mean, std, pool_mean, pool_std = self._codes(code)
        d = pairwise_divergence(mean, std, pool_mean, pool_std, "kl")  # [B, N*B] float64, from the differences
        rows = math.log(d.shape[1]) - torch.logsumexp(-d, dim=1)  # [B]
        return self.mean(rows).to(mean.dtype)

    @torch.no_grad()
    def estimate(self, x: Tensor, z: Tensor, *, code: Code | None = None, batch_size: int = 1024,
                 permutations: int = 10, generator: torch.Generator | None = None) -> MIEstimate:
        """The pairwise KL bound over the whole (held-out) set, in nats; the other arguments are unused. Its `se`
        is NaN: the bound is exact for X uniform over the set's inputs, a property of the set, not a sample of it."""
        _, _, pool_mean, pool_std = self._codes(code)
        return MIEstimate(pairwise_bound(pool_mean, pool_std, "kl"))
