"""Tests of ib.models.critics: every critic's scores and pair bookkeeping, its noise layers (in training only,
shared between a row's pairings), and the joint critic's split first layer against autograd."""
import math

import pytest
import torch

from ib.models import CRITICS

# Small settings so that the file runs in seconds.
SMALL_CRITIC = {
    "joint": {"hidden": (16, 16), "x_channels": (4,), "x_features": 8},
    "separable": {"hidden": (16,), "embed_dim": 8, "x_channels": (4,), "x_features": 8},
}
K = 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _critic(name, shape, **kwargs):
    return CRITICS.create(name, shape, K, **{**SMALL_CRITIC.get(name, {}), **kwargs})


def _assert_backward(module, out):
    out.square().mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


CRITIC_CASES = [
    (n, s, br)
    for n in CRITICS.names()
    for s, br in [((1, 8, 8), "flatten"), ((1, 28, 28), "flatten"), ((3, 32, 32), "conv")]
]


@pytest.mark.parametrize("name,shape,branch", CRITIC_CASES)
def test_critic_shapes_and_pairs(name, shape, branch):
    critic = _critic(name, shape, x_branch=branch).eval()
    x, z, z2 = torch.rand(5, *shape), torch.randn(5, K), torch.randn(5, K)
    t = critic(x, z)
    assert t.shape == (5,) and torch.isfinite(t).all()
    scores = critic.scores(x, z)
    assert scores.shape == (5, 5)
    torch.testing.assert_close(scores.diagonal(), t)
    # Every entry: row i is x_i, column j is z_j.
    tiled = critic(x.repeat_interleave(5, dim=0), z.repeat(5, 1)).view(5, 5)
    torch.testing.assert_close(scores, tiled)
    joint_t, marg_t = critic.pair_scores(x, z, z2)
    torch.testing.assert_close(joint_t, t)
    torch.testing.assert_close(marg_t, critic(x, z2))


def test_joint_critic_noisy_all_pairs_pair_row_i_with_column_j():
    # In training with input noise, scores() tiles the B x M pairs (each needs its own draw); with a vanishing
    # noise they must equal the eval-mode scores, whose row i is x_i and column j is z_j.
    critic = _critic("joint", (1, 8, 8), input_noise=1e-12, hidden_noise=0.0)
    x, z = torch.rand(5, 1, 8, 8), torch.randn(4, K)
    noisy = critic.train().scores(x, z)
    torch.testing.assert_close(noisy, critic.eval().scores(x, z))
    assert noisy.shape == (5, 4) and not torch.allclose(noisy, noisy[:, :1].expand(5, 4))  # columns differ


@pytest.mark.parametrize("name", CRITICS.names())
def test_critic_backward_in_training(name):
    critic = _critic(name, (1, 8, 8)).train()
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K, requires_grad=True)
    joint_t, marg_t = critic.pair_scores(x, z, z.roll(1, 0))
    scores = critic.scores(x, z)
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()
    _assert_backward(critic, joint_t.mean() - marg_t.exp().mean() + scores.mean())
    assert z.grad is not None


@pytest.mark.parametrize("name", CRITICS.names())
def test_critic_noise_only_in_training(name):
    critic = _critic(name, (1, 8, 8))
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K)
    noisy = {"input_noise", "hidden_noise"} & set(CRITICS.options(name))
    critic.train()
    assert torch.equal(critic(x, z), critic(x, z)) is not bool(noisy)
    critic.eval()
    assert torch.equal(critic(x, z), critic(x, z))


@pytest.mark.parametrize("noise", ["input_noise", "hidden_noise"])
def test_joint_critic_each_noise(noise):
    other = {"input_noise", "hidden_noise"} - {noise}
    critic = _critic("joint", (1, 8, 8), **{noise: 0.5, other.pop(): 0.0}).train()
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K)
    assert not torch.equal(critic(x, z), critic(x, z))
    assert not torch.equal(critic.scores(x, z), critic.scores(x, z))


def test_joint_critic_pairings_of_a_row_share_its_noise_draws():
    critic = _critic("joint", (1, 8, 8), input_noise=0.3, hidden_noise=0.5).train()
    x, z = torch.rand(6, 1, 8, 8), torch.randn(6, K)
    for p in (1, 2):  # P shufflings that happen to be z itself: the same inputs in every block
        joint_t, marg_t = critic.pair_scores(x, z, z.repeat(p, 1))
        assert torch.equal(marg_t[:6], joint_t)  # the joint pairs reuse the first shuffled block's draws
        assert p == 1 or not torch.equal(marg_t[6:], joint_t)  # later blocks draw their own
    assert not torch.equal(joint_t, critic.pair_scores(x, z, z.repeat(2, 1))[0])  # fresh draws on each call


