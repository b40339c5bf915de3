"""A population: S runs of one recipe that differ in beta and seed, trained as one batched model.

Adam and SGD update each element on its own, so S copies of a model stacked along a leading "population" dimension
and trained on the sum of their losses are S independent runs done with batched matrix products
(`torch.func.stack_module_state`, `functional_call`, `vmap`). What keeps each member equal to the separate run it
stands for:
- its own batches (the caller stacks each member's batch: [S, B, ...]);
- its own random draws, from its own RNG state (`ib.models.noise.population_noise`), in its separate run's order;
  draws that its separate run skips (the penalty's at beta = 0) are skipped too;
- its own beta, the penalty computed for all and weighted by beta, with the loss and its gradient those of the
  separate run (which skips the penalty at beta = 0);
- its own running statistics (MINE's moving average: a stacked buffer [S] updated in place);
- per-member gradient clipping and finiteness: a member whose update is not finite keeps its weights, optimiser
  moments and buffers, as its separate run would (its Adam step count, shared by the population, then runs one
  ahead of the separate run's).

`population_step` is `ib.engine.step.train_step`'s two-pass step for the population (critic first on detached
codes, then the encoder against the updated critic); tests/engine/test_population.py holds it to S separate
`train_step`s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from ib.estimators import MIEstimator
from ib.models import noise
from ib.models.bottlenecks import Code
from ib.models.stacked import Stacked, per_member
from ib.objectives import reverse_grad


@dataclass
class Population:
    """The stacked model and estimator of S members, their optimisers over the stacked parameters, and each
    member's RNG state (what `torch.get_rng_state()` would be in its separate run)."""

    model: Stacked
    estimator: Optional[Stacked]
    optimizer: torch.optim.Optimizer
    critic_optimizer: Optional[torch.optim.Optimizer]
    rng_states: List[Tensor]
    member: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.member = torch.arange(len(self.rng_states))

    @property
    def size(self) -> int:
        return len(self.rng_states)


def build_population(models: Sequence[nn.Module], estimators: Sequence[Optional[MIEstimator]],
                     make_optimizer, make_critic_optimizer, rng_states: Sequence[Tensor]) -> Population:
    """A population from S built members: `make_optimizer(params)` / `make_critic_optimizer(params)` build the
    optimisers (as the recipe builds each run's) over the stacked parameters, with no state yet."""
    model = Stacked(models)
    estimator = Stacked(estimators) if estimators[0] is not None else None
    trains = estimator is not None and bool(estimator.leaves)  # a critic; vib_kl has nothing to train
    return Population(model, estimator, make_optimizer(list(model.leaves.values())),
                      make_critic_optimizer(list(estimator.leaves.values())) if trains else None,
                      [s.clone() for s in rng_states])


def _member_finite(tensors: Sequence[Tensor], size: int) -> Tensor:
    """[S] bool: every element of member m's slice of every tensor ([S, ...]) is finite."""
    sums = torch.stack([t.detach().sum(dim=per_member(t), dtype=torch.float32) if t.dim() > 1
                        else t.detach().float() for t in tensors])  # [T, S]
    return sums.isfinite().all(0)


def _clip_(grads: Sequence[Tensor], max_norm: Optional[float], size: int) -> None:
    """Each member's gradients scaled to a total norm of at most `max_norm`, as `clip_grad_norm_` per run."""
    if max_norm is None or not grads:
        return
    norms = torch.stack([torch.linalg.vector_norm(g, dim=per_member(g)) if g.dim() > 1 else g.abs()
                         for g in grads]).norm(dim=0)  # [S]
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(size, *([1] * (g.dim() - 1))))


