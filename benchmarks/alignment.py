"""Tangent-kernel alignment (Baratin et al., AISTATS 2021) on permutation-invariant MNIST: what one measurement
costs, whether the paper's finding holds here, and whether an information bottleneck changes it.

Stages (each resumable: finished runs are skipped, stopped ones resumed):
- `cost`: one measurement of `monitor.alignment` (100 + 100 class-balanced probe inputs, c = 10, the whole network,
  encoder, decoder, each layer, tr K and the effective rank) on the MNIST recipe's MLP (784-1024-1024, K = 256),
  median of 5 after a warm-up, against nngeometry 0.4's `GramMatrix` (by one of the paper's authors; installed
  separately: `pip install nngeometry==0.4`) doing the work of the authors' `train.py` (the whole kernel on each
  probe, then one kernel per layer), and the largest difference between the two kernels.
- `paper`: the paper's setting as far as this model allows: plain cross-entropy (deterministic code, no penalty),
  SGD lr 0.01, momentum 0.9, weight decay 5e-4 (the authors' scripts; their default lr 0.1 is for their own
  initialisation), batch 128, `--epochs` epochs, with 0 %, 20 % and 50 % of the training labels drawn at random
  (`data.label_noise`); alignment at step 0 and floor(5 * 1.15^k).
- `ib`: the MNIST results table's rows (`benchmarks/ib_table.py`, 10 epochs): beta = 0, VIB (beta 0.01) and MINE-IB
  (beta 0.01), Adam as in `recipes/mnist.yaml`, with the monitor on.
- `report`: `results/alignment.md` and the figures beside it, from the finished runs.

    python benchmarks/alignment.py                       # every stage, seeds 0 and 1
    python benchmarks/alignment.py --stages cost
    python benchmarks/alignment.py --stages report
"""
from __future__ import annotations

import argparse
import logging
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.alignment import layer_kernels  # noqa: E402
from ib.engine.align_monitor import log_spaced_steps  # noqa: E402
from ib.engine.build import build_run  # noqa: E402
from ib.monitor import read_csv, read_json  # noqa: E402
from ib.recipe import load_recipe  # noqa: E402
from runs import train_or_resume  # noqa: E402
from train_speed import cpu_name  # noqa: E402

log = logging.getLogger("alignment")

MONITOR = ("monitor.alignment.enabled=true",)
PLAIN = ("mi.enabled=false", "beta=0", "model.bottleneck={name: deterministic, z_dim: 256}", "model.eval_samples=0",
         "optimizer={name: sgd, lr: 0.01, momentum: 0.9, weight_decay: 5.0e-4}", "lr_schedule=constant",
         "data.batch_size=128")
PAPER = {f"label noise {int(100 * p)} %": (*PLAIN, f"data.label_noise={p}") for p in (0.0, 0.2, 0.5)}
IB = {"beta = 0": ("mi.enabled=false", "beta=0"),
      "VIB (beta 0.01)": ("mi.estimator=vib_kl", "beta=0.01"),
      "MINE-IB (beta 0.01)": ("mi.estimator=mine", "beta=0.01")}
PUBLISHED = ("Baratin et al. 2021 find that the alignment rises during training, and rises less when part of the "
             "labels are random; this report compares the direction of those effects, not their size (no figure of "
             "theirs is quoted: their runs train far longer, on other architectures)")


def slug(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name.lower()).strip("_").replace("__", "_")


def stage_runs(configs: Dict[str, Tuple[str, ...]], group: str, args) -> None:
    for seed in args.seeds:
        for name, overrides in configs.items():
            run_dir = Path(args.work) / group / slug(name) / f"seed_{seed}"
            log.info("%s: %s, seed %d", group, name, seed)
            settings = [*overrides, *MONITOR, f"seed={seed}", f"data.root={args.mnist_root}", *args.overrides]
            train_or_resume(Path(args.recipe), settings, run_dir, args.epochs if group == "paper" else args.ib_epochs)


