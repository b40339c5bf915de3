"""What runs write beside their work: TensorBoard scalars and figures, `history.csv`, JSON and CSV files, and the
PNG figures of a run, a sweep or an evaluation.

Each logger takes the epoch's row of metrics (a flat dict with hierarchical keys such as `loss/ce`, `mi/I_XZ`,
`acc/val`) after the loop has computed it; none of them computes anything itself. The figures themselves are pure
functions in `ib.plots`; this module reads the files they are drawn from and writes them. `ib.plots` (matplotlib) is
imported where a figure is drawn, so that a process that draws none (a torchrun worker) never loads it.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Set

from ib.checkpoint import atomic_write
from ib.errors import ConfigError

# ---------------------------------------------------------------------------------------------------------------------
# Files


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: str | Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically; non-finite floats become null (JSON has no NaN)."""
    text = json.dumps(_json_safe(dict(data)), indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: str | Path) -> Optional[Dict[str, Any]]:
    """A JSON object written by `write_json`; None when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None) -> None:
    """Write rows atomically under `columns` (default: every key, in order of first appearance; keys outside
    `columns` are left out, missing cells left blank)."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


TEXT_COLUMNS = ("run", "status", "units", "attack", "variant", "threat", "loss")


def read_csv(path: str | Path) -> List[Dict[str, Any]]:
    """A CSV file back as rows, with floats where the cells hold numbers (but in `TEXT_COLUMNS`); blank cells stay
    blank."""
    rows = []
    with Path(path).open(newline="") as f:
        for r in csv.DictReader(f):
            out: Dict[str, Any] = {}
            for k, v in r.items():
                try:
                    out[k] = float(v) if k not in TEXT_COLUMNS else v
                except (TypeError, ValueError):
                    out[k] = v
            rows.append(out)
    return rows


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # an empty CSV cell, a missing key
        return math.nan


def plane_point(epoch: int, row: Mapping[str, Any]) -> Dict[str, float]:
    """The information-plane point of an epoch's row (or of its `history.csv` line)."""
    keys = ("I_XZ", "I_XZ_se", "I_XZ_upper", "I_ZY", "I_XZ_pairwise_lower", "I_XZ_pairwise_upper", "I_XZ_ceiling")
    return {"epoch": epoch, **{k: _number(row.get(f"mi/{k}")) for k in keys}}


def history_points(run_dir: str | Path, up_to: Optional[int] = None) -> List[Dict[str, float]]:
    """The plane points of a run folder's `history.csv` (epochs up to `up_to`, when given)."""
    return [plane_point(int(r["epoch"]), r) for r in read_csv(Path(run_dir) / "history.csv")
            if up_to is None or int(r["epoch"]) <= up_to]


# ---------------------------------------------------------------------------------------------------------------------
# Epoch loggers


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class CSVHistory:
    """`history.csv`: one row per epoch; rewritten whole each epoch (small), so it never holds a half row."""

    def __init__(self, path: str | Path, resume_epoch: int = 0) -> None:
        self.path = Path(path)
        self.rows: List[Dict[str, Any]] = []
        if resume_epoch and self.path.exists():
            with self.path.open(newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= resume_epoch]

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        self.rows.append({"epoch": epoch, **row})
        write_csv(self.path, self.rows)

    def close(self) -> None:
        pass


