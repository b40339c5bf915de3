"""What the attacks on the sampled model should ascend, measured: the loss of its prediction (-log mean_z p(y|z),
`eval.sampled_loss=mean_softmax`, the default) against the loss of single draws (`per_draw`, the former default),
and AutoAttack's `rand` version (`ib[autoattack]`) beside them, on models whose code noise matters and on one
whose code is nearly deterministic.

Models (bundled digits, `recipes/digits.yaml`, `--epochs` epochs, seed 0), each trained once into `--work`:
- VIB at beta 0.1 and 0.3, started with the code's noise on the scale of its spread (`std_offset=0`): their
  noise is not negligible (the pairwise band sits below its ceiling);
- the recipe's MINE run (std_offset 5: noise about 0.007, nearly deterministic).
Evaluation: the whole test split (360 images), the sampled model with the recipe's 12 draws, L-inf PGD-20 and
EOT-PGD (8 predictions, or 8 draws) at eps 0.05, 0.1 and 0.2, seed 0. Lower accuracy = stronger attack.

    python benchmarks/sampled_attack_loss.py              # writes results/sampled_attack_loss.md
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
from pathlib import Path
from typing import Dict, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.engine import fit, load_run  # noqa: E402
from ib.evaluate import evaluate_model  # noqa: E402
from ib.monitor import read_json  # noqa: E402
from ib.recipe import load_recipe  # noqa: E402
from train_speed import cpu_name  # noqa: E402

MODELS = {
    "VIB beta 0.1 (std_offset 0)": ("mi.estimator=vib_kl", "beta=0.1", "model.bottleneck.std_offset=0",
                                   "beta_schedule.delay=0"),
    "VIB beta 0.3 (std_offset 0)": ("mi.estimator=vib_kl", "beta=0.3", "model.bottleneck.std_offset=0",
                                   "beta_schedule.delay=0"),
    "MINE, the recipe (std_offset 5)": (),
}
EPS = (0.05, 0.1, 0.2)


def train(name: str, overrides: Sequence[str], work: Path, epochs: int) -> Path:
    run_dir = work / "".join(c if c.isalnum() else "_" for c in name.lower())
    if (read_json(run_dir / "metrics.json") or {}).get("status") != "completed":
        fit(load_recipe(ROOT / "recipes" / "digits.yaml", [*overrides, f"epochs={epochs}"]), run_dir, overwrite=True)
    return run_dir


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--limit", type=int, default=None, help="test images (default: all 360)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", default="/tmp/sampled_attack_loss")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampled_attack_loss.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        import pyautoattack  # noqa: F401
        autoattack = True
    except ImportError:
        autoattack = False
    lines = ["# Attacks on the sampled model: the predictor's loss against single draws", "",
             "Written by `benchmarks/sampled_attack_loss.py`; do not edit by hand.", "",
             f"- command: `python benchmarks/sampled_attack_loss.py --epochs {args.epochs} --steps {args.steps}`",
             f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}",
             "- accuracy of the sampled model (12 draws) on the digits test split; lower = stronger attack; "
             "`mean_softmax` ascends -log mean_z p(y|z) of the prediction, `per_draw` the loss of one draw "
             "(EOT-PGD: of 8 predictions, or 8 draws)" + ("" if autoattack else "; AutoAttack not installed"), "",
             "| model | band (nats) | clean | eps | PGD per_draw | PGD mean_softmax | EOT per_draw | EOT mean_softmax"
             + (" | AutoAttack rand |" if autoattack else " |"),
             "|---|---|---|---|---|---|---|---" + ("|---|" if autoattack else "|")]
    for name, overrides in MODELS.items():
        run_dir = train(name, overrides, Path(args.work), args.epochs)
        metrics = read_json(run_dir / "metrics.json")
        run = load_run(run_dir, device="cpu")
        split = run.data.test if args.limit is None else run.data.test.sample(args.limit, 0)
        acc: Dict[tuple, float] = {}
        clean = None
        for kind in ("per_draw", "mean_softmax"):
            report = evaluate_model(run.model, split, attacks=["fgsm", "pgd_linf", "eot_pgd"], eps=EPS,
                                    steps=args.steps, samples=12, eot_samples=8, batch_size=400, check_samples=0,
                                    sampled_loss=kind, autoattack=autoattack and kind == "mean_softmax")
            clean = report["clean"]["sampled"]["accuracy"]
            acc.update({(r["attack"], kind, r["eps"]): r["accuracy"] for r in report["robustness"]
                        if r["variant"] == "sampled"})
        band = f"[{metrics['I_XZ_pairwise_lower']:.2f}, {metrics['I_XZ_pairwise_upper']:.2f}]"
        for eps in EPS:
            cells = [acc[(a, k, eps)] for a in ("pgd_linf", "eot_pgd") for k in ("per_draw", "mean_softmax")]
            if autoattack:
                cells.append(acc[("autoattack_rand", "mean_softmax", eps)])
            lines.append(f"| {name} | {band} | {clean:.4f} | {eps:g} | " + " | ".join(f"{c:.4f}" for c in cells)
                         + " |")
    out = Path(args.out)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
