"""InfoNCE (van den Oord et al. 2018; the bound of Poole et al. 2019): a contrastive lower bound on I(X;Z).

On a batch of B pairs with all-pairs critic scores S [B, B] (row i is x_i, the diagonal holds the joint pairs),

    I_NCE = mean_i [ S_ii - log( (1/B) sum_j e^(S_ij) ) ] = mean_i log softmax_i(S_i)_i + log B  <=  log B.

The bound has low variance but can never exceed log B: at B = 128 that is 4.85 nats, whatever the true MI. Use it
where I(X;Z) is a few nats or less, or where its low variance matters more than its bias (a penalty whose scale
is capped); for large MI use a DV-type bound (`smile`, `mine`).
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ib import distributed
from ib.estimators.base import (CEILING_MARGIN, ESTIMATORS, CeilingWarning, CriticEstimator, MIEstimate,
                                jackknife_se)
from ib.models.bottlenecks import Code


def infonce_terms(s: Tensor, offset: int = 0) -> Tensor:
    """Per-row InfoNCE terms [B] from all-pairs scores s [B, M] whose joint pairs sit at (i, offset + i)."""
    b, m = s.shape
    return s[:, offset:offset + b].diagonal() - (torch.logsumexp(s, dim=1) - math.log(m))


def infonce_bound(s: Tensor) -> Tensor:
    """InfoNCE from all-pairs scores s [B, M] whose first B columns' diagonal holds the joint pairs (M >= B)."""
    return infonce_terms(s).mean()


@ESTIMATORS.register("infonce")
class InfoNCE(CriticEstimator):
    """The InfoNCE bound, trained and reported with every other sample in the batch as a negative.

    Needs a critic with `scores(x, z) -> [B, B]`. A `separable` critic computes those B^2 scores with one matrix
    product; a `joint` critic runs its MLP on all B^2 pairs (fine for B of a few hundred).

    The held-out `estimate` over N samples splits them into ceil(N / batch_size) nearly equal blocks and averages
    the bound of each block (each sample is contrasted with the others of its block), so its ceiling is
    log(block size), about log(min(batch_size, N)); a warning is raised when the estimate comes within 0.1 nats of
    it, because the true value may then be anything above.
    """

    label = "InfoNCE"

    def __init__(self, critic: nn.Module, /) -> None:
        super().__init__(critic)

    def _bound(self, x: Tensor, z: Tensor) -> Tensor:
        # With `sync`, every process's codes are negatives: scores [B, N*B], ceiling log(N*B).
        pool, offset = distributed.gather(z) if self.sync else (z, 0)
        return self.mean(infonce_terms(self.critic.scores(x, pool).float(), offset))  # scores [B, N*B]

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        return -self._bound(x, z)

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        return self._bound(x, z)

    @torch.no_grad()
    def estimate(self, x: Tensor, z: Tensor, *, code: Code | None = None, batch_size: int = 1024,
                 permutations: int = 10, generator: torch.Generator | None = None) -> MIEstimate:
        """The InfoNCE bound on a (held-out) set, in blocks of about `batch_size` samples, in nats, with the
        jackknife standard error of its per-sample terms.

        Args:
            x: inputs [N, ...]; z: codes [N, K].
            code: unused.
            batch_size: the block size, hence the ceiling log(block size); a joint critic scores each block's
                pairs in row chunks of about 65,536 pairs, so memory stays bounded.
            permutations: unused (every pair within a block is scored).
            generator: unused (the blocks are fixed).

        With `sync`, x and z are this process's equal share of the set; the blocks are those of the whole set,
        so the value does not depend on the number of processes.
        """
        pool, offset = distributed.gather(z) if self.sync else (z, 0)  # with `sync`: every process's codes
        n = pool.shape[0]
        if n < 2:
            raise ValueError(f"InfoNCE needs at least 2 samples, got {n}")
        was_training = self.critic.training
        self.critic.eval()
        # Blocks of the whole set; this process scores its own rows of each block against the block's codes.
        blocks = torch.arange(n, device=z.device).tensor_split(math.ceil(n / max(batch_size, 2)))
        terms, ceilings = [], []  # per row of this process, in row order
        for block in blocks:
            m = block.numel()
            lo, hi = max(int(block[0]), offset), min(int(block[-1]) + 1, offset + z.shape[0])
            if m < 2 or lo >= hi:  # a lone sample has no negatives (only for n < 2, excluded above)
                continue
            zb = pool[block]  # [m, K]
            rows = max(1, 65_536 // m)
            s = torch.cat([self.critic.scores(x[i - offset:min(i + rows, hi) - offset], zb)
                           for i in range(lo, hi, rows)])  # [hi - lo, m]
            terms.append(infonce_terms(s.float(), lo - int(block[0])).double())
            ceilings.append(torch.full((hi - lo,), math.log(m), dtype=torch.float64, device=z.device))
        self.critic.train(was_training)
        terms_all, ceiling_all = torch.cat(terms), torch.cat(ceilings)  # [N] (this process's rows)
        if self.sync:  # each process scored its own rows; the whole set's terms on every process
            terms_all, ceiling_all = distributed.gather(terms_all)[0], distributed.gather(ceiling_all)[0]
        value, ceiling = float(terms_all.mean()), float(ceiling_all.mean())
        se = jackknife_se(lambda keep: terms_all[keep].mean(), n, device=terms_all.device)
        if value > ceiling - CEILING_MARGIN:
            warnings.warn(
                f"InfoNCE estimate {value:.3f} nats is within {CEILING_MARGIN} of its ceiling log(block size) = "
                f"{ceiling:.3f}: the true I(X;Z) may be far higher. Use larger blocks (batch_size) or a DV-type "
                f"estimator (smile, mine)", CeilingWarning, stacklevel=2)
        return MIEstimate(value, se)
