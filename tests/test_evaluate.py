"""The evaluation: sanity checks on a small trained model, masking detection, `ib eval` end to end, bad arguments."""
import csv
import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from ib.cli import main
from ib.data import Split
from ib.engine import fit, load_run
from ib.evaluate import EvalWarning, evaluate_model
from ib.recipe import AttackName, load_recipe
from ib.robustness import THREATS, expected_calibration_error

DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"
SMALL = ["epochs=3", "model.encoder.hidden=[128]", "mi.critic.hidden=[64]", "model.eval_samples=4"]
FAST = dict(steps=5, samples=4, eot_samples=4, batch_size=200, check_samples=100)


pytestmark = pytest.mark.usefixtures("one_thread")  # the fixture is in conftest.py


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("eval") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(load_recipe(DIGITS, SMALL), run)
    finally:
        torch.set_num_threads(threads)
    return run


@pytest.fixture(scope="module")
def loaded(run_dir):
    return load_run(run_dir, device="cpu")


def _test_split(loaded, n=200):
    return Split(loaded.data.test.x[:n], loaded.data.test.y[:n])


def test_every_attack_name_has_a_threat_model():
    assert set(THREATS) == set(AttackName.__args__)


def test_ece_closed_form():
    conf = torch.tensor([0.9, 0.9, 0.6, 0.6])
    right = torch.tensor([True, False, True, True])
    # Bins of width 0.1: [0.6, 0.6] -> |1 - 0.6| * 2/4; [0.9, 0.9] -> |0.5 - 0.9| * 2/4.
    assert expected_calibration_error(conf, right, bins=10) == pytest.approx(0.2 + 0.2)
    # One bin: |mean accuracy - mean confidence| = |0.75 - 0.75|.
    assert expected_calibration_error(conf, right, bins=1) == pytest.approx(0.0)
    assert expected_calibration_error(torch.ones(3), torch.ones(3, dtype=torch.bool), bins=15) == 0.0


def test_sanity_checks_hold_on_a_small_trained_model(loaded):
    with warnings.catch_warnings():
        warnings.simplefilter("error", EvalWarning)
        report = evaluate_model(loaded.model, _test_split(loaded), **FAST)
    checks = {c["name"]: c for c in report["checks"]}
    assert set(checks) == {"eval_mode", "eps0_equals_clean", "accuracy_not_rising", "pgd_not_weaker_than_fgsm",
                           "gradients_reach_input", "unbounded_attack_succeeds"}
    assert all(c["passed"] for c in checks.values()), checks
    clean = report["clean"]
    assert clean["mean"]["accuracy"] > 0.85 and 0 <= clean["mean"]["ece"] < 1 and clean["mean"]["nll"] > 0
    assert {"accuracy", "accuracy_per_draw", "nll", "ece"} <= set(clean["sampled"])
    rows = report["robustness"]
    pairs = {(r["attack"], r["variant"]) for r in rows}
    assert pairs == {(a, v) for a in ("fgsm", "pgd_linf", "pgd_l2", "noise") for v in ("mean", "sampled")} | {
        ("eot_pgd", "sampled")}
    at = {(r["attack"], r["variant"], r["eps"]): r["accuracy"] for r in rows}
    assert at[("pgd_linf", "mean", 0.0)] == clean["mean"]["accuracy"]  # exactly: common random numbers
    assert at[("eot_pgd", "sampled", 0.0)] == clean["sampled"]["accuracy"]
    assert at[("pgd_linf", "mean", 0.2)] < at[("pgd_linf", "mean", 0.05)] < clean["mean"]["accuracy"]
    # The headline: the sampled model (behind the run's test accuracy) under its strongest L-inf attack at eps 0.2.
    worst = min(("fgsm", "pgd_linf", "eot_pgd"), key=lambda a: at[(a, "sampled", 0.2)])
    assert report["robust_accuracy_of"] == {"accuracy": at[(worst, "sampled", 0.2)], "attack": worst,
                                            "variant": "sampled", "eps": 0.2}
    assert report["robust_accuracy"] == at[(worst, "sampled", 0.2)] < clean["sampled"]["accuracy"]


def test_eot_pgd_without_draws_of_z_is_reported_as_not_run(loaded, caplog):
    split = _test_split(loaded, 50)
    report = evaluate_model(loaded.model, split, **{**FAST, "samples": 0}, attacks=["eot_pgd"], eps=[0.1])
    assert report["settings"]["attacks"] == [] and report["robustness"] == []
    assert any("eot_pgd not run" in n for n in report["notes"]) and "eot_pgd not run" in caplog.text
    assert report["robust_accuracy"] is None and report["robust_accuracy_of"] is None


