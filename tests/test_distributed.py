"""Data-parallel training on torch.distributed (gloo on CPU): the global-batch bounds and their gradients, the
sharded loader, evaluation and information plane, and `torchrun -m ib train` end to end against one process."""
import copy
import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from ib.data import BatchLoader, Split, random_crop_flip
from ib.engine import evaluate, fit
from ib.estimators import ESTIMATORS
from ib.models.classifier import build_classifier
from ib.models.critics import CRITICS
from ib.plane import information_plane
from ib.recipe import load_recipe

ROOT = Path(__file__).parents[1]
DIGITS = ROOT / "recipes" / "digits.yaml"
WORLD = 2


# ---------------------------------------------------------------------------------------------------------------------
# Two gloo processes in this test's own process group (torch.multiprocessing), each checking against one process


def _spawn(check, tmp_path: Path) -> None:
    """Run `check(rank)` in WORLD gloo processes."""
    mp.spawn(_worker, args=(str(tmp_path / "store"), check), nprocs=WORLD, join=True)


def _worker(rank: int, store: str, check) -> None:
    _join(rank, store)
    try:
        check(rank)  # its DDP wrappers are gone when it returns (see _leave)
    finally:
        _leave()


def _join(rank: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _leave() -> None:
    """Leave together (after a barrier) unless this process failed, with the DDP wrappers collected first: a
    process that exits with a DDP wrapper alive after a backward through the differentiable gather, or tears gloo
    down while the other still talks to it, can abort ("terminate called without an active exception")."""
    gc.collect()
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def _check_bounds(rank: int) -> None:
    """Each estimator's loss on two halves of a batch (sync, DDP) against the loss on the whole batch."""
    b = 16  # per process; the global batch is 32
    torch.manual_seed(0)
    x = torch.randn(WORLD * b, 6)
    z_full = torch.randn(WORLD * b, 4) + 0.8 * x[:, :4]
    rows = slice(rank * b, (rank + 1) * b)
    for name, options in [("mine", {}), ("mine", {"marginals": 3}), ("mine_f", {}), ("infonce", {}),
                          ("smile", {}), ("jsd", {})]:
        kind = "separable" if name == "infonce" else "joint"
        torch.manual_seed(1)
        critic = CRITICS.create(kind, (6,), 4, hidden=(16,), **({} if kind == "separable" else
                                                                {"input_noise": 0.0, "hidden_noise": 0.0}))
        single = ESTIMATORS.create(name, critic, **options)
        shared = copy.deepcopy(single)
        shared.sync = True
        replica = DDP(shared)
        for step in range(2):  # MINE: the first step starts the moving average, the second uses it
            # One process on the whole batch (same seed: the same marginal shifts over 32 rows) ...
            torch.manual_seed(10 + step)
            z1 = z_full.clone().requires_grad_()
            loss1 = single.loss(x, z1)
            single.zero_grad()
            loss1.backward()
            # ... and each process on its half, the critic behind DDP.
            torch.manual_seed(10 + step)
            z2 = z_full[rows].clone().requires_grad_()
            loss2 = replica(x[rows], z2)
            shared.zero_grad()
            loss2.backward()
            label = f"{name} {options} step {step}"
            torch.testing.assert_close(loss2, loss1, rtol=1e-5, atol=1e-6, msg=label)
            for p1, p2 in zip(single.parameters(), shared.parameters()):
                torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-6, msg=label)
            # The gradient reaching a process's codes is WORLD times its share; the encoder's DDP average
            # divides it by WORLD again.
            torch.testing.assert_close(z2.grad / WORLD, z1.grad[rows], rtol=1e-4, atol=1e-6, msg=label)
            for b1, b2 in zip(single.buffers(), shared.buffers()):
                torch.testing.assert_close(b2, b1, msg=label)  # MINE's moving average: the global one


def test_global_batch_bounds_and_gradients_match_one_process(tmp_path):
    _spawn(_check_bounds, tmp_path)


