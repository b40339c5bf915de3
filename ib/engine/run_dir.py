"""The run folder: checking and preparing it, what an epoch writes into it, its `metrics.json`, a failure's
record, and the recipe a resumed run continues with.

    <run dir>/
      recipe.yaml     the resolved recipe (every default filled in)
      last.pt         the latest checkpoint (every epoch; also when stopped mid-epoch)
      best.pt         the checkpoint of the best validation accuracy
      history.csv     one row per epoch
      alignment.csv   the tangent-kernel alignment, one row per measurement (monitor.alignment), and alignment/
                      its TensorBoard sub-run, by step
      metrics.json    the run's summary and status (running, completed, stopped, interrupted, failed)
      events.out.*    TensorBoard scalars and the information-plane figure

Only the main process of a torchrun job writes (`RunFolder` is opened there alone).
"""
from __future__ import annotations

import fnmatch
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from ib import __version__
from ib.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from ib.engine.build import Run
from ib.errors import CheckpointError, ConfigError, IBError
from ib.estimators.base import estimator_labels
from ib.monitor import (AlignmentLog, CSVHistory, EpochLogger, TensorBoardLogger, figure_epochs, read_json,
                        write_json)
from ib.recipe import Recipe, dump_recipe, recipe_from_dict

log = logging.getLogger(__name__)

# What a run and its evaluations write into the run folder: `--overwrite` removes these and nothing else.
RUN_FILES = ("recipe.yaml", "last.pt", "best.pt", "history.csv", "metrics.json", "eval.json", "robustness.csv",
             "robustness.png", "plane.png", "alignment.csv", "alignment.png", ".hparams_written")
RUN_FILE_PATTERNS = ("events.out.tfevents.*", ".*.tmp")  # TensorBoard's event files; atomic_write's leftovers
RUN_FOLDERS = ("eval", "alignment")  # `ib eval`'s TensorBoard runs; the alignment's, by step


def run_files(run_dir: Path) -> List[Path]:
    """The entries of `run_dir` that ib writes (see RUN_FILES): what `--overwrite` replaces."""
    def ours(p: Path) -> bool:
        if p.is_dir():
            return p.name in RUN_FOLDERS
        return p.name in RUN_FILES or any(fnmatch.fnmatchcase(p.name, pattern) for pattern in RUN_FILE_PATTERNS)

    return sorted(p for p in run_dir.iterdir() if ours(p))


def _killed_before_first_epoch(run_dir: Path) -> bool:
    """Whether `run_dir` holds only what a run writes before its first checkpoint, with the marks of one (a
    TensorBoard event file or an atomic write's temporary file): nothing of the user's to lose. A lone recipe.yaml
    is not enough: it may be the user's own."""
    entries = set(run_dir.iterdir())
    marks = [p for p in entries if fnmatch.fnmatchcase(p.name, "events.out.tfevents.*")
             or fnmatch.fnmatchcase(p.name, ".*.tmp")]
    return bool(marks) and not entries - set(run_files(run_dir))


