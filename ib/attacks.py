"""Attacks on inputs in [0, 1]: FGSM, PGD under L-inf and L2, EOT-PGD, and Gaussian-noise corruption.

An attack sees the model only through a per-sample loss to ascend, `loss_fn(x, y) -> [B]`, so the same code attacks
the deterministic mean-code model, a stochastic model (one sampled code per gradient) and its expectation over
codes. EOT-PGD (Expectation over Transformation, Athalye et al. 2018) is `pgd` on `sampled_loss(model, samples)`:
the loss averaged over several draws of Z, hence its gradient too. Normalisation lives inside the model, so the
attacks work in the [0, 1] pixel scale where the radii are given; every iterate is projected onto the eps-ball
around the clean input and clipped to [0, 1].

Gradients are turned back on for the input only: parameters never receive a `.grad`, and an attack may be called
under `torch.inference_mode()` or `torch.no_grad()`.
"""
from __future__ import annotations

import math
from typing import Callable, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ib import checks

LossFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...] in [0, 1], y [B]) -> per-sample loss [B] to ascend
CorrectFn = Callable[[Tensor, Tensor], Tensor]  # (x, y) -> bool [B]: the attacked prediction is still right
Norm = Literal["linf", "l2"]
LossKind = Literal["ce", "margin"]


# ---------------------------------------------------------------------------------------------------------------------
# Losses of the model variants


def classification_loss(logits: Tensor, y: Tensor, kind: LossKind = "ce") -> Tensor:
    """Per-sample loss to ascend, [...] for logits [..., classes] and labels [...].

    "ce": cross-entropy (the loss of PGD in Madry et al. 2018). "margin": max_{j != y} z_j - z_y (Carlini and Wagner
    2017), positive exactly when the sample is misclassified; it follows the strongest wrong class, where the
    cross-entropy gradient mixes all of them (and shrinks with the softmax on confident predictions).
    """
    if kind == "ce":
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    if kind == "margin":
        true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf")).amax(-1)
        return other - true
    raise ValueError(f"loss kind must be 'ce' or 'margin', got {kind!r}")


def mean_code_loss(model: nn.Module, kind: LossKind = "ce") -> LossFn:
    """Loss of the deterministic model that decodes the noise-free (mean) code, `model(x, sample=False)`."""

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return classification_loss(model(x, sample=False), y, kind)

    return loss


def sampled_loss(model: nn.Module, samples: int = 1, kind: LossKind = "ce") -> LossFn:
    """Loss of the stochastic model averaged over `samples` fresh draws of Z per call.

    With `samples=1` a gradient sees one random code (the plain attack on a stochastic model); with more it is the
    EOT gradient, E_z[grad loss(decode(z), y)] estimated from `samples` draws. An `IBClassifier` draws them in one
    batched pass (`bottleneck.sample_z`, one encoder pass for the Gaussian encoder); other models are called once
    per draw.
    """
    checks.integer("samples", samples, minimum=1, error=ValueError)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        logits = sampled_logits(model, x, samples)  # [S, B, classes]
        return classification_loss(logits, y.expand(logits.shape[0], -1), kind).mean(0)  # [B]

    return loss


def predictor_loss(model: nn.Module, samples: int, kind: LossKind = "ce", repeats: int = 1) -> LossFn:
    """Loss of the sampled model's own prediction, the mean softmax over `samples` fresh draws of Z:
    -log mean_s p(y | z_s) for "ce", the margin of log mean_s p(. | z_s) for "margin". This is the loss of the
    predictor that the sampled variant's accuracy judges, where `sampled_loss` averages the loss of single draws.
    With `repeats` > 1, the mean over that many independent predictions (the EOT gradient of the predictor)."""
    checks.integer("samples", samples, minimum=1, error=ValueError)
    checks.integer("repeats", repeats, minimum=1, error=ValueError)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        logits = sampled_logits(model, x, samples * repeats)  # [R S, B, classes]
        log_p = logits.log_softmax(-1).unflatten(0, (repeats, samples))  # [R, S, B, classes]
        log_mean = torch.logsumexp(log_p, dim=1) - math.log(samples)  # [R, B, classes], log of the mean softmax
        # cross_entropy of log-probabilities is -log p_y, since softmax(log p) = p
        return classification_loss(log_mean, y.expand(repeats, -1), kind).mean(0)  # [B]

    return loss


def sampled_logits(model: nn.Module, x: Tensor, samples: int) -> Tensor:
    """Logits [S, B, classes] of `samples` independent draws of Z for each input (differentiable in x)."""
    bottleneck = getattr(model, "bottleneck", None)
    if samples > 1 and bottleneck is not None and hasattr(model, "normalise") and hasattr(model, "decode"):
        return model.decode(bottleneck.sample_z(model.normalise(x), samples))
    return torch.stack([model(x, sample=True) for _ in range(samples)])


# ---------------------------------------------------------------------------------------------------------------------
# Geometry


