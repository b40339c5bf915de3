"""Evaluation a reviewer can trust: clean metrics, a robustness sweep, and sanity checks against weak attacks.

Both model variants, `mean` and `sampled`, are evaluated with common random numbers (see `ib.robustness`).

The sanity checks (`eval.json` "checks", and an `EvalWarning` for each one that fails):
  1. `eval_mode`: every module is in eval mode during the evaluation and the mean-code logits are repeatable;
  2. `eps0_equals_clean`: each attack at radius 0 gives the clean accuracy (at most one sample apart);
  3. `accuracy_not_rising`: accuracy under an attack does not rise with the radius (within `tolerance`);
  4. `pgd_not_weaker_than_fgsm`: L-inf PGD (and EOT-PGD) is at least as strong as FGSM at the same eps;
  5. `gradients_reach_input`: the loss has a non-zero, finite input gradient for nearly every sample;
  6. `unbounded_attack_succeeds`: L-inf PGD at eps 1 (any image in [0, 1]) brings accuracy near 0.
  7. `pgd_agrees_with_autoattack` (with `autoattack`): our strongest L-inf PGD reads at most 2 points above
     AutoAttack at the same variant and radius (`ib.autoattack`).
  Failures of 4-7 point to gradient masking or a weak attack: the numbers then overstate robustness.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from ib import __version__, distributed
from ib.attacks import LossKind, Schedule, input_gradient, pgd
from ib.autoattack import ATTACKS as AUTOATTACKS
from ib.autoattack import agreement_check, autoattack_rows, load_autoattack
from ib.data import BatchLoader, Split
from ib.engine.build import load_run
from ib.errors import ConfigError
from ib.modes import evaluating, seeded
from ib.monitor import write_eval_outputs
from ib.recipe import AttackName, Recipe, check_attacks, check_radii
from ib.robustness import (LINF_PGD, THREATS, SampledLoss, Variant, attack_loss, clean_metrics, derive_seed,
                           headline_robust_accuracy, is_correct, robustness_sweep)

log = logging.getLogger(__name__)

UNBOUNDED_MAX_ACCURACY = 0.1  # check 6: a working attack at eps 1 leaves (almost) nothing correct
ZERO_GRADIENT_MAX_FRACTION = 0.05  # check 5: share of samples allowed an all-zero input gradient
PROBE_SAMPLES = 256  # check 5 looks at one batch of at most this many samples


class EvalWarning(UserWarning):
    """A sanity check of the evaluation failed: the robustness numbers may not mean what they seem to."""


# ---------------------------------------------------------------------------------------------------------------------
# Sanity checks


def _check(name: str, passed: Optional[bool], detail: str, **values: Any) -> Dict[str, Any]:
    return {"name": name, "passed": passed, "detail": detail, **values}


def eval_mode_check(model: nn.Module, loader: BatchLoader, was_training: List[str]) -> Dict[str, Any]:
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    repeatable = True
    with torch.inference_mode():
        for x, _ in loader:  # one batch
            with evaluating(device=x.device):  # the same random state for both passes, then restored
                repeatable = torch.equal(model(x, sample=False), model(x, sample=False))
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


def gradient_check(model: nn.Module, loader: BatchLoader, variants: Sequence[Variant], loss_kind: LossKind,
                    seed: int, sampled: SampledLoss = "mean_softmax") -> Dict[str, Any]:
    fractions: Dict[str, float] = {}
    for x, y in loader:  # one batch: the first PROBE_SAMPLES samples
        for v in variants:
            loss = attack_loss(model, v, eot=False, eot_samples=1, loss_kind=loss_kind, sampled=sampled)
            with seeded(derive_seed(seed, "gradient", v.name), x.device):
                g = input_gradient(loss, x, y).flatten(1)  # [B, D]
            dead = (g.abs().sum(1) == 0) | ~torch.isfinite(g).all(1)  # [B]
            fractions[v.name] = float(dead.float().mean())
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


def unbounded_check(model: nn.Module, loader: BatchLoader, variants: Sequence[Variant], *, steps: int,
                     eot_samples: int, loss_kind: LossKind, seed: int,
                     sampled: SampledLoss = "mean_softmax") -> Dict[str, Any]:
    if len(loader) == 0:
        return _check("unbounded_attack_succeeds", None, "skipped (check_samples=0)")
    accuracy: Dict[str, float] = {}
    for v in variants:
        loss = attack_loss(model, v, eot=True, eot_samples=eot_samples, loss_kind=loss_kind, sampled=sampled)
        right = n = 0
        for i, (x, y) in enumerate(loader):
            with seeded(derive_seed(seed, "unbounded", v.name, i), x.device):
                # From the clean input: a random start at eps 1 would be noise that hides a dead gradient.
                x_adv = pgd(loss, x, y, 1.0, norm="linf", steps=steps, random_start=False)
            right += int(is_correct(model, v, x_adv, y, derive_seed(seed, "predict", i))[0].sum())
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


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(split: Split, batch_size: int, device: torch.device, limit: Optional[int] = None,
             seed: int = 0) -> BatchLoader:
    """`limit` samples of the split (all by default) drawn by a seeded permutation (`Split.sample`: every class in
    proportion, whatever the split's order), as float32 batches in [0, 1] on `device`."""
    if limit is not None:
        split = split.sample(limit, seed)
    return BatchLoader(split, batch_size, shuffle=False, drop_last=False, device=device)


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
    sampled_loss: SampledLoss = "mean_softmax",
    autoattack: bool = False,
    schedule: Schedule = "adaptive",
    targets: int = 3,
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
        step_size: PGD step as a multiple of eps / steps, under the fixed schedule.
        restarts: PGD restarts; the worst case per sample is kept.
        samples: Draws of Z of the sampled variant (0: mean-code variant only).
        eot_samples: Draws of Z averaged into each EOT-PGD gradient (and the unbounded check's).
        loss: What the gradient attacks ascend: "ce" (cross-entropy) or "margin" (max_{j != y} z_j - z_y).
        batch_size: Samples per batch.
        seed: Seed of the random starts, noise and codes.
        ece_bins: Bins of the expected calibration error.
        tolerance: Accuracy slack of checks 3 and 4 (at least one sample).
        check_samples: Samples of the unbounded-attack check (0 skips it).
        sampled_loss: What attacks on the sampled variant ascend: "mean_softmax", the loss of its prediction
            -log mean_z p(y|z) over its `samples` draws (EOT-PGD: averaged over `eot_samples` predictions), or
            "per_draw", the loss of one draw (EOT-PGD: averaged over `eot_samples` draws).
        autoattack: also run AutoAttack at each L-inf radius (`ib.autoattack`: the standard version on the mean
            code, `rand` on the sampled model; needs the `ib[autoattack]` extra) and check 7.
        schedule: PGD's step lengths: "adaptive" (APGD's, Croce & Hein 2020) or "fixed" (Madry et al.'s).
        targets: After each PGD attack, targeted runs toward each sample's `targets` likeliest wrong classes on the
            samples still standing (0: none; AutoAttack's APGD-T: 9).

    Returns:
        {"n", "clean", "robustness", "robust_accuracy", "robust_accuracy_of", "checks", "all_checks_passed", "notes",
        "settings", "seconds"}; `robust_accuracy` as in `headline_robust_accuracy`.
    """
    t0 = time.perf_counter()
    if autoattack:
        load_autoattack()  # a missing extra is said before any work
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
    loader = _batches(split, batch_size, device)
    was_training = [name for name, m in model.named_modules() if m.training]
    with evaluating(model, device=device):
        checks = [eval_mode_check(model, _batches(split, batch_size, device, batch_size, seed), was_training)]
        t1 = time.perf_counter()
        clean = clean_metrics(model, loader, variants, seed=seed, ece_bins=ece_bins)
        clean_seconds = time.perf_counter() - t1
        rows = robustness_sweep(model, loader, variants, grid, steps=steps, step_size=step_size,
                                restarts=restarts, eot_samples=eot_samples, loss_kind=loss, seed=seed,
                                sampled_loss=sampled_loss, schedule=schedule, targets=targets)
        if autoattack:
            rows += autoattack_rows(model, loader, variants, radii["linf"], seed=seed)
        checks += sanity_checks(clean, rows, tolerance=tolerance)
        probe = _batches(split, batch_size, device, min(batch_size, PROBE_SAMPLES), seed)
        checks.append(gradient_check(model, probe, variants, loss, seed, sampled_loss))
        checks.append(unbounded_check(model, _batches(split, batch_size, device, check_samples, seed), variants,
                                      steps=steps, eot_samples=eot_samples, loss_kind=loss, seed=seed,
                                      sampled=sampled_loss))
        if autoattack:
            checks.append(agreement_check(rows))
    for c in checks:
        if c["passed"] is False:
            warnings.warn(f"ib eval: check {c['name']} failed: {c['detail']}", EvalWarning, stacklevel=2)
    settings = {"attacks": attacks, "eps": list(radii["linf"]), "eps_l2": list(radii["l2"]),
                "sigmas": list(radii["noise"]), "steps": steps, "step_size": step_size,
                "step_rule": "step = step_size * eps / steps" if schedule == "fixed" else "APGD's adaptive step",
                "schedule": schedule, "targets": targets, "restarts": restarts, "samples": samples,
                "eot_samples": eot_samples, "loss": loss, "sampled_loss": sampled_loss, "batch_size": batch_size,
                "seed": seed, "ece_bins": ece_bins, "autoattack": autoattack,
                "tolerance": tolerance, "check_samples": check_samples}
    headline = headline_robust_accuracy(rows, "sampled" if samples > 0 else "mean")
    return {"n": len(split.y), "clean": clean, "clean_seconds": clean_seconds, "robustness": rows,
            "robust_accuracy": headline["accuracy"] if headline else None, "robust_accuracy_of": headline,
            "checks": checks,
            "all_checks_passed": all(c["passed"] is not False for c in checks), "notes": notes,
            "settings": settings, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------------------------------
# `ib eval`: a checkpoint's evaluation, written beside it


def evaluate_after_training(recipe: Recipe, run_dir: str | Path,
                            metrics: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The recipe's `eval:` section, as `ib eval RUN_DIR`, once `fit` has completed the run (in the main process
    alone, after the others have left); what `ib train` and `ib sweep` do after training. Returns the report, or
    None when there is nothing to evaluate."""
    if metrics["status"] != "completed" or not recipe.eval.enabled or not distributed.is_main_process():
        return None
    return evaluate_run(run_dir)


def evaluate_run(path: str | Path, overrides: Sequence[str] = (), *, device: Optional[str] = None,
                 tensorboard: bool = True) -> Dict[str, Any]:
    """`ib eval`: evaluate a checkpoint with its recipe's `eval` settings, updated by `eval.*=value` overrides
    (checked as a recipe's are), and write `eval.json`, `robustness.csv` and `robustness.png` beside it, and the
    same to its TensorBoard (`ib.monitor.write_eval_outputs`).

    Args:
        path: a run folder (its `best.pt`) or a checkpoint file.
        overrides: `eval.key=value` settings, e.g. `eval.eps=[0.1]`.
        device: where to evaluate (default: the recipe's device).
        tensorboard: also write TensorBoard events.

    Returns:
        The report written to `eval.json`.
    """
    t0 = time.perf_counter()
    if isinstance(overrides, (str, Mapping)) or not all(isinstance(o, str) for o in overrides):
        raise TypeError(f"overrides must be a sequence of 'eval.key=value' strings, got {overrides!r}")
    other = [o for o in overrides if not o.startswith("eval.")]
    if other:
        raise ConfigError(f"ib eval takes eval.* settings only (the run was trained as it was), got '{other[0]}'")
    if any(o.replace(" ", "").lower() in ("eval.autoattack=true", "eval.autoattack=yes") for o in overrides):
        load_autoattack()  # before the checkpoint and the data are loaded
    run = load_run(path, device, overrides=overrides)
    settings = run.recipe.eval
    if settings.autoattack:
        load_autoattack()
    split = run.data.test if settings.split == "test" else run.data.val
    if settings.limit is not None:  # drawn by a seeded permutation: every class, whatever the split's order
        split = split.sample(settings.limit, settings.seed)
    if len(split.y) == 0:
        raise ConfigError(f"the {settings.split} split of {run.checkpoint} is empty")
    samples = run.recipe.model.eval_samples if settings.samples is None else settings.samples
    batch_size = settings.batch_size or run.recipe.data.eval_batch_size
    log.info("evaluating %s (epoch %d) on %d %s samples", run.checkpoint, run.epoch, len(split.y), settings.split)
    result = evaluate_model(
        run.model, split, attacks=settings.attacks, eps=settings.eps, eps_l2=settings.eps_l2, sigmas=settings.sigmas,
        steps=settings.steps, step_size=settings.step_size, restarts=settings.restarts, samples=samples,
        eot_samples=settings.eot_samples, loss=settings.loss, batch_size=batch_size, seed=settings.seed,
        ece_bins=settings.ece_bins, tolerance=settings.tolerance, check_samples=settings.check_samples,
        sampled_loss=settings.sampled_loss, autoattack=settings.autoattack, schedule=settings.schedule,
        targets=settings.targets,
    )
    report = {"checkpoint": str(run.checkpoint), "epoch": run.epoch, "split": settings.split,
              "limit": settings.limit, **result, "wall_seconds": time.perf_counter() - t0,
              "device": str(_device(run.model)), "ib_version": __version__}
    write_eval_outputs(run.run_dir, report, [*THREATS, *AUTOATTACKS], tensorboard=tensorboard)
    return report