def test_evaluation_restores_modes_and_leaves_the_global_rng_alone(loaded):
    model = loaded.model
    model.train()
    model.bottleneck.encoder.eval()  # a mixed state comes back as it was
    before = {name: m.training for name, m in model.named_modules()}
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    report = evaluate_model(model, _test_split(loaded, 50), attacks=["pgd_linf", "noise"], eps=[0.1], sigmas=[0.1],
                            **FAST)
    assert torch.equal(torch.get_rng_state(), state)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert all(p.grad is None for p in model.parameters())
    assert report["checks"][0]["name"] == "eval_mode" and report["checks"][0]["passed"]
    assert "came in train mode" in report["checks"][0]["detail"]
    model.eval()


def test_evaluation_is_repeatable(loaded):
    split = _test_split(loaded, 60)
    a = evaluate_model(loaded.model, split, attacks=["pgd_linf"], eps=[0.1], **FAST)
    b = evaluate_model(loaded.model, split, attacks=["pgd_linf"], eps=[0.1], **FAST)
    assert [r["accuracy"] for r in a["robustness"]] == [r["accuracy"] for r in b["robustness"]]


class _Quantised(torch.nn.Module):
    """The trained model behind a rounding of its input to 4 grey levels: the forward pass is almost unchanged,
    but the input gradient is zero everywhere (the classic masked gradient)."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, x, sample=True):
        return self.inner(torch.round(x * 3) / 3, sample=sample)


def test_a_masked_gradient_trips_the_masking_warning(loaded):
    with pytest.warns(EvalWarning) as caught:
        report = evaluate_model(_Quantised(loaded.model), _test_split(loaded), attacks=["fgsm", "pgd_linf"],
                                eps=[0.1, 0.2], **FAST)
    assert any("gradient masking" in str(w.message) for w in caught)
    failed = {c["name"] for c in report["checks"] if c["passed"] is False}
    assert {"gradients_reach_input", "unbounded_attack_succeeds"} <= failed
    assert not report["all_checks_passed"]


def test_cli_eval_writes_every_output(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    code = main(["eval", str(run_dir), "--steps", "3", "--limit", "80", "--samples", "3", "--eot-samples", "2",
                 "--eps", "0.05,0.1", "--eps-l2", "0.5", "--sigmas", "0.1"])
    assert code == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["n"] == 80 and report["settings"]["steps"] == 3 and report["checkpoint"].endswith("best.pt")
    assert report["all_checks_passed"] and math.isfinite(report["wall_seconds"])
    rows = list(csv.DictReader((run_dir / "robustness.csv").open()))
    assert {"attack", "variant", "eps", "accuracy", "accuracy_per_draw"} <= set(rows[0])
    assert len(rows) == len(report["robustness"])
    assert (run_dir / "robustness.png").stat().st_size > 1000
    acc = EventAccumulator(str(run_dir / "eval" / "best"), size_guidance={"images": 0})  # a run of its own
    acc.Reload()
    tags = acc.Tags()
    assert {"robust/pgd_linf/mean", "robust/eot_pgd/sampled", "eval/accuracy/mean"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("robust/pgd_linf/mean")] == [0, 50, 100]  # step = 1000 * eps
    assert "robust/accuracy_vs_eps" in tags["images"]
    training = EventAccumulator(str(run_dir))
    training.Reload()
    assert not any(t.startswith(("robust/", "eval/")) for t in training.Tags()["scalars"])


def _scalar_steps(log_dir, tag):
    """The steps of `tag` in a TensorBoard run, sorted: a run's event files load in name order, and two files opened
    in the same second are ordered by process id."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return sorted(e.step for e in acc.Scalars(tag))


def test_eval_events_survive_a_training_resume_and_a_repeated_eval(tmp_path):
    run = tmp_path / "run"
    fit(load_recipe(DIGITS, [*SMALL, "epochs=1"]), run)
    training_events = sorted(run.glob("events.out.tfevents.*"))
    best = run / "eval" / "best"
    best.mkdir(parents=True)
    (best / "notes.txt").write_text("mine")  # not an event file: stays
    args = ["--attacks", "pgd_linf", "--eps", "0.05,0.1", "--steps", "2", "--limit", "40", "--samples", "0"]
    for target in (run, run, run / "last.pt"):  # best.pt twice (the second replaces the first), then last.pt
        assert main(["eval", str(target), *args]) == 0
    assert sorted(run.glob("events.out.tfevents.*")) == training_events
    assert len(list(best.glob("events.out.tfevents.*"))) == 1 and (best / "notes.txt").read_text() == "mine"

    # Training longer purges the training run's steps after epoch 1, and nothing of the evaluations.
    assert main(["train", "--resume", str(run), "epochs=2"]) == 0
    for name in ("best", "last"):
        assert _scalar_steps(run / "eval" / name, "robust/pgd_linf/mean") == [0, 50, 100]
        assert _scalar_steps(run / "eval" / name, "robust/fgsm/mean") == [0, 50, 100]
        assert _scalar_steps(run / "eval" / name, "eval/accuracy/mean") == [1]
    assert _scalar_steps(run, "loss/ce") == [1, 2]


