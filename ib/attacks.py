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
from typing import Any, Callable, List, Literal, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ib import checks

LossFn = Callable[[Tensor, Tensor], Tensor]  # (x [B, ...] in [0, 1], y [B]) -> per-sample loss [B] to ascend
CorrectFn = Callable[[Tensor, Tensor], Tensor]  # (x, y) -> bool [B]: the attacked prediction is still right
Norm = Literal["linf", "l2"]
LossKind = Literal["ce", "margin"]
Schedule = Literal["fixed", "adaptive"]


# ---------------------------------------------------------------------------------------------------------------------
# Losses of the model variants


def classification_loss(logits: Tensor, y: Tensor, kind: LossKind = "ce", target: Optional[Tensor] = None) -> Tensor:
    """Per-sample loss to ascend, [...] for logits [..., classes] and labels [...].

    "ce": cross-entropy (the loss of PGD in Madry et al. 2018). "margin": max_{j != y} z_j - z_y (Carlini and Wagner
    2017), positive exactly when the sample is misclassified; it follows the strongest wrong class, where the
    cross-entropy gradient mixes all of them (and shrinks with the softmax on confident predictions).
    With `target` (class indices shaped like y), whatever `kind`: the targeted margin z_target - z_y, positive
    exactly when the target outscores the label (the role of APGD-T's targeted DLR loss in AutoAttack).
    """
    if target is not None:
        return (logits.gather(-1, target.unsqueeze(-1)) - logits.gather(-1, y.unsqueeze(-1))).squeeze(-1)
    if kind == "ce":
        return F.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="none").view(y.shape)
    if kind == "margin":
        true = logits.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        other = logits.masked_fill(F.one_hot(y, logits.shape[-1]).bool(), float("-inf")).amax(-1)
        return other - true
    raise ValueError(f"loss kind must be 'ce' or 'margin', got {kind!r}")


def mean_code_loss(model: nn.Module, kind: LossKind = "ce", target: Optional[Tensor] = None) -> LossFn:
    """Loss of the deterministic model that decodes the noise-free (mean) code, `model(x, sample=False)`; with
    `target` [B], the targeted margin toward it (`classification_loss`)."""

    def loss(x: Tensor, y: Tensor) -> Tensor:
        return classification_loss(model(x, sample=False), y, kind, target)

    return loss


def sampled_loss(model: nn.Module, samples: int = 1, kind: LossKind = "ce",
                 target: Optional[Tensor] = None) -> LossFn:
    """Loss of the stochastic model averaged over `samples` fresh draws of Z per call.

    With `samples=1` a gradient sees one random code (the plain attack on a stochastic model); with more it is the
    EOT gradient, E_z[grad loss(decode(z), y)] estimated from `samples` draws. An `IBClassifier` draws them in one
    batched pass (`bottleneck.sample_z`, one encoder pass for the Gaussian encoder); other models are called once
    per draw. With `target` [B], each draw's targeted margin toward it.
    """
    checks.integer("samples", samples, minimum=1, error=ValueError)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        logits = sampled_logits(model, x, samples)  # [S, B, classes]
        t = None if target is None else target.expand(logits.shape[0], -1)
        return classification_loss(logits, y.expand(logits.shape[0], -1), kind, t).mean(0)  # [B]

    return loss


