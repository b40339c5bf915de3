"""Beta sweeps: one complete run folder per (beta, seed) under one sweep folder, resumable.

    <sweep dir>/
      sweep.csv                 one row per run: beta, seed, status, accuracies, final I(X;Z), I(Z;Y), ...
      ib_curve.png              final I(X;Z) against I(Z;Y), one point per beta, error bars over seeds
      accuracy_vs_beta.png      test accuracy against beta
      beta_<b>_seed_<s>/        a run folder as `ib train` writes it, plus the run's TensorBoard HParams

Running the same command again skips finished runs and resumes an unfinished one from its `last.pt`, with the
recipe saved there. Only `epochs` may differ from it (a finished run then trains on to the new count); any other
difference stops the sweep before it trains anything.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ib.engine import fit, resume_recipe
from ib.errors import ConfigError, IBError
from ib.evaluate import evaluate_after_training
from ib.monitor import read_json, write_csv, write_hparams_events, write_sweep_plots
from ib.recipe import Recipe, read_recipe_file, recipe_from_dict, recipe_to_dict

log = logging.getLogger(__name__)

COLUMNS = ["run", "beta", "seed", "status", "test_accuracy", "val_accuracy", "units", "I_XZ", "I_XZ_upper", "I_ZY",
           "H_Y", "I_XZ_nats", "epochs", "train_seconds", "robust_accuracy", "I_XZ_pairwise_lower",
           "I_XZ_pairwise_upper", "I_XZ_ceiling", "I_XZ_se"]


def run_name(beta: float, seed: int) -> str:
    """The run folder's name: beta to 6 significant digits (`plan_sweep` refuses betas that share a name)."""
    return f"beta_{beta:g}_seed_{seed}"


@dataclass
class SweepRun:
    beta: float
    seed: int
    recipe: Recipe
    run_dir: Path

    @property
    def name(self) -> str:
        return self.run_dir.name


