"""Training end to end on the bundled digits: the run folder, exact resume, the minimax's direction."""
import copy
import csv
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import tensors

import ib.engine.loop
import ib.engine.step
from ib.cli import main
from ib.engine import autocast, build_run, critic_step, fit, train_step
from ib.engine.build import load_optimizer
from ib.errors import ConfigError
from ib.estimators import ESTIMATORS
from ib.models.classifier import build_classifier
from ib.models.critics import CRITICS
from ib.objectives import ib_objective
from ib.recipe import load_recipe

DIGITS = Path(__file__).parents[2] / "recipes" / "digits.yaml"
SMALL = ["model.encoder.hidden=[64]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[64]", "beta_schedule.delay=0",
         "model.eval_samples=4"]


def _weights(run_dir: Path, name: str = "last.pt"):
    return torch.load(run_dir / name, weights_only=True)


def _metrics(run_dir: Path):
    m = json.loads((run_dir / "metrics.json").read_text())
    for k in ("train_seconds", "epoch_seconds"):
        m.pop(k)
    return m


def test_cli_train_writes_a_complete_run_folder(digits_run):
    run = digits_run  # `ib train recipes/digits.yaml epochs=3 ...` (conftest.py), with SMALL's settings
    for name in ("recipe.yaml", "last.pt", "best.pt", "history.csv", "metrics.json"):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    m = json.loads((run / "metrics.json").read_text())
    assert m["status"] == "completed" and m["epochs"] == 3 and len(m["epoch_seconds"]) == 3
    for key in ("test_accuracy", "val_accuracy", "train_seconds", "I_XZ_nats", "beta_final"):
        assert isinstance(m[key], float) and math.isfinite(m[key]), key
    assert 0.5 < m["test_accuracy"] <= 1.0
    assert m["beta_final"] == pytest.approx(1e-3)
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert {"loss/total", "loss/ce", "mi/I_XZ", "beta", "acc/val", "acc/test", "time/epoch_s"} <= set(rows[0])
    # The test split is evaluated in the last epoch only (monitor.test_every=0); validation every epoch.
    assert [r["acc/test"] != "" for r in rows] == [False, False, True] and all(r["acc/val"] for r in rows)
    assert float(rows[-1]["acc/test_sampled"]) == m["test_accuracy"]
    saved = load_recipe(run / "recipe.yaml")  # the resolved recipe, overrides applied
    assert saved.epochs == 3 and saved.model.bottleneck.options["z_dim"] == 8