def predictor_loss(model: nn.Module, samples: int, kind: LossKind = "ce", repeats: int = 1,
                   target: Optional[Tensor] = None) -> LossFn:
    """Loss of the sampled model's own prediction, the mean softmax over `samples` fresh draws of Z:
    -log mean_s p(y | z_s) for "ce", the margin of log mean_s p(. | z_s) for "margin". This is the loss of the
    predictor that the sampled variant's accuracy judges, where `sampled_loss` averages the loss of single draws.
    With `repeats` > 1, the mean over that many independent predictions (the EOT gradient of the predictor). With
    `target` [B], the targeted margin log p_target - log p_y of the mean softmax."""
    checks.integer("samples", samples, minimum=1, error=ValueError)
    checks.integer("repeats", repeats, minimum=1, error=ValueError)

    def loss(x: Tensor, y: Tensor) -> Tensor:
        logits = sampled_logits(model, x, samples * repeats)  # [R S, B, classes]
        log_p = logits.log_softmax(-1).unflatten(0, (repeats, samples))  # [R, S, B, classes]
        log_mean = torch.logsumexp(log_p, dim=1) - math.log(samples)  # [R, B, classes], log of the mean softmax
        # cross_entropy of log-probabilities is -log p_y, since softmax(log p) = p
        t = None if target is None else target.expand(repeats, -1)
        return classification_loss(log_mean, y.expand(repeats, -1), kind, t).mean(0)  # [B]

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
    schedule: Schedule = "fixed",
) -> Tensor:
    """Projected gradient ascent on the loss, under L-inf or L2: Madry et al.'s PGD, or with an adaptive step.

    Each restart starts at a uniform point of the eps-ball (or at x with `random_start=False`) and takes `steps`
    steps along sign(grad) (L-inf) or grad / ||grad||_2 (L2), each projected onto the eps-ball around x and clipped
    to [0, 1]. The step length follows `schedule`:
      * "fixed" (Madry et al. 2018): `step_size` throughout;
      * "adaptive" (APGD, Croce & Hein 2020, Algorithm 1): 2 eps at first, with momentum 0.75; at checkpoints
        (at 22 % of the steps, then at ever shorter intervals down to 6 %) a sample's step is halved and its
        iterate sent back to its highest-loss point when fewer than 75 % of its steps since the last checkpoint
        raised the loss, or when its step was not halved last time and its best loss has not risen since.
        `step_size` is not used. On robust models this finds far more adversarial inputs in as many steps
        (benchmarks/results/pgd_gap.md).
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
        step_size: Step length of the fixed schedule; default 2.5 * eps / steps, which can cross the ball in the
            last 40 % of the steps.
        restarts: Independent runs; the worst case per sample is kept.
        random_start: Start from a random point of the ball rather than from x.
        correct_fn: The attacked prediction's correctness, used to pick the worst iterate (default: the loss
            alone); it costs one prediction per step.
        schedule: "fixed" or "adaptive" (above).

    Returns:
        Adversarial inputs, detached, [B, ...].
    """
    eps = checks.non_negative("eps", eps, error=ValueError)
    if norm not in ("linf", "l2"):
        raise ValueError(f"norm must be 'linf' or 'l2', got {norm!r}")
    if schedule not in ("fixed", "adaptive"):
        raise ValueError(f"schedule must be 'fixed' or 'adaptive', got {schedule!r}")
    checks.integer("steps", steps, minimum=1, error=ValueError)
    checks.integer("restarts", restarts, minimum=1, error=ValueError)
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    x = x.detach().clone()
    worst = _Worst(correct_fn)
    for _ in range(restarts):
        start = _random_start(x, eps, norm) if random_start else x.clone()
        if schedule == "fixed":
            _fixed_steps(loss_fn, x, y, start, eps, norm, steps, alpha, worst)
        else:
            _adaptive_steps(loss_fn, x, y, start, eps, norm, steps, worst)
    return worst.x.detach()


def targeted_pgd(
    loss_for: Callable[[Tensor], LossFn],
    x: Tensor,
    y: Tensor,
    eps: float,
    x_adv: Tensor,
    ranking: Tensor,
    *,
    targets: int,
    correct_fn: CorrectFn,
    **pgd_args: Any,
) -> Tensor:
    """Targeted PGD after an untargeted attack, as AutoAttack runs APGD-T after APGD-CE: for k = 1..`targets`, the
    samples that `x_adv` has not yet broken are attacked toward their k-th likeliest wrong class, ascending
    `loss_for(target)` (a targeted margin, `classification_loss`), and an input the attack breaks replaces theirs.

    Args:
        loss_for: target [b] -> the loss to ascend on the b samples still standing.
        x: Clean inputs [B, ...]; y: labels [B].
        eps: Radius of the ball.
        x_adv: The untargeted attack's inputs [B, ...], where the targeted runs start from (not changed).
        ranking: Wrong classes of each sample, likeliest first [B, >= targets] (e.g. at the clean input).
        targets: How many target classes to try (AutoAttack's standard version: 9).
        correct_fn: The attacked prediction's correctness.
        **pgd_args: `pgd`'s settings (norm, steps, schedule, ...).

    Returns:
        Adversarial inputs [B, ...], detached.
    """
    checks.integer("targets", targets, minimum=0, error=ValueError)
    if targets > ranking.shape[1]:
        raise ValueError(f"targets must be at most the {ranking.shape[1]} wrong classes, got {targets}")
    x_adv = x_adv.detach().clone()
    for k in range(targets):
        with torch.no_grad():
            idx = correct_fn(x_adv, y).nonzero().squeeze(1)  # [b] samples still standing
        if idx.numel() == 0:
            break
        x_k = pgd(loss_for(ranking[idx, k]), x[idx], y[idx], eps, correct_fn=correct_fn, **pgd_args)
        with torch.no_grad():
            broken = ~correct_fn(x_k, y[idx])
        x_adv[idx[broken]] = x_k[broken]
    return x_adv


