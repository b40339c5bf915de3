"""Faults lose nothing and runs repeat exactly: killed and interrupted runs resume to the same weights and metrics,
non-finite steps are skipped and counted, damaged or malicious checkpoints are refused, a full disk or an unwritable
folder gives one clear line and keeps the previous checkpoint, and a run folder never claims more than happened."""
import csv
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import assert_one_error_line, run_main, tensors

import ib.checkpoint
import ib.engine.build
import ib.engine.loop
from ib.checkpoint import load_checkpoint
from ib.engine import fit, train_step
from ib.errors import CheckpointError
from ib.estimators import ESTIMATORS
from ib.models.classifier import build_classifier
from ib.models.critics import CRITICS, JointCritic
from ib.recipe import load_recipe

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "recipes" / "digits.yaml"
SMALL = ["model.encoder.hidden=[64]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[64]", "beta_schedule.delay=0",
         "model.eval_samples=2", "monitor.plane_figure=false"]
EPOCHS = 8
RUN = [f"epochs={EPOCHS}", *SMALL]  # 20 steps an epoch (1,294 training digits, batches of 64)
STEPS_PER_EPOCH = 20
PARTS = ("model", "estimator", "optimizer", "critic_optimizer")


# ---------------------------------------------------------------------------------------------------------------------
# Helpers


def _same(a, b) -> bool:
    """Bitwise-equal tensors, equal everything else, through nested dicts and lists."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same_state(a: Path, b: Path, parts=PARTS):
    """The named parts of two checkpoints are identical: every weight, MINE's average, the Adam moments."""
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for part in parts:
        assert list(tensors(sa[part])) or part == "beta_schedule", f"{part} holds no tensors"
        assert _same(sa[part], sb[part]), part
    assert (sa["epoch"], sa["step"]) == (sb["epoch"], sb["step"])


def metrics_without_timings(run_dir: Path):
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in m.items() if "seconds" not in k}