@pytest.mark.parametrize("args, message", [  # each option is an eval.* override, checked by the recipe checker
    (["--attacks", "fgsm,cw"], "eval.attacks"),
    (["--eps=-0.1"], "eval.eps: -0.1 is out of range"),
    (["--eps", "0.1,x"], "eval.eps[1]: expected a number, got 'x'"),
    (["--steps", "0"], "eval.steps: 0 is out of range"),
    (["eval.steps=0"], "eval.steps: 0 is out of range"),
    (["epochs=3"], "ib eval takes eval.* settings only"),
    (["--eps="], "--eps: expected a comma-separated list"),
    (["--sigmas", "0.1,"], "--sigmas: expected a comma-separated list"),
])
def test_bad_arguments_exit_2_with_one_line(run_dir, capsys, args, message):
    assert main(["eval", str(run_dir), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ib: error: ") and message in err[0], err


@pytest.mark.parametrize("target, message", [("missing_dir/best.pt", "checkpoint not found"),
                                             ("empty", "no best.pt in run folder")])
def test_missing_checkpoint_exits_2(tmp_path, capsys, target, message):
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_eval_overrides_reach_the_report(run_dir):
    assert main(["eval", str(run_dir), "eval.attacks=[noise]", "eval.sigmas=[0.1]", "eval.limit=30",
                 "--samples", "0"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["n"] == 30 and report["settings"]["attacks"] == ["noise"] and report["settings"]["samples"] == 0
    assert report["settings"]["schedule"] == "adaptive"  # the default


def test_schedule_flag_reaches_the_rows_and_bad_schedule_exits_2(run_dir, capsys):
    assert main(["eval", str(run_dir), "--attacks", "pgd_linf", "--eps", "0.1", "--limit", "20", "--steps", "2",
                 "--samples", "0", "--schedule", "fixed", "eval.check_samples=0"]) == 0
    report = json.loads((run_dir / "eval.json").read_text())
    assert report["settings"]["schedule"] == "fixed"
    assert {r["schedule"] for r in report["robustness"] if r["attack"] == "pgd_linf"} == {"fixed"}
    assert {r["schedule"] for r in report["robustness"] if r["attack"] == "fgsm"} == {None}
    capsys.readouterr()
    for bad, key in (("eval.schedule=apgd", "eval.schedule"), ("eval.targets=-1", "eval.targets")):
        assert main(["eval", str(run_dir), bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err


def test_targeted_runs_only_add_broken_samples_on_the_mean_code(run_dir):
    """The untargeted attack is seeded alike with and without targets, and a targeted run replaces an input only where
    it breaks the prediction: on the deterministic mean code, accuracy with targets can only be lower."""
    accuracy = {}
    for targets in (0, 3):
        assert main(["eval", str(run_dir), "--attacks", "pgd_linf", "--eps", "0.1,0.2", "--limit", "60", "--steps",
                     "5", "--samples", "0", "--targets", str(targets), "eval.check_samples=0"]) == 0
        rows = json.loads((run_dir / "eval.json").read_text())["robustness"]
        accuracy[targets] = {r["eps"]: r["accuracy"] for r in rows if r["attack"] == "pgd_linf"}
        assert {r["targets"] for r in rows if r["attack"] == "pgd_linf"} == {targets}
    assert accuracy[3][0.0] == accuracy[0][0.0]
    assert all(accuracy[3][e] <= accuracy[0][e] for e in (0.1, 0.2))
    assert accuracy[3][0.1] < accuracy[0][0.1]  # the targeted runs broke something (4 of 60 samples here)


def test_recipe_eval_section_runs_at_the_end_of_training(tmp_path):
    """`ib train` runs the recipe's eval section once training completes."""
    run = tmp_path / "run"
    overrides = [*SMALL, "epochs=1", "eval.enabled=true", "eval.attacks=[pgd_linf]", "eval.eps=[0.1]",
                 "eval.steps=2", "eval.limit=40", "eval.check_samples=20"]
    assert main(["train", str(DIGITS), *overrides, "--run-dir", str(run)]) == 0
    report = json.loads((run / "eval.json").read_text())
    assert report["n"] == 40 and report["settings"]["attacks"] == ["fgsm", "pgd_linf"]
    assert (run / "robustness.csv").is_file() and (run / "robustness.png").is_file()
