"""Training: small functions with explicit arguments, and `fit`, which ties them to a run folder.

One encoder step on a batch (x, y):
  1. sample z ~ p(z|x) once;
  2. the critic ascends the MI bound on (x, z.detach()) with its own optimiser, `critic_steps` times;
  3. the encoder and decoder descend CE + beta * penalty(x, z), the critic frozen.
"""
from __future__ import annotations

import contextlib
import fnmatch
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from ib import __version__, distributed
from ib.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ib.data import AUGMENTATIONS, BatchLoader, DataSplits, Split, load_data
from ib.errors import CheckpointError, ConfigError, IBError
from ib.estimators import ESTIMATORS, MIEstimator
from ib.models.bottlenecks import Code
from ib.models.classifier import IBClassifier, build_classifier
from ib.models.critics import CRITICS
from ib.monitor import CSVHistory, EpochLogger, TensorBoardLogger, recipe_estimator, write_json
from ib.objectives import TrainForward, fused_minimax_objective, ib_objective
from ib.plane import information_plane, to_units
from ib.recipe import OptimConfig, Precision, Recipe, dump_recipe, recipe_from_dict, recipe_to_dict
from ib.schedules import BetaSchedule, create_beta_schedule, create_lr_schedule, set_lr

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


class TrainingError(IBError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); `last.pt` holds the last good state."""


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


def build_model(recipe: Recipe, data: DataSplits) -> IBClassifier:
    m = recipe.model
    model = build_classifier(
        m.encoder.name, m.encoder.options, m.bottleneck.name, m.bottleneck.options,
        in_shape=data.in_shape, num_classes=data.num_classes, mean=data.mean, std=data.std,
        decoder_hidden=m.decoder_hidden,
    )
    return model.to(memory_format=_memory_format(recipe))


def _memory_format(recipe: Recipe) -> torch.memory_format:
    """NHWC convolutions under `model.channels_last` (4-D weights in channels-last order; `.to(device)` keeps it,
    and so does `load_state_dict`)."""
    return torch.channels_last if recipe.model.channels_last else torch.preserve_format


def build_estimator(recipe: Recipe, data: DataSplits, z_dim: int) -> Optional[MIEstimator]:
    if not recipe.mi.enabled:
        return None
    if not getattr(ESTIMATORS.get(recipe.mi.estimator.name), "needs_critic", True):  # vib_kl: reads the Gaussian code
        return ESTIMATORS.create(recipe.mi.estimator.name, recipe.model.bottleneck.name, **recipe.mi.estimator.options)
    critic = CRITICS.create(recipe.mi.critic.name, data.in_shape, z_dim, **recipe.mi.critic.options)
    estimator = ESTIMATORS.create(recipe.mi.estimator.name, critic, **recipe.mi.estimator.options)
    return estimator.to(memory_format=_memory_format(recipe))


def build_optimizer(cfg: OptimConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    params = list(params)  # a generator would be used up by the fused check
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    opt_cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if _fused_adam_ok(params):
        # One kernel for the whole update instead of a dozen foreach ops: 0.3 ms of a 2.9 ms MINE critic step on
        # 2 CPU cores (benchmarks/mi_gaussian.py). Same update rule; the state_dict is interchangeable.
        try:
            return opt_cls(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):  # an older torch without fused CPU kernels
            pass
    return opt_cls(params, **kwargs)


def _fused_adam_ok(params: Sequence[Any]) -> bool:
    """Whether fused Adam(W) applies: floating-point parameters (or param groups of them), all on one CPU or CUDA
    device."""
    params = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda")
            and all(p.is_floating_point() for p in params))


def load_optimizer(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """`optimizer.load_state_dict`, keeping the implementation it was built with (fused or not): the saved groups
    carry the flags of the run that saved them, e.g. no `fused` from checkpoints written before it was used.

    Each per-parameter state tensor (Adam's moments) takes its parameter's memory layout: a checkpoint saved with
    NCHW conv weights resumes into channels-last ones, and the fused kernels pair elements by position, not index.
    """
    flags = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
            if kept["fused"] and isinstance(st.get("step"), Tensor):
                # fused kernels want each step counter as a float tensor on the parameter's device
                st["step"] = st["step"].to(p.device, torch.float32)


@dataclass
class Replicas:
    """The DistributedDataParallel wrappers of one process of a torchrun job. Their parameters are the run's
    model and estimator (which the checkpoints save); training runs its forward passes through them so that DDP
    averages the gradients."""

    forward: DDP  # TrainForward: x -> (code, logits)
    critic_loss: Optional[DDP]  # the estimator: (x, z) -> its training loss; None without a critic


def build_replicas(model: IBClassifier, estimator: Optional[MIEstimator], device: torch.device) -> Replicas:
    ids = [device.index] if device.type == "cuda" else None
    critic = None
    if estimator is not None and any(True for _ in estimator.parameters()):
        # Buffers are not broadcast: MINE's moving average is updated from the global batch on every process.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})  # renamed in torch 2.12
        critic = DDP(estimator, device_ids=ids, **no_sync)
    return Replicas(forward=DDP(TrainForward(model), device_ids=ids), critic_loss=critic)


# ---------------------------------------------------------------------------------------------------------------------
# One step, one epoch, one evaluation


@dataclass
class StepStats:
    """Sums over an epoch, kept on the device so that a step never waits for the device."""

    loss: Tensor
    ce: Tensor
    mi_bound: Tensor  # the critic's bound on its training batches
    correct: Tensor
    seen: int = 0
    steps: int = 0
    nonfinite: int = 0
    nonfinite_in_a_row: int = 0  # ending at the last step; carried over from the epochs before (not a sum)

    @classmethod
    def zeros(cls, device: torch.device, nonfinite_in_a_row: int = 0) -> "StepStats":
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z(), z(), nonfinite_in_a_row=nonfinite_in_a_row)

    def state_dict(self) -> Dict[str, Any]:
        return {"loss": self.loss, "ce": self.ce, "mi_bound": self.mi_bound, "correct": self.correct,
                "seen": self.seen, "steps": self.steps, "nonfinite": self.nonfinite,
                "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: Dict[str, Any], rank: int = 0) -> None:
        """Sums saved by `reduce`d stats: every process takes the step means, rank 0 alone the counts."""
        for k, v in state.items():
            setattr(self, k, v.to(self.loss.device) if isinstance(v, Tensor) else v)
        if rank:
            self.correct, self.seen = torch.zeros_like(self.correct), 0

    def reduce(self) -> None:
        """Combine the sums of every process in place (under torchrun): loss, ce and bound become means over the
        processes of their per-step values, correct and seen totals. Every process then holds the same stats."""
        if not distributed.active():
            return
        means = torch.stack([self.loss, self.ce, self.mi_bound])
        counts = torch.stack([self.correct, self.correct.new_tensor(float(self.seen))])
        distributed.reduce_sum_(means, counts)
        means /= torch.distributed.get_world_size()
        self.loss, self.ce, self.mi_bound = means.unbind()
        self.correct, self.seen = counts[0], int(counts[1])

    def summary(self, with_mi: bool) -> Dict[str, float]:
        n = max(self.steps, 1)
        row = {"loss/total": float(self.loss) / n, "loss/ce": float(self.ce) / n,
               "acc/train": float(self.correct) / max(self.seen, 1)}
        if with_mi:
            row["mi/I_XZ_train"] = float(self.mi_bound) / n
        return row


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device sync for the lot.

    The plain sum of a tensor is NaN or inf when any element is (inf - inf is NaN), and a sum is one vectorised
    pass: on 2 CPU cores it checks the PI-MLP's 2M gradients in 0.1 ms, where the max-norm took 2.8 ms (a fifth
    of the step). A sum can also overflow when finite elements are beyond ~1e32: such a step counts as non-finite,
    which for a gradient that large is the right call.
    """
    if not tensors:
        return True
    sums = [t.detach().sum(dtype=torch.float32) for t in tensors]
    return bool(torch.stack([v.to(sums[0].device) for v in sums]).isfinite().all())


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """The context of the training forward passes: for "bf16", torch.autocast to bfloat16 (matmuls and
    convolutions in bf16; weights, gradients, optimiser states, the code and its noise, the decoder and the MI
    bound's arithmetic stay float32, and no loss scaling is needed: bf16 has float32's exponent range); nothing for
    "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    return contextlib.nullcontext()


def critic_step(estimator: MIEstimator, optimizer: torch.optim.Optimizer, x: Tensor, z: Tensor, steps: int,
                loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                precision: Precision = "fp32", grad_clip: Optional[float] = None) -> Tensor:
    """Ascend the bound on (x, z) `steps` times with the critic's own optimiser; returns the last bound (detached).
    `loss_fn` replaces `estimator.loss` (the trainer passes its DistributedDataParallel wrapper under torchrun);
    `precision` as in `autocast`; `grad_clip`: the largest norm of the critic's gradient (`mi.optimizer.grad_clip`).

    An update whose loss or gradient is not finite is not applied, and the estimator's buffers (MINE's moving
    average, a critic's batch-norm statistics) are put back as they were before it; the bound returned is then NaN,
    which `train_step` counts as a non-finite step.
    """
    bound = torch.zeros(())
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for _ in range(steps):
        saved = [b.detach().clone() for b in estimator.buffers()]  # running statistics before this update
        optimizer.zero_grad(set_to_none=True)
        with autocast(x.device, precision):
            loss = (loss_fn or estimator.loss)(x, z)
        loss.backward()
        finite = _all_finite([loss, *_clipped_or_grads([p for p in params if p.grad is not None], grad_clip)])
        if not distributed.all_true(finite, loss.device):  # every process skips, or none
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, before in zip(estimator.buffers(), saved):
                    b.copy_(before)
            return torch.full((), math.nan, device=loss.device)
        optimizer.step()
        bound = loss.detach().neg()
    optimizer.zero_grad(set_to_none=True)  # nothing of the critic's step lingers into the encoder's
    return bound


def train_step(
    model: IBClassifier,
    estimator: Optional[MIEstimator],
    optimizer: torch.optim.Optimizer,
    critic_optimizer: Optional[torch.optim.Optimizer],
    x: Tensor,
    y: Tensor,
    beta: float,
    *,
    critic_steps: int = 1,
    grad_clip: Optional[float] = None,
    critic_grad_clip: Optional[float] = None,
    fused: bool = False,
    replicas: Optional[Replicas] = None,
    precision: Precision = "fp32",
) -> Dict[str, Tensor]:
    """One minimax step on a batch. Returns detached terms; `finite` is False when the step was skipped.

    Two-pass (default): the critic steps on detached z (`critic_steps` times), then the encoder steps on
    CE + beta * penalty against the updated critic. Fused (`fused=True`, one critic step): one forward of the
    critic serves both players through gradient reversal (`fused_minimax_objective`), both optimisers step on the
    gradients of one backward pass, about a third less work per step with the paper's critic.

    An update whose loss or gradient is not finite is skipped (gradients dropped, the estimator's buffers such as
    MINE's moving average put back), and the step reports `finite` False. Fused, that is both players' update;
    two-pass, each player's update is checked on its own: the critic's comes first and stands when only the
    encoder's is not finite. Finiteness is checked with one device sync per update (and, under torchrun, agreed
    by all processes). `grad_clip` and `critic_grad_clip` cap the norms of the encoder's (with the decoder's) and
    of the critic's gradients. `replicas`: the DistributedDataParallel wrappers to run the forward passes through,
    under torchrun. `precision`: "fp32" or "bf16" (the forward passes under `autocast`).
    """
    if (fused and estimator is not None and critic_optimizer is not None and critic_steps == 1
            and getattr(estimator, "loss_is_minus_penalty", True)):  # jsd/smile: the critic's loss is not -penalty
        return _fused_step(model, estimator, optimizer, critic_optimizer, x, y, beta, grad_clip, critic_grad_clip,
                           replicas, precision)
    with autocast(x.device, precision):  # z [B, K], sampled once for both players
        code, logits = replicas.forward(x) if replicas is not None else (model.encode(x), None)
    mi_bound = torch.full((), math.nan)
    checks: List[Tensor] = []
    if estimator is not None and critic_optimizer is not None:
        mi_bound = critic_step(estimator, critic_optimizer, x, code.z.detach(), critic_steps,
                               replicas.critic_loss if replicas is not None else None, precision, critic_grad_clip)
        checks.append(mi_bound)  # NaN when the critic's update was not finite
    with autocast(x.device, precision):
        out = ib_objective(model, estimator, x, y, beta, code=code, logits=logits)
    if estimator is not None and critic_optimizer is None:  # critic-free (vib_kl): report its own bound
        mi_bound = out["mi"].detach() if beta > 0 else _penalty_value(estimator, x, code)
    optimizer.zero_grad(set_to_none=True)
    out["loss"].backward()
    checks += _clipped_or_grads([p for p in model.parameters() if p.grad is not None], grad_clip)
    finite = distributed.all_true(_all_finite([out["loss"], *checks]), x.device)
    if finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    correct = (out["logits"].detach().argmax(1) == y).sum()
    return {"loss": out["loss"].detach(), "ce": out["ce"].detach(), "mi_bound": mi_bound.to(x.device),
            "correct": correct, "finite": torch.tensor(finite)}


@torch.no_grad()
def _penalty_value(estimator: MIEstimator, x: Tensor, code: Code) -> Tensor:
    return estimator.penalty(x, code.z, code)


def _clipped_or_grads(params: List[Tensor], max_norm: Optional[float]) -> List[Tensor]:
    """What tells whether these gradients are finite: with `max_norm`, their total norm after clipping them to it
    (finite iff every gradient is); else the gradients themselves."""
    if max_norm is None:
        return [p.grad for p in params]
    return [nn.utils.clip_grad_norm_(params, max_norm)] if params else []


def _fused_step(model: IBClassifier, estimator: MIEstimator, optimizer: torch.optim.Optimizer,
                critic_optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, beta: float,
                grad_clip: Optional[float], critic_grad_clip: Optional[float], replicas: Optional[Replicas],
                precision: Precision) -> Dict[str, Tensor]:
    saved = [b.detach().clone() for b in estimator.buffers()]  # running statistics before this update
    with autocast(x.device, precision):
        out = fused_minimax_objective(model, estimator, x, y, beta,
                                      forward=replicas.forward if replicas is not None else None,
                                      critic_loss_fn=replicas.critic_loss if replicas is not None else None)
    optimizer.zero_grad(set_to_none=True)
    critic_optimizer.zero_grad(set_to_none=True)
    out["objective"].backward()
    checks = [out["objective"],
              *_clipped_or_grads([p for p in estimator.parameters() if p.grad is not None], critic_grad_clip),
              *_clipped_or_grads([p for p in model.parameters() if p.grad is not None], grad_clip)]
    finite = distributed.all_true(_all_finite(checks), x.device)
    if finite:
        optimizer.step()
        critic_optimizer.step()
    else:
        with torch.no_grad():
            for b, before in zip(estimator.buffers(), saved):
                b.copy_(before)
    optimizer.zero_grad(set_to_none=True)
    critic_optimizer.zero_grad(set_to_none=True)
    correct = (out["logits"].detach().argmax(1) == y).sum()
    return {"loss": out["loss"], "ce": out["ce"].detach(), "mi_bound": out["mi"] if finite else out["mi"] * math.nan,
            "correct": correct, "finite": torch.tensor(finite)}


def _log_once(caught: List[warnings.WarningMessage], warned: set, epoch: int) -> None:
    """Log each kind of warning (its category and origin) once per run, not once per epoch."""
    for w in caught:
        key = (w.category, w.filename, w.lineno)
        if key not in warned:
            warned.add(key)
            log.warning("epoch %d: %s (said once per run)", epoch, w.message)


class StopFlag:
    """Set by SIGINT/SIGTERM while training: the loop finishes its step, saves `last.pt` and returns."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> Any:
        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None:  # a second Ctrl-C stops at once
                raise KeyboardInterrupt
            self.signal = signum
            log.warning("stopping after this step and saving last.pt (press Ctrl-C again to stop at once)")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def train_one_epoch(
    model: IBClassifier,
    estimator: Optional[MIEstimator],
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    critic_optimizer: Optional[torch.optim.Optimizer],
    beta_schedule: BetaSchedule,
    stats: StepStats,
    *,
    step: int,
    critic_steps: int,
    grad_clip: Optional[float],
    critic_grad_clip: Optional[float] = None,
    max_nonfinite: int,
    fused: bool = False,
    log_every: int,
    stop: Optional[StopFlag] = None,
    desc: str = "",
    replicas: Optional[Replicas] = None,
    show_progress: bool = True,
    precision: Precision = "fp32",
) -> int:
    """Train over the rest of the loader's epoch (all of it, unless resumed mid-epoch). Returns the global step.

    Non-finite steps are skipped and counted; `max_nonfinite` in a row (counted in `stats`, across epochs when
    the caller carries `stats.nonfinite_in_a_row` over) raise TrainingError. Under torchrun
    (`replicas`), a stop signal seen by any process stops every process after the same step. `precision`: as in
    `train_step`.
    """
    model.train()
    if estimator is not None:
        estimator.train()
    bar = tqdm(loader, total=loader.batches_left(), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    for x, y in bar:
        beta = beta_schedule.value(step)
        out = train_step(model, estimator, optimizer, critic_optimizer, x, y, beta,
                         critic_steps=critic_steps, grad_clip=grad_clip, critic_grad_clip=critic_grad_clip,
                         fused=fused, replicas=replicas, precision=precision)
        step += 1
        if bool(out["finite"]):
            stats.nonfinite_in_a_row = 0
            stats.loss += out["loss"]
            stats.ce += out["ce"]
            stats.mi_bound += out["mi_bound"].nan_to_num(0.0)
            stats.correct += out["correct"]
            stats.seen += y.shape[0]
            stats.steps += 1
        else:
            stats.nonfinite_in_a_row += 1
            stats.nonfinite += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step,
                        stats.nonfinite_in_a_row)
            if stats.nonfinite_in_a_row >= max_nonfinite:
                raise TrainingError(
                    f"{stats.nonfinite_in_a_row} consecutive non-finite steps (up to step {step}); stopping. Try a "
                    f"lower learning rate or beta; last.pt, if the run has one, holds its last completed epoch")
        if step % log_every == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{float(out['loss']):.4f}", beta=f"{beta:.3g}")
        if stop is not None and _stopping(stop, y.device):
            break
    bar.close()
    return step