def test_tensorboard_events_hold_the_scalars(tmp_path, digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for test_every, test_steps in ((0, [3]), (2, [2, 3]), (1, [1, 2, 3])):
        run = tmp_path / f"run_{test_every}"
        if test_every == 0:  # the default: the shared run
            run = digits_run
        else:
            fit(load_recipe(DIGITS, ["epochs=3", *SMALL, f"monitor.test_every={test_every}"]), run)
        acc = EventAccumulator(str(run))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        assert {"loss/total", "loss/ce", "mi/I_XZ", "beta", "acc/val", "acc/test", "time/epoch_s"} <= tags
        assert [e.step for e in acc.Scalars("acc/val")] == [1, 2, 3]
        assert [e.step for e in acc.Scalars("acc/test")] == test_steps


def test_resume_after_stopping_gives_the_same_weights_and_metrics(tmp_path):
    recipe = load_recipe(DIGITS, ["epochs=4", *SMALL])
    fit(recipe, tmp_path / "straight")
    assert main(["train", str(DIGITS), "epochs=4", *SMALL, "--run-dir", str(tmp_path / "split"),
                 "--stop-after", "2"]) == 0
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["status"] == "stopped"
    assert main(["train", "--resume", str(tmp_path / "split")]) == 0
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for part in ("model", "estimator", "optimizer", "critic_optimizer"):
        flat_a = [t for t in tensors(a[part])]
        flat_b = [t for t in tensors(b[part])]
        assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b)), part
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "split")
    rows = list(csv.DictReader((tmp_path / "split" / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]


def test_same_seed_same_run(tmp_path):
    recipe = load_recipe(DIGITS, ["epochs=2", *SMALL])
    fit(recipe, tmp_path / "a")
    fit(recipe, tmp_path / "b")
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert all(torch.equal(x, y) for x, y in zip(tensors(_weights(tmp_path / "a")["model"]),
                                                   tensors(_weights(tmp_path / "b")["model"])))


def test_beta_lowers_the_held_out_information(tmp_path):
    """The encoder minimises the MI penalty: with beta > 0 the held-out I(X;Z) ends lower than with beta = 0."""
    common = ["epochs=8", "model.encoder.hidden=[64]", "model.bottleneck.z_dim=8", "beta_schedule.delay=0",
              "model.eval_samples=0", "mi.optimizer.lr=1e-3"]
    free = fit(load_recipe(DIGITS, [*common, "beta=0"]), tmp_path / "free")
    squeezed = fit(load_recipe(DIGITS, [*common, "beta=10"]), tmp_path / "squeezed")
    assert free["I_XZ_nats"] > 0.5  # measured: 1.24 nats at beta = 0, 0.02 at beta = 10
    assert squeezed["I_XZ_nats"] < 0.5 * free["I_XZ_nats"], (free["I_XZ_nats"], squeezed["I_XZ_nats"])


def _tiny_minimax(seed: int = 0):
    torch.manual_seed(seed)
    model = build_classifier("mlp", {"hidden": (16,)}, "gaussian", {"z_dim": 4}, in_shape=(1, 4, 4), num_classes=3,
                             mean=(0.5,), std=(0.25,))
    critic = CRITICS.create("joint", (1, 4, 4), 4, hidden=(16,), input_noise=0.0, hidden_noise=0.0)
    estimator = ESTIMATORS.create("mine", critic)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    critic_opt = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    x = torch.rand(32, 1, 4, 4)
    y = torch.randint(0, 3, (32,))
    return model, estimator, opt, critic_opt, x, y


def test_optimisers_own_disjoint_parameters():
    model, estimator, opt, critic_opt, *_ = _tiny_minimax()
    enc = {id(p) for g in opt.param_groups for p in g["params"]}
    cri = {id(p) for g in critic_opt.param_groups for p in g["params"]}
    assert not enc & cri
    assert cri == {id(p) for p in estimator.critic.parameters()}


def test_encoder_step_leaves_the_critic_alone():
    model, estimator, opt, critic_opt, x, y = _tiny_minimax()
    critic_step(estimator, critic_opt, x, model.encode(x).z.detach(), 1)
    before = [p.detach().clone() for p in estimator.critic.parameters()]
    out = ib_objective(model, estimator, x, y, beta=1.0)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert all(p.grad is None for p in estimator.critic.parameters())  # frozen: no gradient reached it
    assert all(torch.equal(a, p) for a, p in zip(before, estimator.critic.parameters()))
    assert all(p.requires_grad for p in estimator.critic.parameters())  # and unfrozen afterwards


def test_minimax_directions():
    """The critic's steps raise the bound; the encoder's steps (large beta, critic frozen) lower the same bound."""
    model, estimator, opt, critic_opt, x, y = _tiny_minimax()

    def bound():
        with torch.no_grad():
            z = model.encode(x, sample=False).z
        return estimator.estimate(x, z, permutations=8, generator=torch.Generator().manual_seed(0))

    start = bound()
    z = model.encode(x, sample=False).z.detach()
    for _ in range(300):
        critic_step(estimator, critic_opt, x, z, 1)
    trained = bound()
    assert trained > start + 1.0, (start, trained)  # the critic maximises
    for _ in range(30):
        train_step(model, estimator, opt, None, x, y, beta=10.0)  # no critic optimiser: the encoder alone
    assert bound() < trained - 0.3, (trained, bound())  # the encoder minimises


def _tiny_mine_setup():
    """A deterministic 16-4 classifier of 3 classes, a noiseless MINE critic and a batch of 32, seeded."""
    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (16,)}, "deterministic", {"z_dim": 4}, in_shape=(1, 4, 4),
                             num_classes=3, mean=(0.5,), std=(0.25,))
    critic = CRITICS.create("joint", (1, 4, 4), 4, hidden=(16,), input_noise=0.0, hidden_noise=0.0)
    estimator = ESTIMATORS.create("mine", critic, ema_rate=0.3)
    return model, estimator, torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))


