"""A population of critic-based estimators of one architecture, trained together with batched matrix products.

S estimators stacked along a leading dimension (`ib.models.stacked.Stacked`) and trained on the sum of their
losses are S independent trainings: Adam and SGD update each element on its own. Each member keeps its own data
(the caller stacks each member's batch, [S, B, ...]), its own running statistics (MINE's moving average, a stacked
buffer) and its own random draws (the marginal shifts, from its own RNG state through `ib.models.noise`), so member
m equals the estimator it was stacked from, trained alone on the same batches, to float rounding.
`ib.estimators.estimate.estimate_mi_population` trains one critic per seed this way; benchmarks/mine_step.py times
its step per member against one estimator's.
"""
from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from torch import Tensor
from torch.func import vmap

from ib.estimators.base import MIEstimator
from ib.models import noise
from ib.models.stacked import Stacked


class CriticPopulation:
    """S estimators trained as one.

    Args:
        estimators: S estimators of one architecture (their critics built alike, weights their own).
        rng_states: each member's CPU RNG state, where its own training would draw next (advanced in place).
        make_optimizer: builds the optimiser over the stacked parameters, as one member's would be built over its
            own (e.g. `lambda params: torch.optim.Adam(params, lr=1e-3)`).
    """

    def __init__(self, estimators: Sequence[MIEstimator], rng_states: Sequence[Tensor],
                 make_optimizer: Callable[[List[Tensor]], torch.optim.Optimizer]) -> None:
        if len(estimators) != len(rng_states):
            raise ValueError(f"{len(estimators)} estimators and {len(rng_states)} RNG states: give one per member")
        self.stacked = Stacked(estimators)
        self.states = [s.clone() for s in rng_states]
        self.member = torch.arange(len(estimators))
        self.optimizer = make_optimizer(list(self.stacked.leaves.values()))

    def _loss(self, params, buffers, x: Tensor, y: Tensor, m: Tensor) -> Tensor:
        with noise.population_noise(self.states, m):
            return self.stacked.call(params, buffers, "loss", x, y)

    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimiser step of every member on its own batch (x [S, B, dx], y [S, B, dy]); returns the members'
        losses [S], detached."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = vmap(self._loss, randomness="same")(self.stacked.params, self.stacked.buffers, x, y, self.member)
        losses.sum().backward()  # [S]: each member's gradient is its own loss's
        self.optimizer.step()
        return losses.detach()

    def load_into(self, m: int, estimator: MIEstimator) -> MIEstimator:
        """Member m's weights and buffers copied into `estimator` (one of the same architecture); returns it."""
        estimator.load_state_dict(self.stacked.member_state(m))
        return estimator