def _stopping(stop: StopFlag, device: torch.device) -> bool:
    """Whether to stop now: the flag, agreed by every process under torchrun (each then carries it)."""
    if distributed.any_true(bool(stop), device):
        stop.signal = stop.signal or signal.SIGTERM
    return bool(stop)


def _eval_mode(*modules: Optional[nn.Module]) -> Any:
    """Put modules in eval mode; returns a function that restores their modes."""
    modes = [(m, m.training) for m in modules if m is not None]
    for m, _ in modes:
        m.eval()
    return lambda: [m.train(flag) for m, flag in modes]


def _rng_devices(device: torch.device) -> List[Any]:
    return [device] if device.type == "cuda" else []


def evaluate(model: IBClassifier, loader: BatchLoader, *, samples: int, seed: int = 0,
             reduce: bool = False) -> Dict[str, float]:
    """Accuracy of the mean (noise-free) code, accuracy averaged over `samples` draws of Z, and NLL.

    Runs in eval mode under inference_mode with a fixed seed, leaving the global RNG as it was, so evaluation is
    repeatable and does not change the training run. `reduce`: under torchrun, each process evaluates its share
    (its loader) and the sums are added over the processes, so every process returns the whole set's figures.
    """
    restore = _eval_mode(model)
    correct = correct_sampled = nll = torch.zeros((), dtype=torch.float64)
    n = 0
    device = next(model.parameters()).device
    with torch.inference_mode(), torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)
        for x, y in loader:
            if samples > 0:  # one encoder pass for both predictions
                p_mean, p = model.predict_proba_both(x, samples)  # [B, classes] each
                correct_sampled = correct_sampled + (p.argmax(1) == y).sum().double().cpu()
            else:
                p_mean = p = model.predict_proba(x, samples=0)
            correct = correct + (p_mean.argmax(1) == y).sum().double().cpu()
            nll = nll + F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum").double().cpu()
            n += y.shape[0]
    restore()
    if reduce:
        sums = torch.stack([correct, correct_sampled, nll, torch.tensor(float(n), dtype=torch.float64)]).to(device)
        distributed.reduce_sum_(sums)
        correct, correct_sampled, nll, n = sums[0].cpu(), sums[1].cpu(), sums[2].cpu(), int(sums[3])
    if n == 0:
        return {"acc": math.nan, "acc_sampled": math.nan, "nll": math.nan}
    acc = float(correct) / n
    return {"acc": acc, "acc_sampled": float(correct_sampled) / n if samples > 0 else acc, "nll": float(nll) / n}


