"""`estimate_mi`: mutual information between two sample sets, with a freshly trained critic; and
`estimate_mi_population`: the same for several seeds (or data sets) at once, the critics trained as one population."""
from __future__ import annotations

import math
import warnings
from typing import List, Sequence

import torch
from torch import Tensor

from ib.allocator import prime_allocator
from ib.errors import ConfigError
from ib.estimators.base import CEILING_MARGIN, ESTIMATORS, CeilingWarning, MIEstimate, MIEstimator
from ib.estimators.population import CriticPopulation
from ib.models.critics import CRITICS
from ib.modes import rng_devices, seeded
from ib.optim import adam

# Width of a separable critic's embeddings. On finite samples wider ones memorise the training pairs: at 2 nats in
# d = 20, an InfoNCE critic with 256-wide embeddings read 2.6 nats on its training pairs and 0.8 held out; 32 (the
# width of Poole et al.'s separable critics) read 1.75 held out, 16 only 1.33 (too narrow for the 20-d x.y term).
SEPARABLE_EMBED = 32
# (batch size, critic widths) where a call leaves them to estimate_mi; its `batch_size` argument says why they differ.
PER_ESTIMATOR = {"mine": (768, (128, 128))}
OTHERS = (128, (256, 256))


def estimate_mi(
    x: Tensor,
    y: Tensor,
    estimator: str = "mine",
    *,
    critic: str | None = None,
    steps: int = 2500,
    batch_size: int | None = None,
    lr: float = 2e-3,
    hidden: tuple[int, ...] | None = None,
    activation: str = "gelu",
    marginals: int = 4,
    holdout: float = 0.2,
    permutations: int = 200,
    seed: int = 0,
) -> MIEstimate:
    """Estimate I(X;Y) in nats from paired samples.

    A critic (no noise layers) is trained for `steps` minibatch steps with Adam and a cosine-decaying learning
    rate on the first `1 - holdout` of the samples; the reported value is the estimator's bound of that critic on
    the held-out rest: the DV bound (clipped for smile) with marginal pairs from `permutations` shuffles, or for
    infonce the InfoNCE bound in blocks of up to 1,024 held-out samples (ceiling about log 1024 = 6.93 nats).
    Holding out keeps a critic that memorised its training pairs from inflating the number (on 20-d Gaussians
    at 2 nats the in-sample bound reads about 0.2 nats higher than the held-out one).

    Args:
        x: samples [N, dx]. y: samples [N, dy], paired row by row with x.
        estimator: registry name: "mine", "mine_f", "infonce", "smile" or "jsd" ("vib_kl" needs an encoder's
            Gaussian code, not samples).
        critic: "joint" (an MLP on concat(x, y) with widths `hidden`) or "separable" (<g(x), h(y)>, g and h MLPs
            with hidden layers `hidden[:-1]` and 32-wide embeddings); default separable for infonce, whose B x B
            scores it computes with one matrix product, and joint otherwise.
        steps: critic updates. For mine at d = 20, 4 nats, 2,500 steps fall short by up to 0.18 in 13.7-14.7 s a call
            on 2 threads, 3,000 by up to 0.17 in 16.4-16.8 s, in the same run (estimate_mi_steps2500.md).
        batch_size: samples per update; default 768 for mine, 128 for the others (`default_batch_size`).
            MINE's gradient noise, more than its critic's width, holds it short at a few nats: on d = 20 Gaussians
            at 4 nats (3 seeds, 20,000 samples), with 256-256 critics its largest error is 0.37 at batch 128, 0.20
            at 256, 0.17 at 384 and 0.19 at 512 (benchmarks/results/estimate_mi_batch.md), and at batch 384 the
            critic's width hardly matters (0.20 and 0.21 for 128 and 192 wide, estimate_mi_cost.md). So mine
            trains a narrower critic on larger batches: with 3,000 steps, 128-128 at batch 768 reads within 0.17 at
            4 nats in 13.9-14.7 s a call on average on 2 threads, where 256-256 at 384 reads within 0.17 in 18.5-20.9
            s (estimate_mi_critic128.md). The others read lower with larger batches: jsd and smile, whose critics
            train on the Jensen-Shannon objective, at 2-6 nats, and jsd collapses on the cubic transform
            (mi_gaussian_fixed_b384.md); infonce's separable critic memorises the training pairs sooner
            (estimate_mi_batch_infonce.md).
        lr: Adam learning rate of the critic.
        hidden: critic widths; default 128-128 for mine (see `batch_size`), 256-256 for the others
            (`default_hidden`).
        activation: of the critic's hidden layers: "gelu" (default), "relu", "elu" or "tanh". The optimal critic of
            Gaussian data is a quadratic form, which GELU's smooth units fit closer than ReLU's kinks do
            (benchmarks/results/estimate_mi_defaults.md).
        marginals: shuffled pairings per sample in each training step (see CriticEstimator; infonce contrasts
            each sample with the whole batch and ignores it).
        holdout: share of samples kept for the reported estimate (0 reports on the training samples).
        permutations: marginal pairings per held-out sample. The log-mean-exp over them is the noisy part of the
            DV report: with the exact critic at 4 nats (d = 20, 4,000 held-out samples) 20 pairings leave a spread
            of 0.20 nats over data seeds, 200 leave 0.05; at 8 nats, where too few pairings make the DV report read
            above the truth, 20 read 8.37 and 200 read 8.21 (benchmarks/results/report_bias.md).
        seed: seeds the critic, the batches and the shuffles; the global RNG is left as it was.

    Returns:
        The estimate in nats: an `MIEstimate`, a float whose `se` is its jackknife standard error over the held-out
        samples (`.interval()` gives value +- 1.96 se). The se is the noise of the held-out evaluation alone; the
        spread over seeds (the critic's training) comes on top. A warning says when it reads within 0.1 nats of
        log N for the N held-out samples, or above: no lower bound from N samples can certify much more (at the
        defaults, 20,000 samples hold out 4,000: log N = 8.29 nats).
    """
    batch_size, hidden = default_batch_size(estimator, batch_size), default_hidden(estimator, hidden)
    x, y = _check(x, y, estimator, critic, hidden, holdout, steps, batch_size)
    prime_allocator()  # a fresh process's first call would fault its steps' activations in page by page
    with seeded(seed, x.device):
        g, train, test, est = _setup(x, y, estimator, critic, hidden, activation, marginals, holdout, seed)
        opt = adam(est.parameters(), lr=lr)  # fused where torch has it
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        b = min(batch_size, len(train))
        for _ in range(steps):
            idx = train[torch.randint(0, len(train), (b,), generator=g).to(x.device)]
            opt.zero_grad(set_to_none=True)
            est.loss(x[idx], y[idx]).backward()
            opt.step()
            decay.step()
        result = est.estimate(x[test], y[test], permutations=permutations, generator=g)
    _warn_near_ceiling(result, len(test), estimator)
    return result


