"""`ib.estimate_mi` with its defaults at 2 and 4 nats, against the same call with one default changed back.

The promise under test (issue: estimators at high MI): on d = 20 correlated Gaussians with 20,000 samples,
`ib.estimate_mi(x, y, seed=s)` reads within 0.2 nats of the truth at 2 and 4 nats for 3 seeds, each call under
15 s on 2 cores. The data of seed s is `mi_gaussian.sample(20_000, mi)` from a generator seeded with s, the same
draws as `correlated_gaussians(20_000, 20, mi, seed=s)` in tests/test_estimators.py.

Rows: the defaults, then one change at a time (the earlier defaults: a ReLU critic, 20 held-out pairings, batch
128), so that each default's share of the error is measured alone, then ways of spending more time on the critic,
and ways of spending less (fewer pairings, a narrower critic, fewer steps), to find what the time a call may take
buys best.
The report lists the defaults it ran with; results/estimate_mi_defaults.md ran with batch 128 and
results/estimate_mi_batch.md compares batch sizes. Columns:
the error of each seed's estimate (estimate - truth, with its jackknife se), the largest |error|, and the wall time
per call.

    python benchmarks/estimate_mi_defaults.py                  # ~10 min on 2 idle cores
"""
from __future__ import annotations

import argparse
import inspect
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.estimators import estimate_mi  # noqa: E402
from ib.estimators.estimate import default_batch_size, default_hidden  # noqa: E402
from mi_gaussian import sample  # noqa: E402
from train_speed import cpu_name, write_report  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "estimate_mi_defaults.md"
# The earlier mine settings that rows below change one thing of, pinned so that a label keeps its meaning when
# the defaults move: 256-256 critics and 3,000 steps (batch 384 for mine from the "batch" rows on), and the current
# 128-128 critic at batch 768.
_WIDE = {"hidden": (256, 256), "steps": 3000}
_WIDE_384 = {**_WIDE, "batch_size": 384}
_NARROW = {"hidden": (128, 128), "batch_size": 768}
VARIANTS = {
    "defaults": {},
    # one change from the defaults of the time (results/estimate_mi_defaults.md lists them)
    "relu critic": {"activation": "relu"},
    "20 pairings": {"permutations": 20},
    "relu, 20 pairings (the earlier defaults)": {"activation": "relu", "permutations": 20},
    "more compute: 5,000 steps": {"steps": 5000},
    "more compute: 16 marginal pairings": {"marginals": 16},
    # batch sizes and widths, settings pinned
    "batch 128 (the earlier default)": {**_WIDE, "batch_size": 128},
    "batch 256": {**_WIDE, "batch_size": 256},
    "batch 512": {**_WIDE, "batch_size": 512},
    "infonce (its default batch, 128)": {"estimator": "infonce"},
    "infonce, batch 384": {"estimator": "infonce", "batch_size": 384},
    "less compute: 2 marginal pairings": {**_WIDE_384, "marginals": 2},
    "less compute: batch 512, 2 marginal pairings": {**_WIDE, "batch_size": 512, "marginals": 2},
    "less compute: critic 192-192": {**_WIDE_384, "hidden": (192, 192)},
    "less compute: critic 128-128": {**_WIDE_384, "hidden": (128, 128)},
    "critic 128-128, batch 512": {**_NARROW, "batch_size": 512, "steps": 3000},
    "critic 128-128, batch 768": {**_NARROW, "steps": 3000},
    "3,000 steps": {**_NARROW, "steps": 3000},
    "less compute: 2,500 steps": {**_NARROW, "steps": 2500},
    "less compute: 2,500 steps, lr 3e-3": {**_NARROW, "steps": 2500, "lr": 3e-3},
    "less compute: 2,000 steps, lr 4e-3": {**_NARROW, "steps": 2000, "lr": 4e-3},
    "less compute: 2,000 steps": {**_NARROW, "steps": 2000},
}


def defaults_line() -> str:
    """The report's line naming `estimate_mi`'s defaults, so that each report says what it ran with."""
    listed = ", ".join(f"{k}={v.default!r}" for k, v in inspect.signature(estimate_mi).parameters.items()
                       if v.default is not inspect.Parameter.empty and k != "seed")
    return (f"- estimate_mi's defaults: {listed}; None: per estimator, batch {default_batch_size('mine')} and "
            f"critic {default_hidden('mine')} for mine, {default_batch_size('jsd')} and {default_hidden('jsd')} for "
            "the others")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lines = [
        "# `ib.estimate_mi` defaults at 2 and 4 nats (d = 20, 20,000 samples)",
        "",
        "Written by `benchmarks/estimate_mi_defaults.py`; do not edit by hand.",
        "",
        f"- command: `python {shlex.join(['benchmarks/estimate_mi_defaults.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads "
        f"{args.threads}, torch {torch.__version__}; load average at the start "
        f"{os.getloadavg()[0]:.1f} (other jobs slow the times, not the values)",
        defaults_line(),
        f"- protocol: `estimate_mi(x, y, seed=s, **change)` on 20,000 samples drawn with seed s, "
        f"s = 0..{args.seeds - 1}; cells: estimate - truth ± jackknife se (nats) per seed; the largest |error|; "
        "the wall time of a call: mean (shortest-longest).",
        "",
        "| estimate_mi | MI | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | max abs error | s/call |",
        "|---|---|" + "---|" * (args.seeds + 2),
    ]
    verdict: list[str] = []
    for name in args.variants:
        for mi in args.levels:
            errors, cells, seconds = [], [], []
            for seed in range(args.seeds):
                x, y = sample(20_000, mi, cubic=False, g=torch.Generator().manual_seed(seed))
                t0 = time.perf_counter()
                est = estimate_mi(x, y, seed=seed, **VARIANTS[name])
                seconds.append(time.perf_counter() - t0)
                errors.append(float(est) - mi)
                cells.append(f"{errors[-1]:+.3f} ± {est.se:.3f}")
                print(f"{name}, MI {mi:g}, seed {seed}: {float(est):.3f} ± {est.se:.3f} ({seconds[-1]:.1f} s)",
                      flush=True)
            worst = max(abs(e) for e in errors)
            lines.append(f"| {name} | {mi:g} | " + " | ".join(cells) + f" | {worst:.3f} | "
                         f"{statistics.fmean(seconds):.1f} ({min(seconds):.1f}-{max(seconds):.1f}) |")
            if name == "defaults":
                verdict.append(f"- the promise at {mi:g} nats: every |error| < 0.2: "
                               f"{'met' if worst < 0.2 else 'not met'} (largest {worst:.3f}); every call under 15 s: "
                               f"{'met' if max(seconds) < 15 else 'not met'} (longest {max(seconds):.1f} s)")
    lines += ["", *verdict]
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