# ---------------------------------------------------------------------------------------------------------------------
# The run folder


@dataclass
class Run:
    """Everything `fit` trains and saves."""

    recipe: Recipe
    data: DataSplits
    device: torch.device
    model: IBClassifier
    estimator: Optional[MIEstimator]
    optimizer: torch.optim.Optimizer
    critic_optimizer: Optional[torch.optim.Optimizer]
    beta_schedule: BetaSchedule
    lr_schedule: Any
    base_lrs: List[float]
    train_loader: BatchLoader
    val_loader: BatchLoader
    test_loader: BatchLoader
    epoch: int = 0  # completed epochs
    step: int = 0
    stats: Optional[StepStats] = None  # sums of an epoch in progress (saved when stopped mid-epoch)
    best: Dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0})
    epoch_seconds: List[float] = field(default_factory=list)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0  # consecutive non-finite steps at the end of the last completed epoch
    proc: distributed.Process = distributed.SINGLE  # this process's place in a torchrun job
    replicas: Optional[Replicas] = None  # DDP wrappers under torchrun

    def state_dict(self) -> Dict[str, Any]:
        """The run's state; under torchrun the same on every process but for the RNG (rank 0's is saved)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "ib_version": __version__,
            "recipe": recipe_to_dict(self.recipe),
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "beta_schedule": self.beta_schedule.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "epoch_stats": self.stats.state_dict() if self.stats is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            "best": dict(self.best),
            "epoch_seconds": list(self.epoch_seconds),
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.estimator is not None:
            self.estimator.load_state_dict(state["estimator"])
            if self.critic_optimizer is not None:  # critic-free bounds (vib_kl) have no optimiser
                load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.optimizer, state["optimizer"])
        self.beta_schedule.load_state_dict(state["beta_schedule"])
        # The schedule spans the run's length, which `--resume DIR epochs=M` may lengthen: the epochs left follow
        # the M-epoch schedule (a cosine decay would otherwise sit at its floor for every added epoch).
        self.lr_schedule.load_state_dict({**state["lr_schedule"], "epochs": self.recipe.epochs})
        self.train_loader.load_state_dict(state["train_loader"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best = dict(state["best"])
        self.epoch_seconds = list(state["epoch_seconds"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)  # absent from checkpoints before 2026-11-28
        if state["epoch_stats"] is not None:
            self.stats = StepStats.zeros(self.device)
            self.stats.load_state_dict(state["epoch_stats"], self.proc.rank)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"][:torch.cuda.device_count()])
        if self.proc.rank:  # rank 0 continues the saved stream; the others draw their own (codes, marginal pairs)
            _seed_process(self.recipe.seed * 1_000_003 + self.step, self.proc)


@contextlib.contextmanager
def _building(section: str) -> Iterator[None]:
    """Name the recipe section in a factory's ConfigError, and turn a failed allocation (a width far too large)
    into a ConfigError rather than a traceback."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = " ".join(str(e).split())
        if not isinstance(e, MemoryError) and "alloc" not in text and "out of memory" not in text:
            raise
        asked = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", text, re.IGNORECASE)
        if asked and asked.group(2) == "bytes":
            asked_for = f" (it asked for {float(asked.group(1)) / 2**30:.3g} GiB)"
        else:
            asked_for = f" (it asked for {asked.group(1)} {asked.group(2)})" if asked else ""
        raise ConfigError(f"{section}: the network does not fit in memory{asked_for}; check the widths in "
                          f"{section}.*") from None


