"""Evaluation mode and seeded randomness that leave no trace: every evaluation pass runs inside these.

`evaluating(*modules, seed=..., device=...)` puts the modules in eval mode, forks the global RNG (seeded when a
seed is given) and, on exit, restores every submodule's mode and the RNG exactly as they were, so that evaluating
in the middle of training changes neither the run's random stream nor its train/eval flags.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

import torch
from torch import nn


def rng_devices(device: torch.device) -> List[int]:
    """The CUDA devices whose RNG `torch.random.fork_rng` must save for work on `device` (none on the CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The global RNG (CPU, and `device`'s if it is a GPU) seeded with `seed` inside, restored on exit."""
    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def evaluating(*modules: Optional[nn.Module], seed: Optional[int] = None,
               device: Optional[torch.device] = None) -> Iterator[None]:
    """Eval mode for `modules` (None entries are skipped) and a forked global RNG, both restored on exit.

    Args:
        modules: switched to eval mode; each submodule's own flag is restored afterwards (not just the top one's).
        seed: seeds the forked RNG when given; otherwise the fork starts from the current state.
        device: where the work runs (its CUDA RNG is forked too); default: the first module's parameters' device.
    """
    present = [m for m in modules if m is not None]
    if device is None:
        params = (p for m in present for p in m.parameters())
        device = next(params, torch.zeros(())).device
    flags = [(sub, sub.training) for m in present for sub in m.modules()]
    for m in present:
        m.eval()
    try:
        with torch.random.fork_rng(devices=rng_devices(device)):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    finally:
        for sub, flag in flags:
            sub.training = flag
