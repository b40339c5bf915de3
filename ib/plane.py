"""The information plane: I(X;Z) against I(Z;Y), measured on a fixed held-out probe set.

Per point (one encoder pass over the probe set, z sampled from p(z|x)):
  1. I(X;Z): the critic's Donsker-Varadhan bound (a lower bound up to sampling error);
  2. I(X;Z) pairwise band, for Gaussian encoders: with X uniform over the probe's N inputs, the pairwise-distance
     bounds of Kolchinsky & Tracey (`ib.estimators.pairwise`), Bhattacharyya below and KL above, both at most
     log N (`I_XZ_ceiling`): the true I(X;Z) of the probe lies in this band;
  3. I(X;Z) upper: E_x KL(p(z|x) || N(0, I)), the variational upper bound of VIB (against a fixed prior, so much
     looser than the pairwise KL bound);
  4. I(Z;Y): the decoder's variational lower bound H(Y) - E[-log q(y|z)], with H(Y) from the probe set's label
     frequencies; it can never exceed H(Y), and by the data-processing inequality (Y -> X -> Z) never I(X;Z).
Encoders without a closed-form p(z|x) (additive, propagated) have no pairwise band: only the critic's estimate.
All values are computed in nats; `to_units` converts for display (bits = nats / ln 2).
"""
from __future__ import annotations

import math
from typing import Dict, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ib import distributed
from ib.estimators import MIEstimator, gaussian_kl
from ib.estimators.pairwise import PairwiseKL, pairwise_bounds
from ib.models.bottlenecks import Code
from ib.models.classifier import IBClassifier
from ib.modes import evaluating

Units = Literal["nats", "bits"]


def to_units(nats: float, units: Units) -> float:
    return nats / math.log(2.0) if units == "bits" else nats


def describe_xz(estimate: float, lower: float, upper: float, zy: float, label: str = "estimate",
                units: str = "") -> str:
    """What the plane says of I(X;Z), for a log line: the pairwise band with its lower end raised to the
    data-processing floor I(Z;Y) ("I(X;Z) in [2.213, 4.963]"), or the floor alone without a band
    ("I(X;Z) >= 2.213"), followed by the estimator's own figure, which may lie outside ("(MINE 0.176)").
    NaN figures (no band, no estimator, no floor) are left out; `units`, when given, follows the plane's figures."""
    finite = [math.isfinite(v) for v in (estimate, lower, upper, zy)]
    if finite[1] and finite[2]:
        low = min(max(lower, zy), upper) if finite[3] else lower  # I(Z;Y) is estimated: it may pass the upper end
        text = f"I(X;Z) in [{low:.3f}, {upper:.3f}]"
    elif finite[3]:
        text = f"I(X;Z) >= {zy:.3f}"
    else:
        text = "I(X;Z)"
    text += f" {units}" if units and text != "I(X;Z)" else ""
    if finite[0] and not (finite[2] and estimate == upper):  # pairwise_kl's estimate is the band's upper end
        text += f" ({label} {estimate:.3f})"
    return text


def entropy(counts: Tensor) -> float:
    """The entropy in nats of the distribution proportional to `counts`."""
    p = counts / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def information_plane(
    model: IBClassifier,
    estimator: Optional[MIEstimator],
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 1000,
    permutations: int = 10,
    seed: int = 0,
    reduce: bool = False,
) -> Dict[str, float]:
    """One point of the information plane on the probe set (x [N, C, H, W] in [0, 1], y [N]), in nats.

    Runs in eval mode under inference_mode with a fixed seed; the global RNG and the modules' modes are restored.
    `reduce`: under torchrun, x and y are this process's equal share of the probe set; every term is computed
    over the whole set (sums added over the processes; the estimator, in `sync` mode, pairs codes across them).

    Returns:
        {"I_ZY": H(Y) - CE, "H_Y": H(Y), "I_XZ": the estimator's estimate (NaN without one), "I_XZ_se": its
         standard error over the probe set (`MIEstimate.se`; NaN where it has none), "I_XZ_upper": VIB's KL bound,
         "I_XZ_pairwise_upper", "I_XZ_pairwise_lower": the pairwise band, "I_XZ_ceiling": log N (the last four NaN
         unless the encoder is Gaussian)}
    """
    device = x.device
    with evaluating(model, estimator, seed=seed, device=device), torch.inference_mode():
        codes, ce = [], torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, len(y), batch_size):
            xb, yb = x[start:start + batch_size], y[start:start + batch_size]
            code = model.encode(xb, sample=True)  # z [B, K]
            ce += F.cross_entropy(model.decode(code.z), yb, reduction="sum").double()
            codes.append(code)
        code = Code(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*codes)))
        counts = torch.bincount(y, minlength=model.num_classes).double()  # [classes]
        kl = gaussian_kl(code.mean, code.std).double().sum() if code.std is not None else ce.new_zeros(())
        if reduce:
            distributed.reduce_sum_(ce, counts, kl)
        n = int(counts.sum())
        h_y = entropy(counts)
        out = {"I_ZY": h_y - float(ce) / max(n, 1), "H_Y": h_y, "I_XZ": math.nan, "I_XZ_se": math.nan,
               "I_XZ_upper": math.nan}
        out.update({"I_XZ_pairwise_upper": math.nan, "I_XZ_pairwise_lower": math.nan, "I_XZ_ceiling": math.nan})
        if code.std is not None:
            out["I_XZ_upper"] = float(kl) / max(n, 1)
            if n >= 2:
                mean, std = code.mean, code.std
                if reduce:  # the band is of the whole probe set: every process's codes
                    mean, std = distributed.gather(mean)[0], distributed.gather(std)[0]
                band = pairwise_bounds(mean, std)  # one pass over the pairs for both ends
                out["I_XZ_pairwise_upper"], out["I_XZ_pairwise_lower"] = band["kl"], band["bhattacharyya"]
                out["I_XZ_ceiling"] = math.log(n)
        if isinstance(estimator, PairwiseKL) and not math.isnan(out["I_XZ_pairwise_upper"]):
            out["I_XZ"] = out["I_XZ_pairwise_upper"]  # its estimate is the band's upper end, already computed
        elif estimator is not None and n >= 2:
            g = torch.Generator().manual_seed(seed)
            estimate = estimator.estimate(x, code.z, code=code, batch_size=batch_size, permutations=permutations,
                                          generator=g)
            out["I_XZ"], out["I_XZ_se"] = float(estimate), estimate.se
    return out
