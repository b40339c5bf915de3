"""What the reported number does on its own: the held-out bounds of the exact critic on the 20-d Gaussians.

On x, y in R^20 with I(X;Y) = mi nats (the data of `mi_gaussian.py` and of `ib.estimate_mi`'s tests), the optimal
critic is known in closed form, T*(x, y) = log p(y | x) - log p(y), and at T* the DV bound equals the MI. Feeding
T* to the library's own `estimate` code therefore isolates what the report adds to any critic's error:

- `dv, P=20` / `P=200`: the held-out DV bound as `ib.estimate_mi` reports it (4,000 held-out samples of 20,000,
  marginal pairs from P random cyclic shifts);
- `dv, all pairs`: the same with every off-diagonal pair of the held-out set (16 million) in the log-mean-exp;
- `smile (tau=5), all pairs`: SMILE's clipped report, E_P[T] - log E_Q[clip(e^T, e^-5, e^5)], of the same critic,
  and of T* + 2 (a shifted critic: DV is blind to the shift, the clip is not).

Each cell: mean ± standard deviation over the data seeds, in nats.

    python benchmarks/report_bias.py                  # seconds
"""
from __future__ import annotations

import argparse
import math
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.estimators import MINE, SMILE  # noqa: E402
from mi_gaussian import DIM, rho_for, sample  # noqa: E402
from train_speed import cpu_name  # noqa: E402

N, HELD_OUT = 20_000, 4_000
LEVELS = (2.0, 4.0, 6.0, 8.0, 10.0)
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "report_bias.md"


class ExactCritic(torch.nn.Module):
    """T*(x, y) + shift for y = rho x + sqrt(1 - rho^2) eps, coordinate-wise."""

    def __init__(self, mi: float, shift: float = 0.0) -> None:
        super().__init__()
        self.rho, self.shift = rho_for(mi), shift

    def t(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        s2 = 1.0 - self.rho**2
        log_cond = -0.5 * ((y - self.rho * x) ** 2).sum(-1) / s2 - 0.5 * DIM * math.log(s2)
        return (log_cond + 0.5 * (y**2).sum(-1) + self.shift).double()

    def pair_scores(self, x: torch.Tensor, z: torch.Tensor, zm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.t(x, z), self.t(x.repeat(len(zm) // len(x), 1), zm)


def held_out(mi: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The held-out 4,000 of 20,000 samples (`mi_gaussian.sample` from a generator seeded with the data seed), split
    as `ib.estimate_mi(seed=seed)` splits them."""
    x, y = sample(N, mi, cubic=False, g=torch.Generator().manual_seed(seed))
    test = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[N - HELD_OUT:]
    return x[test].double(), y[test].double()


def all_pairs(critic: ExactCritic, x: torch.Tensor, y: torch.Tensor, tau: float = math.inf) -> float:
    """E_P[T] - log E_Q[e^clip(T, -tau, tau)] over every off-diagonal pair (rows in chunks)."""
    n, lse = x.shape[0], []
    for start in range(0, n, 200):
        t = critic.t(x[start:start + 200, None, :], y[None, :, :]).clamp(-tau, tau)  # [rows, n]
        rows = torch.arange(start, min(start + 200, n))
        t[rows - start, rows] = -math.inf  # drop the joint pairs
        lse.append(torch.logsumexp(t, dim=1))
    marginal = float(torch.logsumexp(torch.cat(lse), 0)) - math.log(n * (n - 1))
    return float(critic.t(x, y).mean()) - marginal


def measure(seeds: int) -> dict[str, dict[float, list[float]]]:
    cells: dict[str, dict[float, list[float]]] = {}

    def put(name: str, mi: float, value: float) -> None:
        cells.setdefault(name, {}).setdefault(mi, []).append(value)

    for mi in LEVELS:
        for seed in range(seeds):
            x, y = held_out(mi, seed)
            exact = ExactCritic(mi)
            g = torch.Generator().manual_seed(seed)
            for p in (20, 200):
                put(f"dv, P={p}", mi, float(MINE(exact).estimate(x, y, permutations=p, generator=g)))
            put("dv, all pairs", mi, all_pairs(exact, x, y))
            put("smile (tau=5), all pairs", mi, all_pairs(exact, x, y, tau=5.0))
            put("smile (tau=5), all pairs, T* + 2", mi, all_pairs(ExactCritic(mi, 2.0), x, y, tau=5.0))
            put("smile (tau=5), P=20", mi,
                float(SMILE(exact).estimate(x, y, permutations=20, generator=g)))
    return cells


def write(cells: dict[str, dict[float, list[float]]], seeds: int, out: Path) -> None:
    lines = [
        "# The report's own error: held-out bounds of the exact critic on 20-d Gaussians",
        "",
        "Written by `benchmarks/report_bias.py`; do not edit by hand.",
        "",
        f"- command: `python {shlex.join(['benchmarks/report_bias.py', *sys.argv[1:]])}`",
        f"- machine: {cpu_name()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}",
        f"- protocol: the 4,000 held-out samples of 20,000 (the split of `ib.estimate_mi`), {seeds} data seeds; "
        "critic T*(x, y) = log p(y|x) - log p(y), exact, in float64. Cells: mean ± sd over seeds, nats.",
        "",
        "| report | " + " | ".join(f"MI = {mi:g}" for mi in LEVELS) + " |",
        "|---|" + "---|" * len(LEVELS),
    ]
    for name, by_level in cells.items():
        row = []
        for mi in LEVELS:
            v = by_level[mi]
            row.append(f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    write(measure(args.seeds), args.seeds, args.out)
    sys.stdout.write(args.out.read_text())


if __name__ == "__main__":
    main()
