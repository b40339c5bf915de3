"""MI estimators on correlated Gaussians with known MI: the benchmark of Poole et al. (2019) and Song & Ermon (2020).

x, y in R^20 with x ~ N(0, I) and y = rho x + sqrt(1 - rho^2) eps, so that I(X;Y) = -10 log(1 - rho^2) nats; the
cubic variant reports I(X; Y^3), the same MI under an invertible map that a critic must learn to undo.

Protocol (a staircase over training, as in both papers): one run per (estimator, variant, batch size, seed) trains
its critic with Adam on fresh samples every step, and the true MI steps up 2 -> 4 -> 6 -> 8 -> 10 nats every
`--steps` steps. Per level, the reported value is the library's own estimate on fresh batches of the training
batch size, taken every few steps over the last quarter of the level and averaged. Every estimator, ours and
torch-mist's, sees the same batches in lockstep: one step of each in turn, so that load from other processes on
a shared machine falls on all of them alike, and the time per step of each is measured around its own
zero_grad/loss/backward/Adam step only (no sampling, no evaluation).

Critics (the same size for both libraries): a joint ReLU MLP 40-256-256-1 for the DV-type bounds and a separable
critic <g(x), h(y)> with g, h ReLU MLPs 20-256-256 for InfoNCE (torch-mist's `hidden_dims=[256, 256]` for both).
The reported DV-type values use 10 marginal pairings per sample for both libraries (ours: `permutations=10`;
torch-mist: `neg_samples=10` while evaluating); InfoNCE contrasts each sample with the whole batch.

    python benchmarks/mi_gaussian.py                    # the default run (~13 min on 2 shared CPU cores)
    python benchmarks/mi_gaussian.py --steps 4000 --seeds 5     # the papers' length
    python benchmarks/mi_gaussian.py --smoke --out /tmp/x.md    # a few steps, one level (seconds)

The fixed-dataset protocol (`--protocol fixed`) asks what a user of `ib.estimate_mi` gets: per (transform, MI
level, seed), one dataset of 20,000 samples; each estimator trains `--steps` steps (default 2,000) with its library's
own estimate-MI function and defaults (ours: `ib.estimate_mi`, 4,000 samples held out; torch-mist:
`torch_mist.estimate_mi`, trained on the same 16,000, tested on the same 4,000, batch 128), and reports its held-out
value. Critics: torch-mist's 256-256; ours `estimate_mi`'s defaults (128-128 for mine, 256-256 for the others).
Every finished cell is cached beside the report, so a rerun resumes.

    python benchmarks/mi_gaussian.py --protocol fixed                 # 3 seeds (~1-2 h on 2 shared cores)

torch-mist (`pip install torch-mist`, a benchmark-only dependency) is used where installed; `--peers` chooses.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ib.estimators import ESTIMATORS, estimate_mi  # noqa: E402
from ib.estimators.estimate import default_batch_size, default_hidden  # noqa: E402
from ib.models.critics import CRITICS  # noqa: E402
from ib.recipe import OptimConfig  # noqa: E402
from ib.engine.build import build_optimizer  # noqa: E402

DIM = 20
HIDDEN = 256
OURS = ("mine", "mine_f", "infonce", "smile", "jsd")
PEERS = ("mine", "smile", "infonce")
# The fixed protocol calls torch_mist.estimate_mi by name, so it can run more of torch-mist's estimators: its
# JS-trained and NWJ critics, FLO, and DoE (difference of entropies, McAllester & Stratos 2020: a conditional and a
# marginal density model instead of a critic), to ask whether torch-mist has a better tool at high MI than ours.
FIXED_PEERS = PEERS + ("js", "nwj", "flo", "doe")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mi_gaussian.md"
FIXED_OUT = ROOT / "benchmarks" / "results" / "mi_gaussian_fixed.md"
FIXED_N, FIXED_HELD_OUT = 20_000, 0.2  # samples per dataset; the share held out (ib.estimate_mi's default)
FIXED_TEST = int(round(FIXED_HELD_OUT * FIXED_N))  # held-out samples, as ib.estimate_mi rounds them


# ---------------------------------------------------------------------------------------------------------------------
# Data


def rho_for(mi: float, dim: int = DIM) -> float:
    """Per-coordinate correlation giving I(X;Y) = mi nats for `dim` independent coordinate pairs."""
    return math.sqrt(1.0 - math.exp(-2.0 * mi / dim))


def sample(n: int, mi: float, cubic: bool, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n pairs (x [n, 20], y [n, 20]) with I(X;Y) = mi; y cubed for the cubic variant (MI unchanged)."""
    rho = rho_for(mi)
    x = torch.randn(n, DIM, generator=g)
    y = rho * x + math.sqrt(1.0 - rho**2) * torch.randn(n, DIM, generator=g)
    return x, y**3 if cubic else y