def test_fused_step_gives_the_two_pass_gradients():
    """One critic forward with gradient reversal == critic step on detached z + encoder step, at the same state."""
    from ib.objectives import fused_minimax_objective

    model, estimator, x, y = _tiny_mine_setup()
    estimator.loss(x, model.encode(x).z.detach())  # start the moving average
    model2, estimator2 = copy.deepcopy(model), copy.deepcopy(estimator)
    beta = 0.5

    # two-pass: the critic's gradient on detached z, then the encoder's at the same critic and average
    code = model.encode(x)
    torch.manual_seed(7)
    estimator.loss(x, code.z.detach()).backward()
    critic_grads = [p.grad.clone() for p in estimator.parameters()]
    torch.manual_seed(7)
    out = ib_objective(model, estimator, x, y, beta, code=code)
    out["loss"].backward()
    encoder_grads = [p.grad.clone() for p in model.parameters()]

    torch.manual_seed(7)
    fused = fused_minimax_objective(model2, estimator2, x, y, beta)
    fused["objective"].backward()
    for a, p in zip(critic_grads, estimator2.parameters()):
        torch.testing.assert_close(p.grad, a)
    for a, p in zip(encoder_grads, model2.parameters()):
        torch.testing.assert_close(p.grad, a)
    torch.testing.assert_close(estimator2.log_ema, estimator.log_ema)  # updated once, the same way
    torch.testing.assert_close(fused["loss"], out["loss"].detach())


def test_fused_and_two_pass_both_train(tmp_path):
    for fused in ("true", "false"):
        m = fit(load_recipe(DIGITS, ["epochs=3", *SMALL, f"mi.fused={fused}"]), tmp_path / fused)
        assert m["test_accuracy"] > 0.5 and math.isfinite(m["I_XZ_nats"])


def test_vib_kl_run_resumes(tmp_path):
    """A critic-free bound has no critic optimiser: stopping and resuming must still work and match."""
    over = ["epochs=2", "mi.estimator=vib_kl", "model.encoder.hidden=[32]", "model.bottleneck.z_dim=8",
            "beta_schedule.delay=0", "model.eval_samples=0"]
    fit(load_recipe(DIGITS, over), tmp_path / "straight")
    fit(load_recipe(DIGITS, over), tmp_path / "split", stop_after=1)
    fit(load_recipe(DIGITS, over), tmp_path / "split", resume=True)
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "split")


