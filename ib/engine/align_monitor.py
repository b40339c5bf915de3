"""The tangent-kernel alignment of a training run (`monitor.alignment`), measured between steps.

Two fixed, class-balanced probes, one from the training split (with the labels it trains on) and one from the test
split, are drawn once from the recipe's seed. At the scheduled steps the monitor computes the tangent kernel of the
mean-code logits on each (`ib.alignment`) and returns one row:

    align/train, align/test          alignment of the whole network's kernel on each probe
    align/encoder, align/decoder     the kernels of the encoder's layers (with the bottleneck's head) and of the
                                     decoder's, on the training probe
    align/layer/<name>               each layer's own kernel, on the training probe
    align/trace, align/eff_rank      tr(K) and exp(spectral entropy) of the training probe's kernel

The measurement runs in eval mode under a forked RNG and touches no parameter or `.grad`: a run with the monitor on
trains exactly as one with it off.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Dict, List, Optional, Sequence, Set

import torch
from torch import nn

from ib.alignment import alignments, effective_rank, kernel_layers, layer_kernels
from ib.data import DataSplits, Split
from ib.errors import ConfigError
from ib.modes import evaluating
from ib.recipe import AlignmentConfig

log = logging.getLogger(__name__)

Row = Dict[str, float]
ENCODER_PREFIX = "bottleneck."  # dropped from layer names: encoder.net.0, head, decoder.0


def balanced_sample(split: Split, size: int, num_classes: int, seed: int) -> Split:
    """`size` rows of `split` (at most its length), as even over the classes as they allow: one row per class in
    turn, a class that has run out of rows leaving its turn to the others; each class's rows drawn by a seeded
    permutation, returned in that permutation's order."""
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))  # [N]
    labels = split.y[order]
    available = torch.bincount(labels, minlength=num_classes).tolist()
    quota, left = [0] * num_classes, min(size, len(split))
    while left:
        for k in range(num_classes):
            if left and quota[k] < available[k]:
                quota[k] += 1
                left -= 1
    taken = torch.zeros(len(split), dtype=torch.bool)
    for k in range(num_classes):
        taken[(labels == k).nonzero().flatten()[:quota[k]]] = True
    chosen = order[taken]
    return Split(split.x[chosen], split.y[chosen])


def log_spaced_steps(last: int) -> Set[int]:
    """Step 0, the steps floor(5 * 1.15^k) up to `last`, and `last`: the schedule of Baratin et al.'s code."""
    steps, k = {0, last}, 0
    while int(5 * 1.15 ** k) <= last:
        steps.add(int(5 * 1.15 ** k))
        k += 1
    return steps


class AlignmentMonitor:
    """Measures the alignment at the scheduled steps and keeps the rows until the run folder takes them.

    Args:
        model: the classifier (`IBClassifier`: its layers under `bottleneck.` and `decoder.`).
        probes: {"train": Split, "test": Split} on the model's device, inputs as float in [0, 1].
        num_classes: c.
        every: "log" (`log_spaced_steps`) or a number of steps.
        last_step: the run's last step (always measured).
        logged: the layers logged one by one (all when empty).
    """

    def __init__(self, model: nn.Module, probes: Dict[str, Split], num_classes: int, every: str | int,
                 last_step: int, logged: Sequence[str] = ()) -> None:
        try:
            self.layers = kernel_layers(model, prefix_drop=ENCODER_PREFIX)
        except ConfigError as e:
            raise ConfigError(f"monitor.alignment: {e}") from None
        unknown = [name for name in logged if name not in self.layers]
        if unknown:
            raise ConfigError(f"monitor.alignment.layers: no layer {unknown[0]!r} in this model; valid: "
                              f"{', '.join(self.layers)}")
        self.logged = list(logged) or list(self.layers)
        self.groups = {"encoder": [n for n in self.layers if not n.startswith("decoder.")],
                       "decoder": [n for n in self.layers if n.startswith("decoder.")]}
        self.probes, self.num_classes = probes, num_classes
        self.every, self.last_step = every, last_step
        self.steps = log_spaced_steps(last_step) if every == "log" else None
        self.pending: List[Row] = []
        self.seconds = 0.0  # spent measuring since the last `take`
        self.measured: Optional[int] = None  # the last step measured
        self.latest: Optional[Row] = None  # its row
        self.noted: Set[str] = set()  # layers already reported as unused

    @classmethod
    def build(cls, config: AlignmentConfig, data: DataSplits, model: nn.Module, device: torch.device, *,
              seed: int, last_step: int) -> "AlignmentMonitor":
        """The monitor of a run, its probes drawn from `data` with `seed`.

        Raises:
            ConfigError: a probe larger than its split, or a layer name the model does not have.
        """
        probes = {}
        for name, split in (("train", data.train), ("test", data.test)):
            if config.probe_size > len(split):
                raise ConfigError(f"monitor.alignment.probe_size={config.probe_size} is larger than the {name} split "
                                  f"({len(split)} samples)")
            part = balanced_sample(split, config.probe_size, data.num_classes, seed)
            x = part.x.to(device)
            probes[name] = Split(x.float().div_(255.0) if x.dtype == torch.uint8 else x.float(), part.y.to(device))
        return cls(model, probes, data.num_classes, config.every, last_step, config.layers)

    def due(self, step: int) -> bool:
        if step == self.measured:
            return False
        if self.steps is not None:
            return step in self.steps
        return step % int(self.every) == 0 or step == self.last_step

    def measure(self, model: nn.Module, step: int) -> Row:
        """The alignment row at `step` (also kept for `take`)."""
        t0 = time.perf_counter()
        row: Row = {"step": float(step)}
        with evaluating(model):
            for split, probe in self.probes.items():
                kernels = layer_kernels(lambda x: model(x, sample=False), self.layers, probe.x)
                if split == "train":
                    found = alignments(kernels, probe.y, self.num_classes, self.groups)
                    row["align/train"] = found["all"]
                    row.update({f"align/{g}": found[g] for g in self.groups})
                    row.update({f"align/layer/{name}": found[name] for name in self.logged})
                    self._note_unused([name for name in self.logged if kernels[name] is None], step)
                    present = [k for k in kernels.values() if k is not None]
                    whole = sum(present[1:], present[0]) if present else None
                    row["align/trace"] = float(whole.trace()) if whole is not None else math.nan
                    row["align/eff_rank"] = effective_rank(whole) if whole is not None else math.nan
                else:
                    row[f"align/{split}"] = alignments(kernels, probe.y, self.num_classes)["all"]
        self.seconds += time.perf_counter() - t0
        self.measured, self.latest = step, row
        self.pending.append(row)
        return row

    def _note_unused(self, names: Sequence[str], step: int) -> None:
        new = [name for name in names if name not in self.noted]
        if new:
            self.noted.update(new)
            log.warning("step %d: the logits do not depend on layer %s: its alignment is NaN", step, ", ".join(new))

    def take(self) -> List[Row]:
        """The rows measured since the last call (and the time they took is reset)."""
        rows, self.pending, self.seconds = self.pending, [], 0.0
        return rows
