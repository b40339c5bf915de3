"""`ib.estimate_mi` at its defaults as a user meets it: the first call in a fresh process, with and without
`ib.allocator.prime_allocator`, and a second call in the same process beside it; and how much of the first call
is PyTorch's own one-time import of `torch._dynamo`, which the first `torch.optim` optimiser built in a process
triggers (its methods are wrapped by `torch._disable_dynamo`, which imports the module on first use), in
`estimate_mi` or in any other PyTorch training code.

Each (arm, seed) runs in its own Python process: draw the data (d = 20 correlated Gaussians at 4 nats, 20,000
samples, seed s, as benchmarks/estimate_mi_defaults.py), time `estimate_mi(x, y, seed=s)`, then time the same call
again. The `unprimed` arm marks the allocator as primed before the first call, so that the call runs as it did
before the library primed it. The `primed, torch._dynamo first` arm imports `torch._dynamo` (timed) before the
first call. Cells: wall seconds of each call and its minor page faults (getrusage). The arms alternate, so that
drift in the machine's speed falls on all of them alike.

    python benchmarks/first_call.py        # ~6 min on 2 idle cores
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from estimate_mi_defaults import defaults_line  # noqa: E402
from train_speed import cpu_name, write_report  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "first_call.md"

CHILD = """
import json, resource, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
import torch
import ib.allocator
if not {prime}:
    ib.allocator._primed = True  # as if primed already: the first call runs on the allocator as the process left it
torch.set_num_threads({threads})
dynamo = None
if {dynamo}:
    t0 = time.perf_counter()
    import torch._dynamo
    dynamo = time.perf_counter() - t0
from ib.estimators import estimate_mi
from mi_gaussian import sample
x, y = sample(20_000, {mi}, cubic=False, g=torch.Generator().manual_seed({seed}))
out = []
for _ in range(2):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    est = estimate_mi(x, y, seed={seed})
    out.append(dict(seconds=time.perf_counter() - t0, faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0,
                    value=float(est)))
print(json.dumps(dict(calls=out, dynamo=dynamo)))
"""


ARMS = {"primed": (True, False), "primed, torch._dynamo first": (True, True), "unprimed": (False, False)}


def run(prime: bool, dynamo: bool, seed: int, mi: float, threads: int) -> dict:
    code = CHILD.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), prime=prime, dynamo=dynamo,
                        threads=threads, mi=mi, seed=seed)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--mi", type=float, default=4.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    lines = [
        "# `ib.estimate_mi`'s first call in a fresh process: priming the allocator, and PyTorch's one-time import",
        "",
        "Written by `benchmarks/first_call.py`; do not edit by hand.",
        "",
        f"- command: `python {shlex.join(['benchmarks/first_call.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads {args.threads}, torch {torch.__version__}; "
        f"load average at the start {os.getloadavg()[0]:.1f}",
        defaults_line(),
        f"- protocol: one process per (arm, seed): data at {args.mi:g} nats drawn with seed s, then "
        "`estimate_mi(x, y, seed=s)` twice; `primed` is the library as it is, `unprimed` skips "
        "`prime_allocator`, and `primed, torch._dynamo first` imports `torch._dynamo` (timed) before the first "
        "call. Cells: wall seconds (minor page faults) of each call.",
        "",
        "| arm | seed | torch._dynamo import | first call | second call | estimate |",
        "|---|---|---|---|---|---|",
    ]
    firsts: dict[str, list[float]] = {arm: [] for arm in ARMS}
    imports: list[float] = []
    for seed in range(args.seeds):
        for arm, (prime, dynamo) in ARMS.items():
            done = run(prime, dynamo, seed, args.mi, args.threads)
            first, second = done["calls"]
            firsts[arm].append(first["seconds"])
            if done["dynamo"] is not None:
                imports.append(done["dynamo"])
            imported = "in the first call" if done["dynamo"] is None else f"{done['dynamo']:.2f} s, before it"
            lines.append(f"| {arm} | {seed} | {imported} | {first['seconds']:.1f} s ({first['faults']:,}) | "
                         f"{second['seconds']:.1f} s ({second['faults']:,}) | {first['value']:.3f} |")
            print(lines[-1], flush=True)
    lines += [""] + [f"- {arm}: first call {statistics.fmean(t):.1f} s on average, longest {max(t):.1f} s"
                     for arm, t in firsts.items()]
    lines.append(f"- torch._dynamo import: {statistics.fmean(imports):.2f} s on average, longest {max(imports):.2f} s")
    write_report(args.out, lines)


if __name__ == "__main__":
    main()