def plan_sweep(recipe_path: str | Path, betas: Sequence[float], seeds: Sequence[int], overrides: Sequence[str],
               sweep_dir: Path) -> List[SweepRun]:
    """Check every run's recipe before any work starts (a bad override fails the sweep, not its fifth run)."""
    raw = read_recipe_file(recipe_path)
    runs: List[SweepRun] = []
    betas_by_name: Dict[str, float] = {}
    for beta in betas:
        for seed in seeds:
            name = run_name(beta, seed)
            if name in betas_by_name:
                raise ConfigError(f"--beta: {betas_by_name[name]!r} and {beta!r} would share the run folder {name}; "
                                  f"betas must differ within 6 significant digits")
            betas_by_name[name] = beta
            recipe = recipe_from_dict(raw, [*overrides, f"beta={beta!r}", f"seed={seed}", f"name={name}"],
                                      source=str(recipe_path))
            runs.append(SweepRun(beta, seed, recipe, sweep_dir / name))
    return runs


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}."""
    flat: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _changes(saved: Recipe, planned: Recipe) -> List[str]:
    """The settings in which `planned` differs from `saved`, as `key: old -> new`, in recipe order."""
    old, new = _flatten(recipe_to_dict(saved)), _flatten(recipe_to_dict(planned))
    keys = list(old) + [k for k in new if k not in old]
    unset = "(unset)"  # a key of one component's options that the other component has not
    return [f"{k}: {old.get(k, unset)} -> {new.get(k, unset)}" for k in keys if old.get(k, unset) != new.get(k, unset)]


def _saved_recipe(run: SweepRun) -> Recipe:
    """The recipe in the run folder's `last.pt` with the planned epochs, as `ib train --resume DIR epochs=N` takes
    it (`resume_recipe`: epochs is the one setting a resumed run may change, and never below those trained).

    Raises:
        ConfigError: the run was trained with other settings than the planned ones.
        CheckpointError: `last.pt` is unreadable.
    """
    try:
        saved = resume_recipe(run.run_dir, [f"epochs={run.recipe.epochs}"])
    except ConfigError as e:
        raise ConfigError(f"sweep run {run.name}: {e}; {_start_afresh(run)}") from None
    changes = _changes(saved, run.recipe)
    if changes:
        raise ConfigError(f"sweep run {run.name} was trained with other settings ({'; '.join(changes)}); only "
                          f"epochs may change when a sweep is run again: {_start_afresh(run)}")
    return saved


def _start_afresh(run: SweepRun) -> str:
    return f"use a new --sweep-dir, or delete {run.run_dir} to train it again"


def _checked(run: SweepRun) -> SweepRun:
    """`run` with the recipe saved in its folder when it has a checkpoint; see `check_existing_runs`."""
    if (run.run_dir / "last.pt").exists():
        return replace(run, recipe=_saved_recipe(run))
    if _status(run.run_dir) == "completed":
        raise ConfigError(f"sweep run {run.name} is marked completed but has no last.pt to check its settings "
                          f"against; {_start_afresh(run)}")
    return run


def check_existing_runs(runs: Sequence[SweepRun]) -> List[SweepRun]:
    """The runs, each one already checkpointed in its folder with the recipe saved there (and the planned epochs).

    Checks every run before any is trained, so a changed override fails the sweep, not its fifth run.

    Raises:
        ConfigError: a run in the sweep folder was trained with other settings than planned (but epochs), or is
            marked completed without the `last.pt` that records them.
    """
    return [_checked(run) for run in runs]


def _metrics_json(run_dir: Path) -> Dict[str, Any]:
    return read_json(run_dir / "metrics.json") or {}


def _status(run_dir: Path) -> Optional[str]:
    return _metrics_json(run_dir).get("status")


def _finished(run: SweepRun) -> bool:
    """Completed, with as many epochs as planned (a finished run asked for more epochs trains on)."""
    m = _metrics_json(run.run_dir)
    return m.get("status") == "completed" and m.get("epochs") == run.recipe.epochs


def _row(run: SweepRun) -> Dict[str, Any]:
    m = _metrics_json(run.run_dir)
    row = {"run": run.name, "beta": run.beta, "seed": run.seed, "status": m.get("status", "missing")}
    for key in COLUMNS[4:]:
        row[key] = m.get(key, "")
    robust = _robust_accuracy(run.run_dir)
    if robust is not None:
        row["robust_accuracy"] = robust
    return row


def _robust_accuracy(run_dir: Path) -> Optional[float]:
    """The headline robust accuracy of `ib eval` (`ib.robustness.headline_robust_accuracy`) when the run was
    evaluated (its `eval.json`)."""
    value = (read_json(run_dir / "eval.json") or {}).get("robust_accuracy")
    return float(value) if isinstance(value, (int, float)) else None


def write_hparams(run: SweepRun, row: Dict[str, Any]) -> None:
    """TensorBoard HParams for one run (its beta and seed against its final figures), in its own folder."""
    write_hparams_events(run.run_dir, {"beta": run.beta, "seed": run.seed}, row, run.recipe.epochs)
    (run.run_dir / ".hparams_written").touch()


def train_with_torchrun(run: SweepRun, recipe_path: str | Path, overrides: Sequence[str], nproc_per_node: int,
                        resume: bool) -> str:
    """Train one run of the sweep with torchrun on this machine; returns its status from metrics.json.

    The child's output goes to this terminal. Ctrl-C reaches torchrun, which passes the signal on to its workers:
    they finish the step, save `last.pt` and exit; this process waits for them before it returns "interrupted".
    torchrun kills workers that take longer than TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (its default, 30, can be
    shorter than an epoch-end evaluation), so the child gets 600 unless the environment says otherwise.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
           "-m", "ib", "train"]
    if resume:
        cmd += ["--resume", str(run.run_dir), f"epochs={run.recipe.epochs}"]
    else:
        cmd += [str(recipe_path), *overrides, f"beta={run.beta!r}", f"seed={run.seed}", f"name={run.name}",
                "--run-dir", str(run.run_dir), "--overwrite"]
    env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "600", **os.environ}
    child = subprocess.Popen(cmd, env=env)
    try:
        code = child.wait()
    except KeyboardInterrupt:
        code = child.wait()  # the workers got the signal too: let them save last.pt
    status = _status(run.run_dir)
    if code != 0 and status != "interrupted":
        raise IBError(f"{run.name}: torchrun exited with status {code} (its output is above); run the same "
                      f"command again to resume the sweep")
    return status or "failed"


