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
from typing import Any, Dict, List, Mapping, Optional, Protocol

from ib.checkpoint import atomic_write
from ib.errors import ConfigError
from ib.recipe import Recipe, load_recipe


class EpochLogger(Protocol):
    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardLogger:
    """Scalars under their hierarchical tags with the epoch (1-based) as step, a custom-scalars layout that draws
    I(X;Z) inside its band (a critic's lower estimate to the KL upper bound; vib_kl's estimate is that bound, so it
    is drawn alone), and the information-plane trajectory as a figure each epoch.

    `estimator` is the recipe's `mi.estimator` registry name (None: no estimator), which names the charts.

    On resume, events at or after the resumed epoch are purged, so an epoch that was logged but not checkpointed
    before a crash does not appear twice; the trajectory so far is read back from `history.csv`.
    """

    def __init__(self, run_dir: str | Path, resume_epoch: int = 0, *, units: str = "nats",
                 plane_figure: bool = True, estimator: Optional[str] = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir), purge_step=resume_epoch + 1 if resume_epoch else None)
        self.units = units
        self.estimator = estimator
        self.plane_figure = plane_figure
        self.points: List[Dict[str, float]] = []
        history = Path(run_dir) / "history.csv"
        if resume_epoch and history.exists():
            with history.open(newline="") as f:
                self.points = [_plane_point(int(r["epoch"]), r) for r in csv.DictReader(f)
                               if int(r["epoch"]) <= resume_epoch]
        if not resume_epoch:
            self.writer.add_custom_scalars(information_layout(units, self.estimator))

    def log_epoch(self, epoch: int, row: Mapping[str, float]) -> None:
        for tag, value in row.items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        self.points.append(_plane_point(epoch, row))
        if self.plane_figure:
            from ib.plots import plane_figure

            figure = plane_figure(self.points, self.units, estimator=self.estimator)
            self.writer.add_figure("mi/information_plane", figure, epoch)
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


def information_layout(units: str, estimator: Optional[str] = "mine") -> Dict[str, Any]:
    """TensorBoard custom-scalars layout. I(X;Z): a margin chart of the estimate inside [estimate, KL upper bound]
    for a critic's lower bound; for `vib_kl`, whose `mi/I_XZ` is the KL upper bound itself, one line.

    Args:
        units: "nats" or "bits", for the chart titles.
        estimator: the recipe's `mi.estimator` registry name (None: no estimator), for the chart titles.
    """
    if is_upper_bound(estimator):
        xz = {f"I(X;Z) [{units}]: {estimate_name(estimator)}": ["Multiline", ["mi/I_XZ"]]}
    else:
        what = estimate_name(estimator) or "critic"
        band = f"{what} estimate within [{what}, KL upper bound]"
        xz = {f"I(X;Z) [{units}]: {band}": ["Margin", ["mi/I_XZ", "mi/I_XZ", "mi/I_XZ_upper"]]}
    return {
        "information plane": {
            **xz,
            f"I(Z;Y) [{units}] and H(Y)": ["Multiline", ["mi/I_ZY", "mi/H_Y"]],
            "accuracy": ["Multiline", ["acc/train", "acc/val", "acc/test"]],
        }
    }


# The estimator behind `mi/I_XZ`, by `mi.estimator` (README, "MI estimators", says what each one reports).
_NAMES: Dict[str, str] = {"mine": "MINE", "mine_f": "MINE-f", "infonce": "InfoNCE", "smile": "SMILE", "jsd": "JSD",
                          "vib_kl": "KL upper bound"}
_UPPER_BOUNDS = ("vib_kl",)  # estimators whose `mi/I_XZ` is the KL upper bound (the same as `mi/I_XZ_upper`)


def estimate_name(estimator: Optional[str]) -> str:
    """What `mi/I_XZ` is, for labels: "MINE" for `mine`, "KL upper bound" for `vib_kl`, the registry name itself
    for an estimator registered elsewhere, "" when there is none."""
    return "" if estimator is None else _NAMES.get(estimator, estimator)


def xz_label(units: str, estimator: Optional[str]) -> str:
    """The axis label of the held-out I(X;Z), e.g. "I(X;Z) [nats] (MINE, held-out)"."""
    what = estimate_name(estimator)
    return f"I(X;Z) [{units}] ({what + ', ' if what else ''}held-out)"


def is_upper_bound(estimator: Optional[str]) -> bool:
    """Whether `estimator`'s `mi/I_XZ` is the KL upper bound, so that there is no band to draw."""
    return estimator in _UPPER_BOUNDS


def recipe_estimator(recipe: Recipe) -> Optional[str]:
    """The registry name of the recipe's I(X;Z) estimator (`mi.estimator`), None when `mi.enabled` is off."""
    return recipe.mi.estimator.name if recipe.mi.enabled else None


def run_estimator(run_dir: str | Path) -> Optional[str]:
    """`recipe_estimator` of a run folder's `recipe.yaml`; None when the file is missing or unreadable (labels then
    name no estimator)."""
    try:
        return recipe_estimator(load_recipe(Path(run_dir) / "recipe.yaml"))
    except ConfigError:
        return None


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