def cost(args) -> List[str]:
    """One measurement's time, ours against nngeometry's Gram matrices, and the largest difference."""
    recipe = load_recipe(args.recipe, [*MONITOR, "mi.enabled=false", "beta=0", f"data.root={args.mnist_root}",
                                       *args.overrides])
    run = build_run(recipe)
    monitor, model = run.alignment, run.model.eval()
    ours = []
    for i in range(6):  # the first is a warm-up
        t0 = time.perf_counter()
        monitor.measure(model, i)
        ours.append(time.perf_counter() - t0)
    t_ours = statistics.median(ours[1:])
    lines = [f"- one measurement (train and test probes, whole network, encoder, decoder, {len(monitor.layers)} "
             f"layers, tr K, effective rank): **{t_ours:.3f} s** (median of 5: "
             f"{', '.join(f'{t:.3f}' for t in ours[1:])})"]
    try:
        from nngeometry import GramMatrix
        from nngeometry.layercollection import LayerCollection
    except ImportError:
        return lines + ["- nngeometry: not installed (`pip install nngeometry==0.4`), not compared"]

    def f(x, *rest):
        return model(x, sample=False)

    def authors_work() -> torch.Tensor:  # train.py: alignment + layer_alignment on each probe
        whole = None
        for probe in monitor.probes.values():
            gram = GramMatrix(model, (probe.x, probe.y), function=f).data
            whole = gram if whole is None else whole
            collection = LayerCollection.from_model(model)
            for item in collection.layers.items():
                one = LayerCollection()
                one.add_layer(*item)
                GramMatrix(model, (probe.x, probe.y), function=f, layer_collection=one)
        return whole

    theirs = []
    for _ in range(3):
        t0 = time.perf_counter()
        gram = authors_work()
        theirs.append(time.perf_counter() - t0)
    t_theirs = statistics.median(theirs)
    probe = monitor.probes["train"]
    kernel = sum(k for k in layer_kernels(f, monitor.layers, probe.x).values())
    c, n = run.data.num_classes, probe.x.shape[0]
    diff = float((gram.reshape(c * n, c * n) - kernel).abs().max() / kernel.abs().max())
    return lines + [f"- nngeometry 0.4 `GramMatrix`, the same work as the authors' `train.py`: **{t_theirs:.3f} s** "
                    f"(median of 3): ours takes {t_ours / t_theirs:.2f}x its time",
                    f"- largest difference between the two whole-network kernels on the training probe, relative to "
                    f"its largest entry: {diff:.1e} (float32)"]


def runs_of(args, group: str, names: Sequence[str]) -> Dict[str, List[Path]]:
    out = {}
    for name in names:
        folders = [Path(args.work) / group / slug(name) / f"seed_{s}" for s in args.seeds]
        out[name] = [d for d in folders if (read_json(d / "metrics.json") or {}).get("status") == "completed"]
    return out


def fmt(values: Sequence[float], digits: int = 3) -> str:
    values = [v for v in values if isinstance(v, float) and math.isfinite(v)]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f}" + (f" ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else "")


def summary(rows: List[dict], key: str) -> Tuple[float, float, float]:
    """(at step 0, the largest, at the last step) of one alignment column."""
    values = [float(r[key]) for r in rows if isinstance(r.get(key), float)]
    return (values[0], max(values), values[-1]) if values else (math.nan,) * 3


def table(runs: Dict[str, List[Path]], extra: Sequence[Tuple[str, str]] = ()) -> List[str]:
    head = ("| run | seeds | train: step 0 | train: peak | train: last | test: step 0 | test: peak | test: last | "
            + " | ".join(label for label, _ in extra) + (" |" if extra else "|"))
    lines = [head.replace("| |", "|"), "|---" * (8 + len(extra)) + "|"]
    for name, folders in runs.items():
        per = [read_csv(d / "alignment.csv") for d in folders]
        cells = []
        for key in ("align/train", "align/test"):
            stats = [summary(rows, key) for rows in per]
            cells += [fmt([s[i] for s in stats]) for i in range(3)]
        for _, key in extra:
            cells.append(fmt([float((read_json(d / "metrics.json") or {}).get(key, math.nan)) for d in folders], 4))
        lines.append(f"| {name} | {len(folders)} | " + " | ".join(cells) + " |")
    return lines


