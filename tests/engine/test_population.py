"""A population trained by `population_step` equals its members' separate runs under `train_step`."""
import pytest
import torch

from ib.engine.population import build_population, population_step
from ib.engine.step import train_step
from ib.estimators import ESTIMATORS
from ib.models.classifier import build_classifier
from ib.models.critics import CRITICS

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py

S, B, STEPS = 3, 16, 4
BETAS = (0.0, 1e-2, 0.3)  # beta = 0 skips the penalty (and its draws) in its separate run


def _member(seed, estimator, marginals=1):
    torch.manual_seed(seed)
    model = build_classifier("mlp", {"hidden": [32, 32], "activation": "elu"}, "gaussian",
                             {"z_dim": 8, "std_offset": 2.0}, (1, 8, 8), 10, [0.5], [0.25])
    if estimator == "none":
        est = None
    elif estimator == "vib_kl":
        est = ESTIMATORS.create("vib_kl", "gaussian")
    else:
        critic = CRITICS.create("joint", (1, 8, 8), 8, hidden=(24, 24), activation="elu", input_noise=0.3,
                                hidden_noise=0.5)
        est = ESTIMATORS.create(estimator, critic, **({"marginals": marginals} if marginals > 1 else {}))
    return model, est, torch.get_rng_state()


def _optimizer(kind):
    """Adam, or SGD with momentum. Adam divides each gradient by its own running scale, which turns a gradient that
    is zero up to rounding into steps of about lr: the output bias of an InfoNCE critic (the bound ignores a shift of
    every score) and of a MINE critic at its first step (where the moving average equals the batch's value). Its
    rounding then differs between the batched and the separate products, as it would between two CPUs. The critics'
    tests use SGD, whose steps are linear in the gradient and keep rounding at rounding's size."""
    if kind == "adam":
        return lambda params: torch.optim.Adam(params, lr=1e-2, foreach=False)
    return lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, foreach=False)


def _batches(seed):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(B, 1, 8, 8, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(STEPS)]


@pytest.mark.parametrize("estimator, kind, fused, marginals", [
    ("mine", "sgd", False, 1), ("mine", "sgd", True, 1), ("mine", "sgd", False, 3), ("mine", "sgd", True, 3),
    ("infonce", "sgd", False, 1), ("infonce", "sgd", True, 1), ("vib_kl", "adam", False, 1),
    ("vib_kl", "sgd", False, 1), ("none", "adam", False, 1)])
def test_population_step_equals_separate_steps(estimator, kind, fused, marginals):
    """marginals = 3: each member's three distinct shifts of a step, drawn from its own stream."""
    make = _optimizer(kind)
    data = [_batches(100 + m) for m in range(S)]  # each member its own batches
    separate, metrics = [], []
    for m in range(S):
        model, est, _ = _member(m, estimator, marginals)
        opt = make(model.parameters())
        critic_opt = make(est.parameters()) if est is not None and list(est.parameters()) else None
        rows = []
        for x, y in data[m]:
            rows.append(train_step(model, est, opt, critic_opt, x, y, BETAS[m], grad_clip=1.0, critic_grad_clip=5.0,
                                   fused=fused))
        separate.append((model, est, torch.get_rng_state()))
        metrics.append(rows)

    members = [_member(m, estimator, marginals) for m in range(S)]
    pop = build_population([m[0] for m in members], [m[1] for m in members], make, make, [m[2] for m in members])
    rows = []
    for step in range(STEPS):
        x = torch.stack([data[m][step][0] for m in range(S)])
        y = torch.stack([data[m][step][1] for m in range(S)])
        rows.append(population_step(pop, x, y, BETAS, grad_clip=1.0, critic_grad_clip=5.0, fused=fused))

    for m, (model, est, rng) in enumerate(separate):
        got = pop.model.member_state(m)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"member {m}: {name}")
        if pop.estimator is not None:
            got = pop.estimator.member_state(m)
            for name, value in est.state_dict().items():  # the critic and MINE's moving average
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"member {m}: {name}")
        assert torch.equal(pop.rng_states[m], rng)  # every draw of the separate run, and no other
        for step in range(STEPS):
            for key in ("loss", "ce", "mi_bound"):
                torch.testing.assert_close(rows[step][key][m], metrics[m][step][key].float(), rtol=1e-5, atol=1e-6,
                                           equal_nan=True, msg=f"member {m} step {step}: {key}")
            assert int(rows[step]["correct"][m]) == int(metrics[m][step]["correct"])
            assert bool(rows[step]["finite"][m])


@pytest.mark.parametrize("fused", [False, True])
def test_a_member_whose_step_is_not_finite_skips_it_alone(fused):
    """Member 1's second batch holds a NaN: its separate run skips that step (weights, momentum, MINE's average
    kept), and so does the population, while the other members step as their separate runs do."""
    make = _optimizer("sgd")
    data = [_batches(100 + m) for m in range(S)]
    data[1][1][0][0, 0, 0, 0] = float("nan")
    separate, finite = [], []
    for m in range(S):
        model, est, _ = _member(m, "mine")
        opt, critic_opt = make(model.parameters()), make(est.parameters())
        finite.append([bool(train_step(model, est, opt, critic_opt, x, y, BETAS[m], fused=fused)["finite"])
                       for x, y in data[m]])
        separate.append((model, est))
    assert finite[1] == [True, False, True, True] and all(finite[0]) and all(finite[2])
    members = [_member(m, "mine") for m in range(S)]
    pop = build_population([m[0] for m in members], [m[1] for m in members], make, make, [m[2] for m in members])
    for step in range(STEPS):
        out = population_step(pop, torch.stack([data[m][step][0] for m in range(S)]),
                              torch.stack([data[m][step][1] for m in range(S)]), BETAS, fused=fused)
        assert out["finite"].tolist() == [finite[m][step] for m in range(S)]
    for m, (model, est) in enumerate(separate):
        for stacked, module in ((pop.model, model), (pop.estimator, est)):
            got = stacked.member_state(m)
            for name, value in module.state_dict().items():
                torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"member {m}: {name}")
