"""Evaluation a reviewer can trust: clean metrics, a robustness sweep, and sanity checks against weak attacks.

Two model variants are evaluated everywhere:
  * `mean`: the deterministic model that decodes the noise-free code, `model(x, sample=False)`;
  * `sampled`: the stochastic model, whose prediction is the mean softmax over K draws of Z (as `predict_proba`);
    `accuracy_per_draw` is the accuracy of one draw, averaged over the K draws.
The attacks on `sampled` follow one random code per gradient (fgsm, pgd_linf, pgd_l2) or the average over
`eot_samples` codes (eot_pgd). Every prediction of a batch uses the same codes (common random numbers, seeded per
batch), so an attack at eps 0 reproduces the clean accuracy exactly and accuracies at different eps differ by the
attack alone.

The sanity checks (`eval.json` "checks", and an `EvalWarning` for each one that fails):
  1. `eval_mode`: every module is in eval mode during the evaluation and the mean-code logits are repeatable;
  2. `eps0_equals_clean`: each attack at radius 0 gives the clean accuracy (at most one sample apart);
  3. `accuracy_not_rising`: accuracy under an attack does not rise with the radius (within `tolerance`);
  4. `pgd_not_weaker_than_fgsm`: L-inf PGD (and EOT-PGD) is at least as strong as FGSM at the same eps;
  5. `gradients_reach_input`: the loss has a non-zero, finite input gradient for nearly every sample;
  6. `unbounded_attack_succeeds`: L-inf PGD at eps 1 (any image in [0, 1]) brings accuracy near 0.
  Failures of 4-6 point to gradient masking: the numbers then overstate robustness.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ib.attacks import (LossKind, fgsm, gaussian_noise, input_gradient, mean_code_loss, pgd, sampled_logits,
                        sampled_loss)
from ib.data import Split
from ib.errors import CheckpointError, ConfigError
from ib.recipe import AttackName, Recipe, check_attacks, check_radii

log = logging.getLogger(__name__)

# The threat model of each attack: which radius grid it takes.
THREATS: Dict[str, str] = {"fgsm": "linf", "pgd_linf": "linf", "eot_pgd": "linf", "pgd_l2": "l2", "noise": "noise"}
LINF_PGD = ("pgd_linf", "eot_pgd")
UNBOUNDED_MAX_ACCURACY = 0.1  # check 6: a working attack at eps 1 leaves (almost) nothing correct
ZERO_GRADIENT_MAX_FRACTION = 0.05  # check 5: share of samples allowed an all-zero input gradient
PROBE_SAMPLES = 256  # check 5 looks at the first batch, at most this many samples


class EvalWarning(UserWarning):
    """A sanity check of the evaluation failed: the robustness numbers may not mean what they seem to."""


@dataclass(frozen=True)
class Variant:
    """A model variant: `samples=0` decodes the mean code; `samples=K` averages the softmax over K draws of Z."""

    name: str
    samples: int


# ---------------------------------------------------------------------------------------------------------------------
# Predictions with common random numbers


def _seed(base: int, *keys: Any) -> int:
    """A 63-bit seed from `base` and `keys` (repeatable across runs and processes, unlike `hash`)."""
    digest = hashlib.sha256(repr((base, keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _rng_devices(device: torch.device) -> List[int]:
    return [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []


def predict_draws(model: nn.Module, x: Tensor, samples: int, seed: int) -> Tensor:
    """Softmax of each draw, [S, B, classes] (S = 1 for the mean code), with the global RNG seeded then restored."""
    with torch.no_grad(), torch.random.fork_rng(devices=_rng_devices(x.device)):
        torch.manual_seed(seed)
        if samples == 0:
            return model(x, sample=False).softmax(-1).unsqueeze(0)
        return sampled_logits(model, x, samples).softmax(-1)


def _correct(model: nn.Module, variant: Variant, x: Tensor, y: Tensor, seed: int) -> Tuple[Tensor, Tensor]:
    """(the variant's prediction is right [B] bool, share of single draws that are right [B])."""
    draws = predict_draws(model, x, variant.samples, seed)  # [S, B, C]
    right = draws.mean(0).argmax(-1) == y
    return right, (draws.argmax(-1) == y).float().mean(0)


class Batches:
    """Re-iterable batches of a split in order, as float32 in [0, 1]: every `iter` starts at the first sample.

    Args:
        split: Inputs (uint8 0..255 or float in [0, 1]) and labels; moved to `device` once.
        batch_size: Samples per batch (the last one may be smaller).
        device: Where batches are made.
    """

    def __init__(self, split: Split, batch_size: int, device: torch.device) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        self.x = split.x.to(device)  # [N, C, H, W], dtype kept
        self.y = split.y.to(device)  # [N]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return math.ceil(self.y.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        for i in range(0, self.y.shape[0], self.batch_size):
            x = self.x[i:i + self.batch_size]
            yield (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()), self.y[i:i + self.batch_size]

    def head(self, count: int) -> "Batches":
        """The first `count` samples, same batch size."""
        return Batches(Split(self.x[:count], self.y[:count]), self.batch_size, self.x.device)


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


# ---------------------------------------------------------------------------------------------------------------------
# Clean metrics and the sweep


def clean_metrics(model: nn.Module, loader: Batches, variants: Sequence[Variant], *, seed: int,
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
                draws = predict_draws(model, x, variant.samples, _seed(seed, "predict", i))  # [S, B, C]
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
    select_seed: int,
) -> Tensor:
    if attack == "noise":
        return gaussian_noise(x, radius)
    if variant.samples == 0:
        loss = mean_code_loss(model, loss_kind)
    else:
        loss = sampled_loss(model, eot_samples if attack == "eot_pgd" else 1, loss_kind)
    if attack == "fgsm":
        return fgsm(loss, x, y, radius)

    def correct_fn(x_adv: Tensor, y_: Tensor) -> Tensor:
        # Its own draws of Z: the attack must not pick its iterate by the very draws that score it.
        return _correct(model, variant, x_adv, y_, select_seed)[0]

    return pgd(loss, x, y, radius, norm=THREATS[attack], steps=steps, step_size=step_size * radius / steps,
               restarts=restarts, correct_fn=correct_fn)


def robustness_sweep(
    model: nn.Module,
    loader: Batches,
    variants: Sequence[Variant],
    grid: Sequence[Tuple[str, float]],
    *,
    steps: int,
    step_size: float,
    restarts: int,
    eot_samples: int,
    loss_kind: LossKind,
    seed: int,
) -> List[Dict[str, Any]]:
    """Accuracy of each variant under each (attack, radius) of `grid`.

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
            predict_seed = _seed(seed, "predict", i)
            attack_key = (attack, radius, i) if attack == "noise" else (attack, radius, variant.name, i)
            with torch.random.fork_rng(devices=_rng_devices(x.device)):
                torch.manual_seed(_seed(seed, *attack_key))
                x_adv = _perturb(attack, model, variant, x, y, radius, steps=steps if radius > 0 else 1,
                                 step_size=step_size, restarts=restarts, eot_samples=eot_samples,
                                 loss_kind=loss_kind, select_seed=_seed(seed, "select", i))
            ok, ok_draw = _correct(model, variant, x_adv, y, predict_seed)
            right += float(ok.sum())
            per_draw += float(ok_draw.sum())
            n += y.shape[0]
        row = {"attack": attack, "variant": variant.name, "threat": THREATS[attack], "eps": radius,
               "loss": None if attack == "noise" else loss_kind,
               "accuracy": right / n if n else math.nan,
               "accuracy_per_draw": (per_draw / n if n else math.nan) if variant.samples else None,
               "n": n, "seconds": time.perf_counter() - t0}
        rows.append(row)
        log.info("%-8s %-7s eps %-6g accuracy %.4f  (%.1f s)", attack, variant.name, radius, row["accuracy"],
                 row["seconds"])
    bar.close()
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Sanity checks


def _check(name: str, passed: Optional[bool], detail: str, **values: Any) -> Dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail, **values}


def _eval_mode_check(model: nn.Module, loader: Batches, was_training: List[str]) -> Dict[str, Any]:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    repeatable = True
    with torch.inference_mode():
        for x, _ in loader:
            with torch.random.fork_rng(devices=_rng_devices(x.device)):
                repeatable = torch.equal(model(x, sample=False), model(x, sample=False))
            break
    passed = not training and repeatable
    if passed:
        detail = "every module in eval mode; mean-code logits repeatable"
        if was_training:
            detail += " (the model came in train mode: switched for the evaluation and restored after)"
    elif training:
        detail = f"modules still in train mode during the evaluation: {', '.join(training[:5])}"
    else:
        detail = "the mean-code logits differ between two passes over the same batch: randomness outside Z"
    return _check("eval_mode", passed, detail)


def _gradient_check(model: nn.Module, loader: Batches, variants: Sequence[Variant], loss_kind: LossKind,
                    seed: int) -> Dict[str, Any]:
    fractions: Dict[str, float] = {}
    for x, y in loader:
        x, y = x[:PROBE_SAMPLES], y[:PROBE_SAMPLES]
        for v in variants:
            loss = mean_code_loss(model, loss_kind) if v.samples == 0 else sampled_loss(model, 1, loss_kind)
            with torch.random.fork_rng(devices=_rng_devices(x.device)):
                torch.manual_seed(_seed(seed, "gradient", v.name))
                g = input_gradient(loss, x, y).flatten(1)  # [B, D]
            dead = (g.abs().sum(1) == 0) | ~torch.isfinite(g).all(1)  # [B]
            fractions[v.name] = float(dead.float().mean())
        break
    if not fractions:
        return _check("gradients_reach_input", None, "no samples")
    worst = max(fractions, key=fractions.get)
    passed = fractions[worst] <= ZERO_GRADIENT_MAX_FRACTION
    detail = ", ".join(f"{k}: {v:.1%}" for k, v in fractions.items()) + " of probed samples have a zero or " \
        "non-finite input gradient"
    if not passed:
        detail = f"possible gradient masking: {detail} (allowed: {ZERO_GRADIENT_MAX_FRACTION:.0%}); " \
                 "gradient attacks cannot move these inputs, so their robustness is not measured"
    return _check("gradients_reach_input", passed, detail, zero_gradient_fraction=fractions)


def _unbounded_check(model: nn.Module, loader: Batches, variants: Sequence[Variant], *, steps: int,
                     eot_samples: int, loss_kind: LossKind, seed: int) -> Dict[str, Any]:
    if len(loader) == 0:
        return _check("unbounded_attack_succeeds", None, "skipped (check_samples=0)")
    accuracy: Dict[str, float] = {}
    for v in variants:
        loss = mean_code_loss(model, loss_kind) if v.samples == 0 else sampled_loss(model, eot_samples, loss_kind)
        right = n = 0
        for i, (x, y) in enumerate(loader):
            with torch.random.fork_rng(devices=_rng_devices(x.device)):
                torch.manual_seed(_seed(seed, "unbounded", v.name, i))
                # From the clean input: a random start at eps 1 would be noise that hides a dead gradient.
                x_adv = pgd(loss, x, y, 1.0, norm="linf", steps=steps, random_start=False)
            right += int(_correct(model, v, x_adv, y, _seed(seed, "predict", i))[0].sum())
            n += y.shape[0]
        accuracy[v.name] = right / max(n, 1)
    passed = max(accuracy.values()) <= UNBOUNDED_MAX_ACCURACY
    detail = ", ".join(f"{k}: {a:.4f}" for k, a in accuracy.items()) + f" accuracy under L-inf PGD-{steps} at eps 1 " \
        f"on {n} samples"
    if not passed:
        detail = f"possible gradient masking: {detail}; any image in [0, 1] is allowed there, so a working attack " \
                 f"leaves at most {UNBOUNDED_MAX_ACCURACY:.0%}"
    return _check("unbounded_attack_succeeds", passed, detail, accuracy=accuracy)


def sanity_checks(clean: Mapping[str, Mapping[str, float]], rows: Sequence[Mapping[str, Any]], *,
                  tolerance: float) -> List[Dict[str, Any]]:
    """Checks 2-4 of the module docstring on the sweep's rows; `tolerance` is widened to three samples at least."""
    checks: List[Dict[str, Any]] = []
    n = max((r["n"] for r in rows), default=1)
    tol = max(tolerance, 3.0 / max(n, 1))
    acc = {(r["attack"], r["variant"], r["eps"]): r["accuracy"] for r in rows}

    # 2. Radius 0 reproduces the clean accuracy (common random numbers: exactly, up to one sample for rounding).
    bad = [f"{a}/{v}: {x:.4f} vs clean {clean[v]['accuracy']:.4f}" for (a, v, e), x in acc.items()
           if e == 0 and abs(x - clean[v]["accuracy"]) * n > 1 + 1e-6]
    tested = sum(1 for (_, _, e) in acc if e == 0)
    checks.append(_check("eps0_equals_clean", not bad if tested else None,
                         "; ".join(bad) if bad else f"{tested} attack/variant pairs at radius 0 match clean accuracy"))

    # 3. Accuracy does not rise with the radius (random noise is left out: its small rises are sampling noise).
    bad = []
    for a, v in sorted({(a, v) for a, v, _ in acc if a != "noise"}):
        curve = sorted((e, x) for (a2, v2, e), x in acc.items() if (a2, v2) == (a, v))
        bad += [f"{a}/{v}: {x0:.4f} at {e0:g} -> {x1:.4f} at {e1:g}"
                for (e0, x0), (e1, x1) in zip(curve, curve[1:]) if x1 > x0 + tol]
    checks.append(_check("accuracy_not_rising", not bad, "; ".join(bad) if bad else
                         f"no attack's curve rises by more than {tol:.4f} (noise not checked)", tolerance=tol))

    # 4. Iterating must not weaken the attack.
    bad = []
    pairs = 0
    for (a, v, e), x in acc.items():
        if a in LINF_PGD and e > 0 and ("fgsm", v, e) in acc:
            pairs += 1
            if x > acc[("fgsm", v, e)] + tol:
                bad.append(f"{a}/{v} at eps {e:g}: {x:.4f} > fgsm {acc[('fgsm', v, e)]:.4f}")
    if not pairs:
        checks.append(_check("pgd_not_weaker_than_fgsm", None, "skipped: no L-inf PGD and FGSM at the same eps"))
    else:
        detail = ("possible gradient masking (PGD weaker than FGSM): " + "; ".join(bad)) if bad else \
            f"{pairs} PGD/FGSM pairs: PGD at least as strong (within {tol:.4f})"
        checks.append(_check("pgd_not_weaker_than_fgsm", not bad, detail, tolerance=tol))
    return checks


# ---------------------------------------------------------------------------------------------------------------------
# The whole evaluation of one model


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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def evaluate_model(
    model: nn.Module,
    split: Split,
    *,
    attacks: Sequence[AttackName] = ("fgsm", "pgd_linf", "pgd_l2", "eot_pgd", "noise"),
    eps: Sequence[float] = (0.05, 0.1, 0.2),
    eps_l2: Sequence[float] = (0.5, 1.0, 2.0),
    sigmas: Sequence[float] = (0.05, 0.1, 0.2),
    steps: int = 20,
    step_size: float = 2.5,
    restarts: int = 1,
    samples: int = 12,
    eot_samples: int = 8,
    loss: LossKind = "ce",
    batch_size: int = 500,
    seed: int = 0,
    ece_bins: int = 15,
    tolerance: float = 0.005,
    check_samples: int = 500,
) -> Dict[str, Any]:
    """Clean metrics, the robustness sweep and the sanity checks of `model` on `split`.

    The model runs in eval mode (every module's mode is restored afterwards) and the global RNG is left as it was.
    Each failed check is also raised as an `EvalWarning`.

    Args:
        model: Takes `x` in [0, 1] and `sample`; an `IBClassifier` or anything with its `forward`.
        split: Inputs (uint8 0..255 or float in [0, 1]) and labels.
        attacks: Names from `THREATS`. FGSM is added when an L-inf PGD runs without it: it is the reference of
            check 4.
        eps: L-inf radii (fgsm, pgd_linf, eot_pgd) in the [0, 1] pixel scale; 0 is added.
        eps_l2: L2 radii of pgd_l2; 0 is added.
        sigmas: Standard deviations of the noise corruption; 0 is added.
        steps: PGD steps per restart.
        step_size: PGD step as a multiple of eps / steps.
        restarts: PGD restarts; the worst case per sample is kept.
        samples: Draws of Z of the sampled variant (0: mean-code variant only).
        eot_samples: Draws of Z averaged into each EOT-PGD gradient (and the unbounded check's).
        loss: What the gradient attacks ascend: "ce" (cross-entropy) or "margin" (max_{j != y} z_j - z_y).
        batch_size: Samples per batch.
        seed: Seed of the random starts, noise and codes.
        ece_bins: Bins of the expected calibration error.
        tolerance: Accuracy slack of checks 3 and 4 (at least one sample).
        check_samples: Samples of the unbounded-attack check (0 skips it).

    Returns:
        {"n", "clean", "robustness", "robust_accuracy", "robust_accuracy_of", "checks", "all_checks_passed", "notes",
        "settings", "seconds"}; `robust_accuracy` as in `headline_robust_accuracy`.
    """
    t0 = time.perf_counter()
    attacks = list(check_attacks("attacks", list(attacks)))
    notes: List[str] = []
    if samples == 0 and "eot_pgd" in attacks:
        attacks.remove("eot_pgd")
        notes.append("eot_pgd not run: it attacks the sampled variant, and samples = 0 evaluates the mean-code "
                     "model alone (against which EOT-PGD is pgd_linf)")
        log.warning(notes[-1])
    if any(a in LINF_PGD for a in attacks) and "fgsm" not in attacks:
        attacks.insert(0, "fgsm")
        notes.append("fgsm added: it is the reference of the pgd_not_weaker_than_fgsm check")
    radii = {"linf": check_radii("eps", eps, upper=1.0), "l2": check_radii("eps_l2", eps_l2),
             "noise": check_radii("sigmas", sigmas)}
    grid = [(a, r) for a in attacks for r in sorted({0.0, *radii[THREATS[a]]})]
    variants = [Variant("mean", 0)] + ([Variant("sampled", samples)] if samples > 0 else [])
    if samples > 0 and "eot_pgd" in attacks:
        notes.append("eot_pgd runs against the sampled variant only: on the mean-code model it is pgd_linf")

    device = _device(model)
    loader = Batches(split, batch_size, device)
    modes = {m: m.training for m in model.modules()}
    was_training = [name for name, m in model.named_modules() if m.training]
    model.eval()
    try:
        with torch.random.fork_rng(devices=_rng_devices(device)):
            checks = [_eval_mode_check(model, loader, was_training)]
            t1 = time.perf_counter()
            clean = clean_metrics(model, loader, variants, seed=seed, ece_bins=ece_bins)
            clean_seconds = time.perf_counter() - t1
            rows = robustness_sweep(model, loader, variants, grid, steps=steps, step_size=step_size,
                                    restarts=restarts, eot_samples=eot_samples, loss_kind=loss, seed=seed)
            checks += sanity_checks(clean, rows, tolerance=tolerance)
            checks.append(_gradient_check(model, loader, variants, loss, seed))
            checks.append(_unbounded_check(model, loader.head(check_samples), variants, steps=steps,
                                           eot_samples=eot_samples, loss_kind=loss, seed=seed))
    finally:
        for m, flag in modes.items():
            m.training = flag
    for c in checks:
        if c["passed"] is False:
            warnings.warn(f"ib eval: check {c['name']} failed: {c['detail']}", EvalWarning, stacklevel=2)
    settings = {"attacks": attacks, "eps": list(radii["linf"]), "eps_l2": list(radii["l2"]),
                "sigmas": list(radii["noise"]), "steps": steps, "step_size": step_size,
                "step_rule": "step = step_size * eps / steps", "restarts": restarts, "samples": samples,
                "eot_samples": eot_samples, "loss": loss, "batch_size": batch_size, "seed": seed, "ece_bins": ece_bins,
                "tolerance": tolerance, "check_samples": check_samples}
    headline = headline_robust_accuracy(rows, "sampled" if samples > 0 else "mean")
    return {"n": len(split.y), "clean": clean, "clean_seconds": clean_seconds, "robustness": rows,
            "robust_accuracy": headline["accuracy"] if headline else None, "robust_accuracy_of": headline,
            "checks": checks,
            "all_checks_passed": all(c["passed"] is not False for c in checks), "notes": notes,
            "settings": settings, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints, settings from the command line, and the files of a run folder


def resolve_checkpoint(path: str | Path) -> Tuple[Path, Path]:
    """(checkpoint file, folder for the outputs) from a run folder (its `best.pt`) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "best.pt"
        if not ckpt.is_file():
            other = " (last.pt is there: pass it to evaluate that)" if (path / "last.pt").is_file() else ""
            raise CheckpointError(f"no best.pt in run folder {path}{other}")
        return ckpt, path
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give a run folder holding best.pt, or a .pt file)")
    return path, path.parent


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint, with its recipe and data."""

    model: nn.Module
    recipe: Recipe
    data: Any  # ib.data.DataSplits
    checkpoint: Path
    run_dir: Path
    epoch: int


def load_run(path: str | Path, device: Optional[str] = None) -> LoadedRun:
    """Rebuild the model of a checkpoint with `ib.train`'s builders and load its weights (global RNG untouched).

    Args:
        path: A run folder (its `best.pt` is read) or a checkpoint file.
        device: Where to put the model (default: the recipe's `device`).

    Raises:
        CheckpointError: Missing, unreadable, or not matching its own recipe.
        ConfigError, DataError: The recipe's data set cannot be loaded.
    """
    from ib.checkpoint import load_checkpoint
    from ib.data import load_data
    from ib.recipe import recipe_from_dict
    from ib.train import build_model, resolve_device

    ckpt, run_dir = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    if "recipe" not in state or "model" not in state:
        raise CheckpointError(f"{ckpt} holds no recipe or model weights")
    recipe = recipe_from_dict(state["recipe"], source=str(ckpt))
    d = recipe.data
    data = load_data(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction, seed=recipe.seed,
                     image_size=d.image_size)
    target = resolve_device(device or recipe.device)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights from the global RNG
        model = build_model(recipe, data)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: weights do not match the recipe: {' '.join(str(e).split())[:300]}") from None
    return LoadedRun(model.to(target), recipe, data, ckpt, run_dir, int(state.get("epoch", 0)))


def _floats(text: str, flag: str) -> List[float]:
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ConfigError(f"{flag}: '{part.strip()}' is not a number (give a comma-separated list, e.g. "
                              f"0.05,0.1,0.2)") from None
    return values


def parse_eval_args(**given: Any) -> Dict[str, Any]:
    """Check command-line settings (None: not given) and return them as `EvalConfig` fields.

    Lists come as comma-separated text (`attacks="fgsm,pgd_linf"`, `eps="0.05,0.1"`); a ConfigError names the flag.
    """
    out: Dict[str, Any] = {}
    minimum = {"steps": 1, "samples": 0, "limit": 1, "restarts": 1, "batch_size": 1, "eot_samples": 1}
    for key, value in given.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if key == "attacks":
            out[key] = check_attacks(flag, [a.strip() for a in value.split(",") if a.strip()])
        elif key in ("eps", "eps_l2", "sigmas"):
            out[key] = check_radii(flag, _floats(value, flag), upper=1.0 if key == "eps" else None)
        elif key in minimum:
            if value < minimum[key]:
                raise ConfigError(f"{flag}: {value} is out of range; allowed: >= {minimum[key]}")
            out[key] = value
        elif key in ("split", "loss"):  # argparse checked the choices
            out[key] = value
        else:
            raise ConfigError(f"unknown evaluation setting {key}")
    return out


def evaluate_run(path: str | Path, overrides: Optional[Mapping[str, Any]] = None, *,
                 device: Optional[str] = None, tensorboard: bool = True) -> Dict[str, Any]:
    """`ib eval`: evaluate a checkpoint with its recipe's `eval` settings (updated by `overrides`) and write
    `eval.json`, `robustness.csv` and `robustness.png` beside it, and the same to its TensorBoard.

    Returns:
        The report written to `eval.json`.
    """
    from ib import __version__

    t0 = time.perf_counter()
    run = load_run(path, device)
    try:
        settings = dataclasses.replace(run.recipe.eval, **dict(overrides or {}))
    except TypeError as e:
        raise ConfigError(f"evaluation settings: {e}") from None
    split = run.data.test if settings.split == "test" else run.data.val
    if settings.limit is not None:
        split = Split(split.x[:settings.limit], split.y[:settings.limit])
    if len(split.y) == 0:
        raise ConfigError(f"the {settings.split} split of {run.checkpoint} is empty")
    samples = run.recipe.model.eval_samples if settings.samples is None else settings.samples
    batch_size = settings.batch_size or run.recipe.data.eval_batch_size
    log.info("evaluating %s (epoch %d) on %d %s samples", run.checkpoint, run.epoch, len(split.y), settings.split)
    result = evaluate_model(
        run.model, split, attacks=settings.attacks, eps=settings.eps, eps_l2=settings.eps_l2, sigmas=settings.sigmas,
        steps=settings.steps, step_size=settings.step_size, restarts=settings.restarts, samples=samples,
        eot_samples=settings.eot_samples, loss=settings.loss, batch_size=batch_size, seed=settings.seed,
        ece_bins=settings.ece_bins,
        tolerance=settings.tolerance, check_samples=settings.check_samples,
    )
    report = {"checkpoint": str(run.checkpoint), "epoch": run.epoch, "split": settings.split,
              "limit": settings.limit, **result, "wall_seconds": time.perf_counter() - t0,
              "device": str(_device(run.model)), "ib_version": __version__}
    write_outputs(run.run_dir, report, tensorboard=tensorboard)
    return report


def robustness_figure(rows: Sequence[Mapping[str, Any]], title: str = "") -> Any:
    """Accuracy against radius: one panel per threat (L-inf, L2, noise), one line per attack and variant
    (solid: mean code; dashed: sampled)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
                    color=colours[list(THREATS).index(attack)], linestyle="-" if variant == "mean" else "--",
                    label=f"{attack} / {variant}")
        ax.set_xlabel(xlabel[threat])
        ax.set_ylabel("accuracy")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(run_dir: Path, report: Mapping[str, Any], *, tensorboard: bool = True) -> None:
    """`eval.json`, `robustness.csv`, `robustness.png`, and TensorBoard (tags `robust/<attack>/<variant>`, with
    `<attack>_margin` for the margin loss, step = round(1000 * eps); clean metrics under `eval/...` and the figure
    at the checkpoint's epoch).

    The TensorBoard events go to their own run, `<run_dir>/eval/<checkpoint stem>/` (see `eval_log_dir`): in the
    run folder itself, a resumed training's writer (which purges steps after the resumed epoch) would delete the
    eps-indexed points. Evaluating the same checkpoint again replaces its previous events instead of adding a second
    point at every step.
    """
    import csv
    import io

    from ib.checkpoint import atomic_write
    from ib.monitor import write_json

    run_dir = Path(run_dir)
    write_json(run_dir / "eval.json", report)
    buf = io.StringIO()
    columns = ["attack", "variant", "threat", "eps", "loss", "accuracy", "accuracy_per_draw", "n", "seconds"]
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["robustness"])
    atomic_write(run_dir / "robustness.csv", lambda f: f.write(buf.getvalue().encode()))
    ckpt = Path(report["checkpoint"])
    title = f"{ckpt.parent.name}/{ckpt.name}, {report['split']} ({report['n']} samples)"
    fig = robustness_figure(report["robustness"], title)
    fig.savefig(run_dir / "robustness.png")
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = eval_log_dir(run_dir, report["checkpoint"])
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
