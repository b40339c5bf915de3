"""Where the random draws of a training step come from: the global RNG, or each population member's own stream.

Every random draw of a training step goes through the functions here:
- the code's noise (`ib.models.bottlenecks`);
- a joint critic's noise layers (`ib.models.critics`);
- the marginal pairings' shifts, one or several distinct (`ib.estimators.base`).

By default they are torch's own calls on the global RNG, drawing exactly what `torch.randn_like` or `torch.randint`
would. Inside `population_noise`, the draws of a population of models trained as one batched model under
`torch.func.vmap` come from a list of RNG states instead, one per member. Each member then receives exactly the
numbers that its separate run, seeded alike, would draw, in the same order: the population's members equal the
separate runs they stand for.

How a member gets its own numbers inside `vmap`: the source draws each member's tensor on the host from that
member's RNG state, stacks them [S, ...], and indexes the stack with the batched member index that the caller passes
into `vmap` (`torch.arange(S)`, vmapped over dim 0), which makes the result a batched tensor whose member m is draw m.
`vmap` must be called with `randomness="same"`, which lets a random operation run inside it: our draws happen
between `torch.set_rng_state` calls, and the global RNG is restored when the context exits.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor


class PopulationNoise:
    """Per-member RNG streams of a vmapped population.

    Args:
        states: Each member's CPU RNG state (`torch.get_rng_state()` of its separate run); advanced in place as
            the members draw.
        member: The batched member index inside `vmap` (`torch.arange(S)` passed with in_dims 0).
        active: Which members draw (default all); the others get zeros and keep their state, for a draw that their
            separate runs skip (the penalty's, at beta = 0).
    """

    def __init__(self, states: List[Tensor], member: Tensor, active: Optional[Sequence[bool]] = None) -> None:
        self.states = states
        self.member = member
        self.active = [True] * len(states) if active is None else list(active)

    def _each(self, draw) -> Tensor:
        out = []
        for m, state in enumerate(self.states):
            if not self.active[m]:  # its separate run makes no such draw: zeros, and its stream stays put
                out.append(None)
                continue
            torch.set_rng_state(state)
            out.append(draw())
            self.states[m] = torch.get_rng_state()
        shape_of = next((t for t in out if t is not None), None)
        if shape_of is None:
            shape_of = draw()  # no member draws: any tensor of the right shape, replaced by zeros below
        out = [torch.zeros_like(shape_of) if t is None else t for t in out]
        return torch.stack(out)[self.member]  # batched: member m sees out[m]

    def gaussian(self, shape: Sequence[int], like: Tensor) -> Tensor:
        if like.device.type != "cpu":
            raise NotImplementedError("population noise streams are CPU RNG states; the device's RNG is not split")
        return self._each(lambda: torch.randn(tuple(shape), dtype=like.dtype)).to(like.device)

    def randint(self, low: int, high: int) -> Tensor:
        return self._each(lambda: torch.randint(low, high, (1,))[0])

    def distinct(self, n: int, k: int) -> Tensor:
        return self._each(lambda: torch.randperm(n - 1)[:k] + 1)


_SOURCE: contextvars.ContextVar[Optional[PopulationNoise]] = contextvars.ContextVar("ib_noise_source", default=None)


def gaussian(shape: Sequence[int], like: Tensor) -> Tensor:
    """N(0, 1) noise of `shape` with `like`'s dtype and device: `torch.randn` on the global RNG, or each member's
    own draw inside `population_noise`."""
    source = _SOURCE.get()
    if source is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    return source.gaussian(shape, like)


def randint(low: int, high: int, generator: Optional[torch.Generator] = None) -> "int | Tensor":
    """A uniform integer in [low, high): a Python int from the global RNG (or `generator`), or inside
    `population_noise` each member's own draw (a batched 0-d tensor, usable in index arithmetic). A `generator`
    is always used as given: the held-out reports draw from their own."""
    source = _SOURCE.get()
    if source is None or generator is not None:
        return int(torch.randint(low, high, (1,), generator=generator).item())
    return source.randint(low, high)


def distinct_shifts(n: int, k: int) -> "List[int] | Tensor":
    """k distinct integers in [1, n - 1] (the first k of a random permutation, plus one): a list of ints from the
    global RNG, or inside `population_noise` each member's own draw (a batched [k] tensor, whose entries index
    arithmetic can use)."""
    source = _SOURCE.get()
    if source is None:
        return (torch.randperm(n - 1)[:k] + 1).tolist()
    return source.distinct(n, k)


@contextlib.contextmanager
def population_noise(states: List[Tensor], member: Tensor,
                     active: Optional[Sequence[bool]] = None) -> Iterator[PopulationNoise]:
    """Inside: every draw through this module comes from the members' own RNG `states` (advanced in place; only
    the `active` members draw); the global RNG is as it was on exit."""
    source = PopulationNoise(states, member, active)
    token = _SOURCE.set(source)
    saved = torch.get_rng_state()
    try:
        yield source
    finally:
        _SOURCE.reset(token)
        torch.set_rng_state(saved)
