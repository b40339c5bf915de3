"""`ib.estimate_mi_population` (one critic per seed, trained as one batched population) against the same seeds'
separate `ib.estimate_mi` calls, in the same run: wall time, and how far apart the estimates are.

The data are those of benchmarks/estimate_mi_defaults.py: d = 20 correlated Gaussians, 20,000 samples, seed s's
set drawn with seed s (`mi_gaussian.sample`). The separate calls are `estimate_mi(x_s, y_s, seed=s)` for s = 0..S-1
with the defaults; the population is one `estimate_mi_population(x, y, seeds=range(S))` with x, y stacked
[S, N, 20], whose member s is meant to equal the separate call s to float rounding. Separate calls first, then the
population, at each level.

    python benchmarks/estimate_mi_population.py        # ~5 min on one thread
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.estimators import estimate_mi, estimate_mi_population  # noqa: E402
from estimate_mi_defaults import defaults_line  # noqa: E402
from mi_gaussian import sample  # noqa: E402
from train_speed import cpu_name, write_report  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "estimate_mi_population.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--levels", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    seeds = list(range(args.seeds))
    lines = [
        "# `ib.estimate_mi_population` against separate `ib.estimate_mi` calls (d = 20, 20,000 samples)",
        "",
        "Written by `benchmarks/estimate_mi_population.py`; do not edit by hand.",
        "",
        f"- command: `python {shlex.join(['benchmarks/estimate_mi_population.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, torch {torch.__version__}; "
        f"load average at the start {os.getloadavg()[0]:.1f}",
        defaults_line(),
        f"- protocol: estimate_mi's defaults; seed s's data drawn with seed s, s = 0..{args.seeds - 1}; the separate "
        "calls one after another, then one population call on the stacked sets.",
        "",
        "| MI | separate calls (nats) | population (nats) | max abs difference | separate (s) | population (s) "
        "| population / separate |",
        "|---|---|---|---|---|---|---|",
    ]
    for mi in args.levels:
        sets = [sample(20_000, mi, cubic=False, g=torch.Generator().manual_seed(s)) for s in seeds]
        t0 = time.perf_counter()
        separate = [estimate_mi(x, y, seed=s) for s, (x, y) in zip(seeds, sets)]
        t1 = time.perf_counter()
        together = estimate_mi_population(torch.stack([x for x, _ in sets]), torch.stack([y for _, y in sets]),
                                          seeds=seeds)
        t2 = time.perf_counter()
        diff = max(abs(float(a) - float(b)) for a, b in zip(separate, together))
        lines.append(f"| {mi:g} | {' / '.join(f'{float(v):.4f}' for v in separate)} | "
                     f"{' / '.join(f'{float(v):.4f}' for v in together)} | {diff:.1e} | {t1 - t0:.1f} | "
                     f"{t2 - t1:.1f} | {(t2 - t1) / (t1 - t0):.2f} |")
        print(lines[-1], flush=True)
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