def _seed_process(seed: int, proc: distributed.Process) -> None:
    """Give a process other than rank 0 its own random stream, so that processes draw different noise."""
    if proc.rank:
        torch.manual_seed((seed + 7919 * proc.rank) % 2**63)


def build_run(recipe: Recipe, proc: distributed.Process = distributed.SINGLE,
              device: Optional[torch.device] = None) -> Run:
    """Load the data and build every object of a run from a checked recipe (raises ConfigError, DataError).

    Under torchrun (`proc` from `ib.distributed.setup`) every process builds the same model (DDP checks it), takes
    its rows of each global batch and its share of the validation and test sets, and trains through DDP wrappers.
    """
    device = device or resolve_device(recipe.device)
    if recipe.precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        # (torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, on pre-Ampere GPUs)
        raise ConfigError(f"precision: 'bf16' needs a GPU with native bfloat16 (Ampere or newer); "
                          f"{torch.cuda.get_device_name(device)} has none: use precision=fp32")
    torch.manual_seed(recipe.seed)
    d = recipe.data
    if d.batch_size % proc.world_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is the global batch and must divide by the number of "
                          f"processes ({proc.world_size})")
    if d.batch_size // proc.world_size < 2 and recipe.mi.enabled:
        raise ConfigError(f"data.batch_size={d.batch_size} leaves fewer than 2 samples per process "
                          f"({proc.world_size} processes)")
    first = proc.local_rank == 0  # under torchrun: one process per machine loads (maybe downloads) first
    if not first:
        distributed.barrier()
    data = load_data(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction, seed=recipe.seed,
                     image_size=d.image_size)
    if first:
        distributed.barrier()
    probe_share = min(recipe.monitor.probe_size, len(data.val.y) if len(data.val.y) >= 2 else len(data.test.y))
    if proc.distributed and probe_share // proc.world_size < 2:
        raise ConfigError(f"monitor.probe_size={recipe.monitor.probe_size} leaves fewer than 2 probe samples per "
                          f"process ({proc.world_size} processes)")
    if len(data.train.y) < d.batch_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is larger than the training set ({len(data.train.y)})")
    with _building("model"):
        model = build_model(recipe, data).to(device)
    with _building("mi"):
        estimator = build_estimator(recipe, data, model.bottleneck.z_dim)
    critic_optimizer = None
    if estimator is not None:
        estimator = estimator.to(device)
        if any(True for _ in estimator.parameters()):  # bounds without a critic (e.g. a KL bound) train nothing
            critic_optimizer = build_optimizer(recipe.mi.optimizer, list(estimator.parameters()))
    optimizer = build_optimizer(recipe.optimizer, list(model.parameters()))
    beta_schedule = create_beta_schedule(recipe.beta_schedule.name, recipe.beta, **recipe.beta_schedule.options)
    lr_schedule = create_lr_schedule(recipe.lr_schedule.name, recipe.epochs, **recipe.lr_schedule.options)
    augment = AUGMENTATIONS[d.augment]
    replicas = None
    if proc.distributed:
        if estimator is not None:
            estimator.sync = True  # global-batch bounds (ib.distributed)
        replicas = build_replicas(model, estimator, device)
    _seed_process(recipe.seed, proc)

    def share(split: Split) -> Split:
        part = distributed.shard(len(split), proc)
        return Split(split.x[part], split.y[part])

    return Run(
        recipe=recipe, data=data, device=device, model=model, estimator=estimator, optimizer=optimizer,
        critic_optimizer=critic_optimizer, beta_schedule=beta_schedule, lr_schedule=lr_schedule,
        base_lrs=[g["lr"] for g in optimizer.param_groups],
        train_loader=BatchLoader(data.train, d.batch_size, shuffle=True, drop_last=True, device=device,
                                 augment=augment, seed=recipe.seed, rank=proc.rank, world_size=proc.world_size),
        val_loader=BatchLoader(share(data.val), d.eval_batch_size, shuffle=False, drop_last=False, device=device),
        test_loader=BatchLoader(share(data.test), d.eval_batch_size, shuffle=False, drop_last=False, device=device),
        proc=proc, replicas=replicas,
    )