def test_fused_flag_leaves_jsd_on_the_two_pass_step(monkeypatch, tmp_path):

    calls = []
    real = ib.engine.step._fused_step
    monkeypatch.setattr(ib.engine.step, "_fused_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fit(load_recipe(DIGITS, ["epochs=1", *SMALL, "mi.estimator=jsd"]), tmp_path / "jsd")
    assert not calls  # JS-trained critic: the encoder's DV penalty needs its own pass
    fit(load_recipe(DIGITS, ["epochs=1", *SMALL]), tmp_path / "mine")
    assert calls


def test_a_warning_from_the_plane_is_logged_once_per_run(monkeypatch, tmp_path, caplog):
    """InfoNCE's ceiling warning comes from every epoch's estimate; the run log says it once."""
    import warnings

    real = ib.engine.loop.information_plane

    def warning_plane(*args, **kwargs):
        warnings.warn("estimate near its ceiling")
        return real(*args, **kwargs)

    monkeypatch.setattr(ib.engine.loop, "information_plane", warning_plane)
    with caplog.at_level("WARNING", logger="ib.engine.loop"):
        fit(load_recipe(DIGITS, ["epochs=3", *SMALL]), tmp_path / "run")
    said = [r for r in caplog.records if "estimate near its ceiling" in r.getMessage()]
    assert len(said) == 1 and "epoch 1" in said[0].getMessage()


def test_a_run_stopped_after_its_last_checkpoint_reports_the_test_split_when_completed(tmp_path, monkeypatch):
    """Interrupted at the end of epoch 2 of 4 (no test pass there), then resumed with epochs=2: nothing is left
    to train, and the completed run still reports its test accuracy. Fewer epochs than trained are refused."""
    from ib.engine import resume_recipe

    real = ib.engine.loop._stopping
    calls = {"n": 0}

    def stop_after_epoch_two(stop, device):
        calls["n"] += 1
        if calls["n"] == 2 * 20 + 2:  # the check after epoch 2's evaluation (one per step, one per epoch)
            stop.signal = 2
        return real(stop, device)

    monkeypatch.setattr(ib.engine.loop, "_stopping", stop_after_epoch_two)
    first = fit(load_recipe(DIGITS, ["epochs=4", *SMALL]), tmp_path / "run")
    monkeypatch.undo()
    assert first["status"] == "interrupted" and first["epochs"] == 2 and math.isnan(first["test_accuracy"])
    with pytest.raises(ConfigError, match="fewer than the 2 epochs"):
        resume_recipe(tmp_path / "run", ["epochs=1"])
    done = fit(resume_recipe(tmp_path / "run", ["epochs=2"]), tmp_path / "run", resume=True)
    assert done["status"] == "completed" and 0.5 < done["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["test_accuracy"] == done["test_accuracy"]


def test_build_optimizer_takes_generators_and_groups_and_resume_keeps_fused_adam():
    from ib.engine.build import build_optimizer, load_optimizer
    from ib.recipe import OptimConfig

    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(OptimConfig(name="adam"), model.parameters())  # a generator
    assert len(opt.param_groups[0]["params"]) == 2 and opt.param_groups[0]["fused"]
    groups = build_optimizer(OptimConfig(name="adamw"), [{"params": [model.weight]}, {"params": [model.bias]}])
    assert len(groups.param_groups) == 2
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    old = opt.state_dict()
    for g in old["param_groups"]:  # as written before fused Adam was used
        g["fused"] = None
    load_optimizer(opt, old)
    assert opt.param_groups[0]["fused"] is True
    opt.step()  # the fused kernel accepts the loaded state


def _bf16_case(encoder: str, estimator: str, critic: str):
    torch.manual_seed(0)
    enc = {"mlp": ("mlp", {"hidden": (32,)}), "resnet": ("resnet18_cifar", {"width": 4})}[encoder]
    shape = (1, 8, 8) if encoder == "mlp" else (3, 8, 8)
    model = build_classifier(*enc, "gaussian", {"z_dim": 6}, in_shape=shape, num_classes=3,
                             mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    options = {"hidden": (32,), "input_noise": 0.0, "hidden_noise": 0.0} if critic == "joint" else {}
    if critic == "joint_conv":
        critic, options = "joint", {**options, "x_branch": "conv", "x_channels": (4,), "x_features": 8}
    est = ESTIMATORS.create(estimator, CRITICS.create(critic, shape, 6, **options))
    x, y = torch.rand(24, *shape), torch.randint(0, 3, (24,))
    return model, est, x, y


# Cosines of the bf16 step's updates with the fp32 step's (encoder and decoder; critic), measured: 1.000/0.925,
# 1.000/0.925, 0.998/1.000, 1.000/1.000, 0.920/1.000. MINE's critic gradient at the start is a difference of two
# near-equal means (124x smaller than either here), so bf16's 0.4 % on each shows; a random ResNet's conv gradients
# through batch norm are likewise sensitive. A sign or scale error, or a dropped gradient, gives far lower values.
@pytest.mark.parametrize("encoder,estimator,critic,fused,cos_model,cos_critic", [
    ("mlp", "mine", "joint", True, 0.995, 0.85), ("mlp", "mine", "joint", False, 0.995, 0.85),
    ("mlp", "infonce", "separable", True, 0.99, 0.995), ("mlp", "smile", "joint", False, 0.995, 0.995),
    ("resnet", "mine", "joint_conv", True, 0.85, 0.995)])
def test_bf16_step_follows_the_fp32_step(encoder, estimator, critic, fused, cos_model, cos_critic):
    """One train_step under bf16 autocast moves the classifier and the critic as the fp32 step does, to bf16's
    precision; weights and the reported terms stay float32."""
    model, est, x, y = _bf16_case(encoder, estimator, critic)
    est.loss(x, model.encode(x).z.detach())  # start MINE's moving average
    updates = {}
    for precision in ("fp32", "bf16"):
        m, e = copy.deepcopy(model), copy.deepcopy(est)
        opt, critic_opt = torch.optim.SGD(m.parameters(), lr=1.0), torch.optim.SGD(e.parameters(), lr=1.0)
        before = [[p.detach().clone() for p in net.parameters()] for net in (m, e)]
        torch.manual_seed(3)
        out = train_step(m, e, opt, critic_opt, x, y, beta=0.5, fused=fused, precision=precision)
        assert bool(out["finite"]) and out["loss"].dtype == out["mi_bound"].dtype == torch.float32
        assert all(p.dtype == torch.float32 for p in (*m.parameters(), *e.parameters()))
        updates[precision] = [torch.cat([(p.detach() - b).flatten() for p, b in zip(net.parameters(), old)])
                              for net, old in zip((m, e), before)], out
    (ref, out32), (ours, out16) = updates["fp32"], updates["bf16"]
    for a, b, least in zip(ref, ours, (cos_model, cos_critic)):
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        assert cos > least and abs(float(b.norm() / a.norm()) - 1) < 0.2, (cos, float(b.norm() / a.norm()))
    torch.testing.assert_close(out16["loss"], out32["loss"], rtol=0.02, atol=0.02)
    torch.testing.assert_close(out16["mi_bound"], out32["mi_bound"], rtol=0.05, atol=0.02)


def test_bf16_autocast_keeps_the_code_and_its_noise_in_float32():
    model, _, x, _ = _bf16_case("mlp", "mine", "joint")
    with torch.no_grad(), autocast(x.device, "bf16"):
        model.bottleneck.head.bias[:6] += 3.0  # |mean| ~ 3: bf16 spacing 0.016, the std ~0.007
        torch.manual_seed(1)
        code = model.encode(x)
        logits = model.decode(code.z)
    torch.manual_seed(1)
    eps = torch.randn_like(code.std)
    assert code.z.dtype == code.std.dtype == logits.dtype == torch.float32
    assert float(code.std.max()) < 0.02
    # z - mean is the noise to float32 precision; rounded to bf16 it would be off by up to half a spacing (0.008)
    torch.testing.assert_close((code.z - code.mean) / code.std, eps, rtol=1e-3, atol=1e-3)


def test_precision_names_are_checked(monkeypatch):
    with pytest.raises(ValueError, match="'fp16'"):
        autocast(torch.device("cpu"), "fp16")
    # a GPU without native bf16 (torch.cuda.is_bf16_supported() says yes where it is only emulated)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)  # as on a V100 (emulated)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100")
    with pytest.raises(ConfigError, match="Tesla V100 has none: use precision=fp32"):
        build_run(load_recipe(DIGITS, ["precision=bf16"]), device=torch.device("cuda"))


def test_bf16_recipe_trains_like_fp32(tmp_path):
    common = ["epochs=3", *SMALL, "beta=1e-2"]
    fp32 = fit(load_recipe(DIGITS, common), tmp_path / "fp32")
    bf16 = fit(load_recipe(DIGITS, [*common, "precision=bf16"]), tmp_path / "bf16")
    assert abs(bf16["test_accuracy"] - fp32["test_accuracy"]) < 0.03, (bf16["test_accuracy"], fp32["test_accuracy"])
    assert abs(bf16["I_XZ_nats"] - fp32["I_XZ_nats"]) < 0.3, (bf16["I_XZ_nats"], fp32["I_XZ_nats"])
    assert load_recipe(tmp_path / "bf16" / "recipe.yaml").precision == "bf16"  # saved with the run


def test_channels_last_trains_as_the_default_layout():
    """model.channels_last puts every 4-D conv weight (classifier and critic) in NHWC order; one step moves the
    weights as the contiguous layout does, to float rounding."""
    overrides = ["model.encoder=convnet", "model.encoder.channels=[4,8]", "model.encoder.hidden=16",
                 "mi.critic.x_branch=conv", "mi.critic.x_channels=[4,8]", "mi.critic.hidden=[16]", "beta=0.1"]
    runs = {flag: build_run(load_recipe(DIGITS, [*overrides, f"model.channels_last={flag}"]))
            for flag in ("true", "false")}
    for flag, run in runs.items():
        layout = torch.channels_last if flag == "true" else torch.contiguous_format
        for net in (run.model, run.estimator):  # each has a weight with several input channels (1-channel: both)
            convs = [p for p in net.parameters() if p.dim() == 4]
            assert len(convs) == 2 and all(p.is_contiguous(memory_format=layout) for p in convs)
            assert (flag == "true") == any(not p.is_contiguous() for p in convs)
    # In float64: Adam's first step is lr * g / (|g| + eps), which magnifies a change of g by up to lr / eps = 1e5
    # where g is near 0 (MINE's critic gradient nearly cancels). A layout only reorders the convolutions' sums; in
    # float32 that rounding (~1e-7 of the terms) comes out as a visible change of the step, in float64 (~1e-16 of
    # terms of order 1) it stays below 1e-10 after that magnification.
    x, y = runs["true"].data.train.x[:32].double() / 255.0, runs["true"].data.train.y[:32]
    updates = {}
    for flag, run in runs.items():
        run.model.double(), run.estimator.double()  # the same Parameters (the optimisers keep them), in float64
        before = [p.detach().clone() for p in (*run.model.parameters(), *run.estimator.parameters())]
        torch.manual_seed(5)
        out = train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, beta=0.1, fused=True)
        assert bool(out["finite"])
        updates[flag] = [p.detach() - b for p, b in zip((*run.model.parameters(), *run.estimator.parameters()), before)]
    assert any(any(not p.is_contiguous() for p in net.parameters()) for net in (runs["true"].model,))
    for a, b in zip(updates["true"], updates["false"]):
        assert b.abs().max() > 0  # every parameter moved
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("fused", [True, False])
def test_resuming_nchw_optimizer_state_into_channels_last_weights(fused):
    """Adam's moments saved with NCHW conv weights take the layout of channels-last weights on load: the resumed
    step equals the NCHW one (fused kernels pair elements by memory position)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    opt = torch.optim.Adam(conv.parameters(), lr=1e-2, fused=fused)
    x = torch.randn(4, 3, 8, 8)
    conv(x).square().mean().backward()
    opt.step()  # moments in NCHW order
    saved_conv, saved_opt = copy.deepcopy(conv.state_dict()), copy.deepcopy(opt.state_dict())
    steps = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        c = torch.nn.Conv2d(3, 8, 3)
        c.load_state_dict(saved_conv)
        c = c.to(memory_format=layout)
        o = torch.optim.Adam(c.parameters(), lr=1e-2, fused=fused)
        load_optimizer(o, copy.deepcopy(saved_opt))
        c(x).square().mean().backward()
        o.step()
        steps[layout] = c.weight.detach().contiguous()
    torch.testing.assert_close(steps[torch.channels_last], steps[torch.contiguous_format], rtol=1e-6, atol=1e-7)


def test_resume_with_more_epochs_stretches_the_lr_schedule(tmp_path):
    run = tmp_path / "run"
    fit(load_recipe(DIGITS, ["epochs=2", "lr_schedule=cosine", *SMALL]), run)
    fit(load_recipe(run / "recipe.yaml", ["epochs=4"]), run, resume=True)
    lrs = [float(r["lr"]) for r in csv.DictReader((run / "history.csv").open())]
    base = load_recipe(DIGITS).optimizer.lr
    # The first two epochs ran on the 2-epoch cosine; the two added follow the 4-epoch one, not its floor of 0.
    expected = [1.0, 0.5] + [(1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)]
    assert lrs == pytest.approx([base * f for f in expected])
    assert _weights(run)["lr_schedule"]["epochs"] == 4


def test_consecutive_nonfinite_steps_are_counted_across_epochs(tmp_path, monkeypatch):

    monkeypatch.setattr(ib.engine.step, "_all_finite", lambda tensors: False)  # every update is found non-finite
    recipe = load_recipe(DIGITS, ["epochs=3", "data.batch_size=128", "max_nonfinite_steps=15", *SMALL])
    with pytest.raises(ib.engine.step.TrainingError, match="15 consecutive non-finite steps"):
        fit(recipe, tmp_path / "run")  # 10 steps an epoch: the 15th is in epoch 2
    state = _weights(tmp_path / "run")
    assert (state["epoch"], state["nonfinite_in_a_row"]) == (1, 10)


@pytest.mark.parametrize("fused", [True, False])
def test_critic_gradients_are_clipped_by_mi_optimizer_grad_clip(fused, monkeypatch):
    run = build_run(load_recipe(DIGITS, [*SMALL, "beta=0.1", "mi.optimizer.grad_clip=0.01"]))
    norms = []
    step = run.critic_optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for g in run.critic_optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
        return step(*args, **kwargs)

    monkeypatch.setattr(run.critic_optimizer, "step", recording_step)
    x, y = run.data.train.x[:64].float() / 255.0, run.data.train.y[:64]
    out = train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, 0.1, fused=fused,
                     critic_grad_clip=run.recipe.mi.optimizer.grad_clip)
    assert bool(out["finite"]) and len(norms) == 1
    assert norms[0] == pytest.approx(0.01, rel=1e-4)  # a fresh critic's gradient is far larger than 0.01


def test_stop_after_on_a_resumed_run_that_has_those_epochs_trains_nothing(tmp_path):
    run = tmp_path / "run"
    fit(load_recipe(DIGITS, ["epochs=3", *SMALL]), run, stop_after=2)
    before = _weights(run)
    metrics = fit(load_recipe(run / "recipe.yaml"), run, resume=True, stop_after=1)
    assert metrics["status"] == "stopped" and metrics["epochs"] == 2
    assert _weights(run)["epoch"] == 2
    for a, b in zip(tensors(before["model"]), tensors(_weights(run)["model"])):
        assert torch.equal(a, b)


def test_training_bound_follows_monitor_units(tmp_path):
    rows = {}
    for units in ("nats", "bits"):
        fit(load_recipe(DIGITS, ["epochs=1", *SMALL, f"monitor.units={units}"]), tmp_path / units)
        rows[units] = next(csv.DictReader((tmp_path / units / "history.csv").open()))
    for key in ("mi/I_XZ_train", "mi/I_XZ"):
        assert float(rows["bits"][key]) == pytest.approx(float(rows["nats"][key]) / math.log(2), rel=1e-6)


def test_the_probe_set_holds_every_class_of_a_validation_split_in_class_order():
    """The plane's probe set is drawn from the validation split by a seeded permutation: for a split stored in
    class order (as an image folder's is), the first samples would hold a few classes only."""
    from ib.data import Split
    from ib.engine.loop import probe_set

    run = build_run(load_recipe(DIGITS, [*SMALL, "monitor.probe_size=200"]))
    order = run.data.train.y.argsort(stable=True)  # 1,294 training digits in class order, as the validation split
    run.data.val = Split(run.data.train.x[order], run.data.train.y[order])
    probe = probe_set(run)
    counts = torch.bincount(probe.y, minlength=10)
    assert len(probe.y) == 200 and (counts >= 8).all(), counts  # ~20 each
    assert torch.equal(probe_set(run).y, probe.y)  # the same probe every epoch


@pytest.mark.parametrize("fused", [True, False])
def test_train_step_smooths_the_labels(fused):
    """`label_smoothing` e reaches the cross-entropy of both step forms: with a deterministic code the reported ce is
    (1 - e) CE + e * mean over classes of -log p, taken of the logits before the step."""
    model, estimator, x, y = _tiny_mine_setup()
    with torch.no_grad():
        logp = torch.log_softmax(model.decode(model.encode(x).z), dim=1)  # [B, 3]
    e = 0.3
    expected = ((1 - e) * -logp.gather(1, y[:, None]).squeeze(1) + e * -logp.mean(1)).mean()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    critic_opt = torch.optim.SGD(estimator.parameters(), lr=0.1)
    out = train_step(model, estimator, opt, critic_opt, x, y, 0.1, fused=fused, label_smoothing=e)
    torch.testing.assert_close(out["ce"], expected)


def test_recipe_label_smoothing_and_dropout(tmp_path):
    """The recipe's `label_smoothing` and the MLP's `dropout` train end to end; bad values are refused on load."""
    with pytest.raises(ConfigError, match="label_smoothing"):
        load_recipe(DIGITS, ["label_smoothing=1.0"])
    with pytest.raises(ConfigError, match="dropout"):
        build_run(load_recipe(DIGITS, ["model.encoder.dropout=1.5"]))
    m = fit(load_recipe(DIGITS, ["epochs=1", *SMALL, "label_smoothing=0.1", "model.encoder.dropout=0.2"]),
            tmp_path / "run")
    assert m["status"] == "completed" and m["test_accuracy"] > 0.3


@pytest.mark.parametrize("weight", [1e-3, 1e3])
def test_adaptive_clipping_scales_the_penalty_to_the_task(weight):
    """g = g_u + min(|g_u|, |g_m|) g_m / |g_m| (MINE, sec. 3.1), norms over the encoder's parameters, against the
    two gradients taken by hand: a small penalty's gradient passes as it is, a large one is scaled down to the
    cross-entropy's norm; the decoder, which the penalty does not reach, gets the cross-entropy's gradient alone."""
    from ib.engine.step import adaptive_clipped_backward

    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (8,)}, "gaussian", {"z_dim": 3}, in_shape=(1, 2, 2), num_classes=2,
                             mean=(0.5,), std=(0.25,))
    x, y = torch.rand(16, 1, 2, 2), torch.randint(0, 2, (16,))

    def terms():
        torch.manual_seed(1)
        code = model.encode(x)
        return F.cross_entropy(model.decode(code.z), y), weight * code.z.square().sum(1).mean()

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]

    ce, pen = terms()
    g_u = grads(ce)
    g_m = grads(terms()[1])
    encoder = [isinstance(p, torch.nn.Parameter) and any(p is q for q in model.bottleneck.parameters())
               for p in model.parameters()]
    norm = lambda gs: float(torch.sqrt(sum(g.square().sum() for g, e in zip(gs, encoder) if e)))  # noqa: E731
    scale = min(norm(g_u), norm(g_m)) / norm(g_m)
    assert all(float(b.abs().max()) == 0 for b, e in zip(g_m, encoder) if not e)  # the decoder: CE only
    assert (scale == 1.0) == (weight < 1)  # the two cases the parametrisation means to cover
    model.zero_grad(set_to_none=True)
    adaptive_clipped_backward(model, *terms())
    for p, a, b in zip(model.parameters(), g_u, g_m):
        torch.testing.assert_close(p.grad, a + scale * b)