def check_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Raise ConfigError, touching nothing, when `run_dir` cannot become a new run folder: it holds files (and
    `overwrite` is off, or it is not a run folder: a recipe.yaml beside a last.pt, metrics.json or history.csv, or
    only files that a run writes),
    or the nearest existing folder above it is a file or not writable. Cheap: `fit` calls it before loading any
    data."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"run folder {run_dir} exists: resume it with --resume {run_dir}, replace it with "
                              f"--overwrite, or pick another folder (--run-dir, or name=... under output_dir)")
        started = (run_dir / "recipe.yaml").is_file() and any(
            (run_dir / name).is_file() for name in ("last.pt", "metrics.json", "history.csv"))
        if not (started or _killed_before_first_epoch(run_dir)):
            raise ConfigError(f"--overwrite: {run_dir} does not look like a run folder (no recipe.yaml beside a "
                              f"last.pt, metrics.json or history.csv); not removing it")
    above = run_dir.absolute()
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ConfigError(f"cannot create run folder {run_dir}: {above} is a file, not a folder")
    if not os.access(above, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot create run folder {run_dir}: {above} is not writable (permission denied)")


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse to reuse a run folder unless told to overwrite it; overwriting removes the files a run writes
    (`run_files`) and keeps anything else, with a warning that names it."""
    check_run_dir(run_dir, overwrite)
    if run_dir.is_dir():
        for path in run_files(run_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        others = sorted(p.name + ("/" if p.is_dir() else "") for p in run_dir.iterdir())
        if others:
            log.warning("--overwrite: kept %s in %s (not written by ib)", ", ".join(others[:5])
                        + (f" and {len(others) - 5} more" if len(others) > 5 else ""), run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        if created and run_dir.is_dir():  # leave no empty folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise ConfigError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from None


def metrics_record(run: Run, row: Mapping[str, float], plane: Mapping[str, float], status: str) -> Dict[str, Any]:
    """The contents of `metrics.json`: the run's status and progress, and the figures of `row` (an epoch's
    history row) and `plane` (its information-plane point, in nats)."""
    samples = run.recipe.model.eval_samples
    progress = run.progress
    estimator = run.estimator
    return {
        "status": status,
        "epochs": progress.epoch,
        "epochs_planned": run.recipe.epochs,
        "steps": progress.step,
        "test_accuracy": row.get("acc/test_sampled" if samples else "acc/test", math.nan),
        "test_accuracy_mean_code": row.get("acc/test", math.nan),
        "test_accuracy_sampled": row.get("acc/test_sampled", math.nan) if samples else None,
        "eval_samples": samples,
        "val_accuracy": row.get("acc/val_sampled" if samples else "acc/val", math.nan),
        "test_nll": row.get("loss/test_nll", math.nan),
        "I_XZ_nats": plane.get("I_XZ", math.nan),
        "units": run.recipe.monitor.units,
        "I_XZ": row.get("mi/I_XZ", math.nan),
        "I_XZ_se": row.get("mi/I_XZ_se", math.nan),
        "I_XZ_upper": row.get("mi/I_XZ_upper", math.nan),
        "I_XZ_pairwise_lower": row.get("mi/I_XZ_pairwise_lower", math.nan),
        "I_XZ_pairwise_upper": row.get("mi/I_XZ_pairwise_upper", math.nan),
        "I_XZ_ceiling": row.get("mi/I_XZ_ceiling", math.nan),
        "I_ZY": row.get("mi/I_ZY", math.nan),
        "H_Y": row.get("mi/H_Y", math.nan),
        "beta_final": row.get("beta", math.nan),
        "best_epoch": progress.best["epoch"],
        "best_val_accuracy": progress.best["val_accuracy"],
        "nonfinite_steps": progress.nonfinite_steps,
        "train_seconds": sum(progress.epoch_seconds),
        "epoch_seconds": list(progress.epoch_seconds),
        "device": str(run.device),
        "processes": run.proc.world_size,
        "estimator": (None if estimator is None
                      else {"name": run.recipe.mi.estimator.name, **estimator_labels(estimator)}),
        "ib_version": __version__,
    }


class RunFolder:
    """What the main process writes into the run folder: the resolved recipe, the epoch loggers (history.csv,
    TensorBoard), checkpoints and `metrics.json`.

    Args:
        run_dir: the run folder, already prepared (`prepare_run_dir`) or resumed.
        run: the run (at the epoch it resumes from).
    """

    def __init__(self, run_dir: Path, run: Run) -> None:
        self.path = run_dir
        recipe = run.recipe
        labels = estimator_labels(run.estimator)
        # The TensorBoard event file first: it marks the folder as a run's (`_killed_before_first_epoch`), so that a
        # process killed before its first checkpoint never leaves a lone recipe.yaml, which --overwrite and a
        # resumed sweep must refuse to delete (it may be the user's own).
        self.loggers: List[EpochLogger] = [
            CSVHistory(run_dir / "history.csv", run.progress.epoch),
            TensorBoardLogger(run_dir, run.progress.epoch, units=recipe.monitor.units,
                              plane_figure=recipe.monitor.plane_figure, xz_name=labels["label"],
                              figure_epochs=figure_epochs(recipe.epochs, recipe.monitor.plane_figures)),
        ]
        text = dump_recipe(recipe)
        atomic_write(run_dir / "recipe.yaml", lambda f: f.write(text.encode()))
        self.alignment = AlignmentLog(run_dir, run.progress.step) if run.alignment is not None else None
        if self.alignment is not None and self.alignment.rows and run.progress.step:  # resumed: the latest so far
            latest = self.alignment.rows[-1]
            run.alignment.latest = {k: float(v) for k, v in latest.items() if k != "epoch"}
            run.alignment.measured = int(latest["step"])

    def write_alignment(self, rows: Sequence[Mapping[str, float]], epoch: int) -> None:
        """The alignment measured in `epoch` (before its checkpoint: a crash leaves no row the resume redoes)."""
        if self.alignment is not None:
            self.alignment.log(rows, epoch)

    def write_epoch(self, run: Run, row: Mapping[str, float], plane: Mapping[str, float], improved: bool) -> None:
        """An epoch's row to every logger, then (atomically, after the logs) `best.pt` when the validation accuracy
        `improved`, `last.pt` and `metrics.json`: a crash at any point resumes from a consistent state."""
        for logger in self.loggers:
            logger.log_epoch(run.progress.epoch, row)
        state = run.state_dict()
        if improved:
            save_checkpoint(self.path / "best.pt", state)
        save_checkpoint(self.path / "last.pt", state)
        write_json(self.path / "metrics.json", metrics_record(run, row, plane, "running"))

    def save_last(self, run: Run) -> None:
        """`last.pt` alone: the state of a run stopped mid-epoch, with the loader's position."""
        save_checkpoint(self.path / "last.pt", run.state_dict())

    def close(self) -> None:
        for logger in [*self.loggers, *([self.alignment] if self.alignment is not None else [])]:
            try:
                logger.close()
            except Exception as e:  # e.g. a full disk while flushing TensorBoard: the error in flight matters more
                log.warning("closing %s: %s", type(logger).__name__, " ".join(str(e).split()))