# What a run and its evaluations write into the run folder: `--overwrite` removes these and nothing else.
RUN_FILES = ("recipe.yaml", "last.pt", "best.pt", "history.csv", "metrics.json", "eval.json", "robustness.csv",
             "robustness.png", "plane.png", ".hparams_written")
RUN_FILE_PATTERNS = ("events.out.tfevents.*", ".*.tmp")  # TensorBoard's event files; atomic_write's leftovers
RUN_FOLDERS = ("eval",)  # `ib eval`'s TensorBoard runs


def run_files(run_dir: Path) -> List[Path]:
    """The entries of `run_dir` that ib writes (see RUN_FILES): what `--overwrite` replaces."""
    def ours(p: Path) -> bool:
        if p.is_dir():
            return p.name in RUN_FOLDERS
        return p.name in RUN_FILES or any(fnmatch.fnmatchcase(p.name, pattern) for pattern in RUN_FILE_PATTERNS)

    return sorted(p for p in run_dir.iterdir() if ours(p))


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Raise ConfigError, touching nothing, when `run_dir` cannot become a new run folder: it holds files (and
    `overwrite` is off, or it is not a run folder: a recipe.yaml beside a last.pt, metrics.json or history.csv),
    or the nearest existing folder above it is a file or not writable. Cheap: `fit` calls it before loading any
    data."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} exists: resume it with --resume {run_dir}, replace it with "
                              f"--overwrite, or pick another folder (--run-dir, or name=... under output_dir)")
        if not ((run_dir / "recipe.yaml").is_file()
                and any((run_dir / name).is_file() for name in ("last.pt", "metrics.json", "history.csv"))):
            raise ConfigError(f"--overwrite: {run_dir} does not look like a run folder (no recipe.yaml beside a "
                              f"last.pt, metrics.json or history.csv); not removing it")
    above = run_dir.absolute()
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"cannot create run folder {run_dir}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create run folder {run_dir}: {above} is not writable (permission denied)")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to reuse a run folder unless told to overwrite it; overwriting removes the files a run writes
    (`run_files`) and keeps anything else, with a warning that names it."""
    check_run_dir(run_dir, overwrite)
    if run_dir.is_dir():
        for path in run_files(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        others = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
        if others:
            log.warning("--overwrite: kept %s in %s (not written by ib)", ", ".join(others[:5])
                        + (f" and {len(others) - 5} more" if len(others) > 5 else ""), run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if created and run_dir.is_dir():  # leave no empty folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None


def _probe_set(run: Run) -> Split:
    """The fixed held-out probe set of the information plane: the first `monitor.probe_size` validation samples
    (test samples when there is no validation split), on the run's device. Under torchrun, this process's equal
    share of it (the probe set cut to a multiple of the number of processes)."""
    source = run.data.val if len(run.data.val.y) >= 2 else run.data.test
    world = run.proc.world_size
    n = min(run.recipe.monitor.probe_size, len(source.y)) // world * world
    part = distributed.shard(n, run.proc)
    x = source.x[part].to(run.device)
    return Split(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float(), source.y[part].to(run.device))


def _test_row(run: Run, shared: bool) -> Dict[str, float]:
    """The test split's figures under their history tags (`shared`: each process evaluates its share)."""
    samples = run.recipe.model.eval_samples
    test = evaluate(run.model, run.test_loader, samples=samples, seed=run.recipe.seed, reduce=shared)
    row = {"acc/test": test["acc"], "loss/test_nll": test["nll"]}
    if samples:
        row["acc/test_sampled"] = test["acc_sampled"]
    return row