def history_without_timings(run_dir: Path):
    with (run_dir / "history.csv").open(newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def assert_same_run(run_dir: Path, reference: Path):
    assert_same_state(run_dir / "last.pt", reference / "last.pt")
    assert metrics_without_timings(run_dir) == metrics_without_timings(reference)
    assert history_without_timings(run_dir) == history_without_timings(reference)


def start_training(run_dir: Path, cwd: Path) -> subprocess.Popen:
    """`ib -q train` of the digits recipe (RUN) into run_dir, in a child process on one thread."""
    return subprocess.Popen([sys.executable, "-m", "ib", "-q", "train", str(DIGITS), *RUN, "--run-dir", str(run_dir)],
                            cwd=cwd, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (status {proc.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout} s"
        time.sleep(0.01)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread, here and in the subprocesses (ONE_THREAD): on 2 shared cores the tiny models train
    several times faster than with 2 contending threads, and runs that are compared use the same thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    fit(load_recipe(DIGITS, RUN), run_dir)
    return run_dir


@pytest.fixture
def no_data(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a data set was loaded")

    monkeypatch.setattr(ib.engine.build, "load_data", refuse)


# ---------------------------------------------------------------------------------------------------------------------
# Killed and interrupted runs


def test_sigkill_then_resume_reproduces_the_uninterrupted_run(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, tmp_path)
    try:
        wait_for(run_dir / "last.pt", proc)
        time.sleep(0.05)  # into the next epoch
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(run_dir / "last.pt")["epoch"]
    assert 1 <= killed_at < EPOCHS
    status, _ = run_main(["train", "--resume", run_dir], capsys)
    assert status == 0
    assert_same_run(run_dir, reference)


def test_sigint_saves_last_pt_says_how_to_resume_and_resume_reproduces_the_run(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = start_training(run_dir, tmp_path)
    try:
        wait_for(run_dir / "metrics.json", proc)  # written after epoch 1's last.pt
        epoch_seconds = json.loads((run_dir / "metrics.json").read_text())["epoch_seconds"][0]
        time.sleep(0.3 * epoch_seconds)  # aim into epoch 2's training (measured: steps 27-31 of 40)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    lines = err.splitlines()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    how = [line for line in lines if "ib train --resume" in line]
    assert how == [f"interrupted: last.pt saved; continue with: ib train --resume {run_dir}"], lines
    state = load_checkpoint(run_dir / "last.pt")  # mid-epoch, or at an epoch's end if the signal came late
    assert state["step"] < EPOCHS * STEPS_PER_EPOCH
    assert state["train_loader"]["position"] == state["step"] - STEPS_PER_EPOCH * state["epoch"]
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    status, _ = run_main(["train", "--resume", run_dir], capsys)
    assert status == 0
    assert_same_run(run_dir, reference)


def _interrupt_self():
    """SIGINT to this process, as Ctrl-C would send; only while fit's handler is installed (else pytest would stop)."""
    assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "fit installed no SIGINT handler"
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("when", ["mid-epoch", "last-step-of-epoch", "during-evaluation"])
def test_interrupt_at_a_chosen_moment_then_resume(when, reference, tmp_path, monkeypatch):
    """SIGINT at a known point: the loader's position (or the epoch boundary) is saved and resuming is exact."""
    run_dir = tmp_path / "run"
    real_step, real_evaluate = ib.engine.loop.train_step, ib.engine.loop.evaluate
    calls = {"steps": 0, "evaluations": 0}
    signal_at_step = {"mid-epoch": STEPS_PER_EPOCH + 7, "last-step-of-epoch": 2 * STEPS_PER_EPOCH}.get(when)

    def step(*args, **kwargs):
        out = real_step(*args, **kwargs)
        calls["steps"] += 1
        if calls["steps"] == signal_at_step:
            _interrupt_self()
        return out

    def evaluate(*args, **kwargs):
        calls["evaluations"] += 1
        if when == "during-evaluation" and calls["evaluations"] == 2:  # epoch 2's validation (test: last epoch only)
            _interrupt_self()
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(ib.engine.loop, "train_step", step)
    monkeypatch.setattr(ib.engine.loop, "evaluate", evaluate)
    metrics = fit(load_recipe(DIGITS, RUN), run_dir, handle_signals=True)
    assert metrics["status"] == "interrupted"
    state = load_checkpoint(run_dir / "last.pt")
    if when == "mid-epoch":
        assert (state["epoch"], state["step"], state["train_loader"]["position"]) == (1, 27, 7)
        assert state["epoch_stats"]["steps"] == 7
    elif when == "last-step-of-epoch":  # the epoch's batches are done, its evaluation is not
        assert (state["epoch"], state["step"], state["train_loader"]["position"]) == (1, 40, STEPS_PER_EPOCH)
    else:
        assert (state["epoch"], state["step"], state["epoch_stats"]) == (2, 40, None)
    monkeypatch.undo()
    assert fit(load_recipe(DIGITS, RUN), run_dir, resume=True)["status"] == "completed"
    assert_same_run(run_dir, reference)


def test_same_seed_same_everything(tmp_path):
    """Two runs of one recipe: every tensor of last.pt (weights, optimizers, RNG and loader states), history.csv and
    metrics.json agree, timings aside."""
    recipe = load_recipe(DIGITS, ["epochs=2", *SMALL])
    fit(recipe, tmp_path / "a")
    fit(recipe, tmp_path / "b")
    assert_same_state(tmp_path / "a" / "last.pt", tmp_path / "b" / "last.pt",
                      parts=(*PARTS, "rng", "train_loader", "beta_schedule"))
    assert metrics_without_timings(tmp_path / "a") == metrics_without_timings(tmp_path / "b")
    assert history_without_timings(tmp_path / "a") == history_without_timings(tmp_path / "b")


# ---------------------------------------------------------------------------------------------------------------------
# Numerical faults


def _tiny_minimax():
    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (16,)}, "gaussian", {"z_dim": 4}, in_shape=(1, 4, 4), num_classes=3,
                             mean=(0.5,), std=(0.25,))
    critic = CRITICS.create("joint", (1, 4, 4), 4, hidden=(16,), input_noise=0.0, hidden_noise=0.0)
    estimator = ESTIMATORS.create("mine", critic)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    critic_opt = torch.optim.Adam(estimator.parameters(), lr=1e-2)
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    return model, estimator, opt, critic_opt, x, y


def _snapshot(module, optimizer):
    return ([t.detach().clone() for t in module.state_dict().values()],
            [t.clone() for t in tensors(optimizer.state_dict()["state"])])


def _unchanged(before, module, optimizer):
    now = _snapshot(module, optimizer)
    return all(len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(before, now))


def _inject(kind, model, estimator):
    """Make the next step non-finite in one place; returns the hook handles to remove."""
    inf, nan = float("inf"), float("nan")
    if kind in ("critic_joint_inf", "critic_marginal_nan"):
        real = estimator.critic.pair_scores

        def pair_scores(x, z, z_marginal):
            t_joint, t_marginal = real(x, z, z_marginal)
            return (t_joint + inf, t_marginal) if kind == "critic_joint_inf" else (t_joint, t_marginal * nan)

        estimator.critic.pair_scores = pair_scores
        return []
    if kind == "critic_grad_inf":
        return [next(estimator.critic.parameters()).register_hook(lambda g: g * inf)]
    if kind == "encoder_loss_inf":
        real_decode = model.decode
        model.decode = lambda z: real_decode(z) + inf
        return []
    if kind.startswith("encoder_grad_nan"):
        return [next(model.parameters()).register_hook(lambda g: g * nan)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["critic_joint_inf", "critic_marginal_nan", "critic_grad_inf", "encoder_loss_inf",
                                  "encoder_grad_nan", "encoder_grad_nan_clipped"])
def test_a_non_finite_step_is_skipped_without_touching_what_it_must_not(kind):
    model, estimator, opt, critic_opt, x, y = _tiny_minimax()
    train_step(model, estimator, opt, critic_opt, x, y, beta=0.1)  # a good step first: MINE's average is started
    assert int(estimator.ema_steps) == 1
    encoder_before, critic_before = _snapshot(model, opt), _snapshot(estimator, critic_opt)
    ema_steps = int(estimator.ema_steps)
    handles = _inject(kind, model, estimator)
    out = train_step(model, estimator, opt, critic_opt, x, y, beta=0.1,
                     grad_clip=1.0 if kind.endswith("clipped") else None)
    for h in handles:
        h.remove()
    assert not bool(out["finite"])
    assert _unchanged(encoder_before, model, opt), "the encoder or its optimiser moved on a non-finite step"
    assert all(p.grad is None for p in model.parameters())
    if kind.startswith("critic"):
        # the critic's bad update is not applied, and MINE's moving average (log_ema, ema_steps) is as before
        assert _unchanged(critic_before, estimator, critic_opt), "the critic, its optimiser or its average moved"
    else:  # the critic's own update was finite, so it stands
        assert int(estimator.ema_steps) == ema_steps + 1
    assert all(p.grad is None for p in estimator.parameters())
    # and the next good step trains normally
    if kind in ("critic_joint_inf", "critic_marginal_nan"):
        del estimator.critic.pair_scores
    if kind == "encoder_loss_inf":
        del model.decode
    assert bool(train_step(model, estimator, opt, critic_opt, x, y, beta=0.1)["finite"])
    assert all(torch.isfinite(p).all() for p in [*model.parameters(), *estimator.parameters()])


class _Poison:
    """Makes the critic return +inf scores during chosen training steps (counted over `train_step` calls) and checks,
    around each poisoned step, that nothing of the model, the critic or MINE's average moved."""

    def __init__(self, monkeypatch, bad_steps):
        self.bad_steps, self.calls, self.active, self.checked = bad_steps, 0, False, 0
        real_step, real_scores = ib.engine.loop.train_step, JointCritic.pair_scores

        def step(model, estimator, optimizer, critic_optimizer, *args, **kwargs):
            self.calls += 1
            self.active = self.calls in self.bad_steps
            before = (_snapshot(model, optimizer), _snapshot(estimator, critic_optimizer)) if self.active else None
            try:
                out = real_step(model, estimator, optimizer, critic_optimizer, *args, **kwargs)
            finally:
                self.active = False
            if before is not None:
                assert not bool(out["finite"])
                assert _unchanged(before[0], model, optimizer)
                assert _unchanged(before[1], estimator, critic_optimizer)  # includes log_ema and ema_steps
                self.checked += 1
            return out

        def pair_scores(critic, x, z, z_marginal):
            t_joint, t_marginal = real_scores(critic, x, z, z_marginal)
            return (t_joint + float("inf"), t_marginal) if self.active else (t_joint, t_marginal)

        monkeypatch.setattr(ib.engine.loop, "train_step", step)
        monkeypatch.setattr(JointCritic, "pair_scores", pair_scores)  # the recipes use the joint critic


def test_one_bad_batch_is_skipped_and_counted(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    poison = _Poison(monkeypatch, bad_steps={STEPS_PER_EPOCH + 5})  # the 5th step of epoch 2
    run_dir = tmp_path / "run"
    metrics = fit(load_recipe(DIGITS, ["epochs=3", *SMALL]), run_dir)
    assert poison.checked == 1
    assert metrics["status"] == "completed" and metrics["nonfinite_steps"] == 1
    assert json.loads((run_dir / "metrics.json").read_text())["nonfinite_steps"] == 1
    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    assert [float(r["faults/nonfinite_steps"]) for r in rows] == [0.0, 1.0, 1.0]
    assert all(float(r["loss/total"]) == float(r["loss/total"]) for r in rows)  # no NaN leaked into the sums
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("faults/nonfinite_steps")] == [(1, 0.0), (2, 1.0), (3, 1.0)]
    state = load_checkpoint(run_dir / "last.pt")
    assert all(torch.isfinite(t).all() for t in tensors([state["model"], state["estimator"]]))


def test_consecutive_faults_stop_the_run_with_a_clear_error_and_an_intact_last_pt(tmp_path, monkeypatch, capsys):
    start = STEPS_PER_EPOCH + 3
    poison = _Poison(monkeypatch, bad_steps=set(range(start, 10_000)))  # from epoch 2 on, every step
    run_dir = tmp_path / "run"
    status, lines = run_main(["train", DIGITS, "epochs=3", *SMALL, "max_nonfinite_steps=4", "--run-dir", run_dir],
                             capsys)
    assert_one_error_line(status, lines, ["4 consecutive non-finite steps", f"step {start + 3}", "last.pt"])
    assert poison.checked == 4
    state = load_checkpoint(run_dir / "last.pt")  # loadable, from the last good epoch
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "4 consecutive non-finite steps" in metrics["error"]
    assert metrics["epochs"] == 1
    assert not list(run_dir.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints: damaged or malicious files are refused and never overwritten


class _Evil:
    """Unpickling this runs `os.mkdir(path)`: what a malicious checkpoint could do with any callable."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def _damage(kind: str, path: Path, tmp_path: Path) -> None:
    data = path.read_bytes() if path.exists() else b""
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_to_a_few_bytes":
        path.write_bytes(data[:10])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif kind == "zeroed_header":
        path.write_bytes(bytes(512) + data[512:])
    elif kind == "not_a_checkpoint":
        torch.save([1, 2, 3], path)
    elif kind == "malicious_pickle":
        torch.save({"format": 1, "payload": _Evil(tmp_path / "pwned")}, path)
    else:
        raise ValueError(kind)


@pytest.mark.parametrize("kind,phrases", [
    ("truncated", ["cannot read checkpoint", "truncated or corrupted"]),
    ("truncated_to_a_few_bytes", ["cannot read checkpoint", "truncated or corrupted"]),
    ("empty", ["cannot read checkpoint", "truncated or corrupted"]),
    ("garbage", ["cannot read checkpoint", "truncated or corrupted"]),
    ("zeroed_header", ["cannot read checkpoint", "truncated or corrupted"]),
    ("not_a_checkpoint", ["is not an ib checkpoint"]),
    ("malicious_pickle", ["cannot read checkpoint", "weights_only"]),
])
def test_damaged_checkpoint_is_refused_and_kept(kind, phrases, reference, tmp_path, capsys, no_data):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    _damage(kind, run_dir / "last.pt", tmp_path)
    damaged = (run_dir / "last.pt").read_bytes()
    others = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, lines = run_main(["train", "--resume", run_dir, f"epochs={EPOCHS + 1}"], capsys)
    assert_one_error_line(status, lines, [str(run_dir / "last.pt"), *phrases])
    assert (run_dir / "last.pt").read_bytes() == damaged  # not overwritten, not "repaired"
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == others
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(CheckpointError):
        load_checkpoint(run_dir / "last.pt")


def test_the_malicious_pickle_really_is_one(tmp_path):
    """The payload of the test above does run when loaded without weights_only: the refusal is what stops it."""
    path = tmp_path / "evil.pt"
    _damage("malicious_pickle", path, tmp_path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    torch.load(path, weights_only=False)
    assert (tmp_path / "pwned").is_dir()


def test_checkpoint_that_does_not_match_its_recipe_is_refused_and_kept(reference, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    state = torch.load(run_dir / "last.pt", weights_only=True)
    state["recipe"]["model"]["bottleneck"]["z_dim"] = 16  # the weights are for z_dim = 8
    torch.save(state, run_dir / "last.pt")
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    status, lines = run_main(["train", "--resume", run_dir], capsys)
    assert_one_error_line(status, lines, ["does not match the recipe", "size mismatch"])
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


# ---------------------------------------------------------------------------------------------------------------------
# Environment faults


def _full_disk_on(monkeypatch, name: str, nth: int):
    """From the `nth` write of `name` on, its temporary file is /dev/full: the kernel's own ENOSPC."""
    real = tempfile.mkstemp
    count = {"n": 0}

    def mkstemp(*args, prefix="", **kwargs):
        fd, tmp = real(*args, prefix=prefix, **kwargs)
        if prefix == f".{name}.":
            count["n"] += 1
            if count["n"] >= nth:
                if not os.path.exists("/dev/full"):  # not Linux: the error a full disk raises
                    os.close(fd)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)
                os.close(fd)
                os.unlink(tmp)
                return os.open("/dev/full", os.O_WRONLY), tmp
        return fd, tmp

    monkeypatch.setattr(ib.checkpoint.tempfile, "mkstemp", mkstemp)


def test_disk_full_at_the_second_checkpoint(reference, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    _full_disk_on(monkeypatch, "last.pt", nth=2)
    status, lines = run_main(["train", DIGITS, *RUN, "--run-dir", run_dir], capsys)
    assert_one_error_line(status, lines, [f"cannot write {run_dir / 'last.pt'}", "No space left on device",
                                          "the previous last.pt is intact"])
    state = load_checkpoint(run_dir / "last.pt")  # the previous one, intact
    assert (state["epoch"], state["step"]) == (1, STEPS_PER_EPOCH)
    assert not list(run_dir.glob(".*.tmp"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "No space left on device" in metrics["error"]
    assert metrics["epochs"] == 1  # what last.pt holds, not the epoch that could not be saved
    # with space again, the run continues from last.pt and loses nothing
    monkeypatch.undo()
    status, _ = run_main(["train", "--resume", run_dir], capsys)
    assert status == 0
    assert_same_run(run_dir, reference)


def test_disk_full_at_the_first_checkpoint(tmp_path, monkeypatch, capsys):
    """Nothing to keep yet: the error says no last.pt was written, metrics.json counts no epoch, --resume refuses."""
    run_dir = tmp_path / "run"
    _full_disk_on(monkeypatch, "last.pt", nth=1)
    status, lines = run_main(["train", DIGITS, "epochs=2", *SMALL, "--run-dir", run_dir], capsys)
    assert_one_error_line(status, lines, ["No space left on device", "no last.pt was written"])
    assert not (run_dir / "last.pt").exists() and not list(run_dir.glob(".*.tmp"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["status"], metrics["epochs"]) == ("failed", 0)
    monkeypatch.undo()
    status, lines = run_main(["train", "--resume", run_dir], capsys)
    assert_one_error_line(status, lines, ["has no last.pt", "--overwrite"])


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask_from", ["proc", "os.umask"])
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_atomic_write_gives_the_mode_open_would(umask, umask_from, tmp_path, monkeypatch):
    """Not mkstemp's 0600: others sharing a run folder must be able to read its checkpoints and metrics."""
    if umask_from == "os.umask":  # where /proc/self/status does not say: the fallback
        def no_proc(*args, **kwargs):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/self/status")

        monkeypatch.setattr(ib.checkpoint, "open", no_proc, raising=False)
    before = os.umask(umask)
    try:
        ib.checkpoint.atomic_write(tmp_path / "new", lambda f: f.write(b"new"))
        (tmp_path / "old").write_bytes(b"old")
        (tmp_path / "old").chmod(0o600)
        ib.checkpoint.atomic_write(tmp_path / "old", lambda f: f.write(b"replaced"))  # over an existing file
        assert os.umask(umask) == umask  # reading the umask left it as it was
    finally:
        os.umask(before)
    for name in ("new", "old"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert (tmp_path / "old").read_bytes() == b"replaced" and not list(tmp_path.glob(".*.tmp"))


def test_run_folder_under_a_file(tmp_path, capsys, no_data):
    (tmp_path / "file").write_text("not a folder\n")
    status, lines = run_main(["train", DIGITS, "--run-dir", tmp_path / "file" / "run"], capsys)
    assert_one_error_line(status, lines, ["cannot create run folder", "is a file, not a folder"])
    assert (tmp_path / "file").read_text() == "not a folder\n"


def test_run_folder_that_cannot_be_created(tmp_path, capsys, monkeypatch):
    """As a user without permission would see it (root ignores modes, so mkdir is made to fail as it would)."""
    def mkdir(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", mkdir)
    status, lines = run_main(["train", DIGITS, "epochs=1", *SMALL, "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["cannot write to run folder", "Permission denied"])
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes whatever the mode")
def test_run_folder_in_a_read_only_folder(tmp_path, capsys, no_data):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        status, lines = run_main(["train", DIGITS, "--run-dir", locked / "run"], capsys)
    finally:
        locked.chmod(0o755)
    assert_one_error_line(status, lines, ["cannot create run folder", "not writable"])


def test_missing_data_set(tmp_path, capsys):
    status, lines = run_main(["train", DIGITS, "data.name=mnist", f"data.root={tmp_path / 'nothing'}",
                              "--run-dir", tmp_path / "run"], capsys)
    assert_one_error_line(status, lines, ["mnist", "were not found in", str(tmp_path / "nothing"),
                                          "data.download=true"])
    assert not (tmp_path / "run").exists()