def figure_epochs(epochs: int, figures: int) -> Set[int]:
    """The epochs (1-based) at which a run of `epochs` epochs draws its `figures` plane figures: the first to reach
    each of `figures` evenly spaced marks, so the last epoch always draws, and every epoch does when there are no
    more epochs than figures. Each figure holds the whole trajectory so far, so the ones between lose nothing."""
    return {e for e in range(1, epochs + 1) if e * figures // epochs != (e - 1) * figures // epochs}


class TensorBoardLogger:
    """Scalars under their hierarchical tags with the epoch (1-based) as step, a custom-scalars layout that draws
    the I(X;Z) estimate with the pairwise band, and the information-plane trajectory as a figure at the epochs
    `figure_epochs` names.

    Args:
        run_dir: the run folder (TensorBoard's log dir).
        resume_epoch: on resume, events at or after the next epoch are purged, so an epoch that was logged but not
            checkpointed before a crash does not appear twice; the trajectory so far is read back from
            `history.csv`.
        units: of the information quantities, for titles.
        plane_figure: draw the plane's trajectory (the whole trajectory so far, each time).
        xz_name: what `mi/I_XZ` is ("MINE", "KL upper bound", ...; "" without an estimator), for titles.
        figure_epochs: the epochs that draw the figure (`figure_epochs`); None: every epoch.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0, *, units: str = "nats",
                 plane_figure: bool = True, xz_name: str = "", figure_epochs: Optional[Set[int]] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard's writer only where one is made

        self.writer = SummaryWriter(str(run_dir), purge_step=resume_epoch + 1 if resume_epoch else None)
        self.units, self.xz_name = units, xz_name
        self.plane_figure = plane_figure
        self.figure_epochs = figure_epochs  # None: every epoch
        self.points: List[Dict[str, float]] = []
        if resume_epoch and (Path(run_dir) / "history.csv").exists():
            self.points = history_points(run_dir, up_to=resume_epoch)
        if not resume_epoch:
            self.writer.add_custom_scalars(information_layout(units, xz_name))

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for tag, value in row.items():
            if value is not None and not tag.startswith("align/"):  # those go to `AlignmentLog`, by step
                self.writer.add_scalar(tag, value, epoch)
        self.points.append(plane_point(epoch, row))
        if self.plane_figure and (self.figure_epochs is None or epoch in self.figure_epochs):
            from ib.plots import plane_figure, render_rgb

            figure = plane_figure(self.points, self.units, xz_name=self.xz_name)
            self.writer.add_image("mi/information_plane", render_rgb(figure), epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class AlignmentLog:
    """The tangent-kernel alignment of a run, by training step: `alignment.csv` (one row per measurement, rewritten
    whole) and TensorBoard scalars in the run folder's `alignment/` sub-run, whose x axis is the step (the epoch
    loggers' is the epoch), with the figure of `ib.plots.alignment_figure` at each epoch.

    Args:
        run_dir: the run folder.
        resume_step: on resume, rows and events after this step (measured but not checkpointed) are dropped.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.path = Path(run_dir) / "alignment.csv"
        self.rows: List[Dict[str, Any]] = []
        if resume_step and self.path.exists():
            self.rows = [r for r in read_csv(self.path) if _number(r.get("step")) <= resume_step]
        self.writer = SummaryWriter(str(Path(run_dir) / "alignment"),
                                    purge_step=resume_step + 1 if resume_step else None)

    def log(self, rows: Sequence[Mapping[str, float]], epoch: int) -> None:
        for r in rows:
            step = int(r["step"])
            for tag, value in r.items():
                if tag != "step" and value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)
            self.rows.append({"epoch": epoch, **r})
        if rows:
            write_csv(self.path, self.rows)
            from ib.plots import alignment_figure

            self.writer.add_figure("align/figure", alignment_figure(self.rows), int(rows[-1]["step"]))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def information_layout(units: str, xz_name: str = "MINE") -> Dict[str, Any]:
    """TensorBoard custom-scalars layout. I(X;Z): a margin chart of the estimate with the pairwise band (Gaussian
    encoders: Bhattacharyya to KL, where the probe's I(X;Z) lies), VIB's KL bound against N(0, I) on a chart of its
    own, I(Z;Y) with H(Y), and the accuracies.

    Args:
        units: "nats" or "bits", for the chart titles.
        xz_name: what `mi/I_XZ` is, for the chart titles ("" without an estimator).
    """
    what = xz_name or "no"
    return {
        "information plane": {
            f"I(X;Z) [{units}]: {what} estimate and the pairwise band": [
                "Margin", ["mi/I_XZ", "mi/I_XZ_pairwise_lower", "mi/I_XZ_pairwise_upper"]],
            f"I(X;Z) [{units}]: the pairwise band and its ceiling log N": [
                "Multiline", ["mi/I_XZ_pairwise_lower", "mi/I_XZ_pairwise_upper", "mi/I_XZ_ceiling"]],
            f"I(X;Z) [{units}]: VIB's KL bound against N(0, I)": ["Multiline", ["mi/I_XZ_upper"]],
            f"I(Z;Y) [{units}] and H(Y)": ["Multiline", ["mi/I_ZY", "mi/H_Y"]],
            "accuracy": ["Multiline", ["acc/train", "acc/val", "acc/test"]],
        }
    }