def estimate_mi_population(
    x: Tensor,
    y: Tensor,
    estimator: str = "mine",
    *,
    seeds: Sequence[int] = (0, 1, 2),
    critic: str | None = None,
    steps: int = 2500,
    batch_size: int | None = None,
    lr: float = 2e-3,
    hidden: tuple[int, ...] | None = None,
    activation: str = "gelu",
    marginals: int = 4,
    holdout: float = 0.2,
    permutations: int = 200,
) -> List[MIEstimate]:
    """`estimate_mi` for several seeds (and data sets) at once: one critic per seed, trained together as one
    population with batched matrix products (`torch.func.vmap` over the stacked critics).

    Member m is the call `estimate_mi(x[m], y[m], ..., seed=seeds[m])` (or `x`, `y` for every member when they are
    [N, d]): its own initial weights, held-out split, batches and marginal shifts, drawn from its own seed's streams
    in that call's order. The results equal the separate calls' to float rounding (the batched products round
    differently from the single ones; tests/test_estimators.py holds them to it); the spread over seeds is what a
    report of an estimate needs beside its standard error. The population saves the per-step fixed cost of each
    call, not its arithmetic: at the defaults, where a step is arithmetic, three seeds take 1.05-1.19 of the three
    calls' time on one CPU thread, no saving (benchmarks/results/estimate_mi_population.md); with small steps a
    population of 10 takes 0.50-0.64 of torch-mist's time per member (benchmarks/results/mine_step.md).

    Args:
        x: samples [N, dx] shared by every member, or [S, N, dx], one set per member. y: [N, dy] or [S, N, dy].
        seeds: one per member, S of them.
        estimator, critic, steps, batch_size, lr, hidden, activation, marginals, holdout, permutations: as
            `estimate_mi`'s, the same for every member.

    Returns:
        One `MIEstimate` per seed, in order.
    """
    batch_size, hidden = default_batch_size(estimator, batch_size), default_hidden(estimator, hidden)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ConfigError("seeds must name at least one seed")
    size = len(seeds)
    for name, t in (("x", x), ("y", y)):
        if t.ndim == 3 and t.shape[0] != size:
            raise ConfigError(f"{name} holds {t.shape[0]} data sets [S, N, d] for {size} seeds; give one per seed")
    xs = x if x.ndim == 3 else x.expand(size, *x.shape)  # [S, N, dx]
    ys = y if y.ndim == 3 else y.expand(size, *y.shape)  # [S, N, dy]
    checked = [_check(xs[m], ys[m], estimator, critic, hidden, holdout, steps, batch_size) for m in range(size)]
    prime_allocator()
    xs, ys = torch.stack([c[0] for c in checked]), torch.stack([c[1] for c in checked])
    members, states = [], []
    for m, seed in enumerate(seeds):
        with seeded(seed, xs.device):
            members.append(_setup(xs[m], ys[m], estimator, critic, hidden, activation, marginals, holdout, seed))
            states.append(torch.get_rng_state())  # the member's stream after building, where its call goes on
    pop = CriticPopulation([est for _, _, _, est in members], states, lambda params: adam(params, lr=lr))
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(pop.optimizer, T_max=steps)
    n_train = len(members[0][1])
    b = min(batch_size, n_train)
    rows = torch.arange(size).unsqueeze(1)  # [S, 1]
    with torch.random.fork_rng(devices=rng_devices(xs.device)):
        for _ in range(steps):
            idx = torch.stack([train[torch.randint(0, n_train, (b,), generator=g).to(xs.device)]
                               for g, train, _, _ in members])  # [S, b]: each member's batch
            pop.step(xs[rows, idx], ys[rows, idx])
            decay.step()
        results = [pop.load_into(m, est).estimate(xs[m][test], ys[m][test], permutations=permutations, generator=g)
                   for m, (g, _, test, est) in enumerate(members)]
    for result, (_, _, test, _) in zip(results, members):
        _warn_near_ceiling(result, len(test), estimator)
    return results