def _step_members(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], ok: Tensor,
                  buffers: Sequence[Tensor] = (), saved_buffers: Sequence[Tensor] = ()) -> None:
    """Step the optimiser; members with `ok` False keep their parameters, optimiser moments and buffers."""
    keep = (~ok).nonzero().squeeze(1)
    if keep.numel() == 0:
        optimizer.step()
        return
    before = [(p, p.detach()[keep].clone()) for p in params]
    moments = [(t, t[keep].clone()) for p in params for t in optimizer.state.get(p, {}).values()
               if torch.is_tensor(t) and t.dim() > 0 and t.shape[0] == len(ok)]
    for p in params:
        if p.grad is not None:
            p.grad[keep] = 0.0  # no NaN reaches the others' shared arithmetic
    optimizer.step()
    with torch.no_grad():
        for p, old in before:
            p[keep] = old
        for t, old in moments:
            t[keep] = old
        for b, old in zip(buffers, saved_buffers):
            b[keep] = old[keep]


def population_step(pop: Population, x: Tensor, y: Tensor, betas: Sequence[float], *, critic_steps: int = 1,
                    grad_clip: Optional[float] = None, critic_grad_clip: Optional[float] = None,
                    fused: bool = False, label_smoothing: float = 0.0) -> Dict[str, Tensor]:
    """One minimax step of every member on its own batch, as `train_step` per member: two-pass, or fused where
    train_step fuses (`fused`, one critic step, an estimator whose loss is minus its penalty).

    Args:
        pop: The population.
        x: Each member's batch [S, B, ...] in [0, 1]; y: labels [S, B].
        betas: Each member's beta for this step.
        critic_steps, grad_clip, critic_grad_clip, fused, label_smoothing: as `train_step`'s (the same for every
            member).

    Returns:
        {"loss", "ce", "mi_bound", "mi", "correct", "finite"}, each [S] (detached), with train_step's meanings.
    """
    if (fused and pop.estimator is not None and pop.critic_optimizer is not None and critic_steps == 1
            and pop.estimator.skeleton.module.loss_is_minus_penalty):
        return _fused_population_step(pop, x, y, betas, grad_clip, critic_grad_clip, label_smoothing)
    size, states, member = pop.size, pop.rng_states, pop.member
    model, est = pop.model, pop.estimator
    beta = torch.tensor([float(b) for b in betas], dtype=torch.float32)
    active = [b > 0 for b in betas]

    def encode(p, b, x_, m):
        with noise.population_noise(states, m):
            code = model.call(p, b, "encode", x_)
        # vmap returns tensors only: z stands in for the mean and std of a code that has none (never read then)
        return code.z, code.mean if code.mean is not None else code.z, code.std if code.std is not None else code.z

    z, mean, std = vmap(encode, randomness="same")(model.params, model.buffers, x, member)  # [S, B, K] each
    mi_bound = torch.full((size,), math.nan)
    critic_ok = torch.ones(size, dtype=torch.bool)
    if est is not None and pop.critic_optimizer is not None:
        critic_params = list(est.leaves.values())
        buffers = list(est.buffers.values())

        def critic_loss(p, b, x_, z_, m):
            with noise.population_noise(states, m):
                return est.call(p, b, "loss", x_, z_)

        for _ in range(critic_steps):
            saved = [t.clone() for t in buffers]
            pop.critic_optimizer.zero_grad(set_to_none=True)
            loss = vmap(critic_loss, randomness="same")(est.params, est.buffers, x, z.detach(), member)  # [S]
            loss.sum().backward()
            grads = [p.grad for p in critic_params if p.grad is not None]
            _clip_(grads, critic_grad_clip, size)
            critic_ok = _member_finite([loss.unsqueeze(1), *grads], size)
            _step_members(pop.critic_optimizer, critic_params, critic_ok, buffers, saved)
            mi_bound = torch.where(critic_ok, -loss.detach(), torch.full_like(mi_bound, math.nan))
        pop.critic_optimizer.zero_grad(set_to_none=True)
    # The critic frozen: its parameters enter detached, as train_step's `frozen(estimator)`.
    frozen = ({k: v.detach() for k, v in est.params.items()}, est.buffers) if est is not None else ({}, {})

    def objective(p, b, ep, eb, x_, y_, z_, mean_, std_, beta_, m):
        logits = model.call(p, b, "decode", z_)
        ce = F.cross_entropy(logits, y_, label_smoothing=label_smoothing)
        if est is None:
            return ce, ce, ce * math.nan, logits
        with noise.population_noise(states, m, active):
            mi = est.call(ep, eb, "penalty", x_, z_, Code(z_, mean_, std_))
        return ce + beta_ * mi, ce, mi, logits

    loss, ce, mi, logits = vmap(objective, randomness="same")(model.params, model.buffers, *frozen, x, y, z, mean,
                                                              std, beta, member)
    loss = torch.where(torch.tensor(active), loss, ce)  # the separate run's loss at beta = 0 is CE alone
    params = list(model.leaves.values())
    pop.optimizer.zero_grad(set_to_none=True)
    loss.sum().backward()
    grads = [p.grad for p in params if p.grad is not None]
    _clip_(grads, grad_clip, size)
    ok = _member_finite([loss.unsqueeze(1), *grads], size) & critic_ok
    _step_members(pop.optimizer, params, ok)
    pop.optimizer.zero_grad(set_to_none=True)
    if est is not None and pop.critic_optimizer is None:  # critic-free (vib_kl): its own bound, as train_step
        mi_bound = mi.detach()
    correct = (logits.detach().argmax(-1) == y).sum(1)
    return {"loss": loss.detach(), "ce": ce.detach(), "mi_bound": mi_bound, "mi": mi.detach(), "correct": correct,
            "finite": ok}


