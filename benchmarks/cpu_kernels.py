"""The CPU elementwise kernels behind ib/models/functional.py: torch's ELU and softplus against ib's, and torch's
normal sampler, timed in one process (forward, and forward + backward).

    python benchmarks/cpu_kernels.py            # writes benchmarks/results/cpu_kernels.md

Sizes are those of the PI-MLP MINE step (batch 100): an ELU layer of the paper's critic on the joint and shuffled
pairs is 200 x 512 floats, the Gaussian bottleneck's softplus 100 x 256.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path
from typing import Callable, List

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ib.models import functional  # noqa: E402
from train_speed import cpu_name, timed  # noqa: E402


def per_call(fn: Callable[[], object], calls: int, repeats: int) -> float:
    """Median seconds per call over `repeats` timings of `calls` calls (after a warm-up)."""

    def batch() -> None:
        for _ in range(calls):
            fn()

    return timed(batch, torch.device("cpu"), repeats) / calls


def forward_backward(f: Callable, x: torch.Tensor) -> Callable[[], None]:
    g = torch.ones_like(x)

    def run() -> None:
        torch.autograd.grad(f(x), x, g)

    return run


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cpu_kernels.md"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    h = (torch.randn(200, 512) * 2).requires_grad_()  # a critic ELU layer's input
    pre = (torch.randn(100, 256) * 2 - 5).requires_grad_()  # softplus(pre - offset) of the bottleneck
    rows = []
    for name, x, ours, theirs in (("ELU", h, functional.elu, F.elu), ("softplus", pre, functional.softplus, F.softplus)):
        for what, make in (("forward", lambda f, x=x: (lambda: f(x.detach()))), ("forward + backward",
                                                                               lambda f, x=x: forward_backward(f, x))):
            t_torch, t_ib = (per_call(make(f), args.calls, args.repeats) for f in (theirs, ours))
            rows.append(f"| {name} {tuple(x.shape)} {what} | {t_torch * 1e3:.3f} | {t_ib * 1e3:.3f} | "
                        f"{t_torch / t_ib:.1f}x |")
    noise = torch.empty(200, 512)
    t_normal = per_call(noise.normal_, args.calls, args.repeats)
    t_exp = per_call(lambda: torch.exp(noise), args.calls, args.repeats)
    lines = [
        "# CPU elementwise kernels: torch's against ib's",
        "",
        f"Command: `{' '.join(['python', 'benchmarks/cpu_kernels.py', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); {dt.datetime.now():%Y-%m-%d %H:%M}.",
        "",
        "| kernel (shape) | torch ms | ib ms | torch / ib |",
        "|---|---|---|---|",
        *rows,
        "",
        f"torch's normal sampler: {t_normal / noise.numel() * 1e9:.2f} ns per float ({t_normal * 1e3:.3f} ms for "
        f"200 x 512), against {t_exp / noise.numel() * 1e9:.2f} ns for exp.",
        "",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
