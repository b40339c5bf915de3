"""A second opinion on robustness that is not ours: AutoAttack (Croce & Hein, ICML 2020), through the optional
`pyautoattack` package (`pip install 'ib[autoattack]'`), a packaging of the authors' code that installs from PyPI
with no pinned dependencies.

- The mean-code model gets the standard version: APGD-CE, APGD-T, FAB-T and Square.
- The sampled model gets the `rand` version, which AutoAttack prescribes for randomised defences: APGD-CE and
  APGD-DLR, each gradient averaged over 20 draws (EOT). What it attacks is the sampled model's own prediction:
  the log of the mean softmax over its K draws of Z, drawn afresh at each call.

Accuracy is then scored by our own predictor on AutoAttack's adversarial inputs, with the common random numbers
of `ib.robustness`, so its rows compare with ours sample for sample.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn

from ib.attacks import sampled_logits
from ib.data import BatchLoader
from ib.errors import ConfigError
from ib.modes import seeded
from ib.robustness import Variant, derive_seed, is_correct

log = logging.getLogger(__name__)

INSTALL = "pip install 'ib[autoattack]'"
ATTACKS = {"autoattack": "standard", "autoattack_rand": "rand"}  # row name -> AutoAttack version


def load_autoattack() -> type:
    """pyautoattack's `AutoAttack` class; a one-line ConfigError with the install command when it is missing."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise ConfigError(f"AutoAttack is an optional extra: install it with {INSTALL} (the pyautoattack "
                          "package), or leave out --autoattack / eval.autoattack") from None
    return AutoAttack


class MeanCodeLogits(nn.Module):
    """The deterministic model, as AutoAttack calls it: x -> logits of the noise-free code."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x, sample=False)


class PredictorLogits(nn.Module):
    """The sampled model's prediction, as AutoAttack calls it: x -> log of the mean softmax over `samples` fresh
    draws of Z (random at each call; AutoAttack's `rand` version averages its gradients over 20 calls)."""

    def __init__(self, model: nn.Module, samples: int) -> None:
        super().__init__()
        self.model, self.samples = model, samples

    def forward(self, x: Tensor) -> Tensor:
        log_p = sampled_logits(self.model, x, self.samples).log_softmax(-1)  # [S, B, classes]
        return torch.logsumexp(log_p, dim=0) - math.log(self.samples)


def autoattack_rows(model: nn.Module, loader: BatchLoader, variants: Sequence[Variant], eps: Sequence[float], *,
                    seed: int) -> List[Dict[str, Any]]:
    """Accuracy of each variant under AutoAttack at each L-inf radius above 0 (rows as `robustness_sweep`'s:
    attack "autoattack" on the mean code, "autoattack_rand" on the sampled model). The caller puts the model in
    eval mode."""
    AutoAttack = load_autoattack()
    quiet = logging.getLogger("auto-attack")  # its per-batch chatter; warnings still show
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        return _rows(AutoAttack, model, loader, variants, eps, seed)
    finally:
        quiet.setLevel(level)


def _rows(AutoAttack: type, model: nn.Module, loader: BatchLoader, variants: Sequence[Variant],
          eps: Sequence[float], seed: int) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []
    for radius in sorted(e for e in eps if e > 0):
        for variant in variants:
            attack = "autoattack" if variant.samples == 0 else "autoattack_rand"
            target = MeanCodeLogits(model) if variant.samples == 0 else PredictorLogits(model, variant.samples)
            t0 = time.perf_counter()
            right = n = 0
            for i, (x, y) in enumerate(loader):
                aa = AutoAttack(target, norm="Linf", eps=float(radius), version=ATTACKS[attack],
                                seed=derive_seed(seed, attack, radius, i) % (2**31), device=x.device)
                aa.verbose = False
                with seeded(derive_seed(seed, attack, radius, i), x.device), torch.inference_mode(False):
                    x_adv, _ = aa.run_standard_evaluation(x.clone(), y.clone(), batch_size=x.shape[0])
                right += int(is_correct(model, variant, x_adv.detach(), y, derive_seed(seed, "predict", i))[0].sum())
                n += y.shape[0]
            rows.append({"attack": attack, "variant": variant.name, "threat": "linf", "eps": radius,
                         "loss": f"autoattack {ATTACKS[attack]}", "accuracy": right / n if n else math.nan,
                         "schedule": None, "targets": None, "accuracy_per_draw": None, "n": n,
                         "seconds": time.perf_counter() - t0})
            log.info("%-15s %-7s eps %-6g accuracy %.4f  (%.1f s)", attack, variant.name, radius,
                     rows[-1]["accuracy"], rows[-1]["seconds"])
    return rows


def agreement_check(rows: Sequence[Dict[str, Any]], margin: float = 0.02) -> Dict[str, Any]:
    """Check 7: our strongest L-inf PGD (pgd_linf, and eot_pgd on the sampled model) reads at most `margin` above
    AutoAttack at the same variant and radius; more means our attack is weak there and our figures overstate
    robustness."""
    acc = {(r["attack"], r["variant"], r["eps"]): r["accuracy"] for r in rows}
    bad, pairs = [], 0
    for (attack, variant, eps), aa in acc.items():
        if attack not in ATTACKS:
            continue
        ours = [acc[(a, variant, eps)] for a in ("pgd_linf", "eot_pgd") if (a, variant, eps) in acc]
        if not ours:
            continue
        pairs += 1
        if min(ours) > aa + margin:
            bad.append(f"{variant} at eps {eps:g}: our PGD {min(ours):.4f}, AutoAttack {aa:.4f}")
    if not pairs:
        return {"name": "pgd_agrees_with_autoattack", "passed": None,
                "detail": "skipped: no AutoAttack row beside an L-inf PGD row"}
    detail = ("our attack is weak (it reads more than {:.0%} above AutoAttack): ".format(margin) + "; ".join(bad)
              if bad else f"{pairs} variant/radius pairs: our PGD within {margin:.0%} of AutoAttack or below it")
    return {"name": "pgd_agrees_with_autoattack", "passed": not bad, "detail": detail, "margin": margin}
