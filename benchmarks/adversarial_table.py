"""Robustness as a reviewer would read it: standard training, PGD-AT, A3T, MINE-IB and their combinations on MNIST
and Fashion-MNIST, each judged by our attacks, by AutoAttack (`ib[autoattack]`) and by the six sanity checks.

Protocol (every row alike; `--epochs` epochs, 1 by default, far short of Madry's 100,000 steps: labelled as such):
- base recipes `recipes/mnist_pgd.yaml` / `recipes/fashion_mnist_pgd.yaml` (eps 0.3 / 0.1, PGD-40 of 0.01, Adam
  1e-4, batch 50), with the small CNN (conv 32, 64, fc 1024) or the PI-MLP (784-1024-1024) as encoder;
- rows (`ROWS`): standard training; PGD-AT; A3T (FGSM, alpha 0.5, a discriminator on the code); MINE-IB (beta 1e-3,
  Gaussian code K = 256, the recipes' critic); MINE-IB + A3T; VIB (beta 1e-3) + PGD-AT;
- evaluation of each run's last epoch on `--eval-limit` test images (a seeded draw, the same for every run), on the
  sampled model where the code is stochastic (its 12-draw prediction) and on the mean code otherwise: clean accuracy;
  at the data set's eps, FGSM, Madry's PGD-40 (fixed step 2.5 eps / 40), our strongest PGD (`ib eval --steps 100
  --schedule adaptive --targets 9`: APGD's step schedule on the cross-entropy, then targeted margins toward the 9
  likeliest wrong classes) and its EOT form (8 predictions a gradient); AutoAttack (standard on the mean code, rand
  on the sampled model); the sanity checks (check 7 compares our strongest PGD with AutoAttack); the pairwise band
  on I(X;Z); A3T's final `adv/disc_acc`; train time.

Every run is a run folder under `--work` and resumes where it stopped; evaluations are cached beside them
(`table_eval.json`). Anchors, quoted beside ours: Madry's MNIST model, PGD-100 92.5 % and AutoAttack 88.5 % at
eps 0.3 (clean 98.5 %), after 100,000 steps of batch 50 (about 90 epochs).

    python benchmarks/adversarial_table.py --datasets mnist --models cnn --epochs 1 --seeds 0
    python benchmarks/adversarial_table.py --report
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.engine import load_run  # noqa: E402
from ib.evaluate import evaluate_model  # noqa: E402
from ib.monitor import read_csv, read_json, write_csv  # noqa: E402
from runs import train_or_resume  # noqa: E402
from train_speed import cpu_name  # noqa: E402

log = logging.getLogger("adversarial_table")

DATASETS = {"mnist": ("recipes/mnist_pgd.yaml", 0.3, ()), "fashion_mnist": ("recipes/fashion_mnist_pgd.yaml", 0.1, ()),
            "digits": ("recipes/mnist_pgd.yaml", 0.1, ("data.name=digits",))}  # digits: the smoke test's
MODELS = {"cnn": (), "mlp": ("model.encoder={name: mlp, hidden: [1024, 1024], activation: relu}",)}
NONE = ("adversarial.name=none",)
A3T = ("adversarial.name=a3t", "adversarial.attack=fgsm", "adversarial.alpha=0.5")
GAUSSIAN = ("model.bottleneck={name: gaussian, z_dim: 256, std_offset: 5.0}", "model.eval_samples=12",
            "beta=1.0e-3", "mi.enabled=true")
ROWS: Dict[str, Tuple[str, ...]] = {
    "standard": NONE,
    "PGD-AT": (),
    "A3T": A3T,
    "MINE-IB": (*NONE, *GAUSSIAN, "mi.estimator=mine"),
    "MINE-IB + A3T": (*A3T, *GAUSSIAN, "mi.estimator=mine"),
    "VIB + PGD-AT": (*GAUSSIAN, "mi.estimator=vib_kl"),
}
PROTOCOL = 2  # of our attacks' and AutoAttack's evaluation below; a cached one of another protocol is redone
MADRY = 2  # of the PGD-40 column (1 ran the targeted runs of `ib eval`'s default too)
ANCHORS = ("Madry et al. 2018, MNIST challenge model (100,000 steps of batch 50): clean 98.5 %, PGD-100 92.5 %, "
           "AutoAttack 88.5 % at eps 0.3; CIFAR-10 PGD-AT WRN-34-10: AutoAttack 44.0 % at 8/255")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def run_dir(args, dataset: str, model: str, row: str, seed: int) -> Path:
    return Path(args.work) / dataset / model / slug(row) / f"seed_{seed}"


def evaluate(folder: Path, eps: float, args) -> Optional[dict]:
    """The table's evaluation of a run's last.pt, cached in `table_eval.json`: our attacks, AutoAttack and the checks
    (`PROTOCOL`), and Madry's PGD-40 (`MADRY`), each redone when the run trained on or its protocol changed. With
    `--report`, cached evaluations only (None when one part is missing)."""
    cache = folder / "table_eval.json"
    metrics = read_json(folder / "metrics.json") or {}
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    same_run = (cached.get("epochs"), cached.get("limit")) == (metrics.get("epochs"), args.eval_limit)
    main_ok = same_run and cached.get("protocol") == PROTOCOL
    madry_ok = same_run and cached.get("madry_protocol") == MADRY
    if main_ok and madry_ok:
        return cached
    if args.report:
        return None
    run = load_run(folder / "last.pt", device="cpu")
    split, samples = run.data.test.sample(args.eval_limit, 0), run.recipe.model.eval_samples
    variant = "sampled" if samples else "mean"
    out = dict(cached) if main_ok else {}
    if not main_ok:
        try:
            import pyautoattack  # noqa: F401
            autoattack = True
        except ImportError:
            autoattack = False
        report = evaluate_model(run.model, split, attacks=["fgsm", "pgd_linf", "eot_pgd"], eps=[eps], steps=100,
                                schedule="adaptive", targets=9, samples=samples, eot_samples=8, batch_size=250,
                                check_samples=200, autoattack=autoattack)
        acc = {r["attack"]: r["accuracy"] for r in report["robustness"] if r["variant"] == variant and r["eps"] == eps}
        history = read_csv(folder / "history.csv")
        out = {"protocol": PROTOCOL, "epochs": metrics.get("epochs"), "limit": args.eval_limit, "variant": variant,
               "clean": report["clean"][variant]["accuracy"], "fgsm": acc.get("fgsm"),
               "apgd100": acc.get("pgd_linf"), "eot_pgd": acc.get("eot_pgd"),
               "autoattack": acc.get("autoattack", acc.get("autoattack_rand")),
               "autoattack_mean_code": next((r["accuracy"] for r in report["robustness"]
                                             if r["attack"] == "autoattack" and r["eps"] == eps), None),
               "checks": {c["name"]: c["passed"] for c in report["checks"]},
               "band": [metrics.get("I_XZ_pairwise_lower"), metrics.get("I_XZ_pairwise_upper")],
               "disc_acc": float(history[-1]["adv/disc_acc"]) if history and "adv/disc_acc" in history[-1] else None,
               "train_seconds": metrics.get("train_seconds")}
    if not madry_ok:  # Madry's PGD-40 as published: a fixed step, no targeted runs
        madry = evaluate_model(run.model, split, attacks=["pgd_linf"], eps=[eps], steps=40, schedule="fixed",
                               targets=0, samples=samples, batch_size=250, check_samples=0)
        out["pgd40"] = next(r["accuracy"] for r in madry["robustness"]
                            if r["variant"] == variant and r["eps"] == eps and r["attack"] == "pgd_linf")
        out["madry_protocol"] = MADRY
    cache.write_text(json.dumps(out, indent=2))
    return out


def fmt(values: Sequence, scale: float = 100.0, digits: int = 1) -> str:
    values = [float(v) * scale for v in values if isinstance(v, (int, float)) and math.isfinite(float(v))]
    if not values:
        return "-"
    text = f"{statistics.fmean(values):.{digits}f}"
    return text + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def table(results: Dict[str, List[dict]]) -> List[str]:
    lines = ["| row | seeds | clean (%) | FGSM (%) | PGD-40 (%) | PGD-100 adaptive + 9 targets (%) | its EOT form (%) "
             "| AutoAttack (%) | checks passed | band (nats) | disc. acc. | train (s) |", "|---" * 12 + "|"]
    for row, evals in results.items():
        if not evals:
            lines.append(f"| {row} | 0 |" + " - |" * 10)
            continue
        checks = [sum(v is not False for v in e["checks"].values()) for e in evals]
        totals = {len(e["checks"]) for e in evals}
        failed = sorted({k for e in evals for k, v in e["checks"].items() if v is False})
        band = [e["band"] for e in evals if e["band"][0] is not None]
        band_text = (f"[{statistics.fmean(b[0] for b in band):.2f}, {statistics.fmean(b[1] for b in band):.2f}]"
                     if band else "-")
        cells = [fmt([e["clean"] for e in evals]), fmt([e["fgsm"] for e in evals]), fmt([e["pgd40"] for e in evals]),
                 fmt([e["apgd100"] for e in evals]), fmt([e["eot_pgd"] for e in evals]),
                 fmt([e["autoattack"] for e in evals]),
                 f"{min(checks)}/{max(totals)}" + (f" (failed: {', '.join(failed)})" if failed else ""), band_text,
                 fmt([e["disc_acc"] for e in evals], 1.0, 3),
                 fmt([e["train_seconds"] for e in evals], 1.0, 0)]
        lines.append(f"| {row} | {len(evals)} | " + " | ".join(cells) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="mnist,fashion_mnist")
    parser.add_argument("--models", default="cnn,mlp")
    parser.add_argument("--rows", default="", help="comma-separated row slugs (e.g. standard,pgd_at); default all")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--eval-limit", type=int, default=1000)
    parser.add_argument("--report", action="store_true", help="train and evaluate nothing: the table from the runs "
                        "trained and evaluated under this protocol")
    parser.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "datasets" / "mnist"))
    parser.add_argument("--work", default=str(ROOT / "checkpoints" / "adversarial_table"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "adversarial_table.md"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {k: v for k, v in ROWS.items() if not args.rows or slug(k) in args.rows.split(",")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Adversarial training, IB penalties and their combinations, judged by our attacks and AutoAttack", "",
             "Written by `benchmarks/adversarial_table.py`; do not edit by hand.", "",
             f"- command: `python benchmarks/adversarial_table.py --datasets {args.datasets} --models {args.models} "
             f"--seeds {args.seeds} --epochs {args.epochs} --eval-limit {args.eval_limit}"
             + (" -- " + " ".join(args.overrides) if args.overrides else "") + "`",
             f"- protocol: **{args.epochs} epoch(s) a run** for every row (the anchors train about 90); the rows and "
             "the evaluation as in the script's docstring; accuracies in %, mean ± std over the seeds",
             f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}",
             f"- anchors: {ANCHORS}", ""]
    csv_rows = []
    for dataset in args.datasets.split(","):
        recipe, eps, data = DATASETS[dataset]
        for model in args.models.split(","):
            results: Dict[str, List[dict]] = {}
            for row, overrides in rows.items():
                evals = []
                for seed in seeds:
                    folder = run_dir(args, dataset, model, row, seed)
                    settings = [*data, *MODELS[model], *overrides, f"seed={seed}", "monitor.alignment.enabled=false",
                                *([f"data.root={args.mnist_root}"] if dataset == "mnist" else []), *args.overrides]
                    if not args.report:
                        log.info("%s, %s, %s, seed %d", dataset, model, row, seed)
                        train_or_resume(ROOT / recipe, settings, folder, args.epochs)
                    done = (read_json(folder / "metrics.json") or {}).get("status") == "completed"
                    result = evaluate(folder, eps, args) if done else None
                    if result is not None:
                        evals.append(result)
                        csv_rows.append({"dataset": dataset, "model": model, "row": row, "seed": seed, **{
                            k: v for k, v in evals[-1].items() if k not in ("checks", "band")},
                            "band_lower": evals[-1]["band"][0], "band_upper": evals[-1]["band"][1],
                            "checks_failed": ",".join(k for k, v in evals[-1]["checks"].items() if v is False)})
                results[row] = evals
            lines += [f"## {dataset}, {model} (eps {eps:g})", "", *table(results), ""]
            out.write_text("\n".join(lines) + "\n")
    if csv_rows:
        write_csv(out.with_name(out.stem + "_runs.csv"), csv_rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
