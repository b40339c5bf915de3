"""The interface of an estimator of I(X;Z), and the base of the critic-based lower bounds.

An estimator keeps apart what it trains and what it reports:
- `loss(x, z)`: what the critic's own optimiser minimises (minus a bound, maybe a surrogate whose gradient is
  bias-corrected); it may update running statistics (buffers).
- `penalty(x, z, code)`: the differentiable I(X;Z) term that the encoder minimises; it never updates running
  statistics. `code` (the bottleneck's `Code`, with `mean`/`std` for Gaussian encoders) serves estimators that use
  the encoder's distribution rather than samples.
- `estimate(x, z, code=...)`: the plain bound on (held-out) data, in nats, with no surrogate and no moving average.

The registry holds the estimator classes themselves: positional-only arguments come from the library (the critic,
or for `vib_kl` the bottleneck's registry name), keyword-only ones from the recipe's `mi.estimator`. What the trainer
and the monitor need to know of an estimator are class attributes (`MIEstimator`), readable without building one. An
estimator without parameters (no critic, e.g. `vib_kl`) needs no optimiser; the trainer then skips the critic's step.

Data parallelism (`sync = True`, set by the trainer under torchrun): the bounds are those of the global batch.
Marginal pairs draw z from every process, and means and log-mean-exps run over all processes' scores, with the
same value everywhere (see `ib.distributed` for why the gradients then come out right). `estimate` is global
too: each process scores its share of the held-out set against codes gathered from all.

Numerics: every log E[e^T] is a logsumexp, and every e^u that a loss needs goes through `exp_capped`, so that critic
outputs of +-1e4 give finite losses and gradients.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ClassVar, Dict, Iterator

import torch
from torch import Tensor, nn

from ib import distributed
from ib.errors import ConfigError
from ib.models import noise
from ib.models.bottlenecks import Code
from ib.registry import Registry

ESTIMATORS = Registry("estimator")  # MIEstimator subclasses: the trainer reads their class attributes

EXP_CAP = 30.0  # e^30 ~ 1e13: beyond it e^u continues as a tangent line (see exp_capped)
JACKKNIFE_GROUPS = 20  # groups of held-out samples for an estimate's standard error (see jackknife_se)
# Pairs (joint and shuffled) per critic pass of a held-out report: at most this many, so that the [pairs, width]
# activations stay near the cache instead of streaming through memory (1,024 samples with 200 pairings each would
# make 206,000 pairs, 200 MB per 256-wide layer).
REPORT_PAIRS = 8192


CEILING_MARGIN = 0.1  # nats: an estimate this close to its ceiling (or above it) is reported with a CeilingWarning


class CeilingWarning(UserWarning):
    """An estimate reads at (or above) the most its samples can show: log of InfoNCE's block size, or for a held-out
    report `estimate_mi`'s log N. Filter it by category (`warnings.simplefilter("ignore", CeilingWarning)`)."""


class MIEstimate(float):
    """An estimate of I(X;Z) in nats (a float, usable wherever one is) with `se`, its standard error over the
    samples it was computed on: the spread one would see re-estimating on another held-out set of the same size,
    with the same trained critic. It does not include the critic's training noise (seeds), which only repeated
    training measures. NaN where an estimate has no sampling error to report."""

    se: float

    def __new__(cls, value: float, se: float = math.nan) -> "MIEstimate":
        out = super().__new__(cls, value)
        out.se = float(se)
        return out

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """(value - z se, value + z se): a 95 % normal interval by default."""
        return float(self) - z * self.se, float(self) + z * self.se

    def __repr__(self) -> str:
        return f"MIEstimate({float(self)!r}, se={self.se!r})"


def jackknife_se(statistic: Callable[[Tensor], Any], n: int, *, groups: int = JACKKNIFE_GROUPS,
                 device: "torch.device | str" = "cpu") -> float:
    """The delete-a-group jackknife standard error of a statistic of n samples.

    statistic(keep) computes the estimate from the samples where the bool mask keep [n] (on `device`) is True. The
    samples are dealt into min(groups, n) interleaved groups (sample i to group i mod G, so that a set ordered by
    class spreads every class over every group); with theta_k the statistic without group k,
    se^2 = (G - 1) / G * sum_k (theta_k - mean theta)^2 (Efron & Tibshirani 1993, ch. 11). For a mean it is the
    usual sd / sqrt(n) up to grouping; for the DV bound, a mean minus a log-mean-exp, it needs no delta method.
    """
    g = min(groups, n)
    if g < 2:
        return math.nan
    group = torch.arange(n, device=device) % g
    thetas = torch.tensor([float(statistic(group != k)) for k in range(g)], dtype=torch.float64)
    return float(((g - 1) / g * (thetas - thetas.mean()).square().sum()).sqrt())


def marginal_shift(n: int, generator: torch.Generator | None = None) -> "int | Tensor":
    """A random cyclic shift in [1, n - 1]: z rolled by it pairs every x with another sample's z (no fixed points).
    An int, or in a vmapped population (`ib.models.noise`) each member's own shift as a batched 0-d tensor."""
    if n < 2:
        raise ValueError(f"marginal samples need a batch of at least 2, got {n}")
    return noise.randint(1, n, generator)


