"""Adversarial training: PGD-AT against the closed-form worst case of a linear model, A3T's discriminator and its
gradient reversal, exact resume, and bad input."""
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, run_main, tensors
from torch import nn

from ib.adversarial import AdversarialTraining
from ib.engine import build_run, fit, resume_recipe, train_step
from ib.engine.build import build_optimizer
from ib.errors import ConfigError
from ib.models.classifier import build_classifier
from ib.recipe import AdversarialConfig, OptimConfig, load_recipe

DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"
SMALL = ["model.encoder.hidden=[32]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[32]", "model.eval_samples=2",
         "monitor.probe_size=60"]
A3T = ["adversarial.name=a3t", "adversarial.attack=pgd", "adversarial.steps=2", "adversarial.step_size=0.05",
       "adversarial.eps=0.1", "adversarial.alpha=0.5", "adversarial.disc_hidden=[16]"]


def _linear_problem(n: int = 200, weak: int = 20):
    """Two classes in [0, 1]^(1 + weak): feature 0 separates them by a margin of 0.15 around 0.5; each of the
    `weak` others leans towards the label by 0.03 under noise of 0.02. Standard training spreads its weight over
    the weak features (a large L1 norm, fragile); at eps 0.1 only feature 0 survives the worst case."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 2
    s = (2 * y - 1).float()[:, None]  # [n, 1] in {-1, 1}
    strong = 0.5 + 0.15 * s
    weak_features = 0.5 + 0.03 * s + 0.02 * torch.randn(n, weak, generator=g)
    x = torch.cat([strong, weak_features], dim=1).view(n, 1, 1, 1 + weak)
    return x, y


def _linear_model(width: int, z_dim: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return build_classifier("mlp", {"hidden": [], "activation": "relu"}, "deterministic", {"z_dim": z_dim},
                            (1, 1, width), 2, [0.5], [0.1])


def _worst_case_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    """The exact L-inf worst case of a model whose logit difference d(x) = w.x + b is affine: a sample stays right
    iff its margin s * d(x) exceeds eps * ||w||_1 (the clip to [0, 1] never binds here: x +- eps stays inside)."""
    probe = x[:1].clone().requires_grad_(True)
    logits = model(probe, sample=False)
    (w,) = torch.autograd.grad(logits[0, 1] - logits[0, 0], probe)
    with torch.no_grad():
        d = (lambda z: z[:, 1] - z[:, 0])(model(x, sample=False))
        margin = (2 * y - 1).float() * d
        return float((margin > eps * w.abs().sum()).float().mean())


def _train(model, x, y, adversarial=None, steps: int = 300):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        train_step(model, None, optimizer, None, x, y, 0.0, adversarial=adversarial)
    return model


def test_pgd_training_raises_the_closed_form_worst_case_accuracy_of_a_linear_model():
    x, y = _linear_problem()
    assert float(x.min()) > 0.1 and float(x.max()) < 0.9
    standard = _train(_linear_model(x.shape[-1]), x, y)
    cfg = AdversarialConfig(name="pgd", eps=0.1, steps=10, step_size=0.025)
    robust_model = _linear_model(x.shape[-1])
    robust = _train(robust_model, x, y, AdversarialTraining(cfg, robust_model, (1, 1, x.shape[-1])))
    clean = [_worst_case_accuracy(m, x, y, 0.0) for m in (standard, robust)]
    worst = [_worst_case_accuracy(m, x, y, 0.1) for m in (standard, robust)]
    assert clean[0] == 1.0 and clean[1] == 1.0
    assert worst[0] < 0.5 and worst[1] > 0.95, worst


def _a3t(model: nn.Module, shape, **settings) -> AdversarialTraining:
    cfg = AdversarialConfig(name="a3t", disc_hidden=(16,), **settings)
    return AdversarialTraining(cfg, model, shape)


def _fit_discriminator(a3t: AdversarialTraining, encode, shift: torch.Tensor, steps: int = 300) -> float:
    """Train `a3t`'s discriminator alone on the codes of a frozen encoder, clean against shifted inputs; return its
    accuracy on fresh inputs."""
    optimizer = build_optimizer(OptimConfig(name="adam", lr=1e-2), list(a3t.parameters()))
    for _ in range(steps):
        x = torch.randn(128, 2)
        with torch.no_grad():
            h, h_adv = encode(x), encode(x + shift)
        out = a3t.discriminator_loss(h, h_adv)
        optimizer.zero_grad()
        out["disc_loss"].backward()
        optimizer.step()
    x = torch.randn(4000, 2)
    with torch.no_grad():
        return float(a3t.discriminator_loss(encode(x), encode(x + shift))["disc_acc"])


def test_the_discriminator_separates_clean_from_adversarial_codes_of_a_frozen_encoder():
    """Codes N(0, I) against the same shifted by 6 along one axis: the Bayes accuracy is Phi(3) = 0.9987."""
    torch.manual_seed(0)
    a3t = _a3t(_linear_model(4), (1, 1, 4))
    assert _fit_discriminator(a3t, lambda x: x, torch.tensor([6.0, 0.0])) > 0.95


def test_gradient_reversal_drives_the_discriminator_toward_chance():
    """A linear encoder h = E x (2-D code) with a task that needs x[1] only, and adversarial inputs shifted by 6
    along x[0] (Bayes accuracy Phi(3) = 0.9987 on the raw inputs). Without the reversal (weight 0) the
    discriminator's accuracy over the last 300 of 1,000 steps stays near that; with it, the encoder hides the shift
    and the accuracy falls toward chance (0.50-0.62 over seeds 0-2; the game oscillates, so its average is the
    measure, not one step)."""
    shift = torch.tensor([6.0, 0.0])

    def late_accuracy(weight: float) -> float:
        torch.manual_seed(0)
        encoder, head = nn.Linear(2, 2), nn.Linear(2, 2)
        a3t = _a3t(_linear_model(4), (1, 1, 4), disc_weight=weight)
        optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters(), *a3t.parameters()], lr=1e-2)
        accuracies = []
        for _ in range(1000):
            x = torch.randn(128, 2)
            y = (x[:, 1] > 0).long()
            out = a3t.discriminator_loss(encoder(x), encoder(x + shift))
            loss = nn.functional.cross_entropy(head(encoder(x)), y) + out["disc_loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            accuracies.append(float(out["disc_acc"]))
        return sum(accuracies[-300:]) / 300

    assert late_accuracy(0.0) > 0.95
    assert late_accuracy(1.0) < 0.7


def test_a3t_run_resumes_exactly_with_its_discriminator(tmp_path):
    recipe = load_recipe(DIGITS, ["epochs=2", *SMALL, *A3T])
    fit(recipe, tmp_path / "straight")
    fit(recipe, tmp_path / "split", stop_after=1)
    fit(resume_recipe(tmp_path / "split"), tmp_path / "split", resume=True)
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("straight", "split"))
    for part in ("model", "estimator", "adversarial", "adversarial_optimizer", "optimizer"):
        flat_a, flat_b = list(tensors(a[part])), list(tensors(b[part]))
        assert flat_a and len(flat_a) == len(flat_b), part
        assert all(torch.equal(u, v) for u, v in zip(flat_a, flat_b)), part
    rows = (tmp_path / "split" / "history.csv").read_text().splitlines()
    assert {"adv/ce_adv", "adv/disc_loss", "adv/disc_acc"} <= set(rows[0].split(","))
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    assert metrics["status"] == "completed"


def test_a3t_on_a_hidden_layer_sizes_its_discriminator_from_that_layer():
    run = build_run(load_recipe(DIGITS, [*SMALL, *A3T, "adversarial.disc_layer=encoder.net.0"]))
    assert run.adversarial.discriminator[0].in_features == 32
    x, y = run.data.train.x[:16].float(), run.data.train.y[:16]
    out = train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, 0.0,
                     adversarial=run.adversarial, adversarial_optimizer=run.adversarial_optimizer)
    assert bool(out["finite"]) and 0.0 <= float(out["adv/disc_acc"]) <= 1.0


@pytest.mark.parametrize("override, phrase", [
    ("adversarial.eps=1.5", "adversarial.eps: 1.5 is out of range"),
    ("adversarial.steps=0", "adversarial.steps: 0 is out of range"),
    ("adversarial.alpha=-0.1", "adversarial.alpha: -0.1 is out of range"),
    ("adversarial.disc_layer=encoder.net.9", "adversarial.disc_layer: no layer 'encoder.net.9' in this model; "
                                             "valid: z, encoder, encoder.net, encoder.net.0"),
])
def test_bad_adversarial_settings_are_one_line(tmp_path, capsys, override, phrase):
    status, lines = run_main(["train", DIGITS, *SMALL, "adversarial.name=a3t", override, "--run-dir",
                              tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, [phrase])
    assert not (tmp_path / "run").exists()


def test_adversarial_training_refuses_adaptive_clipping():
    with pytest.raises(ConfigError, match="does not combine with adversarial training"):
        build_run(load_recipe(DIGITS, [*SMALL, "adversarial.name=pgd", "mi.adaptive_clip=true"]))


def test_adversarial_recipes_carry_madrys_settings_and_train_a_step():
    recipes = Path(__file__).parents[1] / "recipes"
    madry = {"mnist_pgd": (0.3, 40, 0.01), "fashion_mnist_pgd": (0.1, 40, 0.01),
             "cifar10_pgd": (pytest.approx(8 / 255, abs=1e-6), 10, pytest.approx(2 / 255, abs=1e-6))}
    for name, (eps, steps, step) in madry.items():
        a = load_recipe(recipes / f"{name}.yaml").adversarial
        assert (a.name, a.attack, a.eps, a.steps, a.step_size, a.random_start, a.alpha) == (
            "pgd", "pgd", eps, steps, step, True, 0.0), name
    for name in ("mnist_pgd", "mnist_a3t", "fashion_mnist_a3t"):  # on the bundled digits, one step
        recipe = load_recipe(recipes / f"{name}.yaml", ["data.name=digits", "data.batch_size=16",
                                                        "model.encoder.channels=[4]", "model.encoder.hidden=16",
                                                        "adversarial.steps=2", "monitor.probe_size=60"])
        run = build_run(recipe)
        x, y = run.data.train.x[:16].float(), run.data.train.y[:16]
        out = train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, recipe.beta,
                         adversarial=run.adversarial, adversarial_optimizer=run.adversarial_optimizer)
        assert bool(out["finite"]) and float(out["adv/ce_adv"]) > 0, name
