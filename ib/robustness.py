"""Accuracy under attack with common random numbers: the predictions of a model's two variants, its clean
metrics, and the robustness sweep over attacks and radii.

Two model variants are evaluated everywhere:
  * `mean`: the deterministic model that decodes the noise-free code, `model(x, sample=False)`;
  * `sampled`: the stochastic model, whose prediction is the mean softmax over K draws of Z (as `predict_proba`);
    `accuracy_per_draw` is the accuracy of one draw, averaged over the K draws.
The attacks on `sampled` ascend the loss of its prediction, -log mean_z p(y|z) over its K draws (fgsm, pgd_linf,
pgd_l2), and eot_pgd the mean of that over `eot_samples` independent predictions (`sampled_loss="mean_softmax"`, the
default); with `sampled_loss="per_draw"` they follow one random code per gradient, and eot_pgd the cross-entropy
averaged over `eot_samples` codes. Every prediction of a batch uses the same codes (common random numbers, seeded per
batch), so an attack at eps 0 reproduces the clean accuracy exactly and accuracies at different eps differ by the
attack alone.
"""
from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ib.attacks import (LossFn, LossKind, Schedule, fgsm, gaussian_noise, mean_code_loss, pgd, predictor_loss,
                        sampled_logits, sampled_loss, targeted_pgd, wrong_classes)
from ib.data import BatchLoader
from ib.modes import seeded

log = logging.getLogger(__name__)

# The threat model of each attack: which radius grid it takes.
THREATS: Dict[str, str] = {"fgsm": "linf", "pgd_linf": "linf", "eot_pgd": "linf", "pgd_l2": "l2", "noise": "noise"}
LINF_PGD = ("pgd_linf", "eot_pgd")
PGD_ATTACKS = ("pgd_linf", "pgd_l2", "eot_pgd")  # those whose steps follow a schedule


@dataclass(frozen=True)
class Variant:
    """A model variant: `samples=0` decodes the mean code; `samples=K` averages the softmax over K draws of Z."""

    name: str
    samples: int


# ---------------------------------------------------------------------------------------------------------------------
# Predictions with common random numbers