def wrong_classes(probs: Tensor, y: Tensor) -> Tensor:
    """The classes other than y, likeliest first under `probs` [B, classes]: [B, classes - 1]."""
    others = probs.masked_fill(F.one_hot(y, probs.shape[-1]).bool(), float("-inf"))
    return others.argsort(-1, descending=True)[:, :-1]


def _direction(grad: Tensor, norm: Norm) -> Tensor:
    """The steepest-ascent direction of unit length in `norm`: sign(grad) or grad / ||grad||_2."""
    return grad.sign() if norm == "linf" else grad / _flat_norm(grad).clamp_min(1e-12)


def _fixed_steps(loss_fn: LossFn, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, norm: Norm, steps: int,
                 alpha: float, worst: "_Worst") -> None:
    for _ in range(steps):
        loss, grad = loss_and_gradient(loss_fn, x_adv, y)  # of x_adv, before the step
        worst.offer(x_adv, y, loss)
        x_adv = project(x_adv + alpha * _direction(grad, norm), x, eps, norm)
    with torch.no_grad():
        worst.offer(x_adv, y, loss_fn(x_adv, y))


def checkpoints(steps: int) -> List[int]:
    """APGD's checkpoints: the steps ceil(p_j * steps) with p_1 = 0.22 and p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03,
    0.06), below `steps` (Croce & Hein 2020, section 3.2)."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = (math.ceil(round(q * steps, 9)) for q in p[1:])  # round: 0.57 * 100 is 57.000000000000007
    return sorted({m for m in marks if 0 < m < steps})


def _adaptive_steps(loss_fn: LossFn, x: Tensor, y: Tensor, x_adv: Tensor, eps: float, norm: Norm, steps: int,
                    worst: "_Worst", momentum: float = 0.75, rho: float = 0.75) -> None:
    shape = (-1, *([1] * (x.dim() - 1)))  # per-sample scalars against [B, ...]
    loss, grad = loss_and_gradient(loss_fn, x_adv, y)
    worst.offer(x_adv, y, loss)
    best_x, best_loss, best_grad = x_adv, loss, grad
    eta = torch.full_like(loss, 2.0 * eps)  # [B] step lengths
    x_prev = x_adv
    rises = torch.zeros_like(loss)  # [B] steps since the last checkpoint that raised the loss
    last_check, last_eta, last_best = 0, eta.clone(), best_loss.clone()
    marks = set(checkpoints(steps))
    for k in range(steps):
        z = project(x_adv + eta.view(shape) * _direction(grad, norm), x, eps, norm)
        a = 1.0 if k == 0 else momentum
        x_next = project(x_adv + a * (z - x_adv) + (1.0 - a) * (x_adv - x_prev), x, eps, norm)
        loss_next, grad_next = loss_and_gradient(loss_fn, x_next, y)
        worst.offer(x_next, y, loss_next)
        rises += (loss_next > loss).to(rises.dtype)
        better = loss_next > best_loss  # [B]
        best_x = torch.where(better.view(shape), x_next, best_x)
        best_grad = torch.where(better.view(shape), grad_next, best_grad)
        best_loss = torch.where(better, loss_next, best_loss)
        x_prev, x_adv, loss, grad = x_adv, x_next, loss_next, grad_next
        if k + 1 in marks:
            stalled = rises < rho * (k + 1 - last_check)  # condition 1
            stalled |= (eta == last_eta) & (best_loss <= last_best)  # condition 2
            eta = torch.where(stalled, eta / 2.0, eta)
            back = stalled.view(shape)
            x_adv, grad = torch.where(back, best_x, x_adv), torch.where(back, best_grad, grad)
            x_prev = torch.where(back, best_x, x_prev)  # no momentum out of a restart from the best point
            loss = torch.where(stalled, best_loss, loss)
            rises.zero_()
            last_check, last_eta, last_best = k + 1, eta.clone(), best_loss.clone()


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