def _flat_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped to broadcast against t: [B, 1, 1, 1]."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: Norm) -> Tensor:
    """Project x_adv onto the `norm`-ball of radius eps around x, then clip to [0, 1].

    Clipping after the L2 projection keeps the point in the ball: with x in [0, 1] it only shrinks |delta_i|.
    """
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: Norm) -> Tensor:
    """A uniform point of the eps-ball around x (clipped to [0, 1])."""
    if norm == "linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # Uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d).
        d = x[0].numel()
        direction = torch.randn_like(x)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        radius = eps * torch.rand(x.shape[0], device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def loss_and_gradient(loss_fn: LossFn, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
    """(loss_fn(x, y) [B], d sum(loss) / dx [B, ...]), with gradients on for x alone (parameters get no `.grad`)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # a normal tensor even when x came from inference mode
        loss = loss_fn(x, y)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), grad


def input_gradient(loss_fn: LossFn, x: Tensor, y: Tensor) -> Tensor:
    """d sum(loss_fn(x, y)) / dx with gradients on for x alone (parameters get no `.grad`)."""
    return loss_and_gradient(loss_fn, x, y)[1]


# ---------------------------------------------------------------------------------------------------------------------
# Attacks


def fgsm(loss_fn: LossFn, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one L-inf step of size eps from x, clipped to [0, 1].

    Args:
        loss_fn: Per-sample loss to ascend.
        x: Clean inputs in [0, 1], [B, ...].
        y: Labels [B].
        eps: L-inf radius in the [0, 1] pixel scale.

    Returns:
        Adversarial inputs, detached, [B, ...].
    """
    eps = checks.non_negative("eps", eps, error=ValueError)
    x = x.detach().clone()
    grad = input_gradient(loss_fn, x, y)
    return (x + eps * grad.sign()).clamp(0.0, 1.0).detach()


def pgd(
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    eps: float,
    *,
    norm: Norm = "linf",
    steps: int = 20,
    step_size: Optional[float] = None,
    restarts: int = 1,
    random_start: bool = True,
    correct_fn: Optional[CorrectFn] = None,
) -> Tensor:
    """Projected gradient descent on the loss (Madry et al. 2018), under L-inf or L2.

    Each restart:
      1. starts at a uniform point of the eps-ball (or at x with `random_start=False`);
      2. takes `steps` steps of `step_size` along sign(grad) (L-inf) or grad / ||grad||_2 (L2);
      3. projects onto the eps-ball around x and clips to [0, 1] after every step;
    Every iterate of every restart is a candidate, and each sample keeps its worst case (as APGD does): an input
    that `correct_fn` calls wrong beats one it calls right, and between two alike the higher loss wins. So the last
    iterate overshooting costs nothing, and more steps or restarts never weaken the attack. The random starts draw
    from the global RNG (seed it, or fork it, for repeatable results).

    Args:
        loss_fn: Per-sample loss to ascend.
        x: Clean inputs in [0, 1], [B, ...].
        y: Labels [B].
        eps: Radius of the ball, in the [0, 1] pixel scale.
        norm: "linf" or "l2".
        steps: Gradient steps per restart.
        step_size: Step length; default 2.5 * eps / steps, which can cross the ball in the last 40 % of the steps.
        restarts: Independent runs; the worst case per sample is kept.
        random_start: Start from a random point of the ball rather than from x.
        correct_fn: The attacked prediction's correctness, used to pick the worst iterate (default: the loss
            alone); it costs one prediction per step.

    Returns:
        Adversarial inputs, detached, [B, ...].
    """
    eps = checks.non_negative("eps", eps, error=ValueError)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    checks.integer("steps", steps, minimum=1, error=ValueError)
    checks.integer("restarts", restarts, minimum=1, error=ValueError)
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach().clone()
    worst = _Worst(correct_fn)
    for _ in range(restarts):
        x_adv = _random_start(x, eps, norm) if random_start else x.clone()
        for _ in range(steps):
            loss, grad = loss_and_gradient(loss_fn, x_adv, y)  # of x_adv, before the step
            worst.offer(x_adv, y, loss)
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _flat_norm(grad).clamp_min(1e-12)
            x_adv = project(x_adv + alpha * step, x, eps, norm)
        with torch.no_grad():
            worst.offer(x_adv, y, loss_fn(x_adv, y))
    return worst.x.detach()


class _Worst:
    """The worst input seen so far per sample: a wrong prediction beats a right one, then the higher loss wins."""

    def __init__(self, correct_fn: Optional[CorrectFn]) -> None:
        self.correct_fn = correct_fn
        self.x: Optional[Tensor] = None
        self.wrong = self.loss = None

    def offer(self, x: Tensor, y: Tensor, loss: Tensor) -> None:
        """Consider inputs x [B, ...] with their losses [B]."""
        with torch.no_grad():
            wrong = ~self.correct_fn(x, y) if self.correct_fn is not None else torch.zeros_like(loss, dtype=torch.bool)
        if self.x is None:
            self.x, self.wrong, self.loss = x, wrong, loss
            return
        better = (wrong & ~self.wrong) | ((wrong == self.wrong) & (loss > self.loss))  # [B]
        self.x = torch.where(better.view(-1, *([1] * (x.dim() - 1))), x, self.x)
        self.wrong = self.wrong | wrong
        self.loss = torch.where(better, loss, self.loss)


def gaussian_noise(x: Tensor, sigma: float) -> Tensor:
    """x + N(0, sigma^2) per pixel, clipped to [0, 1] (sigma in the [0, 1] pixel scale; global RNG)."""
    sigma = checks.non_negative("sigma", sigma, error=ValueError)
    return (x + sigma * torch.randn_like(x)).clamp(0.0, 1.0)