def run_sweep(
    recipe_path: str | Path,
    betas: Sequence[float],
    seeds: Sequence[int],
    overrides: Sequence[str] = (),
    sweep_dir: str | Path | None = None,
    *,
    handle_signals: bool = False,
    nproc_per_node: int = 1,
    vectorize: bool = False,
) -> List[Dict[str, Any]]:
    """Train every (beta, seed) of the grid into `sweep_dir`, skipping finished runs; returns the sweep.csv rows.

    Stops early (returning the rows so far) when a run was interrupted. With `nproc_per_node` > 1 each run is
    handed to `torchrun --standalone --nproc_per_node=N -m ib train ...` (one machine, data parallel). With
    `vectorize`, the unfinished runs that stand at the same step train together as one population
    (`ib.engine.population_loop`), each into its own run folder as if trained alone.
    """
    if nproc_per_node < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc_per_node}")
    if vectorize and nproc_per_node > 1:
        raise ConfigError("--vectorize trains the runs as one population in one process; it does not combine "
                          "with --nproc-per-node (run one or the other)")
    if sweep_dir is None:
        base = recipe_from_dict(read_recipe_file(recipe_path), overrides, source=str(recipe_path))
        sweep_dir = Path(base.output_dir) / f"{base.name}_sweep"
    sweep_dir = Path(sweep_dir)
    runs = check_existing_runs(plan_sweep(recipe_path, betas, seeds, overrides, sweep_dir))
    try:
        sweep_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create sweep folder {sweep_dir}: {e.strerror or e}") from None
    units = runs[0].recipe.monitor.units
    rows: Dict[str, Dict[str, Any]] = {r.name: _row(r) for r in runs}
    if vectorize:
        return _vectorized(runs, rows, sweep_dir, units, handle_signals)
    for i, run in enumerate(runs, 1):
        if _finished(run):
            status = "completed"
            log.info("[%d/%d] %s: done, skipped", i, len(runs), run.name)
        else:
            resume = (run.run_dir / "last.pt").exists()
            (run.run_dir / ".hparams_written").unlink(missing_ok=True)  # a finished run training on: new figures
            log.info("[%d/%d] %s: %s", i, len(runs), run.name, "resuming" if resume else "training")
            if nproc_per_node > 1:
                status = train_with_torchrun(run, recipe_path, overrides, nproc_per_node, resume)
            else:
                metrics = fit(run.recipe, run.run_dir, resume=resume, overwrite=not resume,
                              handle_signals=handle_signals)
                status = metrics["status"]
                evaluate_after_training(run.recipe, run.run_dir, metrics)  # as `ib train` does (torchrun's child too)
        rows[run.name] = _row(run)
        write_csv(sweep_dir / "sweep.csv", list(rows.values()), COLUMNS)
        if status != "completed":
            log.warning("sweep stopped at %s (%s); run the same command again to resume", run.name, status)
            return list(rows.values())
        if not (run.run_dir / ".hparams_written").exists():
            write_hparams(run, rows[run.name])
    write_sweep_plots(sweep_dir, list(rows.values()), units)
    return list(rows.values())


def _vectorized(runs: List[SweepRun], rows: Dict[str, Dict[str, Any]], sweep_dir: Path, units: str,
                handle_signals: bool) -> List[Dict[str, Any]]:
    """`run_sweep` with `vectorize`: each group of unfinished runs at the same step trains as one population."""
    from ib.engine.population_loop import fit_population, population_blockers, saved_step

    todo = [r for r in runs if not _finished(r)]
    for r in runs:
        if r not in todo:
            log.info("%s: done, skipped", r.name)
    if todo:
        blockers = population_blockers([r.recipe for r in todo])
        if blockers:
            raise ConfigError(f"--vectorize: these runs cannot train as one population ({'; '.join(blockers)}); "
                              f"run the sweep without --vectorize to train them one after another")
    groups: Dict[int, List[SweepRun]] = {}
    for r in todo:
        groups.setdefault(saved_step(r.run_dir), []).append(r)
    for step, group in sorted(groups.items()):
        resume = [(r.run_dir / "last.pt").exists() for r in group]
        for r in group:
            (r.run_dir / ".hparams_written").unlink(missing_ok=True)
        log.info("population of %d runs (%s) %s", len(group), ", ".join(r.name for r in group),
                 f"resuming at step {step}" if step else "training")
        results = fit_population([r.recipe for r in group], [r.run_dir for r in group], resume=resume,
                                 handle_signals=handle_signals)
        stopped = False
        for r, metrics in zip(group, results):
            if metrics["status"] == "completed":
                evaluate_after_training(r.recipe, r.run_dir, metrics)
            rows[r.name] = _row(r)
            stopped |= metrics["status"] != "completed"
        write_csv(sweep_dir / "sweep.csv", list(rows.values()), COLUMNS)
        if stopped:
            log.warning("sweep stopped (%s); run the same command again to resume",
                        ", ".join(f"{r.name}: {m['status']}" for r, m in zip(group, results)))
            return list(rows.values())
        for r in group:
            if not (r.run_dir / ".hparams_written").exists():
                write_hparams(r, rows[r.name])
    write_csv(sweep_dir / "sweep.csv", list(rows.values()), COLUMNS)
    write_sweep_plots(sweep_dir, list(rows.values()), units)
    return list(rows.values())