def test_train_step_with_adaptive_clipping_bounds_the_encoders_update():
    """At a huge beta the penalty's gradient dwarfs the task's; clipped, one SGD step (lr 1) moves the weights by
    at most |g_u| + min(|g_u|, |g_m|) <= 2 |g_u|, fused or not (clipping runs the two-pass step)."""
    torch.manual_seed(0)
    base = build_classifier("mlp", {"hidden": (8,)}, "gaussian", {"z_dim": 3}, in_shape=(1, 2, 2), num_classes=2,
                            mean=(0.5,), std=(0.25,))
    x, y = torch.rand(16, 1, 2, 2), torch.randint(0, 2, (16,))
    vib = ESTIMATORS.create("vib_kl", "gaussian")
    model = copy.deepcopy(base)
    torch.manual_seed(1)
    ce = F.cross_entropy(model.decode(model.encode(x).z), y)
    ce.backward()
    g_u = float(torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None)))
    moved = {}
    for clip in (False, True):
        model = copy.deepcopy(base)
        before = [p.detach().clone() for p in model.parameters()]
        torch.manual_seed(1)
        train_step(model, vib, torch.optim.SGD(model.parameters(), lr=1.0), None, x, y, 1e4, fused=True,
                   adaptive_clip=clip)
        moved[clip] = float(torch.sqrt(sum((p.detach() - b).square().sum() for p, b in zip(model.parameters(),
                                                                                             before))))
    assert moved[True] <= 2 * g_u * (1 + 1e-5) and moved[False] > 100 * g_u, (moved, g_u)


@pytest.mark.parametrize("torchrun", [False, True])
def test_a_second_signal_stops_at_once_except_under_torchrun(monkeypatch, torchrun):
    """Under torchrun one Ctrl-C can reach a worker twice (from the terminal and forwarded by the agent); that must
    not abort the worker mid-collective. Alone, a second Ctrl-C stops at once."""
    import signal

    from ib import distributed
    from ib.engine.loop import StopFlag

    monkeypatch.setattr(distributed, "launched_by_torchrun", lambda: torchrun)
    stop = StopFlag()
    previous = stop.install()
    try:
        handler = signal.getsignal(signal.SIGINT)
        handler(signal.SIGINT, None)
        assert stop and stop.signal == signal.SIGINT
        if torchrun:
            handler(signal.SIGINT, None)  # ignored: still stopping after this step
            handler(signal.SIGTERM, None)
            assert stop.signal == signal.SIGINT
        else:
            with pytest.raises(KeyboardInterrupt):
                handler(signal.SIGINT, None)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