def derive_seed(base: int, *keys: Any) -> int:
    """A 63-bit seed from `base` and `keys` (repeatable across runs and processes, unlike `hash`)."""
    digest = hashlib.sha256(repr((base, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def predict_draws(model: nn.Module, x: Tensor, samples: int, seed: int) -> Tensor:
    """Softmax of each draw, [S, B, classes] (S = 1 for the mean code), with the global RNG seeded then restored."""
    with torch.no_grad(), seeded(seed, x.device):
        if samples == 0:
            return model(x, sample=False).softmax(-1).unsqueeze(0)
        return sampled_logits(model, x, samples).softmax(-1)


def is_correct(model: nn.Module, variant: Variant, x: Tensor, y: Tensor, seed: int) -> Tuple[Tensor, Tensor]:
    """(the variant's prediction is right [B] bool, share of single draws that are right [B])."""
    draws = predict_draws(model, x, variant.samples, seed)  # [S, B, C]
    right = draws.mean(0).argmax(-1) == y
    return right, (draws.argmax(-1) == y).float().mean(0)


def expected_calibration_error(confidence: Tensor, correct: Tensor, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins (Guo et al. 2017): sum_b n_b / n * |accuracy_b - confidence_b|.

    Args:
        confidence: Probability of the predicted class, [N].
        correct: Whether the prediction is right, [N].
        bins: Number of bins over [0, 1].
    """
    if confidence.numel() == 0:
        return math.nan
    confidence = confidence.double()
    correct = correct.double()
    index = (confidence * bins).long().clamp(0, bins - 1)  # [N], a confidence of 1 falls into the last bin
    # Per bin, n_b * (accuracy_b - confidence_b) is the sum of (correct - confidence) over its samples.
    gap = torch.zeros(bins, dtype=torch.float64, device=confidence.device).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum() / confidence.numel())


SampledLoss = Literal["mean_softmax", "per_draw"]


def attack_loss(model: nn.Module, variant: Variant, *, eot: bool, eot_samples: int, loss_kind: LossKind,
                sampled: SampledLoss = "mean_softmax", target: Optional[Tensor] = None) -> LossFn:
    """What a gradient attack on `variant` ascends (module docstring); `eot`: the EOT-PGD form; `target` [B]: the
    targeted margin toward those classes instead."""
    if variant.samples == 0:
        return mean_code_loss(model, loss_kind, target)
    if sampled == "per_draw":
        return sampled_loss(model, eot_samples if eot else 1, loss_kind, target)
    if sampled != "mean_softmax":
        raise ValueError(f"sampled_loss must be 'mean_softmax' or 'per_draw', got {sampled!r}")
    return predictor_loss(model, variant.samples, loss_kind, repeats=eot_samples if eot else 1, target=target)


# ---------------------------------------------------------------------------------------------------------------------
# Clean metrics and the sweep


def clean_metrics(model: nn.Module, loader: BatchLoader, variants: Sequence[Variant], *, seed: int,
                  ece_bins: int) -> Dict[str, Dict[str, float]]:
    """Accuracy, negative log-likelihood (nats) and ECE of each variant on clean inputs.

    The caller puts the model in eval mode. Batches are seeded as in `robustness_sweep` (common random numbers).
    """
    out: Dict[str, Dict[str, float]] = {}
    for variant in variants:
        conf: List[Tensor] = []
        right: List[Tensor] = []
        per_draw = nll = 0.0
        n = 0
        with torch.inference_mode():
            for i, (x, y) in enumerate(loader):
                draws = predict_draws(model, x, variant.samples, derive_seed(seed, "predict", i))  # [S, B, C]
                p = draws.mean(0)  # [B, C]
                c, pred = p.max(-1)
                conf.append(c.cpu())
                right.append((pred == y).cpu())
                per_draw += float((draws.argmax(-1) == y).float().mean(0).sum())
                nll += float(F.nll_loss(p.clamp_min(1e-12).log(), y, reduction="sum"))
                n += y.shape[0]
        confidence, correct = torch.cat(conf), torch.cat(right)
        row = {"accuracy": float(correct.double().mean()) if n else math.nan, "nll": nll / n if n else math.nan,
               "ece": expected_calibration_error(confidence, correct, ece_bins)}
        if variant.samples:
            row["accuracy_per_draw"] = per_draw / n if n else math.nan
            row["samples"] = variant.samples
        out[variant.name] = row
    return out


def _perturb(
    attack: str,
    model: nn.Module,
    variant: Variant,
    x: Tensor,
    y: Tensor,
    radius: float,
    *,
    steps: int,
    step_size: float,
    restarts: int,
    eot_samples: int,
    loss_kind: LossKind,
    sampled: SampledLoss,
    select_seed: int,
    schedule: Schedule,
    targets: int,
) -> Tensor:
    if attack == "noise":
        return gaussian_noise(x, radius)
    loss = attack_loss(model, variant, eot=attack == "eot_pgd", eot_samples=eot_samples, loss_kind=loss_kind,
                       sampled=sampled)
    if attack == "fgsm":
        return fgsm(loss, x, y, radius)

    def correct_fn(x_adv: Tensor, y_: Tensor) -> Tensor:
        # Its own draws of Z: the attack must not pick its iterate by the very draws that score it.
        return is_correct(model, variant, x_adv, y_, select_seed)[0]

    settings = dict(norm=THREATS[attack], steps=steps, step_size=step_size * radius / steps, restarts=restarts,
                    schedule=schedule)
    x_adv = pgd(loss, x, y, radius, correct_fn=correct_fn, **settings)
    if targets == 0 or radius == 0:
        return x_adv
    ranking = wrong_classes(predict_draws(model, x, variant.samples, select_seed).mean(0), y)  # [B, classes - 1]

    def loss_for(target: Tensor) -> LossFn:
        return attack_loss(model, variant, eot=attack == "eot_pgd", eot_samples=eot_samples, loss_kind=loss_kind,
                           sampled=sampled, target=target)

    return targeted_pgd(loss_for, x, y, radius, x_adv, ranking, targets=min(targets, ranking.shape[1]),
                        correct_fn=correct_fn, **settings)


def robustness_sweep(
    model: nn.Module,
    loader: BatchLoader,
    variants: Sequence[Variant],
    grid: Sequence[Tuple[str, float]],
    *,
    steps: int,
    step_size: float,
    restarts: int,
    eot_samples: int,
    loss_kind: LossKind,
    seed: int,
    sampled_loss: SampledLoss = "mean_softmax",
    schedule: Schedule = "adaptive",
    targets: int = 0,
) -> List[Dict[str, Any]]:
    """Accuracy of each variant under each (attack, radius) of `grid`; the PGD attacks take their step lengths by
    `schedule` ("adaptive": APGD's; "fixed": `step_size * eps / steps`, Madry et al.'s; see `ib.attacks.pgd`), and
    with `targets` > 0 each PGD attack goes on with targeted runs toward each sample's `targets` likeliest wrong
    classes on the samples it left standing (`ib.attacks.targeted_pgd`).

    `eot_pgd` runs against the sampled variant only: on the deterministic mean-code model it is `pgd_linf`. At
    radius 0 PGD takes one step: every iterate is the clean input, and the step still runs the whole path (random
    start, gradient, projection, clipping, selection) that check 2 compares with the clean accuracy.
    Each (attack, radius, variant, batch) seeds its own random start; noise is drawn once per (radius, batch) and
    shared by the variants. The caller puts the model in eval mode.

    Returns:
        Rows {attack, variant, threat, eps, loss, accuracy, accuracy_per_draw (sampled only), n, seconds}.
    """
    jobs = [(a, r, v) for a, r in grid for v in variants if not (a == "eot_pgd" and v.samples == 0)]
    rows: List[Dict[str, Any]] = []
    bar = tqdm(jobs, desc="robustness", leave=False, dynamic_ncols=True, disable=None)
    for attack, radius, variant in bar:
        bar.set_postfix_str(f"{attack} {variant.name} eps={radius:g}")
        t0 = time.perf_counter()
        right = per_draw = 0.0
        n = 0
        for i, (x, y) in enumerate(loader):
            predict_seed = derive_seed(seed, "predict", i)
            attack_key = (attack, radius, i) if attack == "noise" else (attack, radius, variant.name, i)
            with seeded(derive_seed(seed, *attack_key), x.device):
                x_adv = _perturb(attack, model, variant, x, y, radius, steps=steps if radius > 0 else 1,
                                 step_size=step_size, restarts=restarts, eot_samples=eot_samples,
                                 loss_kind=loss_kind, sampled=sampled_loss,
                                 select_seed=derive_seed(seed, "select", i), schedule=schedule,
                                 targets=targets if attack in PGD_ATTACKS else 0)
            ok, ok_draw = is_correct(model, variant, x_adv, y, predict_seed)
            right += float(ok.sum())
            per_draw += float(ok_draw.sum())
            n += y.shape[0]
        row = {"attack": attack, "variant": variant.name, "threat": THREATS[attack], "eps": radius,
               "loss": None if attack == "noise" else _loss_name(loss_kind, variant, sampled_loss),
               "accuracy": right / n if n else math.nan,
               "accuracy_per_draw": (per_draw / n if n else math.nan) if variant.samples else None,
               "schedule": schedule if attack in PGD_ATTACKS else None,
               "targets": targets if attack in PGD_ATTACKS else None, "n": n, "seconds": time.perf_counter() - t0}
        rows.append(row)
        log.info("%-8s %-7s eps %-6g accuracy %.4f  (%.1f s)", attack, variant.name, radius, row["accuracy"],
                 row["seconds"])
    bar.close()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The whole evaluation of one model


def _loss_name(kind: LossKind, variant: Variant, sampled: SampledLoss) -> str:
    """The `loss` column of a row: "ce" or "margin", with "/mean_softmax" or "/per_draw" on the sampled variant."""
    return kind if variant.samples == 0 else f"{kind}/{sampled}"


def headline_robust_accuracy(rows: Sequence[Mapping[str, Any]], variant: str) -> Optional[Dict[str, Any]]:
    """One figure for tables and sweeps: `variant`'s accuracy under the strongest L-inf attack (the lowest accuracy
    over fgsm, pgd_linf and eot_pgd) at the largest L-inf radius evaluated. The evaluation reports `variant` =
    "sampled" when it has draws of Z, else "mean": the prediction behind the run's test accuracy.

    Returns:
        {"accuracy", "attack", "variant", "eps"}, or None when no L-inf attack ran at a radius above 0.
    """
    linf = [r for r in rows if r["threat"] == "linf" and r["variant"] == variant and r["eps"] > 0]
    if not linf:
        return None
    eps = max(r["eps"] for r in linf)
    worst = min((r for r in linf if r["eps"] == eps), key=lambda r: r["accuracy"])
    return {"accuracy": worst["accuracy"], "attack": worst["attack"], "variant": variant, "eps": eps}