# ---------------------------------------------------------------------------------------------------------------------
# The two libraries behind one small adapter


@dataclass
class Contender:
    """An estimator under test: `step(x, y)` trains it on a batch, `value(x, y)` is its estimate on a batch."""

    library: str
    name: str
    module: torch.nn.Module
    step_fn: Callable[[torch.Tensor, torch.Tensor], None]
    value_fn: Callable[[torch.Tensor, torch.Tensor], float]
    seconds: float = 0.0
    steps: int = 0

    @property
    def label(self) -> str:
        return f"{self.library} {self.name}"

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.step_fn(x, y)
        self.seconds += time.perf_counter() - t0
        self.steps += 1

    def value(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.value_fn(x, y)


def _adam_step(module: torch.nn.Module, loss_fn: Callable, lr: float,
               opt: Optional[torch.optim.Optimizer] = None) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A training step; `opt` defaults to torch's Adam with its defaults (what torch-mist's own training uses)."""
    opt = opt or torch.optim.Adam(module.parameters(), lr=lr)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y).backward()
        opt.step()

    return step


def make_ours(name: str, lr: float, eval_negatives: int) -> Contender:
    if name == "infonce":
        critic = CRITICS.create("separable", (DIM,), DIM, hidden=(HIDDEN,), embed_dim=HIDDEN, activation="relu")
    else:
        critic = CRITICS.create("joint", (DIM,), DIM, hidden=(HIDDEN, HIDDEN), activation="relu", input_noise=0.0,
                                hidden_noise=0.0)
    est = ESTIMATORS.create(name, critic)

    def value(x: torch.Tensor, y: torch.Tensor) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # InfoNCE's ceiling warning: the table shows the ceiling anyway
            return est.estimate(x, y, batch_size=x.shape[0], permutations=eval_negatives)

    # The library's own optimiser builder, as `ib train` uses for the critic: Adam, fused where torch has it.
    opt = build_optimizer(OptimConfig(name="adam", lr=lr), list(est.parameters()))
    return Contender("ib", name, est, _adam_step(est, est.loss, lr, opt), value)


def make_peer(name: str, lr: float, eval_negatives: int) -> Contender:
    import torch_mist.estimators as tme

    est = getattr(tme, name)(x_dim=DIM, y_dim=DIM, hidden_dims=[HIDDEN, HIDDEN])  # its defaults otherwise
    train_negatives = est.neg_samples

    def value(x: torch.Tensor, y: torch.Tensor) -> float:
        # Fresh tensors every call: torch-mist caches critic outputs keyed on its arguments.
        est.eval()
        if name != "infonce":
            est.neg_samples = eval_negatives
        try:
            with torch.no_grad():
                return float(est.mutual_information(x, y))
        finally:
            est.neg_samples = train_negatives
            est.train()

    return Contender("torch-mist", name, est, _adam_step(est, est.loss, lr), value)


def peers_available() -> bool:
    return importlib.util.find_spec("torch_mist") is not None


# ---------------------------------------------------------------------------------------------------------------------
# One staircase run


@dataclass
class Config:
    levels: Sequence[float]
    steps: int
    seeds: int
    batch_sizes: Sequence[int]
    variants: Sequence[str]
    ours: Sequence[str]
    peers: Sequence[str]
    lr: float
    eval_batches: int
    eval_negatives: int
    threads: int


@dataclass
class Result:
    """Per contender label: per level, the estimate of each seed; and the training seconds and steps."""

    values: Dict[str, Dict[float, List[float]]] = field(default_factory=dict)
    seconds: Dict[str, float] = field(default_factory=dict)
    steps: Dict[str, int] = field(default_factory=dict)


def staircase(cfg: Config, batch: int, cubic: bool, seed: int, result: Result, progress: Callable[[str], None]) -> None:
    """Train every contender on one staircase; add its per-level estimates and its training time to `result`.

    The steps of a level are cut into chunks of a few steps; each contender in turn trains on the same chunk of
    batches, so that contenders share the machine's load alike while none pays for another's memory traffic. At
    each chunk end in the last quarter of the level, each contender estimates the MI on the same fresh batches.
    """
    contenders: List[Contender] = []
    for i, name in enumerate(cfg.ours):
        torch.manual_seed(1000 * seed + i)
        contenders.append(make_ours(name, cfg.lr, cfg.eval_negatives))
    for i, name in enumerate(cfg.peers):
        torch.manual_seed(1000 * seed + 100 + i)
        contenders.append(make_peer(name, cfg.lr, cfg.eval_negatives))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    window = max(1, cfg.steps // 4)
    chunk = max(1, window // 4)
    for level in cfg.levels:
        evals: Dict[str, List[float]] = {c.label: [] for c in contenders}
        done = 0
        while done < cfg.steps:
            batches = [sample(batch, level, cubic, g) for _ in range(min(chunk, cfg.steps - done))]
            for c in contenders:
                for x, y in batches:
                    c.step(x, y)
            done += len(batches)
            if done > cfg.steps - window:
                fresh = [sample(batch, level, cubic, g) for _ in range(cfg.eval_batches)]
                for c in contenders:
                    evals[c.label] += [c.value(x, y) for x, y in fresh]
        for c in contenders:
            vals = evals[c.label]
            result.values.setdefault(c.label, {}).setdefault(level, []).append(statistics.fmean(vals))
        progress(f"  level {level:g}: " + ", ".join(f"{c.label} {result.values[c.label][level][-1]:.2f}"
                                                    for c in contenders))
    for c in contenders:
        result.seconds[c.label] = result.seconds.get(c.label, 0.0) + c.seconds
        result.steps[c.label] = result.steps.get(c.label, 0) + c.steps


# ---------------------------------------------------------------------------------------------------------------------
# The fixed-dataset protocol


def fixed_dataset(level: float, cubic: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The 20,000 samples of one (level, transform, seed) cell; the same for every estimator."""
    return sample(FIXED_N, level, cubic, torch.Generator().manual_seed(10_000 * seed + int(10 * level)))