def _metrics(run: Run, row: Dict[str, float], plane: Dict[str, float], status: str,
             train_seconds: float) -> Dict[str, Any]:
    samples = run.recipe.model.eval_samples
    units = run.recipe.monitor.units
    return {
        "status": status,
        "epochs": run.epoch,
        "epochs_planned": run.recipe.epochs,
        "steps": run.step,
        "test_accuracy": row.get("acc/test_sampled" if samples else "acc/test", math.nan),
        "test_accuracy_mean_code": row.get("acc/test", math.nan),
        "test_accuracy_sampled": row.get("acc/test_sampled", math.nan) if samples else None,
        "eval_samples": samples,
        "val_accuracy": row.get("acc/val_sampled" if samples else "acc/val", math.nan),
        "test_nll": row.get("loss/test_nll", math.nan),
        "I_XZ_nats": plane.get("I_XZ", math.nan),
        "units": units,
        "I_XZ": row.get("mi/I_XZ", math.nan),
        "I_XZ_upper": row.get("mi/I_XZ_upper", math.nan),
        "I_ZY": row.get("mi/I_ZY", math.nan),
        "H_Y": row.get("mi/H_Y", math.nan),
        "beta_final": row.get("beta", math.nan),
        "best_epoch": run.best["epoch"],
        "best_val_accuracy": run.best["val_accuracy"],
        "nonfinite_steps": run.nonfinite_steps,
        "train_seconds": train_seconds,
        "epoch_seconds": list(run.epoch_seconds),
        "device": str(run.device),
        "processes": run.proc.world_size,
        "ib_version": __version__,
    }


