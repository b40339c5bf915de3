"""MI estimators against ground truth (correlated Gaussians with I = -d/2 log(1 - rho^2) nats), their closed forms,
and the registry's classes (vib_kl, which needs a Gaussian code rather than samples: test_vib.py)."""
import inspect
import math
import time
import warnings

import pytest
import torch

import ib
from ib.errors import ConfigError
from ib.estimators import (
    ESTIMATORS,
    CeilingWarning,
    MINE,
    InfoNCE,
    MIEstimate,
    MIEstimator,
    MINEf,
    clipped_dv,
    dv_bound,
    exp_capped,
    infonce_bound,
    jackknife_se,
    js_objective,
    log_mean_exp,
)
from ib.estimators import base
from ib.estimators.base import marginal_shift
from ib.models.critics import CRITICS

CRITIC_BASED = [n for n in ESTIMATORS.names() if ESTIMATORS.get(n).needs_critic]


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


def correlated_gaussians(n: int, d: int, mi: float, seed: int = 0):
    """x, y in R^d, each coordinate pair correlated with rho chosen so that I(X;Y) = mi nats."""
    rho = math.sqrt(1.0 - math.exp(-2.0 * mi / d))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return x, y


# Measured with the defaults (for mine a GELU 128-128 critic, 2,500 steps, batch 768, 4 marginal pairings; held-out
# DV on 4,000 samples with 200 pairings), seeds 0-2 (benchmarks/results/estimate_mi_steps2500.md): 1.93-2.00 at 2
# nats, 3.82-3.90 at 4 nats. The tolerance is the promise, 0.2 at both levels; seed 0 reads 1.94 and 3.82 there.
@pytest.mark.parametrize("true_mi", [2.0, 4.0])
def test_estimate_mi_on_gaussians(true_mi):
    x, y = correlated_gaussians(20_000, 20, true_mi)
    t0 = time.perf_counter()
    est = ib.estimate_mi(x, y, estimator="mine", seed=0)
    seconds = time.perf_counter() - t0
    assert abs(est - true_mi) < 0.2, f"estimate {est:.3f} vs true {true_mi}"
    # One thread here (the module's fixture). The 15 s goal is for 2 threads (13.7-14.7 s measured) and is timed by
    # benchmarks/estimate_mi_defaults.py and first_call.py; this bound only catches a pathological slowdown.
    assert seconds < 120


def test_estimate_mi_of_independent_samples_is_near_zero():
    x, _ = correlated_gaussians(5000, 5, 1.0, seed=1)
    y = torch.randn(5000, 5, generator=torch.Generator().manual_seed(2))
    est = ib.estimate_mi(x, y, steps=500, seed=0)
    assert abs(est) < 0.1


