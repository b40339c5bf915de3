"""The training loop: `fit` trains a recipe into a run folder, one epoch after another.

    fit                     joins a torchrun job if launched by one, opens or resumes the run folder
      train_epochs          the epoch loop: train, evaluate, write, until done, stopped or interrupted
        train_one_epoch     the steps of one epoch (`ib.engine.step.train_step`)
        close_epoch         everything after the steps:
          train_summary     the epoch's training sums
          add_evaluation    validation (test in the last epoch) and the information plane
          add_alignment     the tangent-kernel alignment measured during the epoch (`monitor.alignment`)
          end_epoch         progress, best epoch
      finish                the final `metrics.json`
"""
from __future__ import annotations

import logging
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ib import distributed
from ib.checkpoint import load_checkpoint
from ib.data import BatchLoader, Split
from ib.engine.align_monitor import AlignmentMonitor
from ib.engine.build import Run, build_run
from ib.engine.run_dir import RunFolder, check_run_dir, metrics_record, prepare_run_dir, record_failure
from ib.engine.step import StepStats, TrainingError, train_step
from ib.errors import CheckpointError
from ib.estimators.pairwise import PairwiseKL
from ib.models.classifier import IBClassifier
from ib.modes import evaluating
from ib.monitor import read_json, write_json
from ib.plane import describe_xz, information_plane, to_units
from ib.recipe import Recipe
from ib.schedules import set_lr

SATURATION_NATS = 0.01  # a pairwise_kl penalty within this of log B counts as saturated

log = logging.getLogger(__name__)

Row = Dict[str, float]


def fit(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
        stop_after: Optional[int] = None, handle_signals: bool = False) -> Dict[str, Any]:
    """Train `recipe` into `run_dir`, or continue the run there (`resume=True`, from its `last.pt`).

    Every epoch writes `history.csv`, TensorBoard scalars, `last.pt` (and `best.pt` when validation accuracy
    improves) and `metrics.json` (see `ib.engine.run_dir`). The recipe's `eval` section is not run here: `ib train`
    runs it once training has completed (`ib.evaluate.evaluate_run`).

    Args:
        recipe: a checked recipe (for `resume`, the one saved in the run folder, maybe with more epochs).
        run_dir: the run folder.
        resume: continue from `run_dir/last.pt`.
        overwrite: replace an existing run folder.
        stop_after: stop (checkpointed, resumable) once this many epochs are complete.
        handle_signals: on SIGINT/SIGTERM finish the step, save `last.pt` and return (for the command line).

    Under torchrun (`torchrun --nproc_per_node=N -m ib train ...`) every process calls `fit`; it joins the process
    group (gloo on CPU, nccl on CUDA), trains data-parallel, and only rank 0 writes to `run_dir`. Resuming reads
    `last.pt` in every process, with any number of processes.

    Returns:
        The contents of `metrics.json` (the same in every process).
    """
    joined = not torch.distributed.is_initialized()
    proc, device = distributed.setup(recipe.device)
    try:
        run = _open_run(recipe, Path(run_dir), proc, device, resume=resume, overwrite=overwrite)
        metrics = _train_in_folder(run, Path(run_dir), stop_after=stop_after, handle_signals=handle_signals)
    except BaseException:
        if joined and proc.distributed:
            distributed.teardown(wait=False)
        raise
    if joined and proc.distributed:
        distributed.teardown()
    return metrics