def fit(
    recipe: Recipe,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    stop_after: Optional[int] = None,
    handle_signals: bool = False,
) -> Dict[str, Any]:
    """Train `recipe` into `run_dir`, or continue the run there (`resume=True`, from its `last.pt`).

    Every epoch writes `history.csv`, TensorBoard scalars, `last.pt` (and `best.pt` when validation accuracy
    improves) and `metrics.json`. A checkpoint is written atomically after the epoch's logs, so a crash at any
    point resumes from a consistent state.

    Args:
        recipe: a checked recipe (for `resume`, the one saved in the run folder, maybe with more epochs).
        run_dir: the run folder.
        resume: continue from `run_dir/last.pt`.
        overwrite: replace an existing run folder.
        stop_after: stop (checkpointed, resumable) once this many epochs are complete.
        handle_signals: on SIGINT/SIGTERM finish the step, save `last.pt` and return (for the command line).

    Under torchrun (`torchrun --nproc_per_node=N -m ib train ...`) every process calls `fit`; it joins the process
    group (gloo on CPU, nccl on CUDA), trains data-parallel, and only rank 0 writes to `run_dir`. Resuming reads
    `last.pt` in every process, with any number of processes.

    Returns:
        The contents of `metrics.json` (the same in every process).
    """
    joined = not torch.distributed.is_initialized()
    proc, device = distributed.setup(recipe.device)
    try:
        metrics = _fit(recipe, Path(run_dir), proc, device, resume=resume, overwrite=overwrite,
                       stop_after=stop_after, handle_signals=handle_signals)
    except BaseException:
        if joined and proc.distributed:
            distributed.teardown(wait=False)
        raise
    if joined and proc.distributed:
        distributed.teardown()
    if proc.is_main and metrics["status"] == "completed" and recipe.eval.enabled:
        # The recipe's `eval:` section, as `ib eval RUN_DIR` (in one process, after the others have left).
        from ib.evaluate import evaluate_run  # imported here: ib.evaluate builds models with this module

        evaluate_run(run_dir)
    return metrics


