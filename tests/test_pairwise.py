"""The pairwise-distance bounds on I(X;Z) of Gaussian codes, against what is known exactly."""
import math
from pathlib import Path

import pytest
import torch

import ib.estimators.pairwise as pairwise
from ib.estimators.pairwise import pairwise_bound, pairwise_divergence


def test_codes_far_apart_give_log_n_and_identical_codes_give_zero():
    mean = torch.arange(12.0)[:, None] * torch.full((1, 3), 50.0)  # pairs 50 apart in each of 3 dims
    std = torch.full((12, 3), 0.1)
    for kind in ("kl", "bhattacharyya"):
        assert pairwise_bound(mean, std, kind) == pytest.approx(math.log(12), abs=1e-12)
        assert pairwise_bound(torch.zeros(12, 3), std, kind) == pytest.approx(0.0, abs=1e-12)


def test_closed_forms_equal_torch_distributions():
    torch.manual_seed(0)
    m1, m2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    s1, s2 = torch.rand(4, 3, dtype=torch.float64) + 0.2, torch.rand(5, 3, dtype=torch.float64) + 0.2
    kl = pairwise_divergence(m1, s1, m2, s2, "kl")
    p, q = torch.distributions.Normal(m1[:, None], s1[:, None]), torch.distributions.Normal(m2[None], s2[None])
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(p, q).sum(-1))
    # Bhattacharyya distance of two 1-D Gaussians by numerical integration: -log of the integral of sqrt(p q).
    grid = torch.linspace(-20, 20, 400_001, dtype=torch.float64)
    a, b = torch.distributions.Normal(0.3, 0.5), torch.distributions.Normal(-1.0, 1.5)
    overlap = torch.trapezoid(((a.log_prob(grid) + b.log_prob(grid)) / 2).exp(), grid)
    exact = -math.log(float(overlap))
    got = pairwise_divergence(torch.tensor([[0.3]]), torch.tensor([[0.5]]), torch.tensor([[-1.0]]),
                              torch.tensor([[1.5]]), "bhattacharyya")
    assert float(got) == pytest.approx(exact, rel=1e-6)  # the trapezoid rule on a 1e-4 grid: ~1e-8


@pytest.mark.parametrize("spread, noise", [(1.0, 1.0), (2.0, 0.5), (0.3, 1.0), (4.0, 0.2)])
def test_a_mixture_of_1d_gaussians_lies_inside_the_band(spread, noise):
    """X uniform over N inputs, Z | x_i = N(m_i, s_i^2): I(X;Z) = H(Z) - mean_i H(Z | x_i), with H(Z) integrated
    numerically on a fine grid (error far below the gaps between the bounds and the truth)."""
    g = torch.Generator().manual_seed(1)
    n = 6
    mean = spread * torch.randn(n, 1, generator=g, dtype=torch.float64)
    std = noise * (0.5 + torch.rand(n, 1, generator=g, dtype=torch.float64))
    grid = torch.linspace(float(mean.min() - 12 * std.max()), float(mean.max() + 12 * std.max()), 200_001,
                          dtype=torch.float64)
    density = torch.distributions.Normal(mean, std).log_prob(grid[None]).exp().mean(0)  # [grid]
    h_z = -float(torch.trapezoid(torch.xlogy(density, density), grid))
    h_z_given_x = float((0.5 * torch.log(2 * math.pi * math.e * std.square())).mean())
    exact = h_z - h_z_given_x
    lower, upper = pairwise_bound(mean, std, "bhattacharyya"), pairwise_bound(mean, std, "kl")
    assert 0.0 <= lower <= exact + 1e-6 and exact <= upper + 1e-6 and upper <= math.log(n) + 1e-12, \
        (lower, exact, upper)


def test_tiny_noise_and_a_wide_spread_stay_exact_and_blocks_do_not_matter(monkeypatch):
    """std ~ 1e-3 and means spread over ~7: the divergences of the differences in float64 (an expanded square
    would cancel); the row blocks give the bound of the whole matrix."""
    torch.manual_seed(2)
    mean = 7.0 * torch.randn(40, 16)
    std = torch.full((40, 16), 1e-3)
    mean[1] = mean[0] + 1e-3  # one pair within the noise: the bound is below log N
    whole = pairwise_bound(mean, std, "kl")
    assert 0.0 < whole < math.log(40)
    d01 = float(pairwise_divergence(mean[:1], std[:1], mean[1:2], std[1:2], "kl"))
    assert d01 == pytest.approx(0.5 * 16 * (1e-3 / 1e-3) ** 2, rel=1e-3)  # float32 inputs: (1e-3 + rounding)^2
    monkeypatch.setattr(pairwise, "BLOCK_ELEMENTS", 16 * 40 * 3)  # blocks of 8 rows and 15 columns
    assert pairwise_bound(mean, std, "kl") == pytest.approx(whole, rel=1e-12)


def test_the_lower_bound_never_exceeds_the_upper():
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        mean = torch.randn(30, 4, generator=g) * torch.rand(1, generator=g) * 5
        std = torch.rand(30, 4, generator=g) + 0.05
        assert pairwise_bound(mean, std, "bhattacharyya") <= pairwise_bound(mean, std, "kl") + 1e-12


def test_fewer_than_two_codes_and_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_bound(torch.zeros(1, 3), torch.ones(1, 3), "kl")
    with pytest.raises(ValueError, match="kind"):
        pairwise_divergence(torch.zeros(1, 3), torch.ones(1, 3), torch.zeros(1, 3), torch.ones(1, 3), "js")


