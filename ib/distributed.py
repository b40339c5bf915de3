"""Data-parallel training on torch.distributed: process set-up under torchrun, and the collectives the estimators,
the evaluation and the epoch statistics need.

Launch (one process per GPU, or per CPU share with `gloo`):

    torchrun --nproc_per_node=2 -m ib train recipes/digits.yaml

`data.batch_size` stays the GLOBAL batch: each of the N processes takes its own B / N rows of every global batch
(B must divide by N), so a recipe trains the same model, with the same number of steps per epoch and the same
learning rates, on 1 or N processes.

Gradients of the encoder and of the critic are averaged by DistributedDataParallel. The MI bounds are computed on
the global batch: marginal pairs draw z from every process (`gather`, differentiable), and the batch means and
log-mean-exps are global (`global_sum`, differentiable), so every process holds the same bound and MINE's moving
average stays identical everywhere. Why the gradients come out right: each process's loss contains the same global
term L; the backward of the differentiable gather sums, over the N processes, the gradient that each sends to a
process's own rows, which is N dL/d(rows); DDP's average divides it by N again. The encoder and the critic thus
receive exactly the gradient of the global-batch bound.
"""
from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ib.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Process:
    """This process's place in the job: rank (global), local_rank (on its machine), world_size."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes logs, TensorBoard, checkpoints and metrics."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Process()


def launched_by_torchrun() -> bool:
    """Whether the environment of torchrun (or another launcher setting RANK/WORLD_SIZE) is present."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def is_main_process() -> bool:
    """Whether this process is the one that writes, as `setup` decides: rank 0 of a job of several processes, and
    any process outside one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return True
    return int(os.environ["RANK"]) == 0


def setup(device: str) -> tuple[Process, Optional[torch.device]]:
    """Join the process group when launched by torchrun with more than one process.

    Returns the process's place and, for CUDA, its device (cuda:LOCAL_RANK; None: let the recipe choose). The
    backend is `nccl` on CUDA and `gloo` on CPU. Outside torchrun, or with one process, nothing is initialised.
    A process group that the caller initialised already is used as it is.
    """
    if dist.is_available() and dist.is_initialized():  # the caller's own process group (mp.spawn, srun, ...)
        if dist.get_world_size() == 1:
            return SINGLE, None
        rank = dist.get_rank()
        proc = Process(rank, int(os.environ.get("LOCAL_RANK", rank)), dist.get_world_size())
        on_cuda = dist.get_backend() == "nccl"
        return proc, torch.device("cuda", torch.cuda.current_device()) if on_cuda else None
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE, None
    proc = Process(int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    if use_cuda and proc.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"local rank {proc.local_rank} has no GPU: this machine has {torch.cuda.device_count()}; "
                          f"use --nproc_per_node <= {torch.cuda.device_count()}")
    backend = "nccl" if use_cuda else "gloo"
    dev = torch.device("cuda", proc.local_rank) if use_cuda else None
    if dev is not None:
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                            **({"device_id": dev} if dev is not None else {}))
    return proc, dev


def broadcast_buffers_(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every process, so that all evaluate the same model."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, 0)


def barrier() -> None:
    if active():
        dist.barrier()


def teardown(wait: bool = True) -> None:
    """Leave the process group; `wait`: after a barrier, so that no process tears gloo down while another still
    talks to it (that can abort the process). A failing process leaves at once."""
    if dist.is_initialized():
        # DDP wrappers that ran a backward through `gather` and are still alive when the process exits can abort
        # it ("terminate called without an active exception"): collect them while the group is up.
        gc.collect()
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the job (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather(t: Tensor) -> tuple[Tensor, int]:
    """Rows of every process, concatenated in rank order ([N*B, ...] from [B, ...] each; equal B everywhere), and
    the offset of this process's rows. Differentiable: the gradient of each row returns to its process, summed over
    the processes that used it."""
    if not active():
        return t, 0
    return _GatherRows.apply(t), dist.get_rank() * t.shape[0]


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0; the backward hands each process the sum over processes of its rows' gradients.

    Synchronous collectives only (all_gather, all_reduce), which every backend has (gloo lacks reduce-scatter);
    the all-reduce moves N times the rows a reduce-scatter would, which for codes and scalars is nothing.
    """

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:
        ctx.rows = t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # [N*B, ...]: every process's gradient for every row, summed
        start = dist.get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


def global_sum(t: Tensor) -> Tensor:
    """The sum of a tensor over the processes, with the same value on all; differentiable (see the module note)."""
    return gather(t.unsqueeze(0))[0].sum(0)


def global_logsumexp(t: Tensor) -> Tensor:
    """logsumexp of all elements of `t` over every process (a scalar); differentiable."""
    lse = torch.logsumexp(t.flatten(), dim=0)
    return torch.logsumexp(gather(lse.unsqueeze(0))[0], dim=0)


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every process (one small all-reduce); `flag` itself outside a process group."""
    if not active():
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    dist.all_reduce(t)
    return bool(t.item() == 0.0)


def any_true(flag: bool, device: torch.device) -> bool:
    return not all_true(not flag, device)


def reduce_sum_(*tensors: Tensor) -> None:
    """In-place sum over the processes of each tensor (no gradient)."""
    if not active():
        return
    for t in tensors:
        dist.all_reduce(t)


def shard(n: int, proc: Process) -> slice:
    """This process's contiguous share of n items (sizes differ by at most one)."""
    lo = n * proc.rank // proc.world_size
    hi = n * (proc.rank + 1) // proc.world_size
    return slice(lo, hi)