def test_joint_critic_shared_noise_keeps_each_score_distribution():
    # One (x, z) pair and one marginal z' tiled over n rows: the rows' scores are n independent draws of the
    # pair's noisy score, which pair_scores (P = 2 shuffled blocks, the joint pairs reusing the first block's
    # draws) and the plain forward (its own draws for every pair) must give with the same mean and spread.
    torch.manual_seed(0)
    critic = _critic("joint", (1, 8, 8), input_noise=0.0, hidden_noise=0.5).train()
    n = 20000
    x, z, z2 = torch.rand(1, 1, 8, 8).expand(n, 1, 8, 8), torch.randn(1, K).expand(n, K), torch.randn(1, K).expand(n, K)
    with torch.no_grad():
        joint_t, marg_t = critic.pair_scores(x, z, z2.repeat(2, 1))
        plain_j, plain_m = critic(x, z), critic(x, z2)
    for ours, plain in ((joint_t, plain_j), (marg_t[:n], plain_m), (marg_t[n:], plain_m)):
        se = float(plain.std()) / math.sqrt(n)
        assert abs(float(ours.mean() - plain.mean())) < 5 * math.sqrt(2) * se
        assert abs(float(ours.std() / plain.std()) - 1) < 0.05
    corr = torch.corrcoef(torch.stack([joint_t, marg_t[:n], marg_t[n:]]))
    assert corr[0, 1] > 0.5  # the joint pairs share the first block's draws
    assert abs(float(corr[1, 2])) < 0.05 and abs(float(corr[0, 2])) < 0.05  # the shuffled blocks do not
    # and the draws themselves have the configured scale, shared or not
    for p in (1, 3):
        noise = critic._noise(torch.zeros((p + 1) * n, 4), 0.5, joint_rows=n).view(p + 1, n, 4)
        assert torch.equal(noise[0], noise[1])
        for block in noise[1:]:
            assert abs(float(block.std()) - 0.5) < 0.01 and abs(float(block.mean())) < 0.01
        assert p == 1 or abs(float(torch.corrcoef(noise[1:, :, 0])[0, 1])) < 0.05


def test_shared_noise_lowers_the_spread_of_the_bound():
    """The paper's critic (784 + 256 inputs, 512-512 ELU, noise 0.3/0.5) on one batch of dependent (x, z): the DV
    bound's spread over noise draws with the joint pairs reusing their twins' draws, against independent draws for
    every pair (measured 0.0072 against 0.048 nats; the README cites it), with the same mean."""
    from ib.estimators.base import dv_bound

    torch.manual_seed(0)
    critic = CRITICS.create("joint", (784,), 256, hidden=(512, 512)).train()
    x = torch.rand(100, 784)
    z = torch.randn(100, 256) + x[:, :256]
    shuffled = z.roll(1, 0)
    with torch.no_grad():
        shared = torch.tensor([float(dv_bound(*critic.pair_scores(x, z, shuffled))) for _ in range(200)])
        independent = torch.tensor([float(dv_bound(critic(x, z), critic(x, shuffled))) for _ in range(200)])
    assert shared.std() < independent.std() / 3
    assert abs(float(shared.mean() - independent.mean())) < 4 * float(independent.std()) / math.sqrt(200)


def test_separable_scores_are_a_matmul():
    critic = _critic("separable", (1, 8, 8))
    x, z = torch.rand(5, 1, 8, 8), torch.randn(7, K)
    torch.testing.assert_close(critic.scores(x, z), critic.g(x.flatten(1)) @ critic.h(z).T)


@pytest.mark.parametrize("tiles", [1, 2, 3])
def test_shared_first_layer_matches_autograd_through_the_concatenated_input(tiles):
    """The joint critic's first layer on pairs sharing x: values and every gradient against the plain Linear on
    concat(x, z) (double precision gradcheck too)."""
    from ib.models.critics import shared_first_layer

    torch.manual_seed(0)
    b, f, k, h = 4, 5, 3, 6
    fx = torch.randn(b, f, dtype=torch.float64, requires_grad=True)
    zz = torch.randn(tiles * b, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(h, f + k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(h, dtype=torch.float64, requires_grad=True)
    ours = shared_first_layer(fx, zz, weight, bias)
    plain = torch.nn.functional.linear(torch.cat([fx.repeat(tiles, 1), zz], dim=1), weight, bias)
    torch.testing.assert_close(ours, plain)
    g = torch.randn_like(plain)
    grads_ours = torch.autograd.grad(ours, (fx, zz, weight, bias), g)
    grads_plain = torch.autograd.grad(plain, (fx, zz, weight, bias), g)
    for a, e in zip(grads_ours, grads_plain):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(shared_first_layer, (fx, zz, weight, bias))
