"""`ib sweep`: the grid, its folder and plots, resuming after a kill, HParams, and TensorBoard serving it all."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ib.cli import main, parse_list
from ib.errors import ConfigError
from ib.monitor import read_csv
from ib.sweep import SweepRun, plan_sweep, run_sweep, train_with_torchrun

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "recipes" / "digits.yaml"
SMALL = ["epochs=2", "model.encoder.hidden=[32]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[32]",
         "beta_schedule.delay=0", "model.eval_samples=0", "monitor.plane_figure=false"]


def test_parse_list():
    assert parse_list("0,1e-4, 1e-3,1E-2,1", "beta") == [0.0, 1e-4, 1e-3, 1e-2, 1.0]
    assert parse_list("0,1,2", "seeds", int) == [0, 1, 2]


@pytest.mark.parametrize("text,words", [("", "comma-separated"), ("0,,1", "comma-separated"), ("a", "not a number"),
                                        ("-1", "negative"), ("nan", "not finite"), ("1,1", "twice"),
                                        ("inf", "not finite")])
def test_parse_list_rejects(text, words):
    with pytest.raises(ConfigError, match=words):
        parse_list(text, "beta")


def test_bad_beta_list_exits_2(tmp_path, capsys):
    assert main(["sweep", str(DIGITS), "--beta", "0,x", "--sweep-dir", str(tmp_path / "s")]) == 2
    assert "--beta: 'x' is not a number" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sweep_folder_csv_plots_and_hparams(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sweep = tmp_path / "sweep"
    evaluation = ["eval.enabled=true", "eval.limit=50", "eval.steps=2", "eval.attacks=[pgd_linf]", "eval.eps=[0.1]",
                  "eval.check_samples=0"]
    assert main(["sweep", str(DIGITS), "--beta", "0,1e-2", "--seeds", "0", *SMALL, *evaluation,
                 "--sweep-dir", str(sweep)]) == 0
    rows = read_csv(sweep / "sweep.csv")
    assert [(r["beta"], r["seed"], r["status"]) for r in rows] == [(0.0, 0.0, "completed"), (0.01, 0.0, "completed")]
    for r in rows:
        assert 0.25 < r["test_accuracy"] <= 1.0 and isinstance(r["I_XZ"], float)  # chance is 0.1
        assert (sweep / r["run"] / "metrics.json").is_file() and (sweep / r["run"] / "last.pt").is_file()
        report = json.loads((sweep / r["run"] / "eval.json").read_text())
        at_eps = [x["accuracy"] for x in report["robustness"] if x["threat"] == "linf" and x["eps"] == 0.1]
        assert len(at_eps) == 2  # pgd_linf and its fgsm reference, on the mean code alone (eval_samples=0)
        assert r["robust_accuracy"] == report["robust_accuracy"] == min(at_eps)
    for png in ("ib_curve.png", "accuracy_vs_beta.png"):
        assert (sweep / png).read_bytes()[:4] == b"\x89PNG"
    acc = EventAccumulator(str(sweep / rows[1]["run"]), size_guidance={"tensors": 0})
    acc.Reload()
    assert "_hparams_/experiment" in acc.summary_metadata or any("hparams" in t for t in acc.Tags()["tensors"])


def test_killed_sweep_skips_finished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    first = sweep / "beta_0_seed_0"
    cmd = [sys.executable, "-m", "ib", "sweep", str(DIGITS), "--beta", "0,1", "--seeds", "0", *SMALL,
           "epochs=6", "--sweep-dir", str(sweep)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if json.loads((first / "metrics.json").read_text())["status"] == "completed":
                break
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at = (first / "last.pt").stat().st_mtime_ns
    rows = run_sweep(DIGITS, [0.0, 1.0], [0], [*SMALL, "epochs=6"], sweep)
    assert (first / "last.pt").stat().st_mtime_ns == done_at  # not trained again
    assert [r["status"] for r in rows] == ["completed", "completed"]


def test_plan_names_runs_readably(tmp_path):
    runs = plan_sweep(DIGITS, [0.0, 1e-3, 0.01], [0, 1], SMALL, tmp_path)
    assert [r.name for r in runs] == ["beta_0_seed_0", "beta_0_seed_1", "beta_0.001_seed_0", "beta_0.001_seed_1",
                                      "beta_0.01_seed_0", "beta_0.01_seed_1"]
    assert [(r.recipe.beta, r.recipe.seed, r.recipe.name) for r in runs[2:4]] == [
        (1e-3, 0, "beta_0.001_seed_0"), (1e-3, 1, "beta_0.001_seed_1")]


def test_betas_sharing_a_run_folder_are_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"0\.001 and 0\.0010000001 would share the run folder beta_0\.001_seed_0"):
        plan_sweep(DIGITS, [1e-3, 0.0010000001], [0], SMALL, tmp_path)
    assert main(["sweep", str(DIGITS), "--beta", "0,1e-3,0.0010000001", *SMALL, "--sweep-dir",
                 str(tmp_path / "s")]) == 2
    assert "0.001 and 0.0010000001" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before any run was trained


def _history_lrs(run_dir):
    return [float(r["lr"]) for r in read_csv(run_dir / "history.csv")]


def test_unfinished_run_resumes_only_with_its_own_recipe(tmp_path):
    """An `ib train` run stopped after epoch 1 of 3 in the sweep folder: a sweep with another learning rate is
    refused before it trains; the same sweep with more epochs resumes the run with its saved recipe."""
    from ib.engine import fit
    from ib.recipe import load_recipe

    sweep = tmp_path / "sweep"
    run_dir = sweep / "beta_0_seed_0"
    recipe = load_recipe(DIGITS, [*SMALL, "epochs=3", "beta=0.0", "seed=0", "name=beta_0_seed_0"])
    assert fit(recipe, run_dir, stop_after=1)["status"] == "stopped"
    stopped_at = (run_dir / "last.pt").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"sweep run beta_0_seed_0 was trained with other settings "
                                          r"\(optimizer\.lr: 0\.001 -> 0\.05\).*new --sweep-dir"):
        run_sweep(DIGITS, [0.0], [0], [*SMALL, "epochs=3", "optimizer.lr=0.05"], sweep)
    assert (run_dir / "last.pt").stat().st_mtime_ns == stopped_at  # nothing trained
    assert _history_lrs(run_dir) == [0.001]

    rows = run_sweep(DIGITS, [0.0], [0], [*SMALL, "epochs=4"], sweep)
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", 4)]
    assert _history_lrs(run_dir) == [0.001] * 4
    saved = load_recipe(run_dir / "recipe.yaml")
    assert (saved.optimizer.lr, saved.epochs) == (0.001, 4)


def test_finished_run_with_other_settings_is_not_reported_as_new(tmp_path):
    """A finished run is skipped only when the sweep asks for what it was trained with; more epochs train it on,
    fewer, or any other change, stop the sweep before it trains anything."""
    sweep = tmp_path / "sweep"
    run_dir = sweep / "beta_0_seed_0"
    run_sweep(DIGITS, [0.0], [0], SMALL, sweep)  # epochs=2
    done_at = (run_dir / "last.pt").stat().st_mtime_ns
    for change, words in [(["model.bottleneck.z_dim=4"], r"model\.bottleneck\.z_dim: 8 -> 4"),
                          (["epochs=1"], "epochs=1 is fewer than the 2 epochs")]:
        with pytest.raises(ConfigError, match=f"sweep run beta_0_seed_0.*{words}"):
            run_sweep(DIGITS, [0.0, 1.0], [0], [*SMALL, *change], sweep)
    assert (run_dir / "last.pt").stat().st_mtime_ns == done_at
    assert not (sweep / "beta_1_seed_0").exists()  # the check comes before any run is trained

    rows = run_sweep(DIGITS, [0.0], [0], [*SMALL, "epochs=3"], sweep)
    assert [(r["status"], r["epochs"]) for r in rows] == [("completed", 3)]
    assert len(read_csv(run_dir / "history.csv")) == 3


def test_finished_run_without_its_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "beta_0_seed_0"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed", "epochs": 2}))
    with pytest.raises(ConfigError, match="beta_0_seed_0 is marked completed but has no last.pt"):
        run_sweep(DIGITS, [0.0], [0], SMALL, tmp_path)


def test_torchrun_resumes_with_the_planned_epochs(tmp_path, monkeypatch):
    """The torchrun path resumes as `ib train --resume DIR epochs=N`, as the single-process path does."""
    from ib.recipe import load_recipe

    run_dir = tmp_path / "beta_0_seed_0"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text(json.dumps({"status": "completed"}))
    commands = []

    class Child:
        def __init__(self, cmd, env):
            commands.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    run = SweepRun(0.0, 0, load_recipe(DIGITS, [*SMALL, "epochs=5"]), run_dir)
    assert train_with_torchrun(run, DIGITS, SMALL, 2, resume=True) == "completed"
    assert commands[0][-3:] == ["--resume", str(run_dir), "epochs=5"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensorboard_serves_scalars_and_hparams(tmp_path):
    sweep = tmp_path / "sweep"
    run_sweep(DIGITS, [0.0, 1e-2], [0], SMALL, sweep)
    port = _free_port()
    tb = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(sweep), "--host", "127.0.0.1",
                           "--port", str(port), "--load_fast", "false"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    try:
        base = f"http://127.0.0.1:{port}"
        tags = None
        for _ in range(150):  # up to ~30 s for TensorBoard to start and load the runs
            try:
                tags = json.loads(urllib.request.urlopen(f"{base}/data/plugin/scalars/tags", timeout=2).read())
                if len(tags) >= 2 and all("mi/I_XZ" in t for t in tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.2)
        assert tags and {"beta_0_seed_0", "beta_0.01_seed_0"} <= set(tags), tags
        assert {"mi/I_XZ", "mi/I_ZY", "acc/test"} <= set(tags["beta_0_seed_0"])
        req = urllib.request.Request(f"{base}/data/plugin/hparams/experiment", data=b'{"experimentName": ""}',
                                     headers={"Content-Type": "application/json", "X-TensorBoard-Feature-Flags": "{}"})
        experiment = json.loads(urllib.request.urlopen(req, timeout=5).read())
        names = {h["name"] for h in experiment["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {"beta", "seed"} <= names
        assert "hparams/test_accuracy" in metrics
    finally:
        tb.terminate()
        tb.wait(10)


VECTOR_SETTINGS = {  # vib_kl with the recipe's Adam; MINE with SGD (see tests/engine/test_population.py on Adam)
    "vib_kl": ["mi.estimator=vib_kl"],
    "mine": ["optimizer={name: sgd, lr: 0.05, momentum: 0.9}", "mi.optimizer={name: sgd, lr: 0.05, momentum: 0.9}"],
}


@pytest.mark.parametrize("estimator", ["mine", "vib_kl"])
def test_vectorized_sweep_equals_the_sequential_one_and_trains_on(tmp_path, estimator):
    """Four runs (betas 0 and 0.01, seeds 0 and 1) trained one after another, and as one population: first for
    one epoch, then asked for a second (each member resumes from its last.pt). Every run folder holds the same
    weights, MINE's moving average, RNG state and figures to float rounding."""
    import torch

    settings = [*SMALL, *VECTOR_SETTINGS[estimator]]
    grid = ["--beta", "0,1e-2", "--seeds", "0,1"]
    assert main(["sweep", str(DIGITS), *grid, *settings, "--sweep-dir", str(tmp_path / "seq")]) == 0
    assert main(["sweep", str(DIGITS), *grid, *settings, "epochs=1", "--vectorize",
                 "--sweep-dir", str(tmp_path / "vec")]) == 0
    assert main(["sweep", str(DIGITS), *grid, *settings, "--vectorize", "--sweep-dir", str(tmp_path / "vec")]) == 0
    seq, vec = read_csv(tmp_path / "seq" / "sweep.csv"), read_csv(tmp_path / "vec" / "sweep.csv")
    assert [r["run"] for r in seq] == [r["run"] for r in vec] and len(seq) == 4
    for a, b in zip(seq, vec):
        assert a["status"] == b["status"] == "completed" and a["epochs"] == b["epochs"] == 2
        for key in ("test_accuracy", "val_accuracy", "I_XZ", "I_ZY", "I_XZ_pairwise_upper"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["run"], key)
        x = torch.load(tmp_path / "seq" / a["run"] / "last.pt", weights_only=False)
        y = torch.load(tmp_path / "vec" / a["run"] / "last.pt", weights_only=False)
        for part in ("model", "estimator"):
            for name, value in (x[part] or {}).items():
                torch.testing.assert_close(y[part][name], value, rtol=1e-5, atol=1e-6, msg=f"{a['run']}: {name}")
        assert torch.equal(x["rng"]["torch"], y["rng"]["torch"]) and x["step"] == y["step"]


