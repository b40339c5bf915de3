"""The Information Bottleneck objective: loss = CE(y, decode(z)) + beta * I(X;Z), z ~ p(z|x)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ib.estimators.base import MIEstimator
from ib.models.bottlenecks import Code
from ib.models.classifier import IBClassifier


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off gradients for `module`'s parameters (they still pass gradients through to their inputs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class _ReverseGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (gradient reversal, Ganin & Lempitsky 2015).
    The scale is a number, or a 0-d tensor (a population's per-member beta under `vmap`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z: Tensor, scale: float | Tensor) -> Tensor:
        return z.view_as(z)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        scale = inputs[1]
        ctx.tensor_scale = torch.is_tensor(scale)
        if ctx.tensor_scale:
            ctx.save_for_backward(scale)
        else:
            ctx.scale = scale

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        scale = ctx.saved_tensors[0] if ctx.tensor_scale else ctx.scale
        return grad * -scale, None


def reverse_grad(z: Tensor, scale: float | Tensor) -> Tensor:
    """z unchanged; the gradient reaching z through it is -scale times the incoming one."""
    return _ReverseGrad.apply(z, scale)


def fused_minimax_objective(
    model: IBClassifier,
    estimator: MIEstimator,
    x: Tensor,
    y: Tensor,
    beta: float,
    *,
    forward: Optional[Callable[[Tensor], Tuple[Code, Tensor]]] = None,
    critic_loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
    label_smoothing: float = 0.0,
) -> Dict[str, Tensor]:
    """Both players' losses from ONE forward of the critic, for one backward pass.

    With S the estimator's (bias-corrected) bound and critic loss L_T = -S, the objective is

        J = CE + L_T(x, R(z)),      R = gradient reversal with scale beta,

    so dJ/d(critic) = dL_T/d(critic) = -dS/d(critic) (the critic ascends S), and the gradient reaching z is
    -beta * dL_T/dz = beta * dS/dz (the encoder descends CE + beta * S). Both gradients are taken at the critic as it
    is before the step: simultaneous gradient descent-ascent. They equal the two-pass step's (critic on detached z,
    then the encoder on CE + beta * penalty) only at a fixed critic: the two-pass step updates the critic first and
    gives the encoder the gradient of the updated one. The moving average is updated once, by the critic's loss, as
    in the two-pass step.

    `forward` (x -> (code, logits)) and `critic_loss_fn` ((x, z) -> critic loss) replace `encode_decode(model, .)`
    and `estimator.loss`: the trainer passes their DistributedDataParallel wrappers under torchrun.

    Returns:
        {"objective" (to backpropagate), "loss" (CE + beta * S, the encoder's loss), "ce", "mi" (S), "logits", "beta"}
    """
    code, logits = forward(x) if forward is not None else encode_decode(model, x)  # z [B, K], logits [B, classes]
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    critic_loss = (critic_loss_fn or estimator.loss)(x, reverse_grad(code.z, beta))
    bound = -critic_loss.detach()
    return {"objective": ce + critic_loss, "loss": ce.detach() + beta * bound, "ce": ce, "mi": bound,
            "logits": logits, "beta": torch.tensor(beta)}


def encode_decode(model: IBClassifier, x: Tensor) -> Tuple[Code, Tensor]:
    """The training forward: a sampled code of x and its logits [B, classes]."""
    code = model.encode(x)
    return code, model.decode(code.z)


class TrainForward(nn.Module):
    """`encode_decode` as a module's forward, for DistributedDataParallel (which syncs only what runs through
    forward) to wrap."""

    def __init__(self, model: IBClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tuple[Code, Tensor]:
        return encode_decode(self.model, x)


def ib_objective(
    model: IBClassifier,
    estimator: MIEstimator | None,
    x: Tensor,
    y: Tensor,
    beta: float,
    code: Code | None = None,
    logits: Tensor | None = None,
    label_smoothing: float = 0.0,
) -> Dict[str, Tensor]:
    """The encoder's loss on one batch, with its terms named so that logging never recomputes them.

    The I(X;Z) term is the estimator's penalty (MINE: the bias-corrected DV bound). It is computed with the
    critic frozen: the encoder minimises it, while the critic is trained only by its own optimiser to maximise it.
    With beta == 0 the penalty is skipped (it would add nothing to the gradient).

    Args:
        model: the classifier. estimator: the I(X;Z) bound, or None for plain cross-entropy.
        x: inputs in [0, 1] [B, C, H, W]. y: labels [B].
        beta: weight of I(X;Z). code: a code already sampled for x (else sampled here), and maybe its logits.
        label_smoothing: of the cross-entropy (0 for none); "ce" is then the smoothed loss.

    Returns:
        {"loss", "ce", "mi" (the penalty, NaN when skipped), "logits" [B, classes], "beta"}.
    """
    code = model.encode(x) if code is None else code
    logits = model.decode(code.z) if logits is None else logits  # [B, classes]
    ce = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    if estimator is not None and beta > 0:
        with frozen(estimator):
            mi = estimator.penalty(x, code.z, code)
        loss = ce + beta * mi
    else:
        mi = torch.full((), float("nan"), device=ce.device)
        loss = ce
    return {"loss": loss, "ce": ce, "mi": mi, "logits": logits, "beta": torch.tensor(beta)}
