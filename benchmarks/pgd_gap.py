"""Where our PGD and AutoAttack part: each attack alone, on the same images of one trained run, with the share of
images that each one breaks and the others do not.

The adversarial table's check 7 flags our PGD-40 when it reads more than 2 points above AutoAttack. This script
takes one run folder (its `last.pt`, the mean-code model, eval mode) and the table's images (`--limit` test images,
seeded draw 0) and runs, one at a time:

- ours (`ib.attacks`, as `ib eval` runs them): Madry's PGD-40 (cross-entropy, fixed step 2.5 eps / 40, one random
  start), the same with the margin loss, PGD-100 with 5 restarts; the adaptive step schedule at 40 and 100 steps;
  then PGD-100 adaptive followed by targeted runs toward the 3 or 9 likeliest wrong classes (`eval.targets`);
- AutoAttack's four attacks, each alone (`pyautoattack`, version "custom"): APGD-CE, APGD-T (targeted DLR, 9
  targets), FAB-T and Square (5,000 queries).

It prints and writes a table of accuracies, the accuracy of the union of each group, and for each attack the images
only it breaks.

    python benchmarks/pgd_gap.py checkpoints/adversarial_table/mnist/cnn/pgd_at/seed_0 --eps 0.3
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.attacks import mean_code_loss, pgd, targeted_pgd, wrong_classes  # noqa: E402
from ib.autoattack import MeanCodeLogits, load_autoattack  # noqa: E402
from ib.data import BatchLoader  # noqa: E402
from ib.engine import load_run  # noqa: E402
from ib.modes import seeded  # noqa: E402
from train_speed import cpu_name  # noqa: E402

OURS = {  # name: (steps, restarts, loss, schedule, targets)
    "pgd40": (40, 1, "ce", "fixed", 0),  # Madry et al.'s PGD-40, step 2.5 eps / 40
    "pgd40_margin": (40, 1, "margin", "fixed", 0),
    "pgd100_r5": (100, 5, "ce", "fixed", 0),
    "pgd40_adaptive": (40, 1, "ce", "adaptive", 0),
    "pgd100_adaptive": (100, 1, "ce", "adaptive", 0),
    "pgd100_adaptive_t3": (100, 1, "ce", "adaptive", 3),
    "pgd100_adaptive_t9": (100, 1, "ce", "adaptive", 9),  # the adversarial table's
}
THEIRS = ("apgd-ce", "apgd-t", "fab-t", "square")


def our_attack(name: str, model, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Adversarial inputs of one of our attacks, run as `ib eval` runs them on the mean code."""

    def correct(x_adv: Tensor, y_: Tensor) -> Tensor:
        return model(x_adv, sample=False).argmax(-1) == y_

    steps, restarts, kind, schedule, targets = OURS[name]
    x_adv = pgd(mean_code_loss(model, kind), x, y, eps, steps=steps, restarts=restarts, correct_fn=correct,
                schedule=schedule)
    if targets:
        with torch.no_grad():
            ranking = wrong_classes(model(x, sample=False).softmax(-1), y)
        x_adv = targeted_pgd(lambda t: mean_code_loss(model, target=t), x, y, eps, x_adv, ranking, targets=targets,
                             correct_fn=correct, steps=steps, schedule=schedule)
    return x_adv


def their_attack(name: str, model, x: Tensor, y: Tensor, eps: float, seed: int) -> Tensor:
    AutoAttack = load_autoattack()
    aa = AutoAttack(MeanCodeLogits(model), attacks=[name], version="custom", norm="Linf", eps=eps, seed=seed)
    if name == "apgd-t":
        aa.apgd_targeted.n_target_classes = 9
    if name == "fab-t":
        aa.fab.n_target_classes, aa.fab.n_restarts = 9, 1
    if name == "apgd-ce":
        aa.apgd.n_restarts = 1
    aa.verbose = False
    with torch.inference_mode(False):
        x_adv, _ = aa.run_standard_evaluation(x.clone(), y.clone(), batch_size=x.shape[0])
    return x_adv.detach()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a run folder with last.pt")
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--limit", type=int, default=500)
    parser.add_argument("--attacks", default=",".join([*OURS, *THEIRS]))
    parser.add_argument("--out", default="", help="markdown file to append the table to (default: print only)")
    args = parser.parse_args(argv)
    run = load_run(Path(args.run) / "last.pt", device="cpu")
    model = run.model.eval()
    loader = BatchLoader(run.data.test.sample(args.limit, 0), args.limit, shuffle=False, drop_last=False)
    x, y = next(iter(loader))
    with torch.no_grad():
        clean = model(x, sample=False).argmax(-1) == y
    robust: Dict[str, Tensor] = {}
    seconds: Dict[str, float] = {}
    for name in args.attacks.split(","):
        t0 = time.perf_counter()
        with seeded(0, x.device):
            x_adv = (our_attack(name, model, x, y, args.eps) if name in OURS
                     else their_attack(name, model, x, y, args.eps, 0))
        seconds[name] = time.perf_counter() - t0
        assert (x_adv - x).abs().max() <= args.eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        with torch.no_grad():
            robust[name] = clean & (model(x_adv, sample=False).argmax(-1) == y)
        print(f"{name:16s} {robust[name].float().mean():.3f}  ({seconds[name]:.0f} s)", flush=True)
    lines = [f"## {args.run} (eps {args.eps:g}, {args.limit} test images, mean code)", "",
             f"- command: `python benchmarks/pgd_gap.py {args.run} --eps {args.eps:g} --limit {args.limit}`",
             f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}", f"- clean: "
             f"{clean.float().mean():.3f}", "",
             "| attack | robust accuracy | breaks alone (of all listed) | seconds |", "|---|---|---|---|"]
    for name, flags in robust.items():
        others = torch.stack([f for k, f in robust.items() if k != name]).all(0) if len(robust) > 1 else clean
        lines.append(f"| {name} | {flags.float().mean():.3f} | {int((others & ~flags).sum())} | {seconds[name]:.0f} |")
    groups: Dict[str, List[str]] = {"ours (union)": [k for k in robust if k in OURS],
                                    "AutoAttack (union)": [k for k in robust if k in THEIRS]}
    for group, names in groups.items():
        if names:
            union = torch.stack([robust[k] for k in names]).all(0)
            lines.append(f"| {group} | {union.float().mean():.3f} | | |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text((out.read_text() + "\n" if out.exists() else "") + text)


if __name__ == "__main__":
    main()