def test_estimate_mi_is_repeatable_and_leaves_global_rng_alone():
    x, y = correlated_gaussians(2000, 4, 1.0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = ib.estimate_mi(x, y, steps=100, seed=5)
    assert torch.equal(before, torch.get_rng_state())
    assert a == ib.estimate_mi(x, y, steps=100, seed=5)


@pytest.mark.parametrize("estimator", ["mine", "infonce", "smile"])
def test_estimate_mi_population_equals_the_separate_calls(estimator):
    """Each member is the call with its seed: its split, initial critic, batches and marginal shifts (mine: 4
    distinct shifts a step, from its own stream). The batched products round differently from the single ones (a
    few float32 ulps, 1.2e-7 relative, per product), so after 60 Adam steps the estimates (about 0.2-0.8 nats)
    agree to rounding's size, not bitwise: within 1e-5, some 100 ulps. Marginal shifts drawn from the global stream
    instead of each member's put them 3e-4 apart, and another seed's batches by the seeds' spread (over 1e-2)."""
    x, y = correlated_gaussians(1200, 4, 1.0)
    kw = dict(steps=60, hidden=(32, 32), permutations=20, batch_size=128)
    separate = [ib.estimate_mi(x, y, estimator, seed=s, **kw) for s in (3, 4, 5)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    together = ib.estimate_mi_population(x, y, estimator, seeds=(3, 4, 5), **kw)
    assert torch.equal(before, torch.get_rng_state())
    assert max(separate) - min(separate) > 1e-2  # the seeds differ by far more than the tolerance below
    for a, b in zip(together, separate):
        assert abs(a - b) < 1e-5, f"{[float(v) for v in together]} vs {[float(v) for v in separate]}"
        assert abs(a.se - b.se) < 1e-5


def test_estimate_mi_population_has_estimate_mi_s_defaults():
    """The two signatures are written out for their readers; a default changed in one must change in both."""
    one = inspect.signature(ib.estimate_mi).parameters
    many = inspect.signature(ib.estimate_mi_population).parameters
    assert {k: v.default for k, v in one.items() if k != "seed"} == {k: v.default for k, v in many.items()
                                                                    if k != "seeds"}


def test_estimate_mi_population_takes_a_data_set_per_member_and_refuses_a_mismatch():
    sets = [correlated_gaussians(1000, 3, mi, seed=7) for mi in (0.2, 1.5)]
    x, y = torch.stack([s[0] for s in sets]), torch.stack([s[1] for s in sets])  # [2, N, 3]
    kw = dict(steps=40, hidden=(16, 16), permutations=10)
    together = ib.estimate_mi_population(x, y, seeds=(0, 1), **kw)
    for m in range(2):
        assert abs(together[m] - ib.estimate_mi(x[m], y[m], seed=m, **kw)) < 1e-5
    with pytest.raises(ConfigError, match="2 data sets .* for 3 seeds"):
        ib.estimate_mi_population(x, y, seeds=(0, 1, 2), **kw)
    with pytest.raises(ConfigError, match="at least one seed"):
        ib.estimate_mi_population(x, y, seeds=(), **kw)


class _GaussianCritic(torch.nn.Module):
    """The optimal critic of `correlated_gaussians`: T*(x, y) = log p(y | x) - log p(y), exactly."""

    def __init__(self, d: int, mi: float):
        super().__init__()
        self.rho = math.sqrt(1.0 - math.exp(-2.0 * mi / d))

    def _t(self, x, y):
        s2 = 1.0 - self.rho**2
        return -0.5 * ((y - self.rho * x) ** 2).sum(-1) / s2 - 0.5 * x.shape[-1] * math.log(s2) + 0.5 * (y**2).sum(-1)

    def pair_scores(self, x, z, zm):
        return self._t(x, z), self._t(x.repeat(len(zm) // len(x), 1), zm)


def test_jackknife_se_of_a_mean_is_the_spread_of_its_group_means():
    # Leaving group k out moves the mean by -(g_k - g)/(G - 1), so se^2 = sum_k (g_k - g)^2 / (G (G - 1)): the
    # standard error of the G group means (samples dealt i -> i mod G).
    t = torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    groups = t.view(10, 20).T.mean(1)  # sample i in group i mod 20
    expected = float(groups.var() / 20) ** 0.5
    assert jackknife_se(lambda keep: t[keep].mean(), 200) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(jackknife_se(lambda keep: t[keep].mean(), 1))


class _IndexCritic(torch.nn.Module):
    """Scores that name their pair: T(x_i, z_j) = sin(i) + 0.3 cos(3 j), with x and z holding the row indices."""

    def __init__(self):
        super().__init__()
        self.passes = []  # samples per pair_scores call

    def _t(self, x, z):
        return torch.sin(x[:, 0]) + 0.3 * torch.cos(3 * z[:, 0])

    def pair_scores(self, x, z, zm):
        self.passes.append(len(x))
        return self._t(x, z), self._t(x.repeat(len(zm) // len(x), 1), zm)


@pytest.mark.parametrize("batch_size, report_pairs", [(16, base.REPORT_PAIRS), (1024, 28)])
def test_estimate_groups_each_marginal_pair_with_its_x_row(batch_size, report_pairs, monkeypatch):
    # The jackknife drops a sample with its joint pair and its P marginal pairs (x_i, z_(i - s) mod n); over
    # uneven batches (16, 16, 16, 2), or (7, ..., 7, 1) where the pairs per pass are capped at 28 = 7 * (P + 1), a
    # misplaced marginal score changes the leave-one-group-out values.
    monkeypatch.setattr(base, "REPORT_PAIRS", report_pairs)
    n, p = 50, 3
    rows = torch.arange(n, dtype=torch.float64)
    critic = _IndexCritic()
    e = MINE(critic).estimate(rows[:, None], rows[:, None], batch_size=batch_size, permutations=p,
                              generator=torch.Generator().manual_seed(4))
    assert critic.passes == ([16, 16, 16, 2] if batch_size == 16 else [7] * 7 + [1])
    g = torch.Generator().manual_seed(4)
    shifts = [marginal_shift(n, g) for _ in range(p)]
    tj = torch.sin(rows) + 0.3 * torch.cos(3 * rows)  # [n]
    tm = torch.stack([torch.sin(rows) + 0.3 * torch.cos(3 * ((rows - s) % n)) for s in shifts], 1)  # [n, P]
    assert float(e) == pytest.approx(float(tj.mean() - log_mean_exp(tm)), abs=1e-12)
    expected = jackknife_se(lambda keep: tj[keep].mean() - log_mean_exp(tm[keep]), n)
    assert e.se == pytest.approx(expected, rel=1e-9) and e.se > 0


def test_estimate_standard_error_matches_the_spread_over_held_out_sets():
    # With the exact critic, the DV bound's only error is the held-out sample's: over 200 independent sets its
    # spread must match the jackknife se the estimates report. The sd of 200 values is known to about
    # 1/sqrt(398) = 5 % and the mean of 200 se's to about 1 %, so [0.8, 1.25] is a 4-sigma band.
    est = MINE(_GaussianCritic(5, 1.0))
    g = torch.Generator().manual_seed(0)
    values, ses = [], []
    for seed in range(200):
        x, y = correlated_gaussians(500, 5, 1.0, seed=seed + 1)
        e = est.estimate(x, y, permutations=10, generator=g)
        assert isinstance(e, MIEstimate) and e.interval()[0] < e < e.interval()[1]
        values.append(float(e))
        ses.append(e.se)
    spread = float(torch.tensor(values).std())
    assert 0.8 < sum(ses) / len(ses) / spread < 1.25, (sum(ses) / len(ses), spread)
    assert abs(sum(values) / len(values) - 1.0) < 4 * spread / 200**0.5  # the exact critic's DV is unbiased here


def test_estimate_mi_refuses_a_holdout_of_one_sample_before_training():
    x, y = correlated_gaussians(10, 2, 1.0)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="leaves 1 held-out sample of N=10"):
        ib.estimate_mi(x, y, steps=10_000, holdout=0.1)
    assert time.perf_counter() - start < 1.0  # checked before the critic's 10,000 steps


# The registry: classes, their recipe options and what the trainer and the monitor read from them.

ESTIMATOR_CLASSES = {
    # name: (label, upper_bound, needs_critic, loss_is_minus_penalty, recipe options with their defaults)
    "mine": ("MINE", False, True, True, {"ema_rate": 0.01, "marginals": 1}),
    "mine_f": ("MINE-f", False, True, True, {"marginals": 1}),
    "infonce": ("InfoNCE", False, True, True, {}),
    "smile": ("SMILE", False, True, False, {"tau": 5.0, "marginals": 1}),
    "jsd": ("JSD", False, True, False, {"marginals": 1}),
    "vib_kl": ("KL upper bound", True, False, False, {}),
    "pairwise_kl": ("pairwise KL bound", True, False, False, {}),
}


@pytest.mark.parametrize("name", ESTIMATORS.names())
def test_registered_class_attributes_and_options(name):
    assert name in ESTIMATOR_CLASSES, f"{name}: add it to ESTIMATOR_CLASSES"
    label, upper_bound, needs_critic, minus_penalty, options = ESTIMATOR_CLASSES[name]
    cls = ESTIMATORS.get(name)
    assert inspect.isclass(cls) and issubclass(cls, MIEstimator)
    assert (cls.label, cls.upper_bound, cls.needs_critic, cls.loss_is_minus_penalty) == (label, upper_bound,
                                                                                         needs_critic, minus_penalty)
    # The library's argument positional-only, the recipe's options keyword-only, annotated and defaulted.
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params if p.kind is p.POSITIONAL_ONLY] == ["critic" if needs_critic else "bottleneck"]
    assert {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY} == options
    assert list(ESTIMATORS.options(name)) == list(options)  # in this order in the resolved recipe
    hints = ESTIMATORS.option_hints(name)
    assert all(hints[o] is type(d) for o, d in options.items())
    built = ESTIMATORS.create(name, _ConstCritic() if needs_critic else "gaussian")
    assert type(built) is cls and built.label == label


def test_unknown_estimator_option_is_a_config_error_naming_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown option 'tau' for estimator 'mine'; valid: ema_rate, marginals"):
        ESTIMATORS.create("mine", _ConstCritic(), tau=3.0)
    with pytest.raises(ConfigError, match="unknown option 'marginals' for estimator 'infonce'; valid: \\(none\\)"):
        ESTIMATORS.create("infonce", _ConstCritic(), marginals=2)


def test_dv_bound_closed_form():
    t_joint = torch.tensor([1.0, 2.0, 3.0])
    t_marg = torch.tensor([0.0, math.log(3.0)])
    assert dv_bound(t_joint, t_marg).item() == pytest.approx(2.0 - math.log(2.0))


def test_log_mean_exp_is_finite_for_extreme_values():
    t = torch.tensor([1e4, -1e4, 0.0])
    assert log_mean_exp(t).item() == pytest.approx(1e4 - math.log(3.0))


def test_marginal_shift_has_no_fixed_points():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 64):
        for _ in range(50):
            assert 1 <= marginal_shift(n, g) <= n - 1


class _ConstCritic(torch.nn.Module):
    """A critic whose scores are set by the test: (t_joint, t_marginal) for pairs; the matrix `s` for all pairs."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.t = (torch.zeros(4), torch.zeros(4))
        self.s = torch.zeros(4, 4)

    def pair_scores(self, x, z, zm):  # the marginal scores repeat for each of P pairings, as a critic's would
        return self.t[0] + self.w, self.t[1].repeat(max(1, len(zm) // len(self.t[1]))) + self.w

    def scores(self, x, z):
        return self.s[: len(x), : len(z)] + self.w


def test_mine_moving_average_closed_form_and_state_dict():
    est = MINE(_ConstCritic(), ema_rate=0.25)
    est.critic.t = (torch.zeros(4), torch.full((4,), math.log(2.0)))  # E_Q[e^T] = 2
    est.loss(None, torch.zeros(4, 1))
    assert est.log_ema.item() == pytest.approx(math.log(2.0))  # first batch initialises the average
    est.critic.t = (torch.zeros(4), torch.full((4,), math.log(6.0)))  # E_Q[e^T] = 6
    est.loss(None, torch.zeros(4, 1))
    assert math.exp(est.log_ema.item()) == pytest.approx(0.75 * 2 + 0.25 * 6)
    state = est.state_dict()
    assert "log_ema" in state and "ema_steps" in state and int(state["ema_steps"]) == 2
    fresh = MINE(_ConstCritic(), ema_rate=0.25)
    fresh.load_state_dict(state)
    assert fresh.log_ema.item() == pytest.approx(est.log_ema.item())


def test_mine_gradient_is_bias_corrected_by_the_moving_average():
    """d/dw of the surrogate = E_P[dT] - E_Q[e^T dT] / ema: with T = t + w, that is 1 - E_Q[e^T] / ema."""
    est = MINE(_ConstCritic(), ema_rate=0.5)
    est.critic.t = (torch.zeros(4), torch.zeros(4))  # E_Q[e^T] = 1
    est.loss(None, torch.zeros(4, 1))
    est.critic.t = (torch.zeros(4), torch.full((4,), math.log(3.0)))  # E_Q[e^T] = 3; ema becomes 0.5 + 1.5 = 2
    est.critic.w.grad = None
    est.loss(None, torch.zeros(4, 1)).backward()  # loss = -surrogate
    assert est.critic.w.grad.item() == pytest.approx(-(1.0 - 3.0 / 2.0))
    # the plain minibatch DV gradient would be 1 - 3/3 = 0: the correction is what makes it non-zero here


def test_mine_moving_average_and_penalty_need_no_host_sync():
    """MINE decides on the device whether its average has started and whether a batch is finite: nothing in
    _update_ema or penalty reads a value back to the host (item/bool/int all go through _local_scalar_dense)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class NoHostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            assert func is not torch.ops.aten._local_scalar_dense.default, "a host sync"
            return func(*args, **(kwargs or {}))

    est = MINE(_ConstCritic(), ema_rate=0.25)
    t_joint, t_marginal = torch.zeros(4), torch.full((4,), math.log(2.0))
    est.scores = lambda x, z: (t_joint, t_marginal)  # (the marginal shift is drawn on the CPU: not this test's)
    with NoHostReads():
        dv = est.penalty(None, None)  # no average yet: the plain DV bound, -log 2
        est._update_ema(torch.tensor(math.log(2.0)))  # starts the average
        est._update_ema(torch.tensor(math.nan))  # ignored
        est._update_ema(torch.tensor(-math.inf))  # ignored
        est._update_ema(torch.tensor(math.log(6.0)))
        surrogate = est.penalty(None, None)
    assert float(dv) == pytest.approx(-math.log(2.0))
    assert int(est.ema_steps) == 2 and math.exp(float(est.log_ema)) == pytest.approx(0.75 * 2 + 0.25 * 6)
    log_ema = math.log(3.0)
    assert float(surrogate) == pytest.approx(0.0 - math.exp(math.log(2.0) - log_ema) + 1.0 - log_ema)


def test_mine_penalty_before_any_update_has_the_plain_dv_gradient():
    """Before the average starts, the penalty is the plain DV bound, chosen by torch.where: its gradient is DV's,
    with nothing leaking from the unused surrogate branch even when that branch's exponent is past the cap."""
    est = MINE(_ConstCritic())
    t_joint = torch.tensor([0.5, 1.0, 1.5, 2.0], requires_grad=True)
    t_marginal = torch.tensor([40.0, 41.0, 39.0, 42.0], requires_grad=True)  # exp(lme - 0) past EXP_CAP = 30
    est.scores = lambda x, z: (t_joint, t_marginal)
    value = est.penalty(None, None)
    value.backward()
    tj, tm = t_joint.detach().requires_grad_(), t_marginal.detach().requires_grad_()
    dv_bound(tj, tm).backward()
    assert torch.isfinite(value) and float(value.detach()) == pytest.approx(float(dv_bound(tj, tm).detach()))
    torch.testing.assert_close(t_joint.grad, tj.grad)
    torch.testing.assert_close(t_marginal.grad, tm.grad)


def test_penalty_does_not_update_the_moving_average():
    est = MINE(_ConstCritic())
    est.loss(None, torch.zeros(4, 1))
    before = est.log_ema.clone(), est.ema_steps.clone()
    est.critic.t = (torch.zeros(4), torch.full((4,), 5.0))
    est.penalty(None, torch.zeros(4, 1))
    assert torch.equal(before[0], est.log_ema) and torch.equal(before[1], est.ema_steps)


@pytest.mark.parametrize("name", CRITIC_BASED)
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_estimators_stay_finite_on_extreme_critic_outputs(name, scale):
    critic = _ConstCritic()
    critic.t = (torch.full((4,), scale), torch.tensor([scale, -scale, 0.0, scale]))
    critic.s = torch.tensor([[scale, -scale, 0.0, scale]] * 4)  # rows mix +-1e4; the diagonal is the joint pairs
    est = ESTIMATORS.create(name, critic)
    x, z = torch.zeros(4, 1), torch.zeros(4, 1)
    for _ in range(3):
        critic.w.grad = None
        loss = est.loss(x, z)
        assert torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(critic.w.grad)
    penalty = est.penalty(x, z)
    assert torch.isfinite(penalty)
    penalty.backward()
    assert torch.isfinite(critic.w.grad)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # InfoNCE at its ceiling
        assert math.isfinite(est.estimate(x, z, permutations=2))
    for buffer in est.buffers():  # MINE's moving average
        assert torch.isfinite(buffer).all()


def test_mine_penalty_against_a_stale_average_stays_finite():
    # The average is set on mild scores; the penalty then meets scores 1e4 above it, where e^(lme - log_ema)
    # overflows float32: exp_capped keeps the value and the gradient finite (the tangent beyond the cap).
    est = MINE(_ConstCritic())
    est.loss(None, torch.zeros(4, 1))  # log_ema = 0
    est.critic.t = (torch.zeros(4), torch.full((4,), 1e4))
    penalty = est.penalty(None, torch.zeros(4, 1))
    penalty.backward()
    cap = math.exp(30.0)
    torch.testing.assert_close(penalty, torch.tensor(-cap * (1.0 + 1e4 - 30.0) + 1.0))
    # dE_P/dw - d(tangent)/dw; float32 scores near 1e4 carry a rounding of 5e-4 into logsumexp's weights
    torch.testing.assert_close(est.critic.w.grad, torch.tensor(1.0 - cap), rtol=1e-3, atol=0.0)


def test_exp_capped_is_exp_below_the_cap_and_its_tangent_above():
    u = torch.tensor([-50.0, 0.0, 10.0, 29.0], requires_grad=True)
    torch.testing.assert_close(exp_capped(u), u.detach().exp())
    big = torch.tensor([40.0, 1e4], requires_grad=True)
    out = exp_capped(big, cap=30.0)
    torch.testing.assert_close(out, math.exp(30.0) * (1 + big.detach() - 30.0))
    out.sum().backward()
    torch.testing.assert_close(big.grad, torch.full((2,), math.exp(30.0)))
    # At the cap itself: e^cap, with the gradient e^cap (not clamp's 0 at its boundary); a continuous slope across it.
    at = torch.tensor([29.999, 30.0, 30.001], dtype=torch.float64, requires_grad=True)
    exp_capped(at).sum().backward()
    expected = torch.tensor([math.exp(-0.001), 1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(at.grad / math.exp(30.0), expected)
    torch.testing.assert_close(exp_capped(torch.tensor(30.0)), torch.tensor(math.exp(30.0)))


def test_mine_f_bound_closed_form():
    """E_P[T] - E_Q[e^(T-1)]: unchanged by the logsumexp form for ordinary scores."""
    est = MINEf(_ConstCritic())
    est.critic.t = (torch.tensor([1.0, 3.0]), torch.tensor([0.0, math.log(3.0)]))  # E_Q[e^T] = 2
    assert (-est.loss(None, torch.zeros(2, 1))).item() == pytest.approx(2.0 - 2.0 / math.e)


def test_jsd_trains_on_js_and_reports_dv():
    """The loss's value is minus the DV bound (what the trainer logs); its gradient is that of minus JS."""
    est = ESTIMATORS.create("jsd", _ConstCritic())
    t_joint, t_marg = torch.tensor([2.0, 1.0, 3.0, 0.5]), torch.tensor([-1.0, 0.0, 0.5, -2.0])
    est.critic.t = (t_joint, t_marg)
    loss = est.loss(None, torch.zeros(4, 1))
    assert loss.item() == pytest.approx(-dv_bound(t_joint, t_marg).item(), abs=1e-6)
    loss.backward()
    w = torch.zeros((), requires_grad=True)
    (-js_objective(t_joint + w, t_marg + w)).backward()
    assert est.critic.w.grad.item() == pytest.approx(w.grad.item(), abs=1e-6)
    assert not est.loss_is_minus_penalty


def test_smile_clips_the_partition_term_at_tau():
    t_joint, t_marg = torch.tensor([1.0, 2.0]), torch.tensor([-9.0, 8.0])
    expected = 1.5 - math.log((math.exp(-3.0) + math.exp(3.0)) / 2)  # e^T clipped to [e^-3, e^3]
    assert clipped_dv(t_joint, t_marg, tau=3.0).item() == pytest.approx(expected, rel=1e-6)
    est = ESTIMATORS.create("smile", _ConstCritic(), tau=3.0)
    est.critic.t = (t_joint, t_marg)
    assert est.penalty(None, torch.zeros(2, 1)).item() == pytest.approx(expected, rel=1e-6)
    assert est.estimate(torch.zeros(2, 1), torch.zeros(2, 1), permutations=1) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ConfigError, match="tau"):
        ESTIMATORS.create("smile", _ConstCritic(), tau=0.0)


def test_infonce_bound_closed_form():
    s = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    rows = [2.0 - math.log((math.e**2 + 1) / 2), 1.0 - math.log(math.e)]
    assert infonce_bound(s).item() == pytest.approx(sum(rows) / 2, rel=1e-6)


class _MatchCritic(torch.nn.Module):
    """T(x, z) = -scale * |x - z|^2: with z = x, a perfect critic, so InfoNCE sits at its ceiling log B."""

    def __init__(self, scale=1e4):
        super().__init__()
        self.scale = scale

    def scores(self, x, z):
        return -self.scale * torch.cdist(x, z).pow(2)  # [B, M]


def test_infonce_held_out_estimate_is_blockwise_and_warns_at_its_ceiling():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    est = InfoNCE(_MatchCritic())
    with pytest.warns(CeilingWarning, match="ceiling"):
        value = est.estimate(x, x, batch_size=64)  # 200 samples in 4 blocks of 50
    assert value == pytest.approx(math.log(50), abs=1e-3) and value <= math.log(50) + 1e-6
    scores = -1e4 * torch.cdist(x[:50], x[:50]).pow(2)
    torch.testing.assert_close(torch.tensor(value), infonce_bound(scores), atol=1e-3, rtol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # far from the ceiling: no warning
        assert InfoNCE(_MatchCritic(scale=0.01)).estimate(x, x, batch_size=64) < 1.0


def test_infonce_respects_its_ceiling_at_10_nats():
    """Trained on 10 nats with batch 64, InfoNCE reads at most log B; in blocks of 16 it sits at log 16 and warns."""
    torch.manual_seed(0)
    critic = CRITICS.create("separable", (20,), 20, hidden=(128,), embed_dim=32, activation="relu")
    est = ESTIMATORS.create("infonce", critic)
    opt = torch.optim.Adam(est.parameters(), lr=2e-3)
    for step in range(300):
        x, y = correlated_gaussians(64, 20, 10.0, seed=step)
        opt.zero_grad()
        est.loss(x, y).backward()
        opt.step()
    x, y = correlated_gaussians(640, 20, 10.0, seed=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = est.estimate(x, y, batch_size=64)  # measured: 4.00
    assert math.log(64) - 0.3 < value <= math.log(64) + 1e-6
    with pytest.warns(CeilingWarning, match="ceiling"):
        value = est.estimate(x, y, batch_size=16)
    assert math.log(16) - 0.1 < value <= math.log(16) + 1e-6


def test_estimate_mi_warns_when_its_report_reaches_log_n():
    """y = x + 1e-3 noise in d = 4 (about 28 nats) with 40 held-out samples: the critic's report reads above
    log 40 = 3.69 (measured: jsd 7.58, se 0.35), which no bound from 40 samples can certify; a CeilingWarning says
    so, naming N and log N. At 1 nat with 400 held-out samples (log N = 5.99) there is none."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 4, generator=g)
    y = x + 1e-3 * torch.randn(400, 4, generator=g)
    small = dict(steps=600, batch_size=64, hidden=(64, 64))
    with pytest.warns(CeilingWarning, match=r"log\(N\) = 3\.689.* N = 40 samples"):
        value = ib.estimate_mi(x, y, "jsd", holdout=0.1, **small)
    assert value > math.log(40)
    with pytest.warns(CeilingWarning, match="N = 40 samples"):
        ib.estimate_mi_population(x, y, "jsd", seeds=(0,), holdout=0.1, **small)
    x, y = correlated_gaussians(2000, 4, 1.0, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ib.estimate_mi(x, y, "jsd", steps=100, batch_size=64, hidden=(32, 32)) < 1.5


def test_ceiling_warning_starts_a_tenth_of_a_nat_below_log_n_and_leaves_infonce_to_its_own():
    from ib.estimators.estimate import _warn_near_ceiling

    ceiling = math.log(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_near_ceiling(MIEstimate(ceiling - 0.11, 0.1), 40, "mine")
        _warn_near_ceiling(MIEstimate(ceiling + 5.0, 0.1), 40, "infonce")  # InfoNCE warns at its block's ceiling
    for value in (ceiling - 0.09, ceiling + 5.0):
        with pytest.warns(CeilingWarning, match=r"\(se 0\.100\)"):
            _warn_near_ceiling(MIEstimate(value, 0.1), 40, "smile")


# Measured with estimate_mi(steps=800, marginals=1, batch 128, 6,400 training and 1,600 held-out samples; 2 seeds),
# true MI 2 nats in d = 20: mine 1.77 / 1.78, mine_f 1.70 / 1.70, infonce 1.60 / 1.60, smile 1.79 / 1.83,
# jsd 1.77 / 1.79. All read low (lower bounds with a finite critic); the tolerance is about 0.1 nats more than
# the larger error measured, and an estimate may exceed the truth by at most 0.15 (sampling error of the bound).
# mine is checked with its defaults by test_estimate_mi_on_gaussians.
@pytest.mark.parametrize("name,tolerance", [("mine_f", 0.4), ("infonce", 0.5), ("smile", 0.35), ("jsd", 0.35)])
def test_each_estimator_on_gaussians_at_2_nats(name, tolerance):
    assert sorted(CRITIC_BASED) == ["infonce", "jsd", "mine", "mine_f", "smile"]  # a new estimator needs a case here
    x, y = correlated_gaussians(8000, 20, 2.0)
    est = ib.estimate_mi(x, y, estimator=name, steps=800, marginals=1, batch_size=128, seed=0)
    assert 2.0 - tolerance < est < 2.15, f"{name}: {est:.3f} vs true 2"


def test_estimate_mi_with_a_separable_critic_and_rejects_vib_kl():
    x, y = correlated_gaussians(2000, 4, 1.0)
    assert 0.5 < ib.estimate_mi(x, y, estimator="mine", critic="separable", steps=300, seed=0) < 1.15
    with pytest.raises(ConfigError, match="vib_kl"):
        ib.estimate_mi(x, y, estimator="vib_kl")
    with pytest.raises(ConfigError, match="critic"):
        ib.estimate_mi(x, y, critic="deep")


def test_held_out_estimate_uses_eval_mode_and_restores_it():
    critic = CRITICS.create("joint", (3,), 2, hidden=(8,), input_noise=0.5, hidden_noise=0.5)
    est = ESTIMATORS.create("mine", critic)
    x, z = torch.randn(50, 3), torch.randn(50, 2)
    a = est.estimate(x, z, generator=torch.Generator().manual_seed(0))
    b = est.estimate(x, z, generator=torch.Generator().manual_seed(0))
    assert a == b  # no noise layers at evaluation
    assert critic.training
