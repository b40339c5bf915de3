"""A beta sweep trained one run after another against the same sweep trained as one population (`ib sweep
--vectorize`), in the same benchmark run: wall time, samples per second, peak memory, the population step's
arithmetic rate against this machine's matmul rate, and whether the two sweeps' figures agree.

Parts (each a pair of `ib sweep` commands run as child processes, sequential first, then vectorised):
- digits: `recipes/digits.yaml` (MINE-IB, 40 epochs), betas 0, 1e-3, 1e-2, 0.1, 1 x seeds 0, 1 (10 runs);
- digits_no_figures: the same without the TensorBoard plane figures (`monitor.plane_figure=false`; ten a
  run), the same work in both sweeps;
- fashion_mnist: `recipes/fashion_mnist.yaml` (the PI-MLP, MINE-IB), betas as above x seeds 0, 1, 2 (15 runs),
  1 epoch, the alignment monitor off (it is per run);
- step: one population step of each part against its members' separate `train_step`s, timed in-process, with its
  floating-point operations counted by torch's FlopCounterMode; the rate is set against a 2048 x 2048 float32
  matmul's on the same threads.

Each part's result is written to `--out` as it completes (`--parts` picks them; a finished part is read back).

    python benchmarks/vectorized_sweep.py                       # all parts
    python benchmarks/vectorized_sweep.py --parts digits,step
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.monitor import read_csv  # noqa: E402
from train_speed import cpu_name  # noqa: E402

BETAS = "0,1e-3,1e-2,0.1,1"
PARTS = {
    "digits": ("recipes/digits.yaml", "0,1", []),
    "digits_no_figures": ("recipes/digits.yaml", "0,1", ["monitor.plane_figure=false"]),
    "fashion_mnist": ("recipes/fashion_mnist.yaml", "0,1,2", ["epochs=1", "monitor.alignment.enabled=false"]),
}
FIGURES = ("test_accuracy", "I_XZ", "I_ZY", "I_XZ_pairwise_upper")


def sweep(part: str, work: Path, vectorize: bool, threads: int) -> Dict[str, float]:
    """One `ib sweep` as a child process: wall seconds and its peak resident memory (GB)."""
    recipe, seeds, overrides = PARTS[part]
    folder = work / part / ("vectorized" if vectorize else "sequential")
    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "ib", "sweep", str(ROOT / recipe), "--beta", BETAS, "--seeds", seeds,
               *overrides, "--sweep-dir", str(folder), *(["--vectorize"] if vectorize else [])]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = folder.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as err:
        child = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory
    seconds = time.perf_counter() - t0
    if status != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{log.read_text()[-2000:]}")
    rows = read_csv(folder / "sweep.csv")
    samples = sum(float(r["epochs"]) for r in rows)  # epochs, scaled to samples by the caller
    return {"seconds": seconds, "peak_rss_gb": usage.ru_maxrss / 2**20, "runs": len(rows), "epochs": samples,
            "rows": rows}


def agreement(a: List[dict], b: List[dict]) -> Dict[str, float]:
    """The largest |difference| of each figure between the two sweeps' rows."""
    return {k: max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b)) for k in FIGURES}


