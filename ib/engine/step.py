"""One minimax step on a batch, and the sums an epoch keeps of its steps.

One encoder step on a batch (x, y):
  1. sample z ~ p(z|x) once;
  2. the critic ascends the MI bound on (x, z.detach()) with its own optimiser, `critic_steps` times;
  3. the encoder and decoder descend CE + beta * penalty(x, z), the critic frozen.
Fused (`mi.fused`, one critic step), one forward of the critic serves both players through gradient reversal.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ib import distributed
from ib.adversarial import AdversarialTraining
from ib.errors import IBError
from ib.estimators import MIEstimator
from ib.models.bottlenecks import Code
from ib.models.classifier import IBClassifier
from ib.objectives import fused_minimax_objective, ib_objective
from ib.recipe import Precision


class TrainingError(IBError):
    """Training cannot go on (e.g. too many consecutive non-finite steps); `last.pt` holds the last good state."""


@dataclass
class Replicas:
    """The DistributedDataParallel wrappers of one process of a torchrun job. Their parameters are the run's
    model and estimator (which the checkpoints save); training runs its forward passes through them so that DDP
    averages the gradients."""

    forward: DDP  # TrainForward: x -> (code, logits)
    critic_loss: Optional[DDP]  # the estimator: (x, z) -> its training loss; None without a critic


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
    extra: Dict[str, Tensor] = field(default_factory=dict)  # sums of the adversarial terms ("adv/ce_adv", ...)

    @classmethod
    def zeros(cls, device: torch.device, nonfinite_in_a_row: int = 0) -> "StepStats":
        z = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        return cls(z(), z(), z(), z(), nonfinite_in_a_row=nonfinite_in_a_row)

    def add(self, out: Dict[str, Tensor], batch: int) -> None:
        """Add a finite step's terms (`train_step`'s output on a batch of `batch` samples)."""
        self.nonfinite_in_a_row = 0
        self.loss += out["loss"]
        self.ce += out["ce"]
        self.mi_bound += out["mi_bound"].nan_to_num(0.0)
        self.correct += out["correct"]
        self.seen += batch
        self.steps += 1
        for key, value in out.items():
            if key.startswith("adv/"):
                self.extra[key] = self.extra.get(key, torch.zeros_like(self.loss)) + value.detach()

    def state_dict(self) -> Dict[str, Any]:
        return {"loss": self.loss, "ce": self.ce, "mi_bound": self.mi_bound, "correct": self.correct,
                "seen": self.seen, "steps": self.steps, "nonfinite": self.nonfinite,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "extra": dict(self.extra)}

    def load_state_dict(self, state: Dict[str, Any], rank: int = 0) -> None:
        """Sums saved by `reduce`d stats: every process takes the step means, rank 0 alone the counts."""
        for k, v in state.items():
            if k == "extra":
                v = {key: t.to(self.loss.device) for key, t in v.items()}
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
        row.update({key: float(total) / n for key, total in self.extra.items()})
        return row


def _all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every element of every tensor is finite, with one device sync for the lot.

    The plain sum of a tensor is NaN or inf when any element is (inf - inf is NaN), and a sum is one vectorised
    pass, cheaper than a max-norm. A sum can also overflow when finite elements are beyond ~1e32: such a step counts
    as non-finite, which for a gradient that large is the right call.
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
    label_smoothing: float = 0.0,
    adaptive_clip: bool = False,
    adversarial: Optional[AdversarialTraining] = None,
    adversarial_optimizer: Optional[torch.optim.Optimizer] = None,
) -> Dict[str, Tensor]:
    """One minimax step on a batch. Returns detached terms; `finite` is False when the step was skipped.

    Two-pass (`fused=False`, this function's default): the critic steps on detached z (`critic_steps` times), then
    the encoder steps on CE + beta * penalty against the updated critic. Fused (`fused=True`, the recipes' default
    `mi.fused`, one critic step): one forward of the critic serves both players through gradient reversal
    (`fused_minimax_objective`) and both optimisers step on the gradients of one backward pass, about a third less
    work per step with the paper's critic. That is simultaneous gradient descent-ascent: the encoder's gradient is
    taken at the critic before its update, so the two forms agree only while the critic stands still.

    An update whose loss or gradient is not finite is skipped (gradients dropped, the estimator's buffers such as
    MINE's moving average put back), and the step reports `finite` False. Fused, that is both players' update;
    two-pass, each player's update is checked on its own: the critic's comes first and stands when only the
    encoder's is not finite. Finiteness is checked with one device sync per update (and, under torchrun, agreed
    by all processes). `grad_clip` and `critic_grad_clip` cap the norms of the encoder's (with the decoder's) and
    of the critic's gradients. `replicas`: the DistributedDataParallel wrappers to run the forward passes through,
    under torchrun. `precision`: "fp32" or "bf16" (the forward passes under `autocast`). `label_smoothing`: of the
    cross-entropy, 0 for none. `adaptive_clip`: MINE's adaptive gradient clipping (`adaptive_clipped_backward`),
    in the two-pass step. `adversarial` (with the discriminator's `adversarial_optimizer` for A3T): adversarial
    training (`ib.adversarial`), in the two-pass step; its terms come back as "adv/ce_adv" (and "adv/disc_loss",
    "adv/disc_acc").
    """
    if (fused and not adaptive_clip and adversarial is None and estimator is not None
            and critic_optimizer is not None and critic_steps == 1
            and estimator.loss_is_minus_penalty):  # jsd/smile: the critic's loss is not -penalty
        return _fused_step(model, estimator, optimizer, critic_optimizer, x, y, beta, grad_clip, critic_grad_clip,
                           replicas, precision, label_smoothing)
    x_adv = adversarial.perturb(model, x, y) if adversarial is not None else None
    capture = adversarial.capture(model) if adversarial is not None else contextlib.nullcontext({})
    with autocast(x.device, precision), capture as features:  # z [B, K], sampled once for both players
        code, logits = replicas.forward(x) if replicas is not None else (model.encode(x), None)
    mi_bound = torch.full((), math.nan)
    checks: List[Tensor] = []
    if estimator is not None and critic_optimizer is not None:
        mi_bound = critic_step(estimator, critic_optimizer, x, code.z.detach(), critic_steps,
                               replicas.critic_loss if replicas is not None else None, precision, critic_grad_clip)
        checks.append(mi_bound)  # NaN when the critic's update was not finite
    adv: Dict[str, Tensor] = {}
    with autocast(x.device, precision):
        out = ib_objective(model, estimator, x, y, beta, code=code, logits=logits, label_smoothing=label_smoothing)
        if adversarial is not None:
            adv = adversarial.objective(model, x_adv, y, out["ce"], features.get("features", code.z),
                                        label_smoothing)
            out["loss"] = out["loss"] + adv.pop("loss_delta")
    if estimator is not None and critic_optimizer is None:  # critic-free (vib_kl): report its own bound
        mi_bound = out["mi"].detach() if beta > 0 else _penalty_value(estimator, x, code)
    players = [opt for opt in (optimizer, adversarial_optimizer) if opt is not None]
    for opt in players:
        opt.zero_grad(set_to_none=True)
    if adaptive_clip and estimator is not None and beta > 0:
        adaptive_clipped_backward(model, out["ce"], beta * out["mi"])
    else:
        out["loss"].backward()
    checks += _clipped_or_grads([p for p in model.parameters() if p.grad is not None], grad_clip)
    if adversarial_optimizer is not None:
        checks += _clipped_or_grads([p for p in adversarial.parameters() if p.grad is not None],
                                    adversarial.config.disc_optimizer.grad_clip)
    finite = distributed.all_true(_all_finite([out["loss"], *checks]), x.device)
    for opt in players:
        if finite:
            opt.step()
        else:
            opt.zero_grad(set_to_none=True)
    correct = (out["logits"].detach().argmax(1) == y).sum()
    return {"loss": out["loss"].detach(), "ce": out["ce"].detach(), "mi_bound": mi_bound.to(x.device),
            "correct": correct, "finite": torch.tensor(finite), **{f"adv/{k}": v.detach() for k, v in adv.items()}}


def adaptive_clipped_backward(model: IBClassifier, main: Tensor, penalty: Tensor) -> None:
    """MINE's adaptive gradient clipping (Belghazi et al. 2018, sec. 3.1) into the parameters' `.grad`:

        g = g_u + min(||g_u||, ||g_m||) * g_m / ||g_m||,

    with g_u the gradient of the main loss (cross-entropy) and g_m that of the weighted penalty (beta * I), both
    norms taken over the encoder's parameters (`model.bottleneck`, the only ones the penalty reaches): the penalty
    may steer the encoder but never outweigh the task. A parameter neither term reaches keeps `.grad` None."""
    params = [p for p in model.parameters() if p.requires_grad]
    g_u = torch.autograd.grad(main, params, retain_graph=True, allow_unused=True)
    g_m = torch.autograd.grad(penalty, params, allow_unused=True)
    encoder = {id(p) for p in model.bottleneck.parameters()}
    norm_u = nn.utils.get_total_norm([g for p, g in zip(params, g_u) if g is not None and id(p) in encoder])
    norm_m = nn.utils.get_total_norm([g for p, g in zip(params, g_m) if g is not None and id(p) in encoder])
    scale = torch.where(norm_m > norm_u, norm_u / norm_m, torch.ones_like(norm_m))  # min(|g_u|, |g_m|) / |g_m|
    for p, gu, gm in zip(params, g_u, g_m):
        if gm is None:
            p.grad = gu
        else:
            p.grad = scale * gm if gu is None else gu + scale * gm


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
                precision: Precision, label_smoothing: float) -> Dict[str, Tensor]:
    saved = [b.detach().clone() for b in estimator.buffers()]  # running statistics before this update
    with autocast(x.device, precision):
        out = fused_minimax_objective(model, estimator, x, y, beta,
                                      forward=replicas.forward if replicas is not None else None,
                                      critic_loss_fn=replicas.critic_loss if replicas is not None else None,
                                      label_smoothing=label_smoothing)
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