def log_mean_exp(t: Tensor) -> Tensor:
    """log(mean(exp(t))) over all elements, computed with logsumexp (finite for large t)."""
    t = t.flatten()
    return torch.logsumexp(t, dim=0) - math.log(t.numel())


def exp_capped(u: Tensor, cap: float = EXP_CAP) -> Tensor:
    """e^u up to u = cap, continued beyond it by its tangent e^cap * (1 + u - cap).

    Equal to exp for u <= cap (every value a sane critic produces); beyond, finite for u up to ~1e25 in float32,
    with a gradient of e^cap that still pushes u down. Each branch is finite with a finite gradient everywhere (the
    exp branch sees u clamped to the cap), so that no inf * 0 appears in the backward pass; the tangent branch
    takes u = cap itself, where clamp's gradient would be 0.
    """
    return torch.where(u < cap, torch.exp(u.clamp(max=cap)), math.exp(cap) * (1.0 + u - cap))


def dv_bound(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Donsker-Varadhan: E_P[T] - log E_Q[e^T], from critic scores on joint and on marginal (shuffled) pairs."""
    return t_joint.mean() - log_mean_exp(t_marginal)


class MIEstimator(nn.Module):
    """An estimator of I(X;Z): a training loss for its own parameters, a penalty for the encoder, an estimate.

    Class attributes (the defaults here are those of a critic-based lower bound):
        label: What the estimate is called in logs and figures, e.g. "MINE"; every estimator of the library sets it
            (a test checks), and one that does not is named by nothing.
        upper_bound: Whether the estimate is an upper bound on I(X;Z) (vib_kl's KL) rather than a lower bound
            (the critics' bounds).
        lower_bound: Whether the estimate is a lower bound on I(X;Z) (mine, mine_f, infonce, jsd) in expectation
            over the data. On a finite held-out set the DV report's log-mean-exp of heavy-tailed e^T is biased low,
            so at high MI it can read above the truth: with the exact critic on 20-d Gaussians and 200 pairings,
            8.21 at 8 nats and 10.40 at 10 (benchmarks/results/report_bias.md). False for the upper bounds, and for
            smile, whose clipped report is neither (it reads above the MI with the exact critic; see `SMILE`).
        needs_critic: Whether the library builds a critic and passes it as the first argument; if False (vib_kl)
            it passes the model's bottleneck name instead, and the estimator has no parameters to train.
        loss_is_minus_penalty: Whether the loss's gradient is minus the penalty's (up to running statistics), as for
            mine, mine_f and infonce: one backward pass through the loss can then serve both players (gradient
            reversal). False for jsd and smile, whose critic trains on the Jensen-Shannon objective while the
            encoder's penalty is a DV bound, and for vib_kl, which trains nothing.
    """

    label: ClassVar[str] = ""
    upper_bound: ClassVar[bool] = False
    lower_bound: ClassVar[bool] = True
    needs_critic: ClassVar[bool] = True
    loss_is_minus_penalty: ClassVar[bool] = True
    sync: bool = False  # global-batch bounds across the processes of a torchrun job (see the module note)

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """The training loss, so that DistributedDataParallel can wrap the estimator."""
        return self.loss(x, z)

    def mean(self, t: Tensor) -> Tensor:
        """The mean of t over the batch: of every process's batch when `sync` (equal shares, as the trainer and
        the probe set make them)."""
        if not self.sync:
            return t.mean()
        return distributed.global_sum(t.sum()) / (t.numel() * distributed.world_size())

    def log_mean_exp(self, t: Tensor) -> Tensor:
        """log mean e^t over the batch: of every process's batch when `sync` (equal shares)."""
        if not self.sync:
            return log_mean_exp(t)
        return distributed.global_logsumexp(t) - math.log(t.numel() * distributed.world_size())

    def loss(self, x: Tensor, z: Tensor) -> Tensor:
        """What the estimator's optimiser minimises on a batch (x [B, ...], z [B, K]); a scalar."""
        raise NotImplementedError

    def penalty(self, x: Tensor, z: Tensor, code: Code | None = None) -> Tensor:
        """The differentiable I(X;Z) term that the encoder minimises; a scalar, in nats."""
        raise NotImplementedError

    def estimate(self, x: Tensor, z: Tensor, *, code: Code | None = None, batch_size: int = 1024,
                 permutations: int = 10, generator: torch.Generator | None = None) -> MIEstimate:
        """The reported value on a whole (held-out) set, in nats, with its standard error over that set."""
        raise NotImplementedError

    @contextlib.contextmanager
    def unsynced(self) -> Iterator[None]:
        """Means and log-mean-exps over this process's tensors alone, for statistics of a set already gathered
        from every process."""
        sync, self.sync = self.sync, False
        try:
            yield
        finally:
            self.sync = sync


def estimator_labels(estimator: "type[MIEstimator] | MIEstimator | None") -> Dict[str, Any]:
    """What figures and `metrics.json` say of an I(X;Z) estimate: its estimator's (class or instance) `label`, ""
    without one, and whether it is an `upper_bound` on I(X;Z) rather than a lower bound."""
    if estimator is None:
        return {"label": "", "upper_bound": False}
    return {"label": estimator.label, "upper_bound": estimator.upper_bound}


class CriticEstimator(MIEstimator):
    """A lower bound on I(X;Z) with a trainable critic T(x, z).

    The held-out `estimate` is the Donsker-Varadhan bound of the critic (subclasses may report another function of
    the same scores through `report`).

    Args:
        critic: a statistics network with `pair_scores(x, z, z_marginal) -> (t_joint [B], t_marginal [P*B])`
            (and `scores(x, z) -> [B, B]` for the contrastive bounds).
        marginals: P, the shuffled pairings of each x per training step. More pairings lower the variance of the
            log E_Q[e^T] term (the weak spot of DV-type bounds) at (P+1)/2 times the critic's cost.
    """

    def __init__(self, critic: nn.Module, /, *, marginals: int = 1) -> None:
        super().__init__()
        if marginals < 1:
            raise ConfigError(f"marginals must be >= 1, got {marginals}")
        self.critic = critic
        self.marginals = marginals

    def scores(self, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
        """Critic scores on the batch's pairs, [B], and on marginal pairs, [P*B]: z rolled by P distinct shifts
        (with `sync`, over the global batch: the code B*N rows away, N processes)."""
        pool, offset = distributed.gather(z) if self.sync else (z, 0)  # [N*B, K], this process's first row
        n = pool.shape[0]
        if self.marginals == 1:
            shifts = [marginal_shift(n)]
        else:
            shifts = noise.distinct_shifts(n, self.marginals)  # distinct, in [1, N*B-1]
        rows = torch.arange(offset, offset + z.shape[0], device=z.device)
        z_marginal = torch.cat([pool[(rows - shifts[j]) % n] for j in range(len(shifts))])  # roll(pool, s)[rows]
        t_joint, t_marginal = self.critic.pair_scores(x, z, z_marginal)
        return t_joint.float(), t_marginal.float()  # the bound's means and exps in float32 under bf16 autocast

    def report(self, t_joint: Tensor, t_marginal: Tensor) -> Tensor:
        """The reported value from scores on joint and marginal pairs: the DV bound."""
        return self.mean(t_joint) - self.log_mean_exp(t_marginal)

    @torch.no_grad()
    def estimate(self, x: Tensor, z: Tensor, *, code: Code | None = None, batch_size: int = 1024,
                 permutations: int = 10, generator: torch.Generator | None = None) -> MIEstimate:
        """The DV bound (or the subclass's `report`) on a whole (held-out) set, in nats, with its jackknife
        standard error over the set's samples (a sample's group takes its joint pair and its marginal pairs).

        Marginal pairs come from `permutations` random cyclic shifts of z over the whole set (not within a batch),
        so the log-mean-exp term averages over `permutations * N` independent-looking pairs.

        Args:
            x: inputs [N, ...]; z: codes [N, K], already sampled.
            code: the encoder's output for x (unused by critic-based bounds).
            batch_size: samples per critic pass, at most; fewer where their pairs would exceed `REPORT_PAIRS`.
            permutations: shifted pairings per sample.
            generator: source of the shifts (for repeatable reports).
        """
        was_training = self.critic.training
        self.critic.eval()
        pool, offset = distributed.gather(z) if self.sync else (z, 0)  # every process's codes; equal shares
        n = pool.shape[0]
        shifts = [marginal_shift(n, generator) for _ in range(permutations)]  # the same on every process
        step = max(1, min(batch_size, REPORT_PAIRS // (permutations + 1)))  # samples per critic pass
        t_joint, t_marg = [], []
        for start in range(0, z.shape[0], step):
            idx = torch.arange(start, min(start + step, z.shape[0]), device=z.device)
            # All pairings of the batch in one critic pass: x's features once, [P*B] marginal scores.
            zm = torch.cat([pool[(idx + offset - shift) % n] for shift in shifts])  # == roll(pool, s)[idx + offset]
            tj, tm = self.critic.pair_scores(x[idx], z[idx], zm)
            t_joint.append(tj.double())  # the report's means and log-mean-exps in float64
            t_marg.append(tm.double().reshape(len(shifts), -1).T)  # [B, P]: row i holds x_i's marginal pairs
        self.critic.train(was_training)
        tj, tm = torch.cat(t_joint), torch.cat(t_marg)  # [N], [N, P]
        if self.sync:  # the whole set's scores on every process (equal shares, in rank order)
            tj, tm = distributed.gather(tj)[0], distributed.gather(tm)[0]
        with self.unsynced():
            value = float(self.report(tj, tm.flatten()))
            se = jackknife_se(lambda keep: self.report(tj[keep], tm[keep].flatten()), tj.shape[0], device=tj.device)
        return MIEstimate(value, se)