def _warn_near_ceiling(value: MIEstimate, n: int, estimator: str) -> None:
    """Warn (CeilingWarning) when a critic's report from n samples (the held-out ones, or all with holdout=0) reads
    within CEILING_MARGIN of log n, or above it: no distribution-free lower bound from n samples can certify much
    more than log n nats with high confidence (McAllester & Stratos, AISTATS 2020). InfoNCE warns at its own, lower,
    ceiling."""
    ceiling = math.log(n)
    if estimator != "infonce" and float(value) > ceiling - CEILING_MARGIN:
        warnings.warn(
            f"{estimator} estimate {float(value):.3f} nats (se {value.se:.3f}) is within {CEILING_MARGIN} nats of "
            f"log(N) = {ceiling:.3f}, or above it, for the N = {n} samples it was computed on: no lower bound from N "
            f"samples can certify much more than log N. For MI this high, give more samples", CeilingWarning,
            stacklevel=3)


def default_batch_size(estimator: str, batch_size: int | None = None) -> int:
    """The batch size asked for, or `estimate_mi`'s default for `estimator`: 768 for mine, 128 for the others."""
    return int(batch_size) if batch_size is not None else PER_ESTIMATOR.get(estimator, OTHERS)[0]


def default_hidden(estimator: str, hidden: Sequence[int] | None = None) -> tuple[int, ...]:
    """The critic widths asked for, or `estimate_mi`'s default for `estimator`: 128-128 for mine, 256-256 for the
    others."""
    return tuple(int(h) for h in hidden) if hidden is not None else PER_ESTIMATOR.get(estimator, OTHERS)[1]


def _check(x: Tensor, y: Tensor, estimator: str, critic: str | None, hidden: tuple[int, ...], holdout: float,
           steps: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Reject what `estimate_mi` cannot do, naming why; returns x and y as float32."""
    if not ESTIMATORS.get(estimator).needs_critic:
        raise ConfigError(f"estimator '{estimator}' reads an encoder's Gaussian code, not samples; estimate_mi "
                          f"takes a critic-based one: mine, mine_f, infonce, smile, jsd")
    if critic not in (None, "joint", "separable"):
        raise ConfigError(f"critic must be 'joint' or 'separable', got {critic!r}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"x and y must be [N, dx] and [N, dy] with the same N, got {tuple(x.shape)}, "
                          f"{tuple(y.shape)}")
    if not hidden:
        raise ConfigError("hidden must name at least one width")
    if not 0.0 <= holdout < 1.0:
        raise ConfigError(f"holdout must be in [0, 1), got {holdout}")
    n = x.shape[0]
    n_train = n - int(round(holdout * n))
    if n_train < 2 or steps < 1 or batch_size < 2:
        raise ConfigError(f"need at least 2 training samples, steps >= 1 and batch_size >= 2 (N={n}, steps={steps})")
    if 0 < n - n_train < 2:
        raise ConfigError(f"holdout={holdout} leaves {n - n_train} held-out sample of N={n}; the estimate needs at "
                          f"least 2 (raise holdout, or 0 to estimate on the training samples)")
    return x.float(), y.float()


def _setup(x: Tensor, y: Tensor, estimator: str, critic: str | None, hidden: tuple[int, ...], activation: str,
           marginals: int, holdout: float, seed: int) -> tuple[torch.Generator, Tensor, Tensor, MIEstimator]:
    """What a call draws before training, in order (inside `seeded(seed)`): its generator, the training and held-out
    rows of its split, and the estimator with a freshly initialised critic."""
    n = x.shape[0]
    n_train = n - int(round(holdout * n))
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).to(x.device)
    train, test = perm[:n_train], perm[n_train:] if n_train < n else perm
    critic = critic or ("separable" if estimator == "infonce" else "joint")
    if critic == "joint":
        net = CRITICS.create("joint", (x.shape[1],), y.shape[1], hidden=hidden, activation=activation,
                             input_noise=0.0, hidden_noise=0.0)
    else:
        net = CRITICS.create("separable", (x.shape[1],), y.shape[1], hidden=hidden[:-1],
                             embed_dim=SEPARABLE_EMBED, activation=activation)
    options = {"marginals": marginals} if "marginals" in ESTIMATORS.options(estimator) else {}
    return g, train, test, ESTIMATORS.create(estimator, net, **options).to(x.device)