def _fused_population_step(pop: Population, x: Tensor, y: Tensor, betas: Sequence[float],
                           grad_clip: Optional[float], critic_grad_clip: Optional[float],
                           label_smoothing: float) -> Dict[str, Tensor]:
    """`train_step`'s fused step per member: one forward of the critic serves both players through gradient
    reversal with each member's beta (`fused_minimax_objective`)."""
    size, states, member, model, est = pop.size, pop.rng_states, pop.member, pop.model, pop.estimator
    beta = torch.tensor([float(b) for b in betas], dtype=torch.float32)
    buffers = list(est.buffers.values())
    saved = [t.clone() for t in buffers]

    def objective(p, b, ep, eb, x_, y_, beta_, m):
        with noise.population_noise(states, m):
            code = model.call(p, b, "encode", x_)
            logits = model.call(p, b, "decode", code.z)
            ce = F.cross_entropy(logits, y_, label_smoothing=label_smoothing)
            critic_loss = est.call(ep, eb, "loss", x_, reverse_grad(code.z, beta_))
        return ce + critic_loss, ce, -critic_loss.detach(), logits

    obj, ce, bound, logits = vmap(objective, randomness="same")(model.params, model.buffers, est.params, est.buffers,
                                                                x, y, beta, member)
    critic_params, params = list(est.leaves.values()), list(model.leaves.values())
    pop.optimizer.zero_grad(set_to_none=True)
    pop.critic_optimizer.zero_grad(set_to_none=True)
    obj.sum().backward()
    critic_grads = [p.grad for p in critic_params if p.grad is not None]
    grads = [p.grad for p in params if p.grad is not None]
    _clip_(critic_grads, critic_grad_clip, size)
    _clip_(grads, grad_clip, size)
    ok = _member_finite([obj.unsqueeze(1), *critic_grads, *grads], size)
    _step_members(pop.optimizer, params, ok)
    _step_members(pop.critic_optimizer, critic_params, ok, buffers, saved)
    pop.optimizer.zero_grad(set_to_none=True)
    pop.critic_optimizer.zero_grad(set_to_none=True)
    correct = (logits.detach().argmax(-1) == y).sum(1)
    return {"loss": ce.detach() + beta * bound, "ce": ce.detach(),
            "mi_bound": torch.where(ok, bound, torch.full_like(bound, math.nan)), "mi": bound, "correct": correct,
            "finite": ok}