def _check_eval(rank: int) -> None:
    """Evaluation and the information plane on two shares of a set equal one process on the whole set."""
    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (16,)}, "deterministic", {"z_dim": 4}, in_shape=(1, 4, 4),
                             num_classes=3, mean=(0.5,), std=(0.25,))
    x, y = torch.rand(40, 1, 4, 4), torch.randint(0, 3, (40,))
    rows = slice(rank * 20, (rank + 1) * 20)
    for name, kind in [("mine", "joint"), ("infonce", "separable")]:
        options = {"input_noise": 0.0, "hidden_noise": 0.0} if kind == "joint" else {}
        single = ESTIMATORS.create(name, CRITICS.create(kind, (1, 4, 4), 4, hidden=(16,), **options))
        # blocks of 8 (InfoNCE), one of which straddles the two shares
        whole = information_plane(model, single, x, y, batch_size=8, permutations=3, seed=5)
        shared = copy.deepcopy(single)
        shared.sync = True
        part = information_plane(model, shared, x[rows], y[rows], batch_size=8, permutations=3, seed=5,
                                 reduce=True)
        assert part.keys() == whole.keys()
        for k in whole:
            if math.isnan(whole[k]):
                assert math.isnan(part[k]), k
            else:
                assert part[k] == pytest.approx(whole[k], rel=1e-5, abs=1e-6), (name, k)
    loader = BatchLoader(Split(x, y), 7, shuffle=False, drop_last=False)
    shard = BatchLoader(Split(x[rows], y[rows]), 7, shuffle=False, drop_last=False)
    assert evaluate(model, shard, samples=0, reduce=True) == pytest.approx(evaluate(model, loader, samples=0))


def test_sharded_evaluation_and_plane_match_one_process(tmp_path):
    _spawn(_check_eval, tmp_path)


def _check_step(rank: int) -> None:
    """One training step (fused and two-pass) through the DDP wrappers on two halves of a batch against one
    process on the whole batch: every parameter of the classifier and of the critic ends the same."""
    from ib.engine import train_step
    from ib.engine.build import build_replicas

    torch.manual_seed(0)
    x, y = torch.rand(32, 1, 4, 4), torch.randint(0, 3, (32,))
    rows = slice(rank * 16, (rank + 1) * 16)
    for fused in (True, False):
        torch.manual_seed(1)
        model = build_classifier("mlp", {"hidden": (16,)}, "deterministic", {"z_dim": 4}, in_shape=(1, 4, 4),
                                 num_classes=3, mean=(0.5,), std=(0.25,))
        critic = CRITICS.create("joint", (1, 4, 4), 4, hidden=(16,), input_noise=0.0, hidden_noise=0.0)
        est = ESTIMATORS.create("mine", critic)
        copies = copy.deepcopy((model, est))
        copies[1].sync = True
        players = []
        for m, e in ((model, est), copies):
            # SGD: Adam's m / sqrt(v) would turn float-rounding differences of near-zero gradients into steps
            # of a full learning rate, and the comparison would test Adam rather than the gradients.
            players.append((m, e, torch.optim.SGD(m.parameters(), lr=0.1),
                            torch.optim.SGD(e.parameters(), lr=0.1)))
        replicas = build_replicas(*copies, torch.device("cpu"))
        for step in range(3):  # the moving average starts at step 0 and is used after
            torch.manual_seed(100 + step)  # the same marginal shift over the 32 rows in both
            one = train_step(*players[0], x, y, 0.5, fused=fused)
            torch.manual_seed(100 + step)
            two = train_step(*players[1], x[rows], y[rows], 0.5, fused=fused, replicas=replicas)
            assert bool(one["finite"]) and bool(two["finite"])
            torch.testing.assert_close(two["mi_bound"], one["mi_bound"], rtol=1e-5, atol=1e-6,
                                       msg=f"fused={fused} step {step}")
        for p1, p2 in zip([*model.parameters(), *est.parameters()], [*copies[0].parameters(),
                                                                      *copies[1].parameters()]):
            torch.testing.assert_close(p2, p1, rtol=1e-4, atol=1e-6, msg=f"fused={fused}")


def test_ddp_training_steps_match_one_process_on_the_whole_batch(tmp_path):
    _spawn(_check_step, tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# The sharded loader


@pytest.mark.parametrize("augment", [None, random_crop_flip])
def test_loader_shards_are_the_rows_of_the_global_batch(augment):
    split = Split(torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8), torch.arange(40))
    whole = BatchLoader(split, 8, shuffle=True, drop_last=True, augment=augment, seed=3)
    parts = [BatchLoader(split, 8, shuffle=True, drop_last=True, augment=augment, seed=3, rank=r, world_size=WORLD)
             for r in range(WORLD)]
    for epoch in range(2):  # a new order each epoch, the same in every process
        epochs = [list(loader) for loader in (whole, *parts)]
        assert len(epochs[0]) == 5 and all(len(e) == 5 for e in epochs)
        for (xw, yw), *shares in zip(*epochs):
            torch.testing.assert_close(torch.cat([s[0] for s in shares]), xw)
            torch.testing.assert_close(torch.cat([s[1] for s in shares]), yw)
    states = [p.state_dict() for p in (whole, *parts)]
    assert all(torch.equal(s["generator"], states[0]["generator"]) for s in states)  # resumable with any N
    with pytest.raises(Exception, match="divide by the number of processes"):
        BatchLoader(split, 9, shuffle=True, drop_last=True, rank=0, world_size=WORLD)