@pytest.mark.parametrize("setting, reason", [("model.encoder.dropout=0.5", "dropout"),
                                             ("monitor.alignment.enabled=true", "monitor.alignment")])
def test_vectorize_refuses_what_it_cannot_batch_in_one_line(tmp_path, capsys, setting, reason):
    assert main(["sweep", str(DIGITS), "--beta", "0,1e-2", *SMALL, setting, "--vectorize",
                 "--sweep-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vectorize" in err[0] and reason in err[0] and "without --vectorize" in err[0], err
    assert not list((tmp_path / "s").glob("beta_*"))


def test_a_population_too_large_for_memory_stops_before_training(tmp_path, capsys, monkeypatch):
    import ib.engine.population_loop as population_loop

    monkeypatch.setattr(population_loop, "available_memory", lambda: 2**16)  # 64 kB: less than two tiny runs need
    assert main(["sweep", str(DIGITS), "--beta", "0,1e-2", *SMALL, "--vectorize",
                 "--sweep-dir", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs about" in err[0] and "MB available" in err[0], err
    assert not list((tmp_path / "s").glob("beta_*/last.pt"))


def test_vectorized_sweep_interrupted_mid_epoch_resumes_exactly(tmp_path, monkeypatch):
    """SIGINT at step 27 of 40 (mid second epoch): every member saves its last.pt there (its loader's position, its
    epoch sums, its RNG stream), and the same command then finishes the sweep with the weights and streams of a
    sweep never interrupted."""
    import signal as signals

    import torch

    import ib.engine.population_loop as population_loop

    settings = [*SMALL, "mi.estimator=vib_kl"]
    run_sweep(DIGITS, [0.0, 1e-2], [0], settings, tmp_path / "ref", vectorize=True)
    real, calls = population_loop.population_step, {"n": 0}

    def step(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 27:
            os.kill(os.getpid(), signals.SIGINT)
        return out

    monkeypatch.setattr(population_loop, "population_step", step)
    rows = run_sweep(DIGITS, [0.0, 1e-2], [0], settings, tmp_path / "int", vectorize=True, handle_signals=True)
    assert [r["status"] for r in rows] == ["interrupted", "interrupted"]
    for r in rows:
        state = torch.load(tmp_path / "int" / r["run"] / "last.pt", weights_only=False)
        assert state["step"] == 27 and state["train_loader"]["position"] == 7
    monkeypatch.setattr(population_loop, "population_step", real)
    rows = run_sweep(DIGITS, [0.0, 1e-2], [0], settings, tmp_path / "int", vectorize=True)
    assert [r["status"] for r in rows] == ["completed", "completed"]
    for r in rows:
        a = torch.load(tmp_path / "ref" / r["run"] / "last.pt", weights_only=False)
        b = torch.load(tmp_path / "int" / r["run"] / "last.pt", weights_only=False)
        for name, value in a["model"].items():
            assert torch.equal(b["model"][name], value), (r["run"], name)
        assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and a["step"] == b["step"] == 40
