"""The pairwise band on I(X;Z) across a beta sweep on the bundled digits, for three penalties: MINE (the recipe's
default), VIB's KL against N(0, I) (`vib_kl`) and the nonlinear IB's pairwise KL (`pairwise_kl`).

Each penalty is one `ib sweep` of `recipes/digits.yaml` (resumable: run the command again to finish it); the table
gives, per beta, means over the seeds of the final epoch: test accuracy, the probe's pairwise band (Bhattacharyya to
KL, at most log N), the penalty's own estimate of I(X;Z) and I(Z;Y). Written to
`benchmarks/results/digits_band.md`, with each sweep's `sweep.csv` beside it.

    python benchmarks/digits_band.py                        # betas 0,1e-3,1e-2,1e-1,0.3,1; seeds 0,1
    python benchmarks/digits_band.py --work /tmp/digits_band -- epochs=20
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.sweep import run_sweep  # noqa: E402
from train_speed import cpu_name  # noqa: E402
# Each penalty with the settings it needs: pairwise_kl's batch bound has a gradient only while codes overlap, so it
# starts with the code's noise on the scale of its spread (std = softplus(pre), about 0.7) and with beta from the
# first step; from the VIB paper's small noise (std_offset 5) or after the 100-step delay it sits at log B with no
# gradient (`benchmarks/results/digits_configs.md`).
PENALTIES = {"mine": (), "vib_kl": (), "pairwise_kl": ("model.bottleneck.std_offset=0", "beta_schedule.delay=0")}


def mean(values: Sequence[float]) -> float:
    values = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def table(rows_by_penalty: Dict[str, List[dict]]) -> List[str]:
    lines = ["| penalty | beta | test accuracy | band lower | band upper | ceiling log N | estimate | I(Z;Y) |",
             "|---|---|---|---|---|---|---|---|"]
    for penalty, rows in rows_by_penalty.items():
        for beta in sorted({float(r["beta"]) for r in rows}):
            group = [r for r in rows if float(r["beta"]) == beta and r["status"] == "completed"]
            cells = [mean([r[k] for r in group]) for k in ("test_accuracy", "I_XZ_pairwise_lower",
                                                         "I_XZ_pairwise_upper", "I_XZ_ceiling", "I_XZ", "I_ZY")]
            lines.append(f"| {penalty} | {beta:g} | {cells[0]:.4f} | {cells[1]:.3f} | {cells[2]:.3f} | "
                         f"{cells[3]:.3f} | {cells[4]:.3f} | {cells[5]:.3f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", default="0,1e-3,1e-2,1e-1,0.3,1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--work", default="/tmp/digits_band", help="the sweep folders (resumable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits_band.md"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    betas = [float(b) for b in args.betas.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.out)
    rows_by_penalty = {}
    for penalty, settings in PENALTIES.items():
        sweep_dir = Path(args.work) / penalty
        rows_by_penalty[penalty] = run_sweep(ROOT / "recipes" / "digits.yaml", betas, seeds,
                                             [f"mi.estimator={penalty}", *settings, *args.overrides], sweep_dir)
        shutil.copy(sweep_dir / "sweep.csv", out.parent / f"digits_band_{penalty}.csv")
    command = "python benchmarks/digits_band.py" + (" -- " + " ".join(args.overrides) if args.overrides else "")
    text = [
        "# The pairwise band across a beta sweep on digits",
        "",
        "Written by `benchmarks/digits_band.py`; do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- protocol: `recipes/digits.yaml` (40 epochs unless overridden), betas {args.betas}, seeds {args.seeds};",
        "  means over the seeds of the final epoch; the probe is the validation split (N = 143, ceiling log 143)",
        f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}",
        "- per-run figures: `digits_band_<penalty>.csv` beside this file",
        "- settings of each penalty beyond the recipe: "
        + "; ".join(f"{p}: `{' '.join(o)}`" for p, o in PENALTIES.items() if o),
        "",
        *table(rows_by_penalty),
        "",
    ]
    out.write_text("\n".join(text))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
