"""What a run writes beside its training loop: TensorBoard scalars, `history.csv` and `metrics.json`.

Each logger takes the epoch's row of metrics (a flat dict with hierarchical keys such as `loss/ce`, `mi/I_XZ`,
`acc/val`) after the loop has computed it; none of them computes anything itself.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Protocol

from ib.checkpoint import atomic_write


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars under their hierarchical tags with the epoch (1-based) as step, a custom-scalars layout that draws
    I(X;Z) inside its band (MINE's lower estimate to the KL upper bound), and the information-plane trajectory as a
    figure each epoch.

    On resume, events at or after the resumed epoch are purged, so an epoch that was logged but not checkpointed
    before a crash does not appear twice; the trajectory so far is read back from `history.csv`.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0, *, units: str = "nats",
                 plane_figure: bool = True) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir), purge_step=resume_epoch + 1 if resume_epoch else None)
        self.units = units
        self.plane_figure = plane_figure
        self.points: List[Dict[str, float]] = []
        history = Path(run_dir) / "history.csv"
        if resume_epoch and history.exists():
            with history.open(newline="") as f:
                self.points = [_plane_point(int(r["epoch"]), r) for r in csv.DictReader(f)
                               if int(r["epoch"]) <= resume_epoch]
        if not resume_epoch:
            self.writer.add_custom_scalars(information_layout(units))

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for tag, value in row.items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        self.points.append(_plane_point(epoch, row))
        if self.plane_figure:
            from ib.plots import plane_figure

            self.writer.add_figure("mi/information_plane", plane_figure(self.points, self.units), epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _plane_point(epoch: int, row: Mapping[str, Any]) -> Dict[str, float]:
    def num(key: str) -> float:
        try:
            return float(row.get(key, math.nan))
        except (TypeError, ValueError):  # an empty CSV cell
            return math.nan

    return {"epoch": epoch, "I_XZ": num("mi/I_XZ"), "I_XZ_upper": num("mi/I_XZ_upper"), "I_ZY": num("mi/I_ZY")}


def information_layout(units: str) -> Dict[str, Any]:
    """TensorBoard custom-scalars layout: I(X;Z) as a margin chart inside [MINE estimate, KL upper bound]."""
    return {
        "information plane": {
            f"I(X;Z) [{units}]: MINE estimate within [MINE, KL upper bound]": [
                "Margin", ["mi/I_XZ", "mi/I_XZ", "mi/I_XZ_upper"]],
            f"I(Z;Y) [{units}] and H(Y)": ["Multiline", ["mi/I_ZY", "mi/H_Y"]],
            "accuracy": ["Multiline", ["acc/train", "acc/val", "acc/test"]],
        }
    }


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
        columns: List[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.path, lambda f: f.write(buf.getvalue().encode()))

    def close(self) -> None:
        pass


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
