"""Figures: a run's information-plane trajectory, a sweep's IB curve and its accuracy against beta.

Built with matplotlib's object API (`Figure`, no pyplot), so importing this module never changes a user's backend.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from matplotlib.figure import Figure


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def plane_figure(points: Sequence[Mapping[str, float]], units: str = "nats", title: str = "", *,
                 estimator: Optional[str] = "mine") -> Figure:
    """I(X;Z) on x, I(Z;Y) on y, one point per epoch, coloured by epoch; the KL upper bound as a band to the right.

    Args:
        points: rows with "epoch", "I_XZ", "I_ZY" and optionally "I_XZ_upper" (in `units`).
        estimator: the recipe's `mi.estimator` registry name (None: no estimator), which names the x axis; for
            `vib_kl`, "I_XZ" is the KL upper bound itself and no band is drawn.
    """
    from ib.monitor import is_upper_bound, xz_label

    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    pts = [p for p in points if _finite(p.get("I_XZ")) and _finite(p.get("I_ZY"))]
    if pts:
        xs, ys, ep = [p["I_XZ"] for p in pts], [p["I_ZY"] for p in pts], [p["epoch"] for p in pts]
        upper = [] if is_upper_bound(estimator) else [p.get("I_XZ_upper") for p in pts]
        span = max(max(xs) - min(xs), 1e-3)
        if upper and all(_finite(u) for u in upper):
            # The KL bound of a nearly deterministic code is far to the right: draw the band up to the edge of the
            # estimates' range and say where it ends.
            right = max(xs) + span
            for x, y, u in zip(xs, ys, upper):
                ax.plot([x, min(u, right)], [y, y], color="0.8", lw=1, zorder=1)
            ax.plot([], [], color="0.8", lw=1, label=f"to the KL upper bound (last: {upper[-1]:.3g})")
            ax.set_xlim(min(xs) - 0.1 * span, max(min(max(upper), right), max(xs)) + 0.1 * span)
        ax.plot(xs, ys, color="0.5", lw=0.8, zorder=2)
        sc = ax.scatter(xs, ys, c=ep, cmap="viridis", s=22, zorder=3)
        fig.colorbar(sc, ax=ax, label="epoch")
        if any(_finite(u) for u in upper):
            ax.legend(loc="lower right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no I(X;Z) estimate in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xz_label(units, estimator))
    ax.set_ylabel(f"I(Z;Y) [{units}] (H(Y) - CE)")
    ax.set_title(title or "information plane")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _by_beta(rows: Sequence[Mapping[str, float]], key: str) -> Dict[float, List[float]]:
    out: Dict[float, List[float]] = {}
    for r in rows:
        if _finite(r.get(key)):
            out.setdefault(float(r["beta"]), []).append(float(r[key]))
    return out


def _mean_std(values: List[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0


def ib_curve_figure(rows: Sequence[Mapping[str, float]], units: str = "nats") -> Figure:
    """Final I(X;Z) against I(Z;Y), one point per beta (mean over seeds, error bars = std over seeds)."""
    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    xz, zy = _by_beta(rows, "I_XZ"), _by_beta(rows, "I_ZY")
    betas = sorted(set(xz) & set(zy))
    for b in betas:
        (mx, sx), (my, sy) = _mean_std(xz[b]), _mean_std(zy[b])
        ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", capsize=3)
        ax.annotate(f"β={b:g}", (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if betas:
        ax.plot([_mean_std(xz[b])[0] for b in betas], [_mean_std(zy[b])[0] for b in betas], color="0.6", lw=0.8)
    ax.set_xlabel(f"I(X;Z) [{units}]")
    ax.set_ylabel(f"I(Z;Y) [{units}]")
    ax.set_title("IB curve (final epoch; error bars: std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def accuracy_figure(rows: Sequence[Mapping[str, float]], keys: Sequence[str] = ("test_accuracy",)) -> Figure:
    """Accuracy against beta (symlog x axis, so beta = 0 has a place), mean and std over seeds."""
    fig = Figure(figsize=(5.5, 4.0), dpi=100)
    ax = fig.add_subplot()
    positive = sorted({float(r["beta"]) for r in rows if float(r["beta"]) > 0})
    ax.set_xscale("symlog", linthresh=positive[0] if positive else 1e-4)
    for key in keys:
        acc = _by_beta(rows, key)
        betas = sorted(acc)
        if betas:
            stats = [_mean_std(acc[b]) for b in betas]
            ax.errorbar(betas, [m for m, _ in stats], yerr=[s for _, s in stats], fmt="o-", capsize=3, label=key)
    ax.set_xlabel("beta")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy against beta")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | Path) -> None:
    fig.savefig(str(path))


def _history_points(run_dir: Path) -> List[Dict[str, float]]:
    import csv

    def num(v: str) -> float:
        try:
            return float(v)
        except (TypeError, ValueError):
            return math.nan

    with (run_dir / "history.csv").open(newline="") as f:
        return [{"epoch": int(r["epoch"]), "I_XZ": num(r.get("mi/I_XZ", "")), "I_ZY": num(r.get("mi/I_ZY", "")),
                 "I_XZ_upper": num(r.get("mi/I_XZ_upper", ""))} for r in csv.DictReader(f)]


def _units(run_dir: Path) -> str:
    import json

    try:
        return json.loads((run_dir / "metrics.json").read_text()).get("units", "nats")
    except (OSError, ValueError):
        return "nats"


def write_plane_plots(folder: Path) -> List[Path]:
    """PNG files for papers, without TensorBoard: a run folder gets `plane.png`; a sweep folder gets
    `ib_curve.png`, `accuracy_vs_beta.png` and a `plane.png` in each run folder.

    Raises:
        ConfigError: `folder` holds neither a run (history.csv) nor a sweep (sweep.csv).
    """
    from ib.errors import ConfigError

    folder = Path(folder)
    written: List[Path] = []
    if (folder / "sweep.csv").is_file():
        from ib.sweep import read_csv, write_plots

        rows = read_csv(folder / "sweep.csv")
        units = next((str(r["units"]) for r in rows if r.get("units")), "nats")
        written += write_plots(folder, rows, units)
        for r in rows:
            run_dir = folder / str(r["run"])
            if (run_dir / "history.csv").is_file():
                written += write_plane_plots(run_dir)
        return written
    if (folder / "history.csv").is_file():
        path = folder / "plane.png"
        from ib.monitor import run_estimator

        figure = plane_figure(_history_points(folder), _units(folder), title=folder.name,
                              estimator=run_estimator(folder))
        save_figure(figure, path)
        return [path]
    raise ConfigError(f"{folder} holds neither a run (history.csv) nor a sweep (sweep.csv)")
