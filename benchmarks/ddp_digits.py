"""One process against several: `ib train` and `torchrun -m ib train` on the same recipe and global batch.

For each process count, the recipe is trained from scratch with `torchrun --standalone --nproc_per_node=N -m ib
train` (N = 1 runs plain `python -m ib train`); a further run with the largest N stops half-way (`--stop-after`)
and is resumed with one process. The table gives the final figures from each run's metrics.json and the wall time
of the command (start-up included), and is written to `benchmarks/results/ddp_digits.md`.

    python benchmarks/ddp_digits.py                          # recipes/digits.yaml, 1 and 2 processes
    python benchmarks/ddp_digits.py --procs 1,2,4 -- epochs=10 beta=1e-2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "ddp_digits.md"


def train(procs: int, recipe: Path, overrides: Sequence[str], run_dir: Path, extra: Sequence[str] = ()) -> float:
    """Run training; returns the command's wall time in seconds."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    if procs == 1:
        cmd = [sys.executable, "-m", "ib", "train"]
    else:
        env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", "-m", "ib",
               "train"]
    cmd += [*(["--resume", str(run_dir)] if "--resume" in extra else [str(recipe), *overrides, "--run-dir",
                                                                         str(run_dir)]),
            *[e for e in extra if e != "--resume"]]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {shlex.join(cmd)}\n{done.stderr[-3000:]}")
    return wall


def row(label: str, run_dir: Path, wall: float) -> Dict[str, str]:
    m = json.loads((run_dir / "metrics.json").read_text())
    return {"run": label, "processes": str(m["processes"]), "steps": str(m["steps"]),
            "test accuracy": f"{m['test_accuracy']:.4f}", "test NLL": f"{m['test_nll']:.4f}",
            f"I(X;Z) {m['units']}": f"{m['I_XZ']:.3f}", f"I(Z;Y) {m['units']}": f"{m['I_ZY']:.3f}",
            "train s": f"{m['train_seconds']:.1f}", "wall s": f"{wall:.1f}"}


def main(argv: List[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "digits.yaml")
    p.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("overrides", nargs="*", help="recipe overrides key=value (after --)")
    args = p.parse_args(argv)
    procs = [int(n) for n in args.procs.split(",")]
    from ib.recipe import load_recipe

    epochs = load_recipe(args.recipe, args.overrides).epochs
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in procs:
            run_dir = Path(tmp) / f"procs_{n}"
            rows.append(row(f"{n} process{'es' if n > 1 else ''}", run_dir, train(n, args.recipe, args.overrides,
                                                                                  run_dir)))
            print(rows[-1], flush=True)
        n = max(procs)
        if n > 1:
            run_dir = Path(tmp) / "resumed"
            wall = train(n, args.recipe, args.overrides, run_dir, ["--stop-after", str(epochs // 2)])
            wall += train(1, args.recipe, args.overrides, run_dir, ["--resume"])
            rows.append(row(f"{n} processes for {epochs // 2} epochs, resumed in 1", run_dir, wall))
            print(rows[-1], flush=True)
    command = shlex.join(["python", "benchmarks/ddp_digits.py", *(argv if argv is not None else sys.argv[1:])])
    header = list(rows[0])
    lines = [
        "# One process against several (torchrun, gloo on CPU)",
        "",
        "Written by `benchmarks/ddp_digits.py`; do not edit by hand.",
        "",
        f"- command: `{command}`",
        f"- recipe: `{args.recipe.relative_to(ROOT) if args.recipe.is_relative_to(ROOT) else args.recipe}` "
        f"{' '.join(args.overrides)} (the global batch is the recipe's `data.batch_size` for every process count)",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, torch {torch.__version__}; torchrun processes run with OMP_NUM_THREADS=1",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "- `train s`: the run's own training time (epochs and their evaluation); `wall s`: the whole command, "
        "start-up and data loading included",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(r[h] for h in header) + " |" for r in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