def step_part(threads: int) -> Dict[str, dict]:
    """Population step against separate steps, and its arithmetic rate, for each part's recipe."""
    from torch.utils.flop_counter import FlopCounterMode

    from ib.engine.build import build_run
    from ib.engine.population import population_step
    from ib.engine.population_loop import stack_runs
    from ib.engine.step import train_step
    from ib.recipe import load_recipe

    torch.set_num_threads(threads)
    a = torch.randn(2048, 2048)
    a @ a
    t0 = time.perf_counter()
    for _ in range(5):
        a @ a
    peak = 5 * 2 * 2048**3 / (time.perf_counter() - t0)
    out = {}
    for part in ("digits", "fashion_mnist"):
        recipe, seeds, overrides = PARTS[part]
        size = 5 * len(seeds.split(","))
        runs, states = [], []
        for m in range(size):
            runs.append(build_run(load_recipe(ROOT / recipe, [*overrides, f"seed={m}", "beta=1e-3",
                                                              "beta_schedule.delay=0"])))
            states.append(torch.get_rng_state())
        r = runs[0].recipe
        pop = stack_runs(runs, states)
        batches = [next(iter(run.train_loader)) for run in runs]
        x, y = torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])
        kw = dict(critic_steps=r.mi.critic_steps, grad_clip=r.optimizer.grad_clip,
                  critic_grad_clip=r.mi.optimizer.grad_clip, fused=r.mi.fused)

        def separate():
            for m, run in enumerate(runs):
                train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x[m], y[m], 1e-3, **kw)

        def together():
            population_step(pop, x, y, [1e-3] * size, **kw)

        timing = {}
        for name, fn in (("separate", separate), ("population", together)):
            fn()
            t0 = time.perf_counter()
            reps = 5
            for _ in range(reps):
                fn()
            timing[name] = (time.perf_counter() - t0) / reps
        with FlopCounterMode(display=False) as counter:
            together()
        flops = counter.get_total_flops()
        out[part] = {"members": size, "batch": int(x.shape[1]), "separate_s": timing["separate"],
                     "population_s": timing["population"], "ratio": timing["population"] / timing["separate"],
                     "flops_per_step": flops, "gflops": flops / timing["population"] / 1e9,
                     "matmul_peak_gflops": peak / 1e9, "utilisation": flops / timing["population"] / peak,
                     "samples_per_s": size * int(x.shape[1]) / timing["population"]}
    return out


def report(results: Dict[str, dict], threads: int, note: str = "") -> List[str]:
    lines = ["# A sweep as one population (`ib sweep --vectorize`) against one run after another", "",
             "Written by `benchmarks/vectorized_sweep.py`; do not edit by hand.", "",
             f"- machine: {platform.machine()}, {cpu_name()}, torch {torch.__version__}, {threads} thread(s) a process",
             f"- betas {BETAS}; the protocol is in the script's docstring", *([f"- {note}"] if note else []), ""]
    for part in PARTS:
        if part not in results:
            continue
        res = results[part]
        seq, vec = res["sequential"], res["vectorized"]
        lines += [f"## {part}: {vec['runs']} runs", "", "| sweep | wall s | runs x epochs | peak RSS (GB) |",
                  "|---|---|---|---|",
                  f"| one run after another | {seq['seconds']:.1f} | {seq['epochs']:.0f} | {seq['peak_rss_gb']:.2f} |",
                  f"| one population | {vec['seconds']:.1f} | {vec['epochs']:.0f} | {vec['peak_rss_gb']:.2f} |", "",
                  f"- wall time ratio (population / sequential): **{vec['seconds'] / seq['seconds']:.2f}**",
                  "- largest difference between the two sweeps' figures: " + ", ".join(
                      f"{k} {v:.2g}" for k, v in res["agreement"].items()), ""]
    if "step" in results:
        lines += ["## One step", "", "| recipe | members | batch | separate steps (ms) | population step (ms) | ratio "
                  "| samples/s | GFLOP/s | of a 2048^2 matmul's rate |", "|---|---|---|---|---|---|---|---|---|"]
        for part, s in results["step"].items():
            lines.append(f"| {part} | {s['members']} | {s['batch']} | {s['separate_s'] * 1e3:.1f} | "
                         f"{s['population_s'] * 1e3:.1f} | {s['ratio']:.2f} | {s['samples_per_s']:.0f} | "
                         f"{s['gflops']:.1f} | {s['utilisation']:.0%} |")
        lines.append("")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="digits,digits_no_figures,fashion_mnist,step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default=str(ROOT / "checkpoints" / "vectorized_sweep"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "vectorized_sweep.md"))
    parser.add_argument("--note", default="", help="a line on the conditions (e.g. another job on the machine)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    store = out.with_suffix(".json")
    results = json.loads(store.read_text()) if store.exists() else {}
    for part in args.parts.split(","):
        if part == "step":
            results["step"] = step_part(args.threads)
        else:
            seq = sweep(part, Path(args.work), False, args.threads)
            vec = sweep(part, Path(args.work), True, args.threads)
            results[part] = {"agreement": agreement(seq.pop("rows"), vec.pop("rows")), "sequential": seq,
                             "vectorized": vec}
        out.parent.mkdir(parents=True, exist_ok=True)
        store.write_text(json.dumps(results, indent=2))
        out.write_text("\n".join(report(results, args.threads, args.note)) + "\n")
        print(f"wrote {out} ({part})", flush=True)


if __name__ == "__main__":
    main()