def test_the_pairwise_kl_penalty_is_the_bound_of_the_batch_and_compresses():
    """`mi.estimator=pairwise_kl`: the penalty is the KL bound of the batch's codes, and descending it pulls the
    means together and scales the stds up (both lower every pairwise KL; the stds' ratios are left alone)."""
    from ib.errors import ConfigError
    from ib.estimators import ESTIMATORS
    from ib.models.bottlenecks import Code

    est = ESTIMATORS.create("pairwise_kl", "gaussian")
    torch.manual_seed(4)
    mean = (torch.randn(16, 3) * 0.5).requires_grad_()
    std = (torch.rand(16, 3) + 0.5).requires_grad_()
    penalty = est.penalty(None, mean, Code(mean, mean, std))
    assert float(penalty.detach()) == pytest.approx(pairwise_bound(mean.detach(), std.detach(), "kl"), rel=1e-6)
    assert est.estimate(None, mean, code=Code(mean, mean, std)) == pytest.approx(float(penalty.detach()), rel=1e-6)
    penalty.backward()
    spread = (mean - mean.mean(0)).detach()
    assert float((mean.grad * spread).sum()) > 0 and float((std.grad * std.detach()).sum()) < 0
    assert not list(est.parameters()) and float(est.loss(None, mean)) == 0.0
    with pytest.raises(ConfigError, match="pairwise_kl needs a Gaussian p"):
        ESTIMATORS.create("pairwise_kl", "additive")


def test_pairwise_kl_trains_end_to_end_and_says_when_it_saturates(tmp_path, caplog):
    """On digits the penalty trains and reports the probe's KL bound. Started with the VIB paper's small noise
    (std_offset 5) every pair of codes in a batch is far apart, the batch bound sits at log B with a vanishing
    gradient, and the run says so once; started with noise on the code's scale (std_offset 0) and beta 0.3, it
    compresses and says nothing."""
    from ib.engine import fit
    from ib.recipe import load_recipe

    digits = Path(__file__).parents[1] / "recipes" / "digits.yaml"
    common = ["epochs=3", "mi.estimator=pairwise_kl", "model.encoder.hidden=[64]", "model.bottleneck.z_dim=8",
              "beta_schedule.delay=0", "model.eval_samples=0"]
    with caplog.at_level("WARNING", logger="ib.engine.loop"):
        metrics = fit(load_recipe(digits, [*common, "beta=0.1"]), tmp_path / "small_noise")
    assert metrics["status"] == "completed" and metrics["test_accuracy"] > 0.5
    assert metrics["I_XZ_nats"] == pytest.approx(metrics["I_XZ_pairwise_upper"], rel=1e-9)  # the estimate is it
    said = [r.getMessage() for r in caplog.records if "ceiling log B" in r.getMessage()]
    assert len(said) == 1 and f"{math.log(64):.3f}" in said[0]  # once per run, at log 64
    caplog.clear()
    with caplog.at_level("WARNING", logger="ib.engine.loop"):
        metrics = fit(load_recipe(digits, [*common, "beta=0.3", "model.bottleneck.std_offset=0"]), tmp_path / "nib")
    assert not [r for r in caplog.records if "ceiling log B" in r.getMessage()]
    assert metrics["I_XZ_pairwise_upper"] < math.log(143) - 0.5  # the band has left its ceiling



def test_a_trained_critics_held_out_estimate_lies_inside_the_band():
    """X uniform over a 4 x 4 grid of points, Z = X + N(0, 0.6^2 I): the band is [1.10, 2.14] nats, the exact
    I(X;Z) (Monte Carlo, standard error 0.002) 1.434, and a MINE critic trained briefly on 4,000 pairs reports a held-out
    value inside the band."""
    from ib.estimators import estimate_mi

    g = torch.Generator().manual_seed(0)
    points = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1).reshape(16, 2)
    std = torch.full((16, 2), 0.6)
    lower, upper = pairwise_bound(points, std, "bhattacharyya"), pairwise_bound(points, std, "kl")
    rows = torch.randint(0, 16, (100_000,), generator=g)
    z = points[rows] + 0.6 * torch.randn(100_000, 2, generator=g)
    log_p = torch.distributions.Normal(points[None], 0.6).log_prob(z[:, None]).sum(-1)  # [M, 16]
    exact = float((log_p[torch.arange(len(rows)), rows] - torch.logsumexp(log_p, 1) + math.log(16)).mean())
    assert lower < exact < upper
    estimate = estimate_mi(points[rows[:4000]], z[:4000], "mine", steps=300, hidden=(64, 64), seed=0)
    assert lower <= estimate <= upper, (lower, estimate, exact, upper)


def test_both_divergences_have_the_gradients_of_their_closed_forms():
    """Out of place when a gradient is wanted: torch.autograd.gradcheck against finite differences, float64."""
    g = torch.Generator().manual_seed(5)
    args = (torch.randn(3, 2, generator=g, dtype=torch.float64).requires_grad_(),
            (torch.rand(3, 2, generator=g, dtype=torch.float64) + 0.3).requires_grad_(),
            torch.randn(4, 2, generator=g, dtype=torch.float64).requires_grad_(),
            (torch.rand(4, 2, generator=g, dtype=torch.float64) + 0.3).requires_grad_())
    for kind in ("kl", "bhattacharyya"):
        assert torch.autograd.gradcheck(lambda *a: pairwise_divergence(*a, kind), args)
