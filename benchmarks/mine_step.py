"""MINE's training step: ours, torch-mist's, and the plain-PyTorch floor of the same work, timed in lockstep.

All three train the same critic (a joint ReLU MLP 40-256-256-1 on concat(x, y), x, y in R^20) on the same batches
of B pairs with one marginal pairing per sample, with Adam at lr 1e-3:

- `ib mine`: `ESTIMATORS.create("mine", critic)`, its loss (DV with the moving-average gradient correction), and
  the optimiser `ib train` builds for a critic (Adam, fused where torch has it);
- `torch-mist mine`: `torch_mist.estimators.mine(x_dim=20, y_dim=20, hidden_dims=[256, 256])` and its loss, with
  torch's Adam (what its own training uses);
- `plain floor`: an nn.Sequential of the same shape, the 2B pairs stacked in one forward, loss
  mean(T_joint) - logsumexp(T_marginal) + log B, backward and fused Adam: the least a MINE step can do in PyTorch
  (no moving average, no marginal sampling beyond one roll);
- `ib mine, population of S`: S such critics trained as one (`ib.estimators.CriticPopulation`, what
  `ib.estimate_mi_population` trains one critic per seed with), each on its own batch of B pairs; its time per
  member (a population step over S) is set against one step of the others: the same work per member.
- `ib mine, compiled` and `plain floor, compiled`: the same two steps with the loss's forward (and with it the
  backward, through AOTAutograd) compiled by `torch.compile` (inductor's C++ kernels on the CPU); the optimiser
  step stays eager. Compiling happens in the warm-up chunk; the first step's time, compilation included, is
  reported apart. `--no-compile` leaves them out.

The contenders take turns on chunks of steps, so load from other processes falls on all alike. The floor bounds
the ratio any eager implementation can reach against torch-mist: ours / torch-mist >= floor / torch-mist; the
compiled floor bounds what fusing the step's element-wise work can add to that.

Denormal floats: the DV bound cannot see a constant shift of the scores, so they drift, and marginal pairs that a
critic scores far below the rest get softmax weights in the backward pass that underflow to denormals, whose
arithmetic is many times slower on x86 CPUs. `--flush-denormal` runs the same steps with denormals flushed to zero
for every contender (TensorFlow does so in its op threads by default), to measure their share; the library leaves
the process's floating-point mode alone. Results: results/mine_step.md and results/mine_step_ftz.md.

    python benchmarks/mine_step.py                    # ~2 min
    python benchmarks/mine_step.py --flush-denormal --out benchmarks/results/mine_step_ftz.md
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.engine.build import build_optimizer  # noqa: E402
from ib.estimators import ESTIMATORS, CriticPopulation  # noqa: E402
from ib.models.critics import CRITICS  # noqa: E402
from ib.recipe import OptimConfig  # noqa: E402
from mi_gaussian import sample  # noqa: E402
from train_speed import cpu_name, write_report  # noqa: E402

DIM, HIDDEN, LR = 20, 256, 1e-3
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mine_step.md"
POOL = 200_000  # samples the batches are drawn from


def _mine() -> torch.nn.Module:
    critic = CRITICS.create("joint", (DIM,), DIM, hidden=(HIDDEN, HIDDEN), activation="relu", input_noise=0.0,
                            hidden_noise=0.0)
    return ESTIMATORS.create("mine", critic)


def ours(compiled: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
    est = _mine()
    opt = build_optimizer(OptimConfig(name="adam", lr=LR), list(est.parameters()))
    loss = torch.compile(est.loss) if compiled else est.loss

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()

    return step


def peer() -> Callable[[torch.Tensor, torch.Tensor], None]:
    import torch_mist.estimators as tme

    est = tme.mine(x_dim=DIM, y_dim=DIM, hidden_dims=[HIDDEN, HIDDEN])
    opt = torch.optim.Adam(est.parameters(), lr=LR)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        est.loss(x.clone(), y.clone()).backward()  # fresh tensors: torch-mist caches outputs keyed on its arguments
        opt.step()

    return step


def population(size: int) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """A population step of `size` members; it takes the stacked batches [S, B, DIM]."""
    members, states = [], []
    for m in range(size):
        torch.manual_seed(m)
        members.append(_mine())
        states.append(torch.get_rng_state())
    pop = CriticPopulation(members, states, lambda params: build_optimizer(OptimConfig(name="adam", lr=LR), params))
    return pop.step


def floor(compiled: bool = False) -> Callable[[torch.Tensor, torch.Tensor], None]:
    net = nn.Sequential(nn.Linear(2 * DIM, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                        nn.Linear(HIDDEN, 1))
    opt = torch.optim.Adam(net.parameters(), lr=LR, fused=True)

    def dv_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        t = net(torch.cat([torch.cat([x, y], 1), torch.cat([x, y.roll(1, 0)], 1)])).squeeze(1)  # [2B]
        return -(t[:b].mean() - torch.logsumexp(t[b:], 0) + math.log(b))

    loss = torch.compile(dv_loss) if compiled else dv_loss

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()

    return step


def measure(batch: int, steps: int, chunk: int, size: int, compiled: bool,
            mi: float = 2.0) -> tuple[Dict[str, List[float]], Dict[str, float]]:
    """Median-ready ms per step of each contender (per member for the population), over lockstep chunks, and
    the seconds of each contender's first step (compilation, for the compiled ones).

    Every chunk draws fresh batches from a pool of correlated Gaussians (I(X;Y) = `mi` nats), the same batches for
    every contender, as training does (an earlier version cycled 50 fixed batches, which a critic can memorise).
    """
    contenders = {"ib mine": ours(), "plain floor": floor()}
    if compiled:
        contenders.update({"ib mine, compiled": ours(compiled=True), "plain floor, compiled": floor(compiled=True)})
    if importlib.util.find_spec("torch_mist") is not None:
        contenders["torch-mist mine"] = peer()
    contenders["population"] = population(size)
    g = torch.Generator().manual_seed(0)
    pool_x, pool_y = sample(POOL, mi, cubic=False, g=g)

    def draw(shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, POOL, shape, generator=g)
        return pool_x[idx], pool_y[idx]

    times: Dict[str, List[float]] = {name: [] for name in contenders}
    first: Dict[str, float] = {}
    for rep in range(steps // chunk + 1):  # the first chunk warms up (and compiles)
        data = [draw((batch,)) for _ in range(chunk)]
        stacked = [draw((size, batch)) for _ in range(chunk // size or 1)]  # as many member steps as one chunk
        for name, fn in contenders.items():
            batches = stacked if name == "population" else data
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(batches):
                fn(x, y)
                if not rep and not i:
                    first[name] = time.perf_counter() - t0
            member_steps = len(batches) * (size if name == "population" else 1)
            if rep:
                times[name].append((time.perf_counter() - t0) / member_steps * 1000)  # ms per (member) step
    return times, first


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--chunk", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--population", type=int, default=10, help="members of the population contender")
    parser.add_argument("--flush-denormal", action="store_true",
                        help="flush denormal floats to zero (torch.set_flush_denormal) for every contender")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile contenders")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        parser.error("this CPU cannot flush denormals")
    compiled = not args.no_compile
    names = ["ib mine", *(["ib mine, compiled"] if compiled else []), "torch-mist mine", "plain floor",
             *(["plain floor, compiled"] if compiled else []), "population"]
    header = {"population": f"ib mine, population of {args.population} (per member)"}
    lines = [
        "# MINE's training step: ours, torch-mist's and the plain-PyTorch floor",
        "",
        "Written by `benchmarks/mine_step.py`; do not edit by hand.",
        "",
        f"- command: `python {shlex.join(['benchmarks/mine_step.py', *(argv or sys.argv[1:])])}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores, torch threads "
        f"{args.threads}, torch {torch.__version__}; load average at the start {os.getloadavg()[0]:.1f}; denormal "
        f"floats {'flushed to zero' if args.flush_denormal else 'kept (the default)'}",
        f"- protocol: critic 40-{HIDDEN}-{HIDDEN}-1 (ReLU), one marginal pairing, Adam lr {LR:g}; {args.steps} steps "
        f"each, in lockstep chunks of {args.chunk} after a chunk of warm-up, every chunk fresh batches of 20-d "
        f"Gaussians at 2 nats (never repeated; see `measure`); cells: median ms per step over "
        f"the chunks (and the ratio of medians). The population of {args.population} critics (each its own batch of "
        "B) steps as many member steps per chunk as the others; its cell is ms per member step."
        + (" Compiled: the loss's forward and backward through `torch.compile` (default mode, `.item()` traced "
           "into the graph: ours compiles to one graph, with no recompile per marginal shift), the optimiser step "
           "eager; their first step, compilation included, in the last table (inductor's caches empty; the run's "
           "first compilation also pays inductor's one-time set-up)." if compiled else ""),
        "",
        "| batch | " + " | ".join(header.get(n, n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    ratio_rows, first_rows = [], []
    firsts = [n for n in names if n != "population"]
    for batch in args.batch_sizes:
        with compile_settings(compiled):
            times, first = measure(batch, args.steps, args.chunk, args.population, compiled)
        med = {name: statistics.median(t) for name, t in times.items()}
        peer_ms = med.get("torch-mist mine", math.nan)
        lines.append(f"| {batch} | " + " | ".join(f"{med.get(n, math.nan):.3f}" for n in names) + " |")
        print(lines[-1], flush=True)
        ratio_rows.append(f"| {batch} | " + " | ".join(f"{med[n] / peer_ms:.2f}" for n in names
                                                       if n != "torch-mist mine")
                          + f" | {med['ib mine'] / med['plain floor']:.2f} |")
        first_rows.append(f"| {batch} | " + " | ".join(f"{first.get(n, math.nan):.2f}" for n in firsts) + " |")
    lines += ["", "Per step, against torch-mist's:", "",
              "| batch | " + " | ".join(f"{header.get(n, n)} / torch-mist" for n in names if n != "torch-mist mine")
              + " | ib mine / plain floor |",
              "|---|" + "---|" * len(names), *ratio_rows]
    if compiled:
        lines += ["", "First step, seconds (for the compiled contenders, compilation included):", "",
                  "| batch | " + " | ".join(firsts) + " |", "|---|" + "---|" * len(firsts), *first_rows]
    write_report(args.out, lines)


@contextlib.contextmanager
def compile_settings(enabled: bool) -> Iterator[None]:
    """For the compiled contenders: inductor's caches, on disk and in memory, empty (a fresh folder, removed
    afterwards; inductor's own `temporary_cache_dir`), so that they compile cold rather than from what earlier runs
    left; and `.item()` traced into the graph (dynamo's capture_scalar_outputs), since the marginal shift that our
    MINE draws as a Python int would otherwise break the graph and recompile it for every new shift."""
    if not enabled:
        yield
        return
    import torch._dynamo
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with tempfile.TemporaryDirectory(prefix="mine_step_inductor_") as folder, temporary_cache_dir(folder), \
            torch._dynamo.config.patch(capture_scalar_outputs=True):
        yield

if __name__ == "__main__":
    main()
