"""The draws of a training step, on the global RNG and per member of a vmapped population (`ib.models.noise`)."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ib.estimators import ESTIMATORS
from ib.estimators.base import marginal_shift
from ib.models import noise
from ib.models.classifier import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


def test_default_draws_are_torchs_own():
    like = torch.empty(16, 8, dtype=torch.float64)
    torch.manual_seed(0)
    ours = (noise.gaussian(like.shape, like=like), marginal_shift(16), noise.gaussian((3, 4), like=like[:, :1]))
    torch.manual_seed(0)
    theirs = (torch.randn_like(like), int(torch.randint(1, 16, (1,)).item()), torch.randn(3, 4, dtype=torch.float64))
    assert torch.equal(ours[0], theirs[0]) and ours[1] == theirs[1] and torch.equal(ours[2], theirs[2])


def test_each_member_draws_its_own_stream_and_the_global_rng_is_left_alone():
    states = []
    for seed in (3, 4, 5):
        torch.manual_seed(seed)
        states.append(torch.get_rng_state())
    torch.manual_seed(99)
    before = torch.get_rng_state()

    def draw(member, like):
        with noise.population_noise(states, member):
            return noise.gaussian(like.shape, like=like) + marginal_shift(10)

    out = vmap(draw, randomness="same")(torch.arange(3), torch.zeros(3, 5))  # [3, 5]
    assert torch.equal(torch.get_rng_state(), before)
    for m, seed in enumerate((3, 4, 5)):
        torch.manual_seed(seed)
        expected = torch.randn(5) + int(torch.randint(1, 10, (1,)).item())
        assert torch.equal(out[m], expected)
        assert torch.equal(states[m], torch.get_rng_state())  # advanced by exactly those draws


class _Objective(nn.Module):
    """CE + beta * KL of a Gaussian code: the vib_kl step's loss, as one module for `functional_call`."""

    def __init__(self, model, estimator):
        super().__init__()
        self.model, self.estimator = model, estimator

    def forward(self, x, y, beta):
        code = self.model.encode(x)
        return F.cross_entropy(self.model.decode(code.z), y) + beta * self.estimator.penalty(x, code.z, code)


def _classifier(seed):
    torch.manual_seed(seed)
    return build_classifier("mlp", {"hidden": [32, 32], "activation": "elu"}, "gaussian",
                            {"z_dim": 8, "std_offset": 2.0}, (1, 8, 8), 10, [0.5], [0.25])


def test_a_vmapped_population_trains_exactly_as_its_separate_runs():
    """Three VIB runs (seeds 0-2, betas 1e-3 / 1e-2 / 0.1, Adam, 5 steps) against the same three stacked along a
    population dimension and trained through one vmapped step on the sum of their losses: Adam is elementwise, the
    noise of each member comes from its own RNG stream, so every weight agrees to float rounding."""
    g = torch.Generator().manual_seed(123)
    batches = [(torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(5)]
    betas = [1e-3, 1e-2, 1e-1]
    separate = []
    for m, beta in enumerate(betas):
        objective = _Objective(_classifier(m), ESTIMATORS.create("vib_kl", "gaussian"))
        opt = torch.optim.Adam(objective.parameters(), lr=1e-2)
        torch.manual_seed(100 + m)
        for x, y in batches:
            opt.zero_grad()
            objective(x, y, beta).backward()
            opt.step()
        separate.append(objective)

    members = [_Objective(_classifier(m), ESTIMATORS.create("vib_kl", "gaussian")) for m in range(3)]
    base = copy.deepcopy(members[0]).to("meta")
    params, buffers = stack_module_state(members)  # [3, ...] leaves
    opt = torch.optim.Adam(params.values(), lr=1e-2)
    states = []
    for m in range(3):
        torch.manual_seed(100 + m)
        states.append(torch.get_rng_state())

    def member_loss(p, b, x, y, beta, member):
        with noise.population_noise(states, member):
            return functional_call(base, (p, b), (x, y, beta))

    for x, y in batches:
        opt.zero_grad()
        losses = vmap(member_loss, in_dims=(0, 0, None, None, 0, 0), randomness="same")(
            params, buffers, x, y, torch.tensor(betas), torch.arange(3))
        losses.sum().backward()
        opt.step()
    for m, objective in enumerate(separate):
        for name, value in objective.named_parameters():
            torch.testing.assert_close(params[name][m], value, rtol=1e-5, atol=1e-6)
