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
    """Scalars under their hierarchical tags with the epoch (1-based) as step.

    On resume, events at or after the resumed epoch are purged, so an epoch that was logged but not checkpointed
    before a crash does not appear twice.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir), purge_step=resume_epoch + 1 if resume_epoch else None)

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for tag, value in row.items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


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