def record_failure(run_dir: Path, run: Run, error: BaseException) -> None:
    """Mark the run folder's `metrics.json` `failed` (or `interrupted`) with the error, keeping the figures of the
    last completed epoch, which match `last.pt`. Best effort: the error in flight is what the caller reports."""
    path = run_dir / "metrics.json"
    metrics = read_json(path)
    if metrics is None:  # nothing recorded yet: count only what last.pt holds
        metrics = metrics_record(run, {}, {}, "failed")
        metrics["epochs"] = run.progress.epoch if (run_dir / "last.pt").exists() else 0
    if isinstance(error, KeyboardInterrupt):
        metrics["status"] = "interrupted"
    else:
        message = str(error) if isinstance(error, IBError) else f"{type(error).__name__}: {error}"
        metrics.update(status="failed", error=" ".join(message.split()))
    try:
        write_json(path, metrics)
    except OSError as e:
        log.warning("could not record the failure in %s: %s", path, " ".join(str(e).split()))


def resume_recipe(run_dir: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The recipe saved in a run's `last.pt`; only `epochs` may be overridden (to train longer)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"--resume: run folder {run_dir} not found")
    if not (run_dir / "last.pt").exists():
        raise CheckpointError(f"--resume: {run_dir} has no last.pt (the run stopped before its first checkpoint); "
                              f"start it again with --overwrite")
    state = load_checkpoint(run_dir / "last.pt")
    for text in overrides:
        if not text.startswith("epochs="):
            raise ConfigError(f"--resume continues a run as it was; only epochs=N may be changed, got '{text}'")
    if not isinstance(state.get("recipe"), dict):
        raise CheckpointError(f"{run_dir / 'last.pt'} holds no recipe: not a checkpoint written by ib train")
    recipe = recipe_from_dict(state["recipe"], overrides, source=str(run_dir / "last.pt"))
    done = int(state.get("epoch", 0))
    if recipe.epochs < done:
        raise ConfigError(f"--resume: epochs={recipe.epochs} is fewer than the {done} epochs {run_dir} has trained")
    return recipe
