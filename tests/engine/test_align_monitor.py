"""The alignment monitor in a training run: its schedule, files, exactness, resume and bad input."""
import csv
import json
import math
import re
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, run_main, tensors

from ib.engine import build_run, fit
from ib.engine.align_monitor import balanced_sample, log_spaced_steps
from ib.data import Split
from ib.errors import ConfigError
from ib.monitor import write_plane_plots
from ib.recipe import load_recipe

DIGITS = Path(__file__).parents[2] / "recipes" / "digits.yaml"
SMALL = ["model.encoder.hidden=[32]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[32]", "beta_schedule.delay=0",
         "model.eval_samples=2", "monitor.probe_size=60"]
ON = ["monitor.alignment.enabled=true", "monitor.alignment.probe_size=30"]


def _rows(path: Path):
    return list(csv.DictReader(path.open()))


def test_log_spaced_steps_are_the_papers():
    """Step 0, floor(5 * 1.15^k) (5, 5, 6, 7, 8, 10, 11, 13, 15, 17, 20, 23, ...) and the last step."""
    assert sorted(log_spaced_steps(24)) == [0, 5, 6, 7, 8, 10, 11, 13, 15, 17, 20, 23, 24]
    assert sorted(log_spaced_steps(3)) == [0, 3]


def test_balanced_sample_takes_even_classes_and_fills_up_from_the_others():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 2)
    split = Split(torch.arange(len(y)).float()[:, None], y)
    part = balanced_sample(split, 30, 3, seed=0)
    assert torch.bincount(part.y, minlength=3).tolist() == [14, 14, 2]  # class 2 short: 10 + 10 + 2, then 4 + 4
    assert len(set(part.x.flatten().tolist())) == 30  # no row twice
    assert torch.equal(part.x, balanced_sample(split, 30, 3, seed=0).x)  # seeded
    assert torch.bincount(balanced_sample(split, 7, 3, seed=1).y).tolist() == [3, 2, 2]


def test_monitor_measures_on_the_schedule_and_leaves_training_unchanged(tmp_path):
    """alignment.csv holds the log-spaced steps up to the last one; history.csv carries the latest measurement;
    the TensorBoard sub-run and alignment.png are written; and the weights equal a run without the monitor."""
    fit(load_recipe(DIGITS, ["epochs=2", *SMALL, *ON]), tmp_path / "on")
    fit(load_recipe(DIGITS, ["epochs=2", *SMALL]), tmp_path / "off")
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("on", "off"))
    assert all(torch.equal(x, y) for x, y in zip(tensors(a["model"]), tensors(b["model"])))
    last = json.loads((tmp_path / "on" / "metrics.json").read_text())["steps"]
    rows = _rows(tmp_path / "on" / "alignment.csv")
    assert [int(float(r["step"])) for r in rows] == sorted(log_spaced_steps(last))
    for r in rows:
        for key in ("align/train", "align/test", "align/encoder", "align/decoder", "align/layer/encoder.net.0",
                    "align/layer/head", "align/layer/decoder.0"):
            assert -1.0 <= float(r[key]) <= 1.0, key
        assert float(r["align/trace"]) > 0 and 1.0 <= float(r["align/eff_rank"]) <= 10 * 30
    assert float(rows[-1]["align/train"]) > float(rows[0]["align/train"])  # training aligns the kernel
    history = _rows(tmp_path / "on" / "history.csv")
    assert float(history[-1]["align/step"]) == last and history[-1]["align/train"] == rows[-1]["align/train"]
    assert float(history[0]["time/align_s"]) > 0
    assert list((tmp_path / "on" / "alignment").glob("events.out.tfevents.*"))
    assert tmp_path / "on" / "alignment.png" in write_plane_plots(tmp_path / "on")


def test_a_resumed_run_continues_the_alignment_log_exactly(tmp_path):
    fit(load_recipe(DIGITS, ["epochs=3", *SMALL, *ON]), tmp_path / "straight")
    fit(load_recipe(DIGITS, ["epochs=3", *SMALL, *ON]), tmp_path / "split", stop_after=1)
    with (tmp_path / "split" / "alignment.csv").open("a") as f:  # a measurement a crash left after the checkpoint
        f.write("2," + "99," * 11 + "99\n")
    from ib.engine import resume_recipe
    fit(resume_recipe(tmp_path / "split"), tmp_path / "split", resume=True)
    straight, split = _rows(tmp_path / "straight" / "alignment.csv"), _rows(tmp_path / "split" / "alignment.csv")
    assert [r["step"] for r in split] == [r["step"] for r in straight]
    for a, b in zip(straight, split):
        assert float(a["align/train"]) == pytest.approx(float(b["align/train"]), rel=1e-6)


def test_convnet_encoder_is_measured(tmp_path):
    recipe = load_recipe(DIGITS, [*SMALL, *ON, "model.encoder={name: convnet, channels: [4], hidden: 16}"])
    run = build_run(recipe)
    row = run.alignment.measure(run.model, 0)
    assert "align/layer/encoder.features.0" in row and all(not math.isnan(v) for v in row.values())


@pytest.mark.parametrize("override, phrase", [
    ("monitor.alignment.probe_size=500", "monitor.alignment.probe_size=500 is larger than the test split (360 "
                                         "samples)"),
    ("monitor.alignment.layers=[encoder.net.7]", "monitor.alignment.layers: no layer 'encoder.net.7' in this model; "
                                                 "valid: encoder.net.0, head, decoder.0"),
])
def test_bad_alignment_settings_fail_before_training(tmp_path, override, phrase):
    with pytest.raises(ConfigError, match=re.escape(phrase)):
        build_run(load_recipe(DIGITS, [*SMALL, *ON, override]))


def test_cli_reports_a_bad_alignment_probe_in_one_line(tmp_path, capsys):
    status, lines = run_main(["train", DIGITS, *SMALL, *ON, "monitor.alignment.probe_size=5000", "--run-dir",
                              tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["monitor.alignment.probe_size=5000 is larger than the train split"])
    status, lines = run_main(["train", DIGITS, *SMALL, "monitor.alignment.probe_size=1"], capsys)
    assert_one_error_line(status, lines, ["monitor.alignment.probe_size: 1 is out of range"])


def test_label_noise_replaces_that_share_of_the_training_labels_only(tmp_path):
    clean = build_run(load_recipe(DIGITS, SMALL)).data
    noisy = build_run(load_recipe(DIGITS, [*SMALL, "data.label_noise=0.5"])).data
    drawn = int(0.5 * len(clean.train))
    changed = int((clean.train.y != noisy.train.y).sum())
    # each drawn label stays right with probability 1/10: about 0.9 * drawn change (binomial, std ~ 8 here)
    assert 0.9 * drawn - 40 < changed <= drawn
    assert torch.equal(clean.val.y, noisy.val.y) and torch.equal(clean.test.y, noisy.test.y)
    assert torch.equal(clean.train.x, noisy.train.x)
    fit(load_recipe(DIGITS, [*SMALL, "epochs=1", "data.label_noise=0.2"]), tmp_path / "run")
    assert load_recipe(tmp_path / "run" / "recipe.yaml").data.label_noise == 0.2
