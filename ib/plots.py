"""Figures: a run's information-plane trajectory, a sweep's IB curve and its accuracy against beta, and an
evaluation's accuracy against the attack radius.

Pure functions of the rows they are given (no files, no other `ib` module): `ib.monitor` reads the files and saves
the figures. Built with matplotlib's object API (`Figure`, no pyplot), so importing this module never changes a
user's backend.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def xz_label(units: str, xz_name: str) -> str:
    """The axis label of the held-out I(X;Z), e.g. "I(X;Z) [nats] (MINE, held-out)"."""
    return f"I(X;Z) [{units}] ({xz_name + ', ' if xz_name else ''}held-out)"


def plane_figure(points: Sequence[Mapping[str, float]], units: str = "nats", title: str = "", *,
                 xz_name: str = "", upper_bound: bool = False) -> Figure:
    """I(X;Z) on x, I(Z;Y) on y, one point per epoch, coloured by epoch; the KL upper bound as a band to the right.

    Args:
        points: rows with "epoch", "I_XZ", "I_ZY" and optionally "I_XZ_upper" (in `units`).
        xz_name: what "I_XZ" is ("MINE", "KL upper bound", ...; "" names nothing), for the x axis.
        upper_bound: "I_XZ" is the KL upper bound itself: no band is drawn.
    """
    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    pts = [p for p in points if _finite(p.get("I_XZ")) and _finite(p.get("I_ZY"))]
    if pts:
        xs, ys, ep = [p["I_XZ"] for p in pts], [p["I_ZY"] for p in pts], [p["epoch"] for p in pts]
        upper = [] if upper_bound else [p.get("I_XZ_upper") for p in pts]
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
    ax.set_xlabel(xz_label(units, xz_name))
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


def robustness_figure(rows: Sequence[Mapping[str, Any]], attacks: Sequence[str], title: str = "") -> Figure:
    """Accuracy against radius: one panel per threat (L-inf, L2, noise), one line per attack and variant
    (solid: mean code; dashed: sampled). `attacks`: every attack name, in the order that gives each its colour."""
    threats = [t for t in ("linf", "l2", "noise") if any(r["threat"] == t for r in rows)]
    fig = Figure(figsize=(4.6 * max(len(threats), 1), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, max(len(threats), 1), squeeze=False)[0]
    xlabel = {"linf": "eps (L-inf, [0, 1] pixel scale)", "l2": "eps (L2, [0, 1] pixel scale)",
              "noise": "noise sigma ([0, 1] pixel scale)"}
    colours = ["C0", "C1", "C2", "C3", "C4"]  # one per attack, whichever panel it is on
    for ax, threat in zip(axes, threats):
        for attack, variant in sorted({(r["attack"], r["variant"]) for r in rows if r["threat"] == threat}):
            curve = sorted((r["eps"], r["accuracy"]) for r in rows if (r["attack"], r["variant"]) == (attack, variant))
            ax.plot([e for e, _ in curve], [a for _, a in curve], marker="o", markersize=3,
                    color=colours[list(attacks).index(attack) % len(colours)],
                    linestyle="-" if variant == "mean" else "--", label=f"{attack} / {variant}")
        ax.set_xlabel(xlabel[threat])
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