def _open_run(recipe: Recipe, run_dir: Path, proc: distributed.Process, device: Optional[torch.device], *,
              resume: bool, overwrite: bool) -> Run:
    """Build the run, from `last.pt` when resuming; otherwise check (before the data are loaded) and prepare the
    run folder."""
    state = load_checkpoint(run_dir / "last.pt") if resume else None
    if state is None and proc.is_main:
        check_run_dir(run_dir, overwrite)
    run = build_run(recipe, proc, device)
    if state is not None:
        try:
            run.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"{run_dir / 'last.pt'} does not match the recipe: {' '.join(str(e).split())[:300]}")
        if proc.is_main:
            log.info("resuming %s at epoch %d/%d (step %d)", run_dir, run.progress.epoch + 1, recipe.epochs,
                     run.progress.step)
    elif proc.is_main:
        prepare_run_dir(run_dir, overwrite)
    if proc.distributed and proc.is_main:
        log.info("data parallel: %d processes (%s), global batch %d = %d per process", proc.world_size,
                 torch.distributed.get_backend(), recipe.data.batch_size, recipe.data.batch_size // proc.world_size)
    return run


def _train_in_folder(run: Run, run_dir: Path, *, stop_after: Optional[int], handle_signals: bool) -> Dict[str, Any]:
    """`train_epochs` with the run folder open (main process), signals handled, and any error recorded in
    `metrics.json` (status "failed"); returns the final metrics."""
    folder: Optional[RunFolder] = None
    stop = StopFlag()
    previous: Dict[int, Any] = {}
    try:
        folder = RunFolder(run_dir, run) if run.proc.is_main else None
        previous = stop.install() if handle_signals else {}
        status, last = train_epochs(run, folder, stop, stop_after)
    except BaseException as e:
        if run.proc.is_main:
            record_failure(run_dir, run, e)
        raise
    finally:
        if folder is not None:
            folder.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return finish(run, run_dir, status, last)


def train_epochs(run: Run, folder: Optional[RunFolder], stop: "StopFlag",
                 stop_after: Optional[int]) -> Tuple[str, Optional[Tuple[Row, Row]]]:
    """Train epoch after epoch until the recipe's `epochs`, `stop_after` or a stop signal.

    Returns:
        The status ("completed", "stopped", "interrupted") and the last completed epoch's (row, plane), if any.
    """
    r, progress = run.recipe, run.progress
    probe = probe_set(run)
    warned: Set[Any] = set()  # warnings already logged this run
    last: Optional[Tuple[Row, Row]] = None
    if stop_after is not None and stop_after <= progress.epoch < r.epochs:  # resumed with N epochs already done
        return "stopped", None
    while progress.epoch < r.epochs:
        epoch = progress.epoch + 1
        t0 = time.perf_counter()
        if run.alignment is not None and progress.step == 0:
            run.alignment.measure(run.model, 0)  # at initialisation (in the first epoch's time)
        set_lr(run.optimizer, run.base_lrs, run.lr_schedule.factor(progress.epoch))
        if progress.stats is None:
            progress.stats = StepStats.zeros(run.device, progress.nonfinite_in_a_row)
        progress.step = train_one_epoch(run, run.train_loader, progress.stats, step=progress.step, stop=stop,
                                        desc=f"epoch {epoch}/{r.epochs}", show_progress=run.proc.is_main)
        progress.stats.reduce()  # under torchrun: every process's sums, the same everywhere
        if stop and run.train_loader.batches_left() < len(run.train_loader):
            if folder is not None:  # stopped mid-epoch: the loader's position resumes exactly here
                if run.alignment is not None:
                    folder.write_alignment(run.alignment.take(), epoch)
                folder.save_last(run)
            return "interrupted", last
        last = close_epoch(run, folder, probe, epoch, started=t0, stop_after=stop_after, warned=warned)
        if _stopping(stop, run.device) and epoch < r.epochs:  # signalled in the last step or the evaluation
            return "interrupted", last
        if stop_after is not None and stop_after <= epoch < r.epochs:
            return "stopped", last
    return "completed", last


def close_epoch(run: Run, folder: Optional[RunFolder], probe: Split, epoch: int, *, started: float,
                stop_after: Optional[int], warned: Set[Any]) -> Tuple[Row, Row]:
    """Everything after an epoch's steps: its training summary, evaluation and information plane, alignment,
    progress, the run folder's files and the log line; returns the epoch's (row, plane)."""
    r = run.recipe
    final = epoch == r.epochs or (stop_after is not None and epoch >= stop_after)
    test = final or bool(r.monitor.test_every and epoch % r.monitor.test_every == 0)
    run.progress.count_faults()
    row = train_summary(run)
    _warn_if_saturated(run, row, warned, epoch)
    plane = add_evaluation(row, run, probe, epoch, started=started, test=test, warned=warned)
    aligned = add_alignment(row, run.alignment)
    improved = end_epoch(run, epoch, row)
    if folder is not None:
        if run.alignment is not None:
            folder.write_alignment(aligned, epoch)
        folder.write_epoch(run, row, plane, improved)
    _log_epoch(run, epoch, row)
    return row, plane


def train_one_epoch(run: Run, loader: BatchLoader, stats: StepStats, *, step: int, stop: Optional["StopFlag"] = None,
                    desc: str = "", show_progress: bool = True) -> int:
    """Train `run`'s model (and critic) over the rest of `loader`'s epoch (all of it, unless resumed mid-epoch),
    with the step settings of `run.recipe`; returns the global step.

    Non-finite steps are skipped and counted in `stats`; `max_nonfinite_steps` in a row (counted across epochs
    when the caller carries `stats.nonfinite_in_a_row` over) raise TrainingError. Under torchrun a stop signal
    seen by any process stops every process after the same step.
    """
    r = run.recipe
    run.model.train()
    for module in (run.estimator, run.adversarial):
        if module is not None:
            module.train()
    bar = tqdm(loader, total=loader.batches_left(), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if show_progress else True)
    for x, y in bar:
        beta = run.beta_schedule.value(step)
        out = train_step(run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, beta,
                         critic_steps=r.mi.critic_steps, grad_clip=r.optimizer.grad_clip,
                         critic_grad_clip=r.mi.optimizer.grad_clip, fused=r.mi.fused, replicas=run.replicas,
                         precision=r.precision, label_smoothing=r.label_smoothing,
                         adaptive_clip=r.mi.adaptive_clip, adversarial=run.adversarial,
                         adversarial_optimizer=run.adversarial_optimizer)
        step += 1
        if run.alignment is not None and run.alignment.due(step):
            run.alignment.measure(run.model, step)
        if bool(out["finite"]):
            stats.add(out, y.shape[0])
        else:
            stats.nonfinite_in_a_row += 1
            stats.nonfinite += 1
            log.warning("non-finite loss or gradient at step %d: step skipped (%d in a row)", step,
                        stats.nonfinite_in_a_row)
            if stats.nonfinite_in_a_row >= r.max_nonfinite_steps:
                raise TrainingError(
                    f"{stats.nonfinite_in_a_row} consecutive non-finite steps (up to step {step}); stopping. Try a "
                    f"lower learning rate or beta; last.pt, if the run has one, holds its last completed epoch")
        if step % r.log_every == 0 and bar.disable is False:
            bar.set_postfix(loss=f"{float(out['loss']):.4f}", beta=f"{beta:.3g}")
        if stop is not None and _stopping(stop, y.device):
            break
    bar.close()
    return step


def train_summary(run: Run) -> Row:
    """The epoch's row so far: beta, learning rate and the training sums (in `monitor.units`)."""
    progress, units = run.progress, run.recipe.monitor.units
    row = {"beta": run.beta_schedule.value(max(progress.step - 1, 0)), "lr": run.optimizer.param_groups[0]["lr"],
           **progress.stats.summary(run.estimator is not None)}
    if "mi/I_XZ_train" in row:  # in monitor.units, like every information quantity
        row["mi/I_XZ_train"] = to_units(row["mi/I_XZ_train"], units)
    return row


def add_evaluation(row: Row, run: Run, probe: Split, epoch: int, *, started: float, test: bool,
                   warned: Set[Any]) -> Row:
    """Add to `row` the validation figures, the test split's when `test`, the information plane (in
    `monitor.units`) and the epoch's timings (from `started`); returns the plane's point in nats.

    The test split is evaluated in the run's last epoch (and every `monitor.test_every` epochs), so that the
    per-epoch cost stays small and nothing is chosen on it. Under torchrun each process evaluates its share and the
    sums are added.
    """
    r, shared = run.recipe, run.proc.distributed
    t1 = time.perf_counter()
    distributed.broadcast_buffers_(run.model)  # rank 0's batch-norm statistics, the ones saved
    val = evaluate(run.model, run.val_loader, samples=r.model.eval_samples, seed=r.seed, reduce=shared)
    row.update({"acc/val": val["acc"], "loss/val_nll": val["nll"]})
    if r.model.eval_samples:
        row["acc/val_sampled"] = val["acc_sampled"]
    if test:
        row.update(_test_row(run))
    t2 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plane = information_plane(run.model, run.estimator, probe.x, probe.y, batch_size=r.data.eval_batch_size,
                                  permutations=r.mi.eval_permutations, seed=r.seed, reduce=shared)
    _log_once(caught, warned, epoch)
    row.update({f"mi/{k}": to_units(v, r.monitor.units) for k, v in plane.items()})
    row["time/plane_s"] = time.perf_counter() - t2
    eval_time = time.perf_counter() - t1
    epoch_time = time.perf_counter() - started
    row.update({"time/epoch_s": epoch_time, "time/eval_s": eval_time,
                "faults/nonfinite_steps": float(run.progress.nonfinite_steps)})
    return plane


def add_alignment(row: Row, monitor: Optional[AlignmentMonitor]) -> List[Row]:
    """Add to `row` the latest alignment measurement (with its step, `align/step`) and the epoch's time spent
    measuring; returns the epoch's measurements, for the run folder."""
    if monitor is None:
        return []
    row["time/align_s"] = monitor.seconds
    rows = monitor.take()
    if monitor.latest is not None:
        row.update({("align/step" if k == "step" else k): v for k, v in monitor.latest.items()})
    return rows


def end_epoch(run: Run, epoch: int, row: Row) -> bool:
    """Count `epoch` as complete in the run's progress; returns whether its validation accuracy is the best yet
    (always so when there is no validation split)."""
    progress = run.progress
    progress.epoch, progress.stats = epoch, None
    progress.epoch_seconds.append(row["time/epoch_s"])
    val_acc = row.get("acc/val_sampled" if run.recipe.model.eval_samples else "acc/val", math.nan)
    improved = math.isnan(val_acc) or val_acc > progress.best["val_accuracy"]
    if improved:
        progress.best = {"epoch": epoch, "val_accuracy": val_acc}
    return improved


def _log_epoch(run: Run, epoch: int, row: Row) -> None:
    r = run.recipe
    val_acc = row.get("acc/val_sampled" if r.model.eval_samples else "acc/val", math.nan)
    test_acc = row.get("acc/test_sampled", row.get("acc/test"))
    label = run.estimator.label if run.estimator is not None else "estimate"
    xz = describe_xz(row["mi/I_XZ"], row["mi/I_XZ_pairwise_lower"], row["mi/I_XZ_pairwise_upper"], row["mi/I_ZY"],
                     label)
    (log.info if run.proc.is_main else log.debug)(
        "epoch %d/%d  loss %.4f  ce %.4f  %s  I(Z;Y) %.3f %s  val %.4f%s  beta %.3g  %.1fs",
        epoch, r.epochs, row["loss/total"], row["loss/ce"], xz, row["mi/I_ZY"], r.monitor.units,
        val_acc, "" if test_acc is None else f"  test {test_acc:.4f}", row["beta"], row["time/epoch_s"],
    )


def finish(run: Run, run_dir: Path, status: str, last: Optional[Tuple[Row, Row]]) -> Dict[str, Any]:
    """The final `metrics.json` (written by the main process) and its contents, returned by every process.

    A completed run always reports its test accuracy: when the last epoch's test pass never ran (stopped after
    that epoch's checkpoint, then resumed with nothing left to train), the test split is evaluated now."""
    saved = read_json(run_dir / "metrics.json") if last is None else None
    if saved is not None:
        metrics = saved
        metrics["status"] = status
        metrics.pop("error", None)  # a failure recorded before this resume is over
    else:
        metrics = metrics_record(run, *(last or ({}, {})), status)
    reported = metrics.get("test_accuracy")
    if status == "completed" and (not isinstance(reported, float) or math.isnan(reported)):
        tested = metrics_record(run, _test_row(run), {}, status)
        metrics.update({k: tested[k] for k in ("test_accuracy", "test_accuracy_mean_code", "test_accuracy_sampled",
                                               "test_nll")})
    if run.proc.is_main:
        write_json(run_dir / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation during training


def evaluate(model: IBClassifier, loader: BatchLoader, *, samples: int, seed: int = 0,
             reduce: bool = False) -> Dict[str, float]:
    """Accuracy of the mean (noise-free) code, accuracy averaged over `samples` draws of Z, and NLL.

    Runs in eval mode under inference_mode with a fixed seed, leaving the global RNG and the modules' modes as they
    were, so evaluation is repeatable and does not change the training run. `reduce`: under torchrun, each process
    evaluates its share (its loader) and the sums are added over the processes, so every process returns the whole
    set's figures.
    """
    correct = correct_sampled = nll = torch.zeros((), dtype=torch.float64)
    n = 0
    device = next(model.parameters()).device
    with evaluating(model, seed=seed, device=device), torch.inference_mode():
        for x, y in loader:
            if samples > 0:  # one encoder pass for both predictions
                p_mean, p = model.predict_proba_both(x, samples)  # [B, classes] each
                correct_sampled = correct_sampled + (p.argmax(1) == y).sum().double().cpu()
            else:
                p_mean = p = model.predict_proba(x, samples=0)
            correct = correct + (p_mean.argmax(1) == y).sum().double().cpu()
            nll = nll + F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum").double().cpu()
            n += y.shape[0]
    if reduce:
        sums = torch.stack([correct, correct_sampled, nll, torch.tensor(float(n), dtype=torch.float64)]).to(device)
        distributed.reduce_sum_(sums)
        correct, correct_sampled, nll, n = sums[0].cpu(), sums[1].cpu(), sums[2].cpu(), int(sums[3])
    if n == 0:
        return {"acc": math.nan, "acc_sampled": math.nan, "nll": math.nan}
    acc = float(correct) / n
    return {"acc": acc, "acc_sampled": float(correct_sampled) / n if samples > 0 else acc, "nll": float(nll) / n}


def _test_row(run: Run) -> Row:
    """The test split's figures under their history tags (under torchrun, each process evaluates its share)."""
    samples = run.recipe.model.eval_samples
    test = evaluate(run.model, run.test_loader, samples=samples, seed=run.recipe.seed, reduce=run.proc.distributed)
    row = {"acc/test": test["acc"], "loss/test_nll": test["nll"]}
    if samples:
        row["acc/test_sampled"] = test["acc_sampled"]
    return row


def probe_set(run: Run) -> Split:
    """The fixed held-out probe set of the information plane: `monitor.probe_size` validation samples drawn by a
    seeded permutation (all of them when they are fewer; test samples when there is no validation split), on the
    run's device. Under torchrun, this process's equal share of it (the probe set cut to a multiple of the number
    of processes)."""
    source = run.data.val if len(run.data.val.y) >= 2 else run.data.test
    source = source.sample(run.recipe.monitor.probe_size, run.recipe.seed)
    world = run.proc.world_size
    n = len(source.y) // world * world
    part = distributed.shard(n, run.proc)
    x = source.x[part].to(run.device)
    return Split(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float(), source.y[part].to(run.device))


# ---------------------------------------------------------------------------------------------------------------------
# Stopping


class StopFlag:
    """Set by SIGINT/SIGTERM while training: the loop finishes its step, saves `last.pt` and returns."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None

    def __bool__(self) -> bool:
        return self.signal is not None

    def install(self) -> Dict[int, Any]:
        """Handle SIGINT and SIGTERM; returns the previous handlers, for the caller to put back.

        A second signal stops at once, except under torchrun: there a worker can receive one Ctrl-C twice, from
        the terminal (its process group) and forwarded by torchrun's agent, and stopping at once would leave the
        other workers waiting in a collective and no last.pt. The agent kills workers that do not exit by
        themselves (after 30 s)."""
        hard_stop = not distributed.launched_by_torchrun()

        def handler(signum: int, frame: Any) -> None:
            if self.signal is not None:
                if hard_stop:  # a second Ctrl-C stops at once
                    raise KeyboardInterrupt
                return
            self.signal = signum
            log.warning("stopping after this step and saving last.pt%s",
                        " (press Ctrl-C again to stop at once)" if hard_stop else "")

        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _stopping(stop: StopFlag, device: torch.device) -> bool:
    """Whether to stop now: the flag, agreed by every process under torchrun (each then carries it)."""
    if distributed.any_true(bool(stop), device):
        stop.signal = stop.signal or signal.SIGTERM
    return bool(stop)


def _warn_if_saturated(run: Run, row: Row, warned: Set[Any], epoch: int) -> None:
    """Say once per run when the pairwise KL penalty sat at its ceiling log B all epoch: every pair of codes in a
    batch is then far apart, exp(-KL) ~ 0, and the penalty has almost no gradient, whatever beta."""
    if not isinstance(run.estimator, PairwiseKL) or row["beta"] <= 0 or "saturated" in warned:
        return
    ceiling = math.log(run.recipe.data.batch_size)  # the bound of the (global) batch is at most log B
    penalty = row.get("mi/I_XZ_train", math.nan) * (math.log(2.0) if run.recipe.monitor.units == "bits" else 1.0)
    if penalty >= ceiling - SATURATION_NATS:
        warned.add("saturated")
        log.warning("epoch %d: the pairwise_kl penalty sits at its ceiling log B = %.3f nats: every pair of codes "
                    "is far apart and the penalty has almost no gradient. Start the code's noise on the scale of its "
                    "spread (model.bottleneck.std_offset=0) with beta from the first step (beta_schedule.delay=0); "
                    "see docs/estimators.md", epoch, ceiling)


def _log_once(caught: List[warnings.WarningMessage], warned: Set[Any], epoch: int) -> None:
    """Log each kind of warning (its category and origin) once per run, not once per epoch."""
    for w in caught:
        key = (w.category, w.filename, w.lineno)
        if key not in warned:
            warned.add(key)
            log.warning("epoch %d: %s (said once per run)", epoch, w.message)