def fixed_ours(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Dict[str, float]:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InfoNCE's ceiling warning: the table shows the ceiling anyway
        value = estimate_mi(x, y, estimator=name, steps=steps, seed=seed)
    return {"value": float(value), "se": value.se, "seconds": time.perf_counter() - t0}


def fixed_peer(name: str, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> Dict[str, float]:
    from torch_mist import estimate_mi as mist_estimate_mi

    perm = torch.randperm(FIXED_N, generator=torch.Generator().manual_seed(seed))  # ib.estimate_mi's split
    n_train = FIXED_N - FIXED_TEST
    train, test = perm[:n_train], perm[n_train:]
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = mist_estimate_mi({"x": x[train], "y": y[train]}, estimator=name, test_data={"x": x[test], "y": y[test]},
                                 max_iterations=steps, batch_size=128, hidden_dims=[HIDDEN, HIDDEN], verbose=False,
                                 logger=False)
    return {"value": float(value), "se": math.nan, "seconds": time.perf_counter() - t0}


def fingerprint(library: str, name: str = "mine") -> str:
    """What a cached cell depends on beyond its key: `ib.estimate_mi`'s defaults for estimator `name` (hashed), or
    torch-mist's version. A change of either makes new cells instead of reusing stale ones."""
    if library == "ib":
        # hidden=None and batch_size=None mean per-estimator defaults: hidden enters resolved, the batch as an extra
        # entry (the form of the cells cached before hidden was per estimator, so that theirs stay valid)
        defaults = sorted((k, repr(default_hidden(name) if k == "hidden" else p.default))
                          for k, p in inspect.signature(estimate_mi).parameters.items()
                          if p.default is not inspect.Parameter.empty and k not in ("estimator", "steps", "seed"))
        defaults.append(("batch", repr(default_batch_size(name))))
        return "defaults-" + hashlib.sha1(repr(defaults).encode()).hexdigest()[:8]
    from importlib.metadata import version

    return f"torch-mist-{version('torch-mist')}"


def cell_key(variant: str, level: float, seed: int, library: str, name: str, steps: int) -> str:
    return f"{variant}|{level:g}|{seed}|{library}|{name}|{steps}|{fingerprint(library, name)}|n={FIXED_N}"


def fixed_protocol(args: argparse.Namespace, peers: Sequence[str], log: Callable[[str], None]) -> Dict[str, Dict]:
    """Every (transform, level, seed, estimator) cell, read from the cache beside the report or computed and added
    to it at once (so an interrupted run resumes); with `--report`, the cached cells alone."""
    cache_path = args.out.with_suffix(".json")
    cache: Dict[str, Dict] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    if args.report:
        return cache
    contenders = [("ib", n, fixed_ours) for n in args.estimators] + [("torch-mist", n, fixed_peer) for n in peers]
    for seed in range(args.seeds):  # seed-major: a partial run covers every level
        for variant in args.variants:
            for level in args.levels:
                x, y = fixed_dataset(level, variant == "cubic", seed)
                for library, name, fn in contenders:
                    key = cell_key(variant, level, seed, library, name, args.steps)
                    if key not in cache:
                        cache[key] = fn(name, x, y, args.steps, seed)
                        cache_path.parent.mkdir(parents=True, exist_ok=True)
                        cache_path.write_text(json.dumps(cache, indent=1, sort_keys=True))
                    log(f"{key}: {cache[key]['value']:.3f} ({cache[key]['seconds']:.1f} s)")
    return cache


def _seed_cells(cache: Dict[str, Dict], args: argparse.Namespace, variant: str, level: float, library: str,
                name: str) -> List[Dict]:
    """The cached cells of one (variant, level, library, estimator), one per seed done."""
    return [cache[k] for seed in range(args.seeds)
            if (k := cell_key(variant, level, seed, library, name, args.steps)) in cache]


def _best_cell(best: Optional[tuple[float, str]]) -> str:
    return "-" if best is None else f"{best[0]:.2f} ({best[1]})"


def _widths(hidden: Sequence[int]) -> str:
    return "-".join(str(h) for h in hidden)


def fixed_report(args: argparse.Namespace, peers: Sequence[str], cache: Dict[str, Dict], command: str) -> str:
    labels = [("ib", n) for n in args.estimators] + [("torch-mist", n) for n in peers]
    lines = [
        "# `estimate_mi` on correlated Gaussians: ours against torch-mist's, one fixed dataset per cell",
        "",
        "Written by `benchmarks/mi_gaussian.py --protocol fixed`; do not edit by hand. Cells are cached in "
        f"`{args.out.with_suffix('.json').name}`.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- protocol: per (transform, true MI, seed), {FIXED_N:,} samples (x, y in R^{DIM}); ours: "
        f"`ib.estimate_mi(x, y, estimator, steps={args.steps}, seed)` with its other defaults (batch "
        f"{default_batch_size('mine')} and critic {_widths(default_hidden('mine'))} for mine, "
        f"{default_batch_size('jsd')} and {_widths(default_hidden('jsd'))} for the others; 20 % held out); "
        f"torch-mist: `torch_mist.estimate_mi` on the same 16,000 training samples, tested on the same 4,000, "
        f"`max_iterations={args.steps}`, batch 128, `hidden_dims=[{HIDDEN}, {HIDDEN}]`, its other defaults "
        "(early stopping on 10 % of the training samples).",
        "- cells: estimate in nats, mean ± sd over seeds (n = the seeds done). `s/1k steps`: the whole call "
        "(training and held-out evaluation) per 1,000 steps, mean over cells. Lower bounds: every estimator but "
        "smile (whose clipped report is not one; see benchmarks/results/report_bias.md). A distribution-free "
        f"lower bound from N = {FIXED_TEST:,} held-out samples cannot certify much more than log N = "
        f"{math.log(FIXED_TEST):.2f} nats with high confidence (McAllester & Stratos, AISTATS 2020), so the levels "
        "above it test what a bound can read, not only how well a critic trains. Each variant's last table: the "
        "standard errors of our held-out reports (jackknife over those samples).",
        "",
    ]
    for variant in args.variants:
        lines += [f"## {variant}", "",
                  "| estimator | " + " | ".join(f"MI = {v:g}" for v in args.levels) + " | s/1k steps |",
                  "|---|" + "---|" * (len(args.levels) + 1)]
        means: Dict[tuple, Dict[float, float]] = {}
        for library, name in labels:
            cells, secs = [], []
            for level in args.levels:
                rec = _seed_cells(cache, args, variant, level, library, name)
                vals = [r["value"] for r in rec]
                secs += [r["seconds"] for r in rec]
                if vals:
                    means.setdefault((library, name), {})[level] = statistics.fmean(vals)
                cells.append(f"{_fmt(vals)} (n={len(vals)})" if vals else "-")
            t = f"{statistics.fmean(secs) / args.steps * 1000:.1f}" if secs else "-"
            lines.append(f"| {library} {name} | " + " | ".join(cells) + f" | {t} |")
        lines += ["", "| level | best of ours: abs error | best of torch-mist: abs error | met | lower bounds "
                  "of ours more than 0.3 above the truth |", "|---|---|---|---|---|"]
        for level in args.levels:
            def best(lib: str) -> Optional[tuple[float, str]]:
                errs = [(abs(m[level] - level), n) for (l_, n), m in means.items() if l_ == lib and level in m]
                return min(errs) if errs else None
            ours, theirs = best("ib"), best("torch-mist")
            over = [f"{n} ({m[level]:.2f})" for (l_, n), m in means.items()
                    if l_ == "ib" and level in m and ESTIMATORS.get(n).lower_bound and m[level] > level + 0.3]
            met = "-" if ours is None or theirs is None else ("yes" if ours[0] <= theirs[0] else "no")
            lines.append(f"| {level:g} | {_best_cell(ours)} | {_best_cell(theirs)} | {met} | "
                         f"{', '.join(over) or 'none'} |")
        lines += ["", "Standard error of our held-out reports (`MIEstimate.se`), mean (largest) over seeds:", "",
                  "| estimator | " + " | ".join(f"MI = {v:g}" for v in args.levels) + " |",
                  "|---|" + "---|" * len(args.levels)]
        for name in args.estimators:
            cells = []
            for level in args.levels:
                ses = [r["se"] for r in _seed_cells(cache, args, variant, level, "ib", name)]
                cells.append(f"{statistics.fmean(ses):.2f} ({max(ses):.2f})" if ses else "-")
            lines.append(f"| ib {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mist = ""
    if peers_available():
        from importlib.metadata import version

        mist = f", torch-mist {version('torch-mist')}"
    return (f"{cpu}, {os.cpu_count()} cores (torch threads: {torch.get_num_threads()}), Python "
            f"{platform.python_version()}, torch {torch.__version__}{mist}")


def _fmt(xs: List[float]) -> str:
    m = statistics.fmean(xs)
    return f"{m:.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{m:.2f}"


def report(cfg: Config, results: Dict[tuple, Result], command: str, wall: float) -> str:
    levels = list(cfg.levels)
    lines = [
        "# MI estimators on correlated Gaussians (Poole et al. 2019; Song & Ermon 2020)",
        "",
        "Written by `benchmarks/mi_gaussian.py`; do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- machine: {machine()}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
        f"wall time {wall / 60:.1f} min",
        f"- protocol: staircase over training, true MI {' -> '.join(f'{v:g}' for v in levels)} nats, "
        f"{cfg.steps} steps per level, fresh samples every step (x, y in R^{DIM}); Adam lr {cfg.lr:g}; "
        f"{cfg.seeds} seed(s). Per level: the mean of each library's estimate on {cfg.eval_batches} fresh batches of "
        f"the training batch size at each of about 5 points in the last quarter of the level.",
        f"- critics (both libraries): joint ReLU MLP {2 * DIM}-{HIDDEN}-{HIDDEN}-1 (mine, mine_f, smile, jsd); "
        f"separable, two ReLU MLPs {DIM}-{HIDDEN}-{HIDDEN} (infonce). DV-type estimates use "
        f"{cfg.eval_negatives} marginal pairings per sample in both libraries; InfoNCE the whole batch.",
        "- cells: estimate in nats, mean ± standard deviation over seeds; `abs bias`: mean over levels of "
        "|mean - true|; `sd`: mean over levels of the standard deviation over seeds; `s/1k steps`: training time "
        "per 1,000 steps (lockstep, so all estimators shared the same load).",
        "",
    ]
    for (variant, batch), res in results.items():
        lines += [f"## {variant}, batch {batch} (InfoNCE ceiling log {batch} = {math.log(batch):.2f} nats)", ""]
        lines.append("| estimator | " + " | ".join(f"MI = {v:g}" for v in levels) + " | abs bias | sd | s/1k steps |")
        lines.append("|---|" + "---|" * (len(levels) + 3))
        for label, per_level in res.values.items():
            bias = statistics.fmean(abs(statistics.fmean(per_level[v]) - v) for v in levels)
            sd = statistics.fmean(statistics.stdev(per_level[v]) if len(per_level[v]) > 1 else 0.0 for v in levels)
            secs = res.seconds[label] / max(res.steps[label], 1) * 1000
            cells = " | ".join(_fmt(per_level[v]) for v in levels)
            lines.append(f"| {label} | {cells} | {bias:.2f} | {sd:.2f} | {secs:.2f} |")
        lines.append("")
        if any(label.startswith("torch-mist") for label in res.values):
            lines += goal_lines(res, levels)
    return "\n".join(lines) + "\n"


def goal_lines(res: Result, levels: Sequence[float]) -> List[str]:
    """The issue's goals: per level, our best |error| against torch-mist's best; MINE's time per step."""
    def best(prefix: str, v: float) -> tuple[float, str]:
        errs = [(abs(statistics.fmean(per[v]) - v), label.split(" ", 1)[1])
                for label, per in res.values.items() if label.startswith(prefix)]
        return min(errs)

    out = ["| level | best of ours: abs error | best of torch-mist: abs error | met |", "|---|---|---|---|"]
    for v in levels:
        (eo, no), (ep, np_) = best("ib ", v), best("torch-mist ", v)
        out.append(f"| {v:g} | {eo:.2f} ({no}) | {ep:.2f} ({np_}) | {'yes' if eo <= ep else 'no'} |")
    if "ib mine" in res.seconds and "torch-mist mine" in res.seconds:
        ours = res.seconds["ib mine"] / max(res.steps["ib mine"], 1)
        theirs = res.seconds["torch-mist mine"] / max(res.steps["torch-mist mine"], 1)
        out += ["", f"MINE time per step, ours / torch-mist's: {ours / theirs:.2f} (goal: <= 0.5)."]
    return out + [""]


# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--protocol", choices=["staircase", "fixed"], default="staircase",
                   help="staircase: the papers' (fresh samples, MI stepping up); fixed: one dataset per cell, "
                        "each library's estimate-MI function (see the module note)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps per MI level (staircase default 300, the papers: 4000; fixed default 2000)")
    p.add_argument("--seeds", type=int, default=None, help="independent runs (critic init and data; default 2, "
                                                           "fixed: 3)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    p.add_argument("--levels", type=float, nargs="+", default=[2.0, 4.0, 6.0, 8.0, 10.0], help="true MI, nats")
    p.add_argument("--variants", nargs="+", choices=["gaussian", "cubic"], default=["gaussian", "cubic"])
    p.add_argument("--estimators", nargs="+", choices=OURS, default=list(OURS), help="ours")
    p.add_argument("--peers", nargs="*", choices=FIXED_PEERS, default=None,
                   help="torch-mist's estimators (default: mine, smile, infonce where torch-mist is installed, mine "
                        "and smile for --protocol fixed; none: --peers); js, nwj, flo and doe: --protocol fixed only")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate for every critic")
    p.add_argument("--eval-batches", type=int, default=5, help="fresh batches per evaluation point (5 points a level)")
    p.add_argument("--eval-negatives", type=int, default=10, help="marginal pairings per sample in DV estimates")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    p.add_argument("--report", action="store_true",
                   help="fixed protocol: write the report from the cached cells only (a partial run's n per cell)")
    p.add_argument("--smoke", action="store_true", help="a plumbing check: 8 steps, one level, one seed, batch 32")
    p.add_argument("--out", type=Path, default=None, help="markdown report (default: benchmarks/results/"
                                                          "mi_gaussian.md, or mi_gaussian_fixed.md)")
    args = p.parse_args(argv)
    fixed = args.protocol == "fixed"
    args.steps = args.steps if args.steps is not None else (2000 if fixed else 300)
    args.seeds = args.seeds if args.seeds is not None else (3 if fixed else 2)
    args.out = args.out or (FIXED_OUT if fixed else DEFAULT_OUT)
    if not fixed and args.peers and set(args.peers) - set(PEERS):
        p.error(f"--peers {' '.join(sorted(set(args.peers) - set(PEERS)))}: --protocol fixed only (the staircase "
                f"steps torch-mist's {', '.join(PEERS)} in lockstep with ours)")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.steps, args.seeds, args.batch_sizes, args.levels, args.variants = 8, 1, [32], [2.0], ["gaussian"]
        args.eval_batches = 1
    # The fixed protocol's default peers are those of the table (torch-mist's InfoNCE, capped at log 128
    # by its batch-wise evaluation, costs ~110 s per 1,000 steps here): --peers mine smile infonce adds it.
    default_peers = ("mine", "smile") if args.protocol == "fixed" else PEERS
    peers = list(default_peers) if args.peers is None else args.peers
    if peers and not peers_available():
        if args.peers:
            raise SystemExit("--peers: torch-mist is not installed (pip install torch-mist)")
        print("torch-mist is not installed: benchmarking ib's estimators only", file=sys.stderr)
        peers = []
    torch.set_num_threads(args.threads)
    command = "python benchmarks/mi_gaussian.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                      else sys.argv[1:]))
    if args.protocol == "fixed":
        cache = fixed_protocol(args, peers, lambda m: print(m, flush=True))
        args.out.write_text(fixed_report(args, peers, cache, command.strip()))
        print(f"wrote {args.out}")
        return 0
    cfg = Config(levels=args.levels, steps=args.steps, seeds=args.seeds, batch_sizes=args.batch_sizes,
                 variants=args.variants, ours=args.estimators, peers=peers, lr=args.lr,
                 eval_batches=args.eval_batches, eval_negatives=args.eval_negatives,
                 threads=args.threads)
    t0 = time.perf_counter()
    results: Dict[tuple, Result] = {}
    for variant in cfg.variants:
        for batch in cfg.batch_sizes:
            res = results.setdefault((variant, batch), Result())
            for seed in range(cfg.seeds):
                print(f"{variant}, batch {batch}, seed {seed} ({time.perf_counter() - t0:.0f} s)", flush=True)
                staircase(cfg, batch, variant == "cubic", seed, res, lambda m: print(m, flush=True))
    wall = time.perf_counter() - t0
    text = report(cfg, results, command.strip(), wall)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
