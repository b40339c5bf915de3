"""Figures: a run's information-plane trajectory, a sweep's IB curve and its accuracy against beta, and an
evaluation's accuracy against the attack radius.

Pure functions of the rows they are given (no files, no other `ib` module): `ib.monitor` reads the files and saves
the figures. Built with matplotlib's object API (`Figure`, no pyplot), so importing this module never changes a
user's backend.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def xz_label(units: str, xz_name: str) -> str:
    """The axis label of the held-out I(X;Z), e.g. "I(X;Z) [nats] (MINE, held-out)"."""
    return f"I(X;Z) [{units}] ({xz_name + ', ' if xz_name else ''}held-out)"


def _impossible_region(ax: Any) -> None:
    """Shade I(X;Z) < I(Z;Y), which the data-processing inequality (Y -> X -> Z) rules out (after the axes' range
    is set: the diagonal is sampled densely, so that it stays the diagonal on a symlog axis)."""
    top = ax.get_ylim()[1]
    xs = [top * i / 200 for i in range(201)]
    ax.fill_between(xs, xs, [top] * len(xs), color="tab:red", alpha=0.08, lw=0, zorder=0,
                    label="impossible: I(X;Z) < I(Z;Y)")


def _axes_range(ax: Any, estimates: Sequence[float], band_ends: Sequence[float], zy: Sequence[float]) -> None:
    """x from 0 past everything drawn, y from 0 past the highest I(Z;Y). An estimate far beyond the band (VIB's KL
    against N(0, I) can be hundreds of nats) would squeeze the band into a corner: the x axis is then linear up to
    the band and logarithmic beyond it."""
    reach = max([*band_ends, *zy, 1e-3])
    xmax = max([*estimates, reach]) * 1.05
    ax.set_xlim(0.0, xmax)
    if band_ends and xmax > 3 * reach:
        ax.set_xscale("symlog", linthresh=reach * 1.05, linscale=2.0)
    ax.set_ylim(0.0, max([*zy, 1e-3]) * 1.15)


def _band(lower: Any, upper: Any, zy: float) -> Optional[tuple[float, float]]:
    """The pairwise band of a point, its lower end raised to the data-processing floor I(Z;Y); None without one."""
    if not (_finite(lower) and _finite(upper)):
        return None
    return max(float(lower), zy), max(float(upper), zy)


def plane_figure(points: Sequence[Mapping[str, float]], units: str = "nats", title: str = "", *,
                 xz_name: str = "") -> Figure:
    """The information plane: I(X;Z) on x, I(Z;Y) on y, one row per epoch, coloured by epoch.

    Drawn: the pairwise band of a Gaussian encoder (a segment at the epoch's I(Z;Y), from the Bhattacharyya bound,
    raised to the data-processing floor I(Z;Y), to the KL bound: where the probe's I(X;Z) lies), the estimate
    "I_XZ" as it is (so that one sees when it leaves the band) with +- 2 standard errors ("I_XZ_se") where given,
    the probe's ceiling log N, and the region the data-processing inequality rules out.

    Args:
        points: rows with "epoch", "I_ZY", and any of "I_XZ", "I_XZ_se", "I_XZ_pairwise_lower",
            "I_XZ_pairwise_upper", "I_XZ_ceiling" (in `units`).
        xz_name: what "I_XZ" is ("MINE", "KL upper bound", ...; "" names nothing), for the x axis.
    """
    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    pts = [p for p in points if _finite(p.get("I_ZY"))]
    bands = [(p, _band(p.get("I_XZ_pairwise_lower"), p.get("I_XZ_pairwise_upper"), p["I_ZY"])) for p in pts]
    estimates = [p for p in pts if _finite(p.get("I_XZ"))]
    if estimates or any(b for _, b in bands):
        ceiling = [p["I_XZ_ceiling"] for p in pts if _finite(p.get("I_XZ_ceiling"))]
        drawn = [(p, b) for p, b in bands if b]
        if drawn:  # one artist for all the epochs' segments and one for their ends: drawn while training, kept cheap
            segments = [[(b[0], p["I_ZY"]), (b[1], p["I_ZY"])] for p, b in drawn]
            ax.add_collection(LineCollection(segments, colors="0.45", linewidths=2.5, alpha=0.6, zorder=1,
                                             label="pairwise band (Bhattacharyya to KL)"))
            ax.plot([x for seg in segments for x, _ in seg], [y for seg in segments for _, y in seg], ls="none",
                    color="0.45", alpha=0.6, marker="|", markersize=9, zorder=1)
        if ceiling:
            ax.axvline(ceiling[-1], color="0.4", ls="--", lw=0.8, label=f"ceiling log N = {ceiling[-1]:.3g}")
        err = [2 * p["I_XZ_se"] if _finite(p.get("I_XZ_se")) else 0.0 for p in estimates]  # +- 2 standard errors
        if estimates:
            ex, ey, ep = [p["I_XZ"] for p in estimates], [p["I_ZY"] for p in estimates], [p["epoch"] for p in estimates]
            ax.plot(ex, ey, color="0.5", lw=0.8, zorder=2)
            if any(err):
                ax.errorbar(ex, ey, xerr=err, fmt="none", ecolor="0.6", elinewidth=0.8, capsize=0, zorder=2)
            sc = ax.scatter(ex, ey, c=ep, cmap="viridis", s=22, zorder=3, label=xz_name or "estimate")
            fig.colorbar(sc, ax=ax, label="epoch")
        _axes_range(ax, [p["I_XZ"] + e for p, e in zip(estimates, err)],
                    [x for _, b in bands if b for x in b] + ceiling[-1:], [p["I_ZY"] for p in pts])
        _impossible_region(ax)
        ax.legend(loc="lower right", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no I(X;Z) estimate in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xz_label(units, xz_name))
    ax.set_ylabel(f"I(Z;Y) [{units}] (H(Y) - CE)")
    ax.set_title(title or "information plane")
    ax.grid(alpha=0.3)
    # Fixed margins that fit the labels at this size, not tight_layout: it measures every tick label, half the cost
    # of a figure that a run draws every epoch.
    fig.subplots_adjust(left=0.12, right=0.97 if not estimates else 0.99, bottom=0.12, top=0.93)
    return fig


def render_rgb(fig: Figure) -> "numpy.ndarray":
    """The figure drawn once by Agg: its pixels [H, W, 3], uint8 (for TensorBoard's `add_image`, which would draw
    it again through `add_figure`'s own canvas)."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return numpy.asarray(canvas.buffer_rgba())[..., :3].copy()


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
    """Final I(X;Z) against I(Z;Y), one point per beta (mean over seeds, error bars = std over seeds), with each
    beta's mean pairwise band (raised to the data-processing floor) where the runs have one, and the region that
    the data-processing inequality rules out."""
    fig = Figure(figsize=(5.5, 4.2), dpi=100)
    ax = fig.add_subplot()
    stats = {key: {b: _mean_std(v) for b, v in _by_beta(rows, key).items()}  # {key: {beta: (mean, std)}}
             for key in ("I_XZ", "I_ZY", "I_XZ_pairwise_lower", "I_XZ_pairwise_upper")}
    xz, zy, lower, upper = (stats[k] for k in ("I_XZ", "I_ZY", "I_XZ_pairwise_lower", "I_XZ_pairwise_upper"))
    bands = {b: _band(lower[b][0], upper[b][0], zy[b][0]) for b in sorted(zy) if b in lower and b in upper}
    betas = sorted(b for b in zy if b in xz or b in bands)
    for i, (b, band) in enumerate(bands.items()):
        ax.plot(band, [zy[b][0]] * 2, color="0.45", lw=2.5, alpha=0.6, marker="|", markersize=9,
                label="pairwise band (Bhattacharyya to KL)" if i == 0 else None)
    for b in betas:
        (my, sy), (mx, sx) = zy[b], xz.get(b, (bands[b][1], 0.0) if b in bands else (0.0, 0.0))
        if b in xz:
            ax.errorbar(mx, my, xerr=sx, yerr=sy, fmt="o", capsize=3)
        ax.annotate(f"β={b:g}", (mx, my), textcoords="offset points", xytext=(5, 4), fontsize=8)
    with_estimate = [b for b in betas if b in xz]
    if with_estimate:
        ax.plot([xz[b][0] for b in with_estimate], [zy[b][0] for b in with_estimate], color="0.6", lw=0.8)
    if betas:
        _axes_range(ax, [xz[b][0] for b in with_estimate], [x for v in bands.values() for x in v],
                    [zy[b][0] for b in betas])
        _impossible_region(ax)
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xlabel(f"I(X;Z) [{units}] (points: the runs' estimate)")
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
    colours = [f"C{i}" for i in range(10)]  # one per attack, whichever panel it is on
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


def alignment_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Figure:
    """Tangent-kernel alignment against the training step (symlog axis, so step 0 has a place): the whole network
    on the training and the test probe (thick), the encoder and decoder groups, and one thin line per layer
    (columns `align/layer/<name>`), as in Baratin et al. 2021, Fig. 2."""
    fig = Figure(figsize=(6.0, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = sorted(rows, key=lambda r: float(r["step"]))
    steps = [float(r["step"]) for r in rows]
    layers = [k for k in (rows[0] if rows else {}) if k.startswith("align/layer/")]
    curves = [("align/train", dict(color="k", lw=2.2, label="whole network, train probe")),
              ("align/test", dict(color="k", lw=2.2, ls="--", label="whole network, test probe")),
              ("align/encoder", dict(color="0.45", lw=1.4, ls=":", label="encoder layers")),
              ("align/decoder", dict(color="0.45", lw=1.4, ls="-.", label="decoder layers"))]
    curves += [(k, dict(lw=1.0, label=k.removeprefix("align/layer/"))) for k in layers]
    for key, style in curves:
        values = [float(r[key]) if _finite(_as_float(r.get(key))) else math.nan for r in rows]
        if any(math.isfinite(v) for v in values):
            ax.plot(steps, values, marker="o", markersize=2, **style)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("centred kernel-target alignment")
    ax.set_title(title or "tangent-kernel alignment", fontsize=9)
    ax.grid(alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _as_float(value: Any) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None