# ---------------------------------------------------------------------------------------------------------------------
# torchrun end to end


def _torchrun(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "ib",
           "train", *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


SETTINGS = ["epochs=4", "beta_schedule.delay=0", "beta=1e-3", "model.eval_samples=0"]


def _last_row(run_dir: Path) -> dict:
    lines = (run_dir / "history.csv").read_text().splitlines()
    return dict(zip(lines[0].split(","), map(float, lines[-1].split(","))))


def test_torchrun_two_processes_match_one_and_resume_in_one(tmp_path, one_thread):
    """2 gloo processes against 1 with the same global batch (64), MINE penalty on from the first step.

    The processes draw other noise (codes, marginal pairs) than one process does, so runs agree to within
    sampling noise, not exactly (full-length figures: benchmarks/results/ddp_digits.md, where 1 and 2 processes
    reach the same test accuracy after 40 epochs and test NLL 0.112 against 0.111).
    """
    one = fit(load_recipe(DIGITS, SETTINGS), tmp_path / "one")

    done = _torchrun(tmp_path, str(DIGITS), *SETTINGS, "--run-dir", "two")
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["status"] == "completed" and two["processes"] == 2 and two["steps"] == one["steps"]
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.02)
    assert two["test_nll"] == pytest.approx(one["test_nll"], abs=0.03)
    assert _last_row(tmp_path / "two")["loss/ce"] == pytest.approx(_last_row(tmp_path / "one")["loss/ce"], abs=0.05)
    assert math.isfinite(two["I_XZ"]) and abs(two["I_XZ"] - one["I_XZ"]) < 0.5
    # Only rank 0 wrote: one event file, one history row per epoch, nothing beside the run folder.
    files = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert files == sorted(["best.pt", "history.csv", "last.pt", "metrics.json", "recipe.yaml",
                            *[f for f in files if f.startswith("events.out.tfevents")]])
    assert sum(f.startswith("events.out.tfevents") for f in files) == 1
    assert len((tmp_path / "two" / "history.csv").read_text().splitlines()) == 1 + 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]

    # A 2-process run stopped after 2 epochs, resumed in 1 process.
    done = _torchrun(tmp_path, str(DIGITS), *SETTINGS, "--run-dir", "split", "--stop-after", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["status"] == "stopped"
    from ib.engine import resume_recipe

    resumed = fit(resume_recipe(tmp_path / "split"), tmp_path / "split", resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == one["steps"] and resumed["processes"] == 1
    assert resumed["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.02)
    assert resumed["test_nll"] == pytest.approx(one["test_nll"], abs=0.03)


def test_sweep_hands_each_run_to_torchrun(tmp_path, monkeypatch):
    from ib.sweep import run_sweep

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")
    rows = run_sweep(DIGITS, [1e-3], [0], ["epochs=1", "model.eval_samples=0"], tmp_path / "sweep",
                     nproc_per_node=WORLD)
    assert [r["status"] for r in rows] == ["completed"]
    metrics = json.loads((tmp_path / "sweep" / "beta_0.001_seed_0" / "metrics.json").read_text())
    assert metrics["processes"] == WORLD and metrics["beta_final"] == 0.0  # the recipe's delay: beta 0 in epoch 1
    recipe = (tmp_path / "sweep" / "beta_0.001_seed_0" / "recipe.yaml").read_text()
    assert "beta: 0.001" in recipe and "name: beta_0.001_seed_0" in recipe
    assert (tmp_path / "sweep" / "sweep.csv").exists()


def test_ctrl_c_on_torchrun_saves_a_checkpoint_that_one_process_resumes(tmp_path):
    """SIGINT to torchrun reaches both workers: they agree on the step to stop at, rank 0 saves last.pt (with the
    loader's position when mid-epoch) and metrics.json says `interrupted`; one process then finishes the run."""
    import signal
    import time

    from ib.engine import resume_recipe

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "ib",
           "train", str(DIGITS), "epochs=200", "eval.enabled=false", "--run-dir", "run"]
    child = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    history = tmp_path / "run" / "history.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.poll() is None:
        if history.exists() and len(history.read_text().splitlines()) >= 3:  # two epochs done
            break
        time.sleep(0.1)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "interrupted", err[-12000:]  # every rank's last words
    assert "interrupted: last.pt saved" in err
    assert 2 <= metrics["epochs"] < 200
    epochs = metrics["epochs"] + 2  # the interrupted epoch and one more
    resumed = fit(resume_recipe(tmp_path / "run", [f"epochs={epochs}"]), tmp_path / "run", resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == epochs * 20 and resumed["processes"] == 1
    assert len(history.read_text().splitlines()) == 1 + epochs
