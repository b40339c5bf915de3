"""What the information plane's pairwise band costs, by probe size: `ib.estimators.pairwise.pairwise_bounds` (both
ends in one pass over the pairs) against the plain formulation it replaced (each divergence's closed form in full
over one [rows, N, K] block of 32 MiB), on the same codes, in the same run.

The codes overlap (means spread by 0.1, stds 0.5 to 1), so that the band lies well below its ceiling log N and the
two formulations are compared where every pair counts; the cost does not depend on the values: O(N^2 K) either way.

    python benchmarks/band_cost.py                   # N = 500 ... 6000, K = 256; writes results/band_cost.md
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.estimators.pairwise import pairwise_bounds  # noqa: E402
from train_speed import cpu_name  # noqa: E402


def plain_bounds(mean: torch.Tensor, std: torch.Tensor, block: int = 1 << 22) -> Dict[str, float]:
    """The reference: both closed forms term by term on [rows, N, K] blocks of `block` float64 elements."""
    n, k = mean.shape
    rows = max(1, block // (n * k))
    totals = {"bhattacharyya": 0.0, "kl": 0.0}
    v = std.double().square()
    for start in range(0, n, rows):
        m1, m2 = mean.double()[start:start + rows, None, :], mean.double()[None, :, :]
        v1, v2 = v[start:start + rows, None, :], v[None, :, :]
        diff2 = (m1 - m2).square()
        kl = 0.5 * (v1 / v2 + diff2 / v2 - 1.0 + v2.log() - v1.log()).sum(-1)
        vm = 0.5 * (v1 + v2)
        bh = (0.125 * diff2 / vm + 0.5 * vm.log() - 0.25 * (v1.log() + v2.log())).sum(-1)
        for kind, d in (("kl", kl), ("bhattacharyya", bh)):
            totals[kind] += float((torch.logsumexp(-d, dim=1) - math.log(n)).sum())
    return {kind: -total / n for kind, total in totals.items()}


def timed(fn, *args) -> tuple[float, Dict[str, float]]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="500,1000,2000,4000,6000")
    parser.add_argument("--plain-up-to", type=int, default=2000, help="time the reference up to this N (it is slow)")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "band_cost.md"))
    parser.add_argument("--note", default="", help="a line on the conditions (e.g. what else ran), for the report")
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    lines = ["| N | K | band [lower, upper] (nats) | log N | pairwise_bounds (s) | plain reference (s) | ratio | "
             "largest difference of the two (nats) |", "|---|---|---|---|---|---|---|---|"]
    for n in (int(s) for s in args.sizes.split(",")):
        mean = 0.1 * torch.randn(n, args.k, generator=g)
        std = 0.5 + 0.5 * torch.rand(n, args.k, generator=g)
        ours, band = timed(pairwise_bounds, mean, std)
        if n <= args.plain_up_to:
            plain, ref = timed(plain_bounds, mean, std)
            diff = max(abs(band[k] - ref[k]) for k in band)
            cells = f"{plain:.2f} | {plain / ours:.1f}x | {diff:.1e}"
        else:
            cells = "- | - | -"
        lines.append(f"| {n} | {args.k} | [{band['bhattacharyya']:.3f}, {band['kl']:.3f}] | {math.log(n):.3f} | "
                     f"{ours:.2f} | {cells} |")
        print(lines[-1], flush=True)
    note = f' --note "{args.note}"' if args.note else ""
    text = ["# The pairwise band's cost by probe size", "", "Written by `benchmarks/band_cost.py`; do not edit by hand.",
            "", f"- command: `python benchmarks/band_cost.py --sizes {args.sizes} --k {args.k}{note}`",
            f"- machine: {platform.machine()}, {cpu_name()}, {torch.get_num_threads()} threads, torch "
            f"{torch.__version__}",
            "- one call each, float32 codes in, float64 arithmetic; both ends of the band (Bhattacharyya and KL)",
            *([f"- {args.note}"] if args.note else []),
            "", *lines, ""]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
