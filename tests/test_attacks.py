"""Attacks against linear classifiers, where the worst perturbation is known in closed form.

For logits W x + b, the margin of class y over class j is m_j = (w_y - w_j) . x + b_y - b_j. Inside the box (no
clipping) the strongest L-inf perturbation of radius eps lowers m_j by eps * ||w_y - w_j||_1 (each pixel moves by
eps against sign(w_y - w_j)), the strongest L2 one by eps * ||w_y - w_j||_2. A sample survives the worst case iff
every m_j stays positive. The data keep x in [0.2, 0.8], so with eps <= 0.2 clipping never binds, and drop the few
samples whose worst margin lies within a small gap of 0, so that the analytic accuracy is unambiguous.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ib.attacks import (checkpoints, classification_loss, fgsm, gaussian_noise, mean_code_loss, pgd, project,
                        sampled_loss, targeted_pgd, wrong_classes)
from ib.models.classifier import build_classifier

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


D = 4  # few pixels: the margins are comparable to the radii, so the worst case is neither 0 nor 1


class Linear(nn.Module):
    """A linear classifier with the `forward(x, sample)` of `IBClassifier` (deterministic)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)

    def forward(self, x: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return x.flatten(1) @ self.weight.T + self.bias


def _linear_problem(classes: int, eps_list, p: float, seed: int = 0, n: int = 4000, gap: float = 0.05):
    """A linear model and data on which the worst-case accuracy at every eps of `eps_list` is clear-cut."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, D, generator=g)
    x = 0.2 + 0.6 * torch.rand(n, D, generator=g)
    b = -(x.mean(0) @ w.T)  # centre the classes on the data
    y = (x @ w.T + b).argmax(1)  # the model is right on every sample; the attack decides what remains
    margins, norms = _margins(w, b, x, y, p)  # [N, classes - 1] each
    keep = torch.ones(n, dtype=torch.bool)
    for eps in eps_list:
        keep &= ((margins - eps * norms).abs() > gap).all(1)
    return Linear(w, b), x[keep], y[keep]


def _margins(w, b, x, y, p):
    """m_j and ||w_y - w_j||_p for every wrong class j, [N, classes - 1]."""
    logits = x @ w.T + b
    dw = w[y].unsqueeze(1) - w.unsqueeze(0)  # [N, classes, D]
    m = logits.gather(1, y[:, None]) - logits  # [N, classes]
    norms = dw.abs().sum(-1) if p == 1 else dw.norm(dim=-1)
    others = torch.ones_like(m, dtype=torch.bool).scatter_(1, y[:, None], False)
    return m[others].view(len(y), -1), norms[others].view(len(y), -1)


def _analytic_accuracy(model, x, y, eps, p):
    margins, norms = _margins(model.weight.detach(), model.bias.detach(), x, y, p)
    return float(((margins - eps * norms) > 0).all(1).float().mean())


def _accuracy(model, x, y):
    with torch.no_grad():
        return float((model(x, sample=False).argmax(1) == y).float().mean())


EPS = (0.02, 0.05, 0.1)


@pytest.mark.parametrize("eps", EPS)
def test_fgsm_reaches_the_analytic_worst_case_of_a_binary_linear_model(eps):
    # Two classes: the cross-entropy gradient points along w_j - w_y, so one signed step of size eps is optimal.
    model, x, y = _linear_problem(2, EPS, p=1)
    x_adv = fgsm(mean_code_loss(model), x, y, eps)
    expected = _analytic_accuracy(model, x, y, eps, p=1)
    assert 0.05 < expected < 0.95  # the case is not trivial
    assert _accuracy(model, x_adv, y) == pytest.approx(expected, abs=1e-9)
    assert (x_adv - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
@pytest.mark.parametrize("eps", EPS)
def test_pgd_linf_reaches_the_analytic_worst_case_of_a_binary_linear_model(eps, schedule):
    model, x, y = _linear_problem(2, EPS, p=1)
    torch.manual_seed(0)
    x_adv = pgd(mean_code_loss(model), x, y, eps, norm="linf", steps=20, schedule=schedule)
    expected = _analytic_accuracy(model, x, y, eps, p=1)
    assert 0.05 < expected < 0.95
    assert _accuracy(model, x_adv, y) == pytest.approx(expected, abs=1e-9)
    assert (x_adv - x).abs().max() <= eps + 1e-6


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
@pytest.mark.parametrize("eps", [0.1, 0.2])
def test_pgd_l2_reaches_the_closed_form_margin_over_norm(eps, schedule):
    # L2: a sample falls iff its margin m < eps * ||w_y - w_j||_2 (its distance to the boundary is m / ||.||_2).
    model, x, y = _linear_problem(2, (0.1, 0.2), p=2)
    torch.manual_seed(0)
    x_adv = pgd(mean_code_loss(model), x, y, eps, norm="l2", steps=20, schedule=schedule)
    expected = _analytic_accuracy(model, x, y, eps, p=2)
    assert 0.05 < expected < 0.95
    assert _accuracy(model, x_adv, y) == pytest.approx(expected, abs=1e-9)
    assert (x_adv - x).flatten(1).norm(dim=1).max() <= eps + 1e-5


# Measured shortfall of PGD (50 steps, 2 restarts) from the analytic worst-case accuracy on the 4-class problem.
SHORTFALL = {"ce": {("linf", 0.02): 0.0, ("linf", 0.05): 0.008, ("linf", 0.1): 0.063, ("l2", 0.1): 0.007,
                    ("l2", 0.2): 0.028},
             "margin": {("linf", 0.02): 0.0, ("linf", 0.05): 0.0, ("linf", 0.1): 0.017, ("l2", 0.1): 0.002,
                        ("l2", 0.2): 0.017}}


@pytest.mark.parametrize("kind", ["ce", "margin"])
@pytest.mark.parametrize("norm, p, eps", [("linf", 1, 0.02), ("linf", 1, 0.05), ("linf", 1, 0.1), ("l2", 2, 0.1),
                                          ("l2", 2, 0.2)])
def test_pgd_on_a_multiclass_linear_model_is_bounded_by_the_analytic_worst_case(kind, norm, p, eps):
    """With four classes PGD never beats the optimum (it stays in the ball) but may fall short of it: the
    cross-entropy gradient mixes the wrong classes, and the margin follows the strongest one, which is not always the
    one that can win. Only a targeted attack per class is exact here; `SHORTFALL` records how far each loss stays."""
    eps_list = EPS if norm == "linf" else (0.1, 0.2)
    model, x, y = _linear_problem(4, eps_list, p=p)
    torch.manual_seed(0)
    x_adv = pgd(mean_code_loss(model, kind), x, y, eps, norm=norm, steps=50, restarts=2,
                correct_fn=lambda xa, ya: model(xa).argmax(1) == ya)
    expected = _analytic_accuracy(model, x, y, eps, p=p)
    assert expected - 1e-9 <= _accuracy(model, x_adv, y) <= expected + SHORTFALL[kind][(norm, eps)] + 0.005


def test_adaptive_checkpoints_are_the_papers():
    # Croce & Hein 2020, section 3.2: p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of the steps.
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [] and checkpoints(10) == [3, 5, 6, 7, 8, 9]


def test_adaptive_schedule_halves_its_step_onto_an_interior_maximum():
    """Loss -||x - c||^2 with its maximum c inside the ball: sign steps of fixed length h end oscillating around c,
    so the best iterate stays up to h/2 from it per pixel when c falls between the grid points x + k h; the adaptive
    schedule sees the loss stop rising, halves its step at its checkpoints and ends within its last step length,
    2 eps / 2^8 after 8 halvings, of c (deterministic: no random start)."""
    eps, steps = 0.3, 100
    h = 2.5 * eps / steps
    x = torch.full((4, 8), 0.5)
    c = x + (22.5 * h) * torch.tensor([1.0, -1.0]).repeat(4)  # halfway between two points of the fixed grid
    loss = lambda xa, ya: -((xa - c) ** 2).sum(1)  # noqa: E731
    y = torch.zeros(4, dtype=torch.long)
    fixed = pgd(loss, x, y, eps, steps=steps, random_start=False, schedule="fixed")
    adaptive = pgd(loss, x, y, eps, steps=steps, random_start=False, schedule="adaptive")
    assert (fixed - c).abs().max() == pytest.approx(h / 2, rel=1e-4)
    assert (adaptive - c).abs().max() < 2 * eps / 2**8 < h / 2


@pytest.mark.parametrize("schedule", ["fixed", "adaptive"])
@pytest.mark.parametrize("norm, p, eps", [("linf", 1, 0.05), ("linf", 1, 0.1), ("l2", 2, 0.2)])
def test_targeted_pgd_toward_every_wrong_class_is_exact_on_a_multiclass_linear_model(norm, p, eps, schedule):
    """Toward one target j the targeted margin is linear, so one signed (or normalised) step sequence reaches its
    closed-form minimum m_j - eps ||w_y - w_j||_p; after all 3 targets the accuracy is the analytic worst case, which
    the untargeted attacks above miss by up to `SHORTFALL`."""
    eps_list = EPS if norm == "linf" else (0.1, 0.2)
    model, x, y = _linear_problem(4, eps_list, p=p)
    correct = lambda xa, ya: model(xa).argmax(1) == ya  # noqa: E731
    torch.manual_seed(0)
    untargeted = pgd(mean_code_loss(model), x, y, eps, norm=norm, steps=20, correct_fn=correct, schedule=schedule)
    ranking = wrong_classes(model(x).softmax(1), y)
    x_adv = targeted_pgd(lambda t: mean_code_loss(model, target=t), x, y, eps, untargeted, ranking, targets=3,
                         correct_fn=correct, norm=norm, steps=20, schedule=schedule)
    expected = _analytic_accuracy(model, x, y, eps, p=p)
    assert _accuracy(model, untargeted, y) >= expected
    assert _accuracy(model, x_adv, y) == pytest.approx(expected, abs=1e-9)
    assert (x_adv - x).flatten(1).norm(p=float("inf") if norm == "linf" else 2, dim=1).max() <= eps + 1e-5


def test_targets_rank_the_wrong_classes_and_a_target_count_beyond_them_raises():
    probs = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    y = torch.tensor([1, 0])
    assert wrong_classes(probs, y).tolist() == [[2, 0], [2, 1]]
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert classification_loss(logits, torch.tensor([0]), "ce", torch.tensor([2])).tolist() == [-2.0]
    model, x, y = _linear_problem(3, EPS, p=1, n=50)
    with pytest.raises(ValueError, match="targets must be at most the 2 wrong classes"):
        targeted_pgd(lambda t: mean_code_loss(model, target=t), x, y, 0.1, x, wrong_classes(model(x), y),
                     targets=3, correct_fn=lambda xa, ya: model(xa).argmax(1) == ya)


def test_margin_loss_is_positive_exactly_when_misclassified():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 5.0]])
    y = torch.tensor([0, 0, 2])
    assert classification_loss(logits, y, "margin").tolist() == [-1.0, 3.0, -4.0]
    assert torch.allclose(classification_loss(logits, y, "ce"), F.cross_entropy(logits, y, reduction="none"))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_iterates_stay_in_the_ball_and_the_unit_box(norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 3))
    forward = lambda x, sample=True: model(x)  # noqa: E731
    x = torch.rand(64, 1, 4, 4)  # the whole [0, 1] range: clipping binds
    x[:8] = 0.0
    x[8:16] = 1.0
    y = torch.randint(0, 3, (64,))
    eps = 0.3

    def loss(xa, ya):
        return F.cross_entropy(forward(xa), ya, reduction="none")

    x_adv = pgd(loss, x, y, eps, norm=norm, steps=10, restarts=3)
    assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
    dist = (x_adv - x).flatten(1).abs().amax(1) if norm == "linf" else (x_adv - x).flatten(1).norm(dim=1)
    assert dist.max() <= eps + 1e-5
    assert project(x + 5.0, x, eps, norm).max() <= 1.0


@pytest.mark.parametrize("attack", ["fgsm", "pgd_linf", "pgd_l2", "noise"])
def test_radius_zero_returns_the_input(attack):
    model, x, y = _linear_problem(3, EPS, p=1, n=200)
    loss = mean_code_loss(model)
    run = {"fgsm": lambda: fgsm(loss, x, y, 0.0), "pgd_linf": lambda: pgd(loss, x, y, 0.0, steps=3),
           "pgd_l2": lambda: pgd(loss, x, y, 0.0, norm="l2", steps=3), "noise": lambda: gaussian_noise(x, 0.0)}
    out = run[attack]()
    assert torch.equal(out, x)


def test_gradients_reach_the_input_only_even_under_inference_mode():
    model, x, y = _linear_problem(3, EPS, p=1, n=200)
    with torch.inference_mode():
        x_inf = x.clone()
        x_adv = pgd(mean_code_loss(model), x_inf, y, 0.1, steps=3)
    assert all(p.grad is None for p in model.parameters())
    assert not torch.equal(x_adv, x)


def test_restarts_keep_the_worst_case_per_sample():
    """With a loss whose landscape has one good and one bad basin per sample, more restarts never do worse."""
    torch.manual_seed(0)
    model, x, y = _linear_problem(4, EPS, p=1)

    def correct(xa, ya):
        return model(xa).argmax(1) == ya

    # Few steps of small size: single runs fall short; each restart adds chances per sample.
    kwargs = dict(norm="linf", steps=2, step_size=0.02, correct_fn=correct)
    torch.manual_seed(1)
    one = _accuracy(model, pgd(mean_code_loss(model), x, y, 0.1, restarts=1, **kwargs), y)
    torch.manual_seed(1)
    many = _accuracy(model, pgd(mean_code_loss(model), x, y, 0.1, restarts=8, **kwargs), y)
    assert many < one


def test_eot_beats_a_single_noisy_gradient_on_a_very_stochastic_encoder():
    """With a very noisy code one sampled gradient is mostly noise; averaged over draws (EOT-PGD: `pgd` on
    `sampled_loss(model, samples)`) it finds the way."""
    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (32,)}, "gaussian", {"z_dim": 8, "std_offset": -1.0},
                             in_shape=(1, 4, 4), num_classes=3, mean=(0.5,), std=(0.25,))  # std ~ 1.3
    model.eval()
    x = torch.rand(500, 1, 4, 4)
    with torch.no_grad():
        y = model.predict_proba(x, samples=256).argmax(1)  # labels the model gets right on average

    def accuracy(x_adv):
        torch.manual_seed(123)
        with torch.no_grad():
            return float((model.predict_proba(x_adv, samples=256).argmax(1) == y).float().mean())

    torch.manual_seed(1)
    single = accuracy(pgd(sampled_loss(model, 1), x, y, 0.1, steps=3))
    torch.manual_seed(1)
    eot = accuracy(pgd(sampled_loss(model, 64), x, y, 0.1, steps=3))
    assert eot < single - 0.03, (eot, single)  # measured: 0.388 against 0.446


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), True, "0.1"])
def test_bad_radius_raises(bad):
    model, x, y = _linear_problem(2, EPS, p=1, n=50)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd(mean_code_loss(model), x, y, bad)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        fgsm(mean_code_loss(model), x, y, bad)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        gaussian_noise(x, bad)


@pytest.mark.parametrize("setting", [dict(steps=0), dict(steps=2.0), dict(restarts=0), dict(restarts=True),
                                     dict(schedule="apgd")])
def test_bad_step_or_restart_count_raises(setting):
    model, x, y = _linear_problem(2, EPS, p=1, n=50)
    with pytest.raises(ValueError, match=f"{next(iter(setting))} must be (a positive integer|'fixed' or 'adaptive')"):
        pgd(mean_code_loss(model), x, y, 0.1, **setting)
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        sampled_loss(model, 0)