def _fit(recipe: Recipe, run_dir: Path, proc: distributed.Process, device: Optional[torch.device], *, resume: bool,
         overwrite: bool, stop_after: Optional[int], handle_signals: bool) -> Dict[str, Any]:
    main = proc.is_main  # the only process that writes
    state = load_checkpoint(run_dir / "last.pt") if resume else None
    if state is None and main:
        check_run_dir(run_dir, overwrite)  # before the data are loaded
    run = build_run(recipe, proc, device)
    if state is not None:
        try:
            run.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{run_dir / 'last.pt'} does not match the recipe: {' '.join(str(e).split())[:300]}")
    elif main:
        prepare_run_dir(run_dir, overwrite)

    # From here on the run folder exists: any error is recorded in its metrics.json (status "failed").
    loggers: List[EpochLogger] = []
    stop = StopFlag()
    previous: Dict[int, Any] = {}
    r = recipe
    last_row: Dict[str, float] = {}
    last_plane: Dict[str, float] = {}
    train_seconds = sum(run.epoch_seconds)
    warned: set = set()  # warnings already logged this run
    status = "running"
    if run.epoch and main:
        log.info("resuming %s at epoch %d/%d (step %d)", run_dir, run.epoch + 1, r.epochs, run.step)
    if proc.distributed and main:
        log.info("data parallel: %d processes (%s), global batch %d = %d per process", proc.world_size,
                 torch.distributed.get_backend(), r.data.batch_size, r.data.batch_size // proc.world_size)
    try:
        if main:
            recipe_text = dump_recipe(recipe)
            atomic_write(run_dir / "recipe.yaml", lambda f: f.write(recipe_text.encode()))
            loggers += [
                CSVHistory(run_dir / "history.csv", run.epoch),
                TensorBoardLogger(run_dir, run.epoch, units=recipe.monitor.units,
                                  plane_figure=recipe.monitor.plane_figure,
                                  estimator=recipe_estimator(recipe)),
            ]
        probe = _probe_set(run)
        previous = stop.install() if handle_signals else {}
        if stop_after is not None and stop_after <= run.epoch < r.epochs:  # resumed with N epochs already done
            status = "stopped"
        while status != "stopped" and run.epoch < r.epochs:
            epoch = run.epoch + 1
            t0 = time.perf_counter()
            set_lr(run.optimizer, run.base_lrs, run.lr_schedule.factor(run.epoch))
            if run.stats is None:
                run.stats = StepStats.zeros(run.device, run.nonfinite_in_a_row)
            run.step = train_one_epoch(
                run.model, run.estimator, run.train_loader, run.optimizer, run.critic_optimizer, run.beta_schedule,
                run.stats, step=run.step, critic_steps=r.mi.critic_steps, grad_clip=r.optimizer.grad_clip,
                critic_grad_clip=r.mi.optimizer.grad_clip, fused=r.mi.fused,
                max_nonfinite=r.max_nonfinite_steps, log_every=r.log_every, stop=stop,
                desc=f"epoch {epoch}/{r.epochs}", replicas=run.replicas, show_progress=main, precision=r.precision,
            )
            run.stats.reduce()  # under torchrun: every process's sums, the same everywhere
            if stop and run.train_loader.batches_left() < len(run.train_loader):
                # stopped mid-epoch: save the loader's position so that resuming continues exactly here
                if main:
                    save_checkpoint(run_dir / "last.pt", run.state_dict())
                status = "interrupted"
                break
            row = {"beta": run.beta_schedule.value(max(run.step - 1, 0)),
                   "lr": run.optimizer.param_groups[0]["lr"], **run.stats.summary(run.estimator is not None)}
            if "mi/I_XZ_train" in row:  # in monitor.units, like every information quantity
                row["mi/I_XZ_train"] = to_units(row["mi/I_XZ_train"], r.monitor.units)
            run.nonfinite_steps += run.stats.nonfinite
            run.nonfinite_in_a_row = run.stats.nonfinite_in_a_row
            t1 = time.perf_counter()
            shared = proc.distributed  # each process evaluates its share; the sums are added
            distributed.broadcast_buffers_(run.model)  # rank 0's batch-norm statistics, the ones saved
            val = evaluate(run.model, run.val_loader, samples=r.model.eval_samples, seed=r.seed, reduce=shared)
            row.update({"acc/val": val["acc"], "loss/val_nll": val["nll"]})
            if r.model.eval_samples:
                row["acc/val_sampled"] = val["acc_sampled"]
            # The test split: in the run's last epoch (and every monitor.test_every epochs), so that the default
            # per-epoch cost stays small and nothing is chosen on it.
            last = epoch == r.epochs or (stop_after is not None and epoch >= stop_after)
            if last or (r.monitor.test_every and epoch % r.monitor.test_every == 0):
                row.update(_test_row(run, shared))
            t2 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                plane = information_plane(run.model, run.estimator, probe.x, probe.y,
                                          batch_size=r.data.eval_batch_size, permutations=r.mi.eval_permutations,
                                          seed=r.seed, reduce=shared)
            _log_once(caught, warned, epoch)
            row.update({f"mi/{k}": to_units(v, r.monitor.units) for k, v in plane.items()})
            row["time/plane_s"] = time.perf_counter() - t2
            eval_time = time.perf_counter() - t1
            epoch_time = time.perf_counter() - t0
            row.update({"time/epoch_s": epoch_time, "time/eval_s": eval_time, "faults/nonfinite_steps":
                        float(run.nonfinite_steps)})
            run.epoch, run.stats = epoch, None
            run.epoch_seconds.append(epoch_time)
            train_seconds += epoch_time
            for logger in loggers:
                logger.log_epoch(epoch, row)
            val_acc = row.get("acc/val_sampled" if r.model.eval_samples else "acc/val", math.nan)
            improved = math.isnan(val_acc) or val_acc > run.best["val_accuracy"]
            if improved:
                run.best = {"epoch": epoch, "val_accuracy": val_acc}
            if main:
                state_now = run.state_dict()
                if improved:
                    save_checkpoint(run_dir / "best.pt", state_now)
                save_checkpoint(run_dir / "last.pt", state_now)
                write_json(run_dir / "metrics.json", _metrics(run, row, plane, "running", train_seconds))
            last_row, last_plane = row, plane
            test_acc = row.get("acc/test_sampled", row.get("acc/test"))
            (log.info if main else log.debug)(
                "epoch %d/%d  loss %.4f  ce %.4f  I(X;Z) %.3f  I(Z;Y) %.3f %s  val %.4f%s  beta %.3g  %.1fs",
                epoch, r.epochs, row["loss/total"], row["loss/ce"], row["mi/I_XZ"], row["mi/I_ZY"], r.monitor.units,
                val_acc, "" if test_acc is None else f"  test {test_acc:.4f}", row["beta"], epoch_time,
            )
            if _stopping(stop, run.device) and epoch < r.epochs:  # signalled in the last step or the evaluation
                status = "interrupted"
                break
            if stop_after is not None and epoch >= stop_after and epoch < r.epochs:
                status = "stopped"
                break
        else:
            if run.epoch >= r.epochs:  # (not when --stop-after stopped it before its first epoch)
                status = "completed"
    except BaseException as e:
        if main:
            _record_failure(run_dir, run, e, train_seconds)
        raise
    finally:
        for logger in loggers:
            try:
                logger.close()
            except Exception as e:  # e.g. a full disk while flushing TensorBoard: the error in flight matters more
                log.warning("closing %s: %s", type(logger).__name__, " ".join(str(e).split()))
        for s, handler in previous.items():
            signal.signal(s, handler)
    if not last_row and (run_dir / "metrics.json").exists():
        metrics = json.loads((run_dir / "metrics.json").read_text())
        metrics["status"] = status
        metrics.pop("error", None)  # a failure recorded before this resume is over
    else:
        metrics = _metrics(run, last_row, last_plane, status, train_seconds)
    reported = metrics.get("test_accuracy")
    if status == "completed" and (not isinstance(reported, float) or math.isnan(reported)):
        # The last epoch's test pass never ran (stopped after that epoch's checkpoint, then resumed with nothing
        # left to train): evaluate the test split now, so that a completed run always reports it.
        tested = _metrics(run, _test_row(run, proc.distributed), {}, status, train_seconds)
        metrics.update({k: tested[k] for k in ("test_accuracy", "test_accuracy_mean_code", "test_accuracy_sampled",
                                               "test_nll")})
    if main:
        write_json(run_dir / "metrics.json", metrics)
    return metrics


def _record_failure(run_dir: Path, run: Run, error: BaseException, train_seconds: float) -> None:
    """Mark the run folder's metrics.json `failed` (or `interrupted`) with the error, keeping the figures of the
    last completed epoch, which match `last.pt`. Best effort: the error in flight is what the caller reports."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        metrics = None
    if metrics is None:  # nothing recorded yet: count only what last.pt holds
        metrics = _metrics(run, {}, {}, "failed", train_seconds)
        metrics["epochs"] = run.epoch if (run_dir / "last.pt").exists() else 0
    if isinstance(error, KeyboardInterrupt):
        metrics["status"] = "interrupted"
    else:
        message = str(error) if isinstance(error, IBError) else f"{type(error).__name__}: {error}"
        metrics.update(status="failed", error=" ".join(message.split()))
    try:
        write_json(path, metrics)
    except OSError as e:
        log.warning("could not record the failure in %s: %s", path, " ".join(str(e).split()))


def resume_recipe(run_dir: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe saved in a run's `last.pt`; only `epochs` may be overridden (to train longer)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder {run_dir} not found")
    if not (run_dir / "last.pt").exists():
        raise CheckpointError(f"--resume: {run_dir} has no last.pt (the run stopped before its first checkpoint); "
                              f"start it again with --overwrite")
    state = load_checkpoint(run_dir / "last.pt")
    for text in overrides:
        if not text.startswith("epochs="):
            raise ConfigError(f"--resume continues a run as it was; only epochs=N may be changed, got '{text}'")
    if not isinstance(state.get("recipe"), dict):
        raise CheckpointError(f"{run_dir / 'last.pt'} holds no recipe: not a checkpoint written by ib train")
    recipe = recipe_from_dict(state["recipe"], overrides, source=str(run_dir / "last.pt"))
    done = int(state.get("epoch", 0))
    if recipe.epochs < done:
        raise ConfigError(f"--resume: epochs={recipe.epochs} is fewer than the {done} epochs {run_dir} has trained")
    return recipe