def layer_table(runs: Dict[str, List[Path]]) -> List[str]:
    layers: List[str] = []
    for folders in runs.values():
        for d in folders:
            layers += [k for k in read_csv(d / "alignment.csv")[0] if k.startswith("align/layer/") and k not in layers]
    lines = ["| run | " + " | ".join(k.removeprefix("align/layer/") for k in layers) + " |",
             "|---" * (1 + len(layers)) + "|"]
    for name, folders in runs.items():
        cells = [fmt([float(read_csv(d / "alignment.csv")[-1].get(k, math.nan)) for d in folders]) for k in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def curve_figure(runs: Dict[str, List[Path]], keys: Sequence[str], title: str, path: Path,
                 plane: bool = False) -> None:
    """Mean alignment over seeds against the step (symlog), one colour per run, solid train, dashed test; with
    `plane`, a second panel of each run's band upper end and I(Z;Y) against the epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0 if plane else 6.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if plane else 1, squeeze=False)[0]
    for i, (name, folders) in enumerate(runs.items()):
        if not folders:
            continue
        per = [read_csv(d / "alignment.csv") for d in folders]
        steps = [float(r["step"]) for r in per[0]]
        for key, style in zip(keys, ("-", "--", ":")):
            values = [statistics.fmean(float(rows[j][key]) for rows in per) for j in range(min(map(len, per)))]
            axes[0].plot(steps[:len(values)], values, color=f"C{i}", ls=style, marker="o", markersize=2,
                         label=f"{name}: {key.removeprefix('align/')}")
        if plane:
            hist = [read_csv(d / "history.csv") for d in folders]
            epochs = [int(r["epoch"]) for r in hist[0]]
            for key, style in (("mi/I_XZ_pairwise_upper", "-"), ("mi/I_ZY", ":")):
                values = [statistics.fmean(float(h[j][key]) for h in hist) for j in range(len(epochs))]
                axes[1].plot(epochs, values, color=f"C{i}", ls=style, marker="o", markersize=3,
                             label=f"{name}: {'band upper I(X;Z)' if 'XZ' in key else 'I(Z;Y)'}")
    axes[0].set_xscale("symlog", linthresh=1.0)
    axes[0].set_xlabel("training step")
    axes[0].set_ylabel("centred kernel-target alignment")
    axes[0].set_title(title, fontsize=9)
    if plane:
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("nats")
        axes[1].set_title("information plane quantities (2,000 validation images)", fontsize=9)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(str(path))


def layer_figure(runs: Dict[str, List[Path]], path: Path) -> None:
    """Per-layer alignment (training probe, first seed) against the step: one panel per run."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    done = {name: folders[0] for name, folders in runs.items() if folders}
    fig = Figure(figsize=(4.2 * max(len(done), 1), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(done), 1), squeeze=False, sharey=True)[0]
    for ax, (name, folder) in zip(axes, done.items()):
        rows = read_csv(folder / "alignment.csv")
        steps = [float(r["step"]) for r in rows]
        for key in [k for k in rows[0] if k.startswith("align/layer/")]:
            ax.plot(steps, [float(r[key]) for r in rows], lw=1.0, label=key.removeprefix("align/layer/"))
        ax.plot(steps, [float(r["align/train"]) for r in rows], color="k", lw=2.0, label="whole network")
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlabel("training step")
        ax.set_title(f"{name} ({folder.name})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("alignment, training probe")
    fig.tight_layout()
    fig.savefig(str(path))


def cost_share(runs: Dict[str, List[Path]], epochs: int) -> List[str]:
    """The measured share of the monitor in the runs, and the share at 20 epochs."""
    lines = []
    for name, folders in runs.items():
        shares, per_epoch, per_measure = [], [], []
        for d in folders:
            hist = read_csv(d / "history.csv")
            align = sum(float(r.get("time/align_s", 0.0)) for r in hist)
            total = sum(float(r["time/epoch_s"]) for r in hist)
            shares.append(align / total)
            per_epoch.append((total - align) / len(hist))
            per_measure.append(align / len(read_csv(d / "alignment.csv")))
        if not folders:
            continue
        steps_per_epoch = int(read_json(folders[0] / "metrics.json")["steps"]) // epochs
        count20 = len(log_spaced_steps(20 * steps_per_epoch))
        t = statistics.fmean(per_measure)
        share20 = count20 * t / (count20 * t + 20 * statistics.fmean(per_epoch))
        lines.append(f"- {name}: the monitor took {fmt([100 * s for s in shares], 1)} % of the {epochs}-epoch runs "
                     f"({statistics.fmean(per_measure):.3f} s a measurement in the run, beside the training); at 20 "
                     f"epochs ({count20} measurements, {steps_per_epoch} steps an epoch): {100 * share20:.1f} %")
    return lines


def report(args, cost_lines: List[str]) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paper = runs_of(args, "paper", list(PAPER))
    ib_runs = runs_of(args, "ib", list(IB))
    lines = ["# Tangent-kernel alignment on PI-MNIST", "", "Written by `benchmarks/alignment.py`; do not edit by hand.",
             "", f"- command: `python benchmarks/alignment.py --seeds {','.join(map(str, args.seeds))} --epochs "
             f"{args.epochs}`", f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}",
             "- alignment: centred kernel-target alignment of the mean-code logits' tangent kernel, 100 training "
             "inputs (with the labels trained on) and 100 test inputs, class-balanced, fixed per seed; measured at "
             "step 0, floor(5 * 1.15^k) and the last step; every figure: mean ± std over the seeds",
             f"- paper: {PUBLISHED}", *([f"- conditions: {args.note}"] if args.note else []),
             "", "## Cost", ""]
    cost_file = out.with_name(out.stem + "_cost.md")
    if cost_lines:
        cost_file.write_text("\n".join(cost_lines) + "\n")
    lines += (cost_file.read_text().splitlines() if cost_file.exists() else ["- not measured (stage `cost`)"])
    lines += [*cost_share(paper, args.epochs), *cost_share(ib_runs, args.ib_epochs)]
    lines += ["", f"## The paper's setting: plain cross-entropy, SGD, {args.epochs} epochs, random labels", "",
              *table(paper, [("test accuracy", "test_accuracy")]), "", "Each layer's alignment at the last step "
              "(training probe):", "", *layer_table(paper), ""]
    lines += [f"## Information bottleneck rows ({args.ib_epochs} epochs, `recipes/mnist.yaml`)", "",
              *table(ib_runs, [("test accuracy", "test_accuracy"), ("band upper", "I_XZ_pairwise_upper"),
                               ("I(Z;Y)", "I_ZY")]), "", "Each layer's alignment at the last step (training probe):",
              "", *layer_table(ib_runs), ""]
    figures = [("label_noise", paper, ("align/train", "align/test"), "plain CE + SGD: alignment against the step",
                False), ("ib", ib_runs, ("align/train", "align/test"), "IB rows: alignment against the step", True)]
    for tag, runs, keys, title, plane in figures:
        if any(runs.values()):
            path = out.with_name(f"{out.stem}_{tag}.png")
            curve_figure(runs, keys, title, path, plane=plane)
            lines.append(f"![{title}]({path.name})")
    for tag, runs in (("paper_layers", paper), ("ib_layers", ib_runs)):
        if any(runs.values()):
            path = out.with_name(f"{out.stem}_{tag}.png")
            layer_figure(runs, path)
            lines.append(f"![per-layer alignment]({path.name})")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="cost,paper,ib,report")
    parser.add_argument("--seeds", default="0,1", type=lambda s: [int(v) for v in s.split(",")])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the paper-setting runs")
    parser.add_argument("--ib-epochs", type=int, default=10, help="epochs of the IB rows (the results table's)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "mnist.yaml"))
    parser.add_argument("--mnist-root", default=str(ROOT.parent / "shared" / "datasets" / "mnist"))
    parser.add_argument("--work", default=str(ROOT / "checkpoints" / "alignment"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "alignment.md"))
    parser.add_argument("--note", default="", help="a line on the conditions (e.g. what else ran), for the report")
    parser.add_argument("overrides", nargs="*", help="recipe overrides for every run (after --)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stages = args.stages.split(",")
    cost_lines = cost(args) if "cost" in stages else []
    if "paper" in stages:
        stage_runs(PAPER, "paper", args)
    if "ib" in stages:
        stage_runs(IB, "ib", args)
    if "report" in stages or cost_lines:
        report(args, cost_lines)


if __name__ == "__main__":
    main()
