"""The `ib` command on bad input: every malformed recipe, file and argument gives exit status 2 and one line
`ib: error: ...` naming what is wrong and what is allowed, no traceback, and no run folder.

The corpus `tests/data/bad_recipes/*.yaml` runs in-process through `ib.cli.main` (fast); a handful of cases also run
through the real console entry (`python -m ib`) in a subprocess, so that exit status and stderr are the real ones.
Each corpus file starts with `# expect: phrase | phrase ...`: phrases the error line must contain.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, run_main

import ib.engine.build

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "recipes" / "digits.yaml"
CORPUS = sorted((ROOT / "tests" / "data" / "bad_recipes").glob("*.yaml"))
# Cases whose error can only be found once the data set is known (its size, its input shape) or read.
AFTER_DATA = {"batch_larger_than_data", "data_missing", "model_too_big", "model_width_zero"}
MARKER = "ib_pwned_by_recipe"  # what the `!!python/...` recipes would create if their tags were constructed


def expected_phrases(path: Path) -> list:
    first = path.read_bytes().split(b"\n", 1)[0].decode("ascii")
    assert first.startswith("# expect:"), f"{path.name}: the first line must be '# expect: ...'"
    return [p.strip() for p in first.removeprefix("# expect:").split("|") if p.strip()]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for the few cases that train: on 2 shared cores it is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_data(monkeypatch):
    """Fail the test if anything loads a data set."""
    def refuse(*args, **kwargs):
        raise AssertionError("a data set was loaded before the recipe error was found")

    monkeypatch.setattr(ib.engine.build, "load_data", refuse)


def test_corpus_is_large_and_well_formed():
    assert len(CORPUS) >= 30
    for path in CORPUS:
        assert expected_phrases(path), path.name


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_bad_recipe_is_rejected_cleanly(path, tmp_path, capsys, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # a constructed `!!python/object/apply:os.system` would touch MARKER here
    if path.stem not in AFTER_DATA:
        request.getfixturevalue("no_data")
    run = tmp_path / "run"
    status, lines = run_main(["train", path, "--run-dir", run], capsys)
    assert_one_error_line(status, lines, expected_phrases(path))
    assert not run.exists()
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("name", ["python_object_apply", "syntax_unclosed_list", "non_utf8", "data_missing"])
def test_bad_recipe_through_the_console_entry(name, tmp_path):
    """The real process: exit status 2, stderr exactly one line, no traceback, no run folder, no code run."""
    path = ROOT / "tests" / "data" / "bad_recipes" / f"{name}.yaml"
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "ib", "train", str(path), "--run-dir", str(run)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr.splitlines(), expected_phrases(path))
    assert not run.exists()
    assert not (tmp_path / MARKER).exists()


def test_safe_yaml_does_not_run_code(tmp_path, capsys, monkeypatch):
    """A tag that would run `os.system` (or build any Python object) is refused; the command it names never runs."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"seed: !!python/object/apply:os.system ['touch {tmp_path / 'ran'}']\n"
                      f"name: !!python/object/apply:os.mkdir ['{tmp_path / 'made'}']\n")
    status, lines = run_main(["train", recipe, "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["invalid YAML", "python/object/apply"])
    assert not (tmp_path / "ran").exists() and not (tmp_path / "made").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Files that cannot be read


def test_missing_recipe_file(tmp_path, capsys, no_data):
    status, lines = run_main(["train", tmp_path / "nope.yaml", "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["recipe file not found", "nope.yaml"])
    assert not (tmp_path / "run").exists()


def test_zero_byte_recipe_file(tmp_path, capsys, no_data):
    (tmp_path / "zero.yaml").write_bytes(b"")
    status, lines = run_main(["train", tmp_path / "zero.yaml", "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["the recipe is empty"])


def test_recipe_path_is_a_folder(tmp_path, capsys, no_data):
    status, lines = run_main(["train", tmp_path, "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["recipe path is a folder"])


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_recipe_file_chmod(tmp_path, capsys, no_data):
    recipe = tmp_path / "locked.yaml"
    recipe.write_text("epochs: 3\n")
    recipe.chmod(0)
    status, lines = run_main(["train", recipe, "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["not readable", "permission denied"])


def test_unreadable_recipe_file_simulated(tmp_path, capsys, monkeypatch, no_data):
    """As root chmod 000 does not stop a read, so the read itself is made to fail as it would for another user."""
    recipe = tmp_path / "locked.yaml"
    recipe.write_text("epochs: 3\n")
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == recipe:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    status, lines = run_main(["train", recipe, "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["not readable", "permission denied", "locked.yaml"])


def test_missing_recipe_file_through_the_console_entry(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ib", "train", str(tmp_path / "nope.yaml")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr.splitlines(), ["recipe file not found"])


# ---------------------------------------------------------------------------------------------------------------------
# Command-line arguments


def _fake_run(run_dir: Path) -> Path:
    """A run folder whose last.pt holds a valid recipe (enough for the argument checks of --resume)."""
    from ib.checkpoint import save_checkpoint
    from ib.recipe import load_recipe, recipe_to_dict

    run_dir.mkdir()
    save_checkpoint(run_dir / "last.pt", {"format": 1, "recipe": recipe_to_dict(load_recipe(DIGITS))})
    return run_dir


BAD_ARGS = [
    # (arguments after `ib`; RUN stands for a folder with a last.pt, EMPTY for a folder without; phrases)
    (["train", DIGITS, "--bogus"], ["unrecognized arguments: --bogus"]),
    (["train", DIGITS, "--stop-after", "-1"], ["--stop-after", "expected an integer >= 1", "-1"]),
    (["train", DIGITS, "--stop-after", "0"], ["--stop-after", "expected an integer >= 1"]),
    (["train", DIGITS, "--stop-after", "two"], ["--stop-after", "expected an integer >= 1", "'two'"]),
    (["train", DIGITS, "epochs"], ["override 'epochs'", "expected key=value"]),
    (["train", DIGITS, "=3"], ["override '=3'", "expected key=value"]),
    (["train", DIGITS, "epochs=[1,"], ["override 'epochs=[1,'", "invalid YAML"]),
    (["train", DIGITS, "epochs=-3"], ["epochs: -3 is out of range", ">= 1"]),
    (["train", DIGITS, "beta.sub=1"], ["'beta' is a value, not a section"]),
    (["train", DIGITS, "model.encoder=transformer"], ["unknown encoder 'transformer'", "mlp"]),
    (["train"], ["give a recipe", "--resume"]),
    (["frobnicate"], ["invalid choice: 'frobnicate'", "train"]),
    (["train", "--resume", "EMPTY"], ["has no last.pt", "--overwrite"]),
    (["train", "--resume", "MISSING"], ["run folder", "not found"]),
    (["train", "--resume", "RUN", "beta=1"], ["only epochs=N may be changed", "beta=1"]),
    (["train", "--resume", "RUN", DIGITS], ["with --resume give no recipe"]),
    (["train", "--resume", "RUN", "--run-dir", "elsewhere"], ["--run-dir and --overwrite do not apply"]),
    (["train", "--resume", "RUN", "epochs=0"], ["epochs: 0 is out of range"]),
]


@pytest.mark.parametrize("argv,phrases", BAD_ARGS, ids=[" ".join(map(str, a[0][1:])).replace(str(DIGITS), "R")
                                                       or a[0][0] for a in BAD_ARGS])
def test_bad_arguments(argv, phrases, tmp_path, capsys, no_data):
    places = {"RUN": _fake_run(tmp_path / "run"), "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing"}
    places["EMPTY"].mkdir()
    before = (tmp_path / "run" / "last.pt").read_bytes()
    status, lines = run_main([places.get(a, a) for a in argv], capsys)
    assert_one_error_line(status, lines, phrases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # nothing created
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


@pytest.mark.parametrize("argv,phrases", [
    (["train", DIGITS, "--no-such-option"], ["unrecognized arguments: --no-such-option"]),
    (["train", DIGITS, "--stop-after", "-1"], ["--stop-after", ">= 1"]),
], ids=["unknown-option", "stop-after-negative"])
def test_bad_arguments_through_the_console_entry(argv, phrases, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ib", *map(str, argv), "--run-dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr.splitlines(), phrases)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_folder_without_last_pt_through_the_console_entry(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("epochs: 3\n")
    proc = subprocess.run([sys.executable, "-m", "ib", "train", "--resume", str(tmp_path / "run")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert_one_error_line(proc.returncode, proc.stderr.splitlines(), ["has no last.pt"])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["recipe.yaml"]


def test_existing_run_folder_is_refused_before_loading_data(tmp_path, capsys, no_data):
    run = _fake_run(tmp_path / "run")
    before = (run / "last.pt").read_bytes()
    status, lines = run_main(["train", DIGITS, "--run-dir", run], capsys)
    assert_one_error_line(status, lines, ["run folder", "exists", "--resume", "--overwrite"])
    assert (run / "last.pt").read_bytes() == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, no_data):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8")
    status, lines = run_main(["train", DIGITS, "--run-dir", folder, "--overwrite"], capsys)
    assert_one_error_line(status, lines, ["does not look like a run folder", "not removing it"])
    assert (folder / "holiday.jpg").read_bytes() == b"\xff\xd8"


def test_overwrite_replaces_a_run_and_keeps_what_ib_did_not_write(tmp_path, capsys, caplog):
    run = _fake_run(tmp_path / "run")
    (run / "recipe.yaml").write_text("old\n")
    (run / "events.out.tfevents.1.host").write_bytes(b"old events")
    (run / "eval" / "best").mkdir(parents=True)
    (run / "notes.txt").write_text("the user's own\n")
    small = ["epochs=1", "model.encoder.hidden=[16]", "model.bottleneck.z_dim=4", "mi.critic.hidden=[16]",
             "model.eval_samples=0", "monitor.plane_figure=false"]
    status, _ = run_main(["train", DIGITS, *small, "--run-dir", run, "--overwrite"], capsys)
    assert status == 0
    assert (run / "notes.txt").read_text() == "the user's own\n" and "kept notes.txt" in caplog.text
    assert not (run / "events.out.tfevents.1.host").exists() and not (run / "eval").exists()
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 1


def test_overwrite_refuses_a_project_folder_that_holds_a_recipe_yaml(tmp_path, capsys, no_data):
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "recipe.yaml").write_text(Path(DIGITS).read_text())  # a recipe, but no run beside it
    status, lines = run_main(["train", folder / "recipe.yaml", "--run-dir", folder, "--overwrite"], capsys)
    assert_one_error_line(status, lines, ["does not look like a run folder", "not removing it"])
    assert sorted(p.name for p in folder.iterdir()) == ["data", "recipe.yaml"]


def test_a_run_killed_while_writing_its_recipe_leaves_a_folder_overwrite_replaces(tmp_path, monkeypatch):
    """The event file comes before recipe.yaml, so no kill leaves a lone recipe.yaml (which --overwrite must refuse:
    it may be the user's own). Simulated: the recipe's write fails right after the loggers are made."""
    import ib.engine.run_dir as run_dir
    from ib.engine.build import build_run
    from ib.recipe import load_recipe

    run = build_run(load_recipe(DIGITS, ["model.encoder.hidden=[16]", "mi.critic.hidden=[16]"]))
    folder = tmp_path / "run"
    folder.mkdir()

    def killed(path, write):
        raise KeyboardInterrupt  # the process dies here

    monkeypatch.setattr(run_dir, "atomic_write", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dir.RunFolder(folder, run)
    assert any(p.name.startswith("events.out.tfevents") for p in folder.iterdir())
    run_dir.check_run_dir(folder, overwrite=True)  # no ConfigError: a run's folder, nothing of the user's


def test_overwrite_replaces_a_run_killed_before_its_first_epoch(tmp_path, capsys):
    """A run killed before its first checkpoint leaves its recipe and a TensorBoard event file (a sweep resumed
    after a kill meets such a folder); nothing else is there, so it is a run folder to replace."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(Path(DIGITS).read_text())
    (run / "events.out.tfevents.1.host").write_bytes(b"")
    small = ["epochs=1", "model.encoder.hidden=[16]", "model.bottleneck.z_dim=4", "mi.critic.hidden=[16]",
             "model.eval_samples=0", "monitor.plane_figure=false"]
    status, _ = run_main(["train", DIGITS, *small, "--run-dir", run, "--overwrite"], capsys)
    assert status == 0 and (run / "last.pt").is_file()