HPARAMS_METRICS = ("test_accuracy", "val_accuracy", "I_XZ", "I_ZY", "robust_accuracy")


def write_hparams_events(run_dir: Path, params: Mapping[str, Any], row: Mapping[str, Any], step: int) -> None:
    """TensorBoard HParams of a run, written into its own folder so that TensorBoard pairs them with its scalars:
    `params` against the finite figures of `row` (a sweep.csv row) named in HPARAMS_METRICS, at `step`."""
    from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard's writer only where one is made
    from torch.utils.tensorboard.summary import hparams

    metrics = {f"hparams/{k}": float(row[k]) for k in HPARAMS_METRICS
               if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
    exp, ssi, sei = hparams(dict(params), metrics)
    with SummaryWriter(str(run_dir)) as w:
        for summary in (exp, ssi, sei):
            w.file_writer.add_summary(summary)
        for tag, value in metrics.items():
            w.add_scalar(tag, value, step)


# ---------------------------------------------------------------------------------------------------------------------
# Figures of a run folder, a sweep folder and an evaluation


def write_plane_plots(folder: str | Path,
                      labels_of: Optional[Callable[[Path], Mapping[str, Any]]] = None) -> List[Path]:
    """PNG files for papers, without TensorBoard: a run folder gets `plane.png` (and `alignment.png` where it
    measured the tangent-kernel alignment); a sweep folder gets
    `ib_curve.png`, `accuracy_vs_beta.png` and a `plane.png` in each run folder.

    A run folder's `metrics.json` says which estimator `mi/I_XZ` comes from (its "estimator" entry: "label",
    "upper_bound"); for a folder without it, `labels_of(run_dir)` gives them (`ib plane` reads the run's recipe),
    and without that the figure names no estimator.

    Raises:
        ConfigError: `folder` holds neither a run (history.csv) nor a sweep (sweep.csv).
    """
    folder = Path(folder)
    written: List[Path] = []
    if (folder / "sweep.csv").is_file():
        rows = read_csv(folder / "sweep.csv")
        units = next((str(r["units"]) for r in rows if r.get("units")), "nats")
        written += write_sweep_plots(folder, rows, units)
        for r in rows:
            run_dir = folder / str(r["run"])
            if (run_dir / "history.csv").is_file():
                written += write_plane_plots(run_dir, labels_of)
        return written
    if (folder / "history.csv").is_file():
        from ib.plots import plane_figure

        metrics = read_json(folder / "metrics.json") or {}
        if "estimator" in metrics:
            estimator = metrics["estimator"] or {}  # null: the run has no estimator
        else:
            estimator = labels_of(folder) if labels_of is not None else {}
        path = folder / "plane.png"
        figure = plane_figure(history_points(folder), metrics.get("units", "nats"), title=folder.name,
                              xz_name=str(estimator.get("label", "")))
        figure.savefig(str(path))
        written.append(path)
        if (folder / "alignment.csv").is_file():
            from ib.plots import alignment_figure

            path = folder / "alignment.png"
            alignment_figure(read_csv(folder / "alignment.csv"), title=folder.name).savefig(str(path))
            written.append(path)
        return written
    raise ConfigError(f"{folder} holds neither a run (history.csv) nor a sweep (sweep.csv)")


def write_sweep_plots(sweep_dir: Path, rows: Sequence[Mapping[str, Any]], units: str) -> List[Path]:
    """`ib_curve.png` and `accuracy_vs_beta.png` of a sweep, from its completed runs' rows."""
    from ib.plots import accuracy_figure, ib_curve_figure

    done = [r for r in rows if r.get("status") == "completed"]
    paths = [sweep_dir / "ib_curve.png", sweep_dir / "accuracy_vs_beta.png"]
    ib_curve_figure(done, units).savefig(str(paths[0]))
    keys = ["test_accuracy"] + (["robust_accuracy"] if any(isinstance(r.get("robust_accuracy"), float)
                                                           for r in done) else [])
    accuracy_figure(done, keys).savefig(str(paths[1]))
    return paths


ROBUSTNESS_COLUMNS = ["attack", "variant", "threat", "eps", "loss", "schedule", "targets", "accuracy",
                      "accuracy_per_draw", "n", "seconds"]


def write_eval_outputs(run_dir: Path, report: Mapping[str, Any], attacks: Sequence[str], *,
                       tensorboard: bool = True) -> None:
    """`eval.json`, `robustness.csv`, `robustness.png`, and TensorBoard (tags `robust/<attack>/<variant>`, with
    `<attack>_margin` for the margin loss, step = round(1000 * eps); clean metrics under `eval/...` and the figure
    at the checkpoint's epoch). `attacks`: every attack name, in the order that gives each its colour.

    The TensorBoard events go to their own run, `<run_dir>/eval/<checkpoint stem>/` (see `eval_log_dir`): in the
    run folder itself, a resumed training's writer (which purges steps after the resumed epoch) would delete the
    eps-indexed points. Evaluating the same checkpoint again replaces its previous events instead of adding a second
    point at every step.
    """
    run_dir = Path(run_dir)
    write_json(run_dir / "eval.json", report)
    write_csv(run_dir / "robustness.csv", report["robustness"], ROBUSTNESS_COLUMNS)
    from ib.plots import robustness_figure

    ckpt = Path(report["checkpoint"])
    title = f"{ckpt.parent.name}/{ckpt.name}, {report['split']} ({report['n']} samples)"
    fig = robustness_figure(report["robustness"], attacks, title)
    fig.savefig(run_dir / "robustness.png")
    if tensorboard:
        _eval_events(eval_log_dir(run_dir, report["checkpoint"]), report, fig)


def _eval_events(log_dir: Path, report: Mapping[str, Any], fig: Any) -> None:
    from torch.utils.tensorboard import SummaryWriter  # loads TensorBoard's writer only where one is made

    log_dir.mkdir(parents=True, exist_ok=True)
    # The previous evaluation's event files, removed once this one is written (so a failure keeps them).
    stale = [f for f in log_dir.glob("events.out.tfevents.*") if f.is_file()]
    writer = SummaryWriter(str(log_dir))
    try:
        for r in report["robustness"]:
            attack = r["attack"] + ("_margin" if r.get("loss") == "margin" else "")  # another attack's curve
            writer.add_scalar(f"robust/{attack}/{r['variant']}", r["accuracy"], round(1000 * r["eps"]))
        epoch = int(report.get("epoch", 0))
        for variant, metrics in report["clean"].items():
            for key in ("accuracy", "nll", "ece"):
                writer.add_scalar(f"eval/{key}/{variant}", metrics[key], epoch)
        writer.add_figure("robust/accuracy_vs_eps", fig, epoch, close=False)
        lines = ["| check | passed | detail |", "|---|---|---|"]
        lines += [f"| {c['name']} | {c['passed']} | {c['detail']} |" for c in report["checks"]]
        writer.add_text("eval/checks", "\n".join(lines), epoch)
    finally:
        writer.close()
    for f in stale:
        f.unlink(missing_ok=True)


def eval_log_dir(run_dir: str | Path, checkpoint: str | Path) -> Path:
    """The TensorBoard folder of an evaluation of `checkpoint`: `<run_dir>/eval/<checkpoint stem>`, a run of its own
    beside the training run (`tensorboard --logdir` on the run folder shows both), one per checkpoint evaluated."""
    return Path(run_dir) / "eval" / Path(checkpoint).stem
