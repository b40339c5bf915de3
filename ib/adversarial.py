"""Adversarial training (the recipe's `adversarial` section): PGD-AT (Madry et al. 2018) and A3T, robustness
through an invariant representation (Erraqabi, Baratin, Bengio & Lacoste-Julien 2018).

Both train the classifier on

    alpha * CE(x) + (1 - alpha) * CE(x_adv)

(alpha = 0 is Madry's), with x_adv from the project's own attacks (`ib.attacks`) on the sampled model, one draw of Z
per gradient, as training sees it. The attack runs with the weights in train mode and batch norm in eval mode (its
running statistics are not updated by attack passes), as the standard recipes do, and leaves no `.grad`.

A3T adds a discriminator D, an MLP with its own optimiser, on the code z (or on a named hidden layer): trained to
tell the features of x (label 1) from those of x_adv (label 0) by binary cross-entropy, while the encoder is
trained to fool it through gradient reversal with weight lambda (`disc_weight`), as in DIAL (Levi et al. 2021, the
maintained successor of A3T with code): one backward pass gives D its descent and the encoder its ascent of D's
loss. When the encoder wins, D's accuracy (`adv/disc_acc`) falls to chance: the representation no longer shows the
perturbation.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ib.attacks import fgsm, pgd, sampled_loss
from ib.errors import ConfigError
from ib.modes import evaluating
from ib.models.encoders import MLP
from ib.objectives import reverse_grad
from ib.recipe import AdversarialConfig

CODE = "z"  # `disc_layer` for the code itself
PREFIX = "bottleneck."  # dropped from layer names, as in the alignment monitor: encoder.net.0, head, decoder.0


def layer_names(model: nn.Module) -> List[str]:
    """The names `disc_layer` accepts: "z" and every submodule of the model whose output is a tensor (less the
    `bottleneck.` prefix; the bottleneck itself returns a code, whose z is "z")."""
    return [CODE] + [name.removeprefix(PREFIX) for name, _ in model.named_modules() if name and name != "bottleneck"]


@contextlib.contextmanager
def batch_norm_in_eval(model: nn.Module) -> Iterator[None]:
    """Batch-norm layers in eval mode inside (their running statistics untouched), every other module as it is."""
    norms = [(m, m.training) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m, _ in norms:
        m.eval()
    try:
        yield
    finally:
        for m, flag in norms:
            m.train(flag)


class AdversarialTraining(nn.Module):
    """The adversarial examples of a batch and, for A3T, the discriminator and its loss.

    Args:
        config: the recipe's `adversarial` section (name "pgd" or "a3t").
        model: the classifier, to size the discriminator from the features of `disc_layer`.
        in_shape: (C, H, W) of one input.
    """

    def __init__(self, config: AdversarialConfig, model: nn.Module, in_shape: tuple) -> None:
        super().__init__()
        self.config = config
        self.discriminator: Optional[MLP] = None
        if config.name == "a3t":
            names = layer_names(model)
            if config.disc_layer not in names:
                raise ConfigError(f"adversarial.disc_layer: no layer {config.disc_layer!r} in this model; valid: "
                                  f"{', '.join(names[:12])}{', ...' if len(names) > 12 else ''}")
            width = self._feature_width(model, in_shape)
            self.discriminator = MLP(width, config.disc_hidden, "relu", out_features=1)

    def _feature_width(self, model: nn.Module, in_shape: tuple) -> int:
        device = next(model.parameters()).device
        with evaluating(model), torch.no_grad(), self.capture(model) as found:
            code = model.encode(torch.zeros(2, *in_shape, device=device))
        return int((found.get("features") if found else code.z).flatten(1).shape[1])

    @contextlib.contextmanager
    def capture(self, model: nn.Module) -> Iterator[Dict[str, Tensor]]:
        """Inside, the output of `disc_layer` (a hidden layer) lands in the yielded dict under "features" at each
        forward pass; empty (nothing captured) for the code itself, which the caller has."""
        found: Dict[str, Tensor] = {}
        if self.config.disc_layer == CODE:
            yield found
            return
        module = {name.removeprefix(PREFIX): m for name, m in model.named_modules()}[self.config.disc_layer]

        def hook(m: nn.Module, args: tuple, out: Tensor) -> None:
            found["features"] = out

        handle = module.register_forward_hook(hook)
        try:
            yield found
        finally:
            handle.remove()

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        """Adversarial inputs [B, ...] for a batch, detached: FGSM or PGD on the cross-entropy of the sampled
        model (one draw of Z per gradient), batch norm in eval mode."""
        c = self.config
        loss_fn = sampled_loss(model, samples=1)
        with batch_norm_in_eval(model):
            if c.attack == "fgsm":
                return fgsm(loss_fn, x, y, c.eps)
            return pgd(loss_fn, x, y, c.eps, steps=c.steps, step_size=c.step_size, random_start=c.random_start)

    def discriminator_loss(self, clean: Tensor, adv: Tensor) -> Dict[str, Tensor]:
        """D's binary cross-entropy on features of clean (label 1) and adversarial (label 0) inputs [B, ...], with
        the encoder's gradient reversed and scaled by `disc_weight`; and D's accuracy (detached)."""
        weight = self.config.disc_weight
        feats = torch.cat([clean.flatten(1), adv.flatten(1)])  # [2B, width]
        labels = torch.cat([torch.ones(clean.shape[0]), torch.zeros(adv.shape[0])]).to(feats)
        logits = self.discriminator(reverse_grad(feats, weight)).squeeze(-1)  # [2B]
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        acc = ((logits.detach() > 0).to(labels) == labels).float().mean()
        return {"disc_loss": loss, "disc_acc": acc}

    def objective(self, model: nn.Module, x_adv: Tensor, y: Tensor, ce: Tensor, clean_features: Tensor,
                  label_smoothing: float = 0.0) -> Dict[str, Tensor]:
        """The adversarial terms of the loss: {"loss_delta" (to add to CE + beta * I), "ce_adv", and for A3T
        "disc_loss" and "disc_acc"}. `ce`: the clean batch's cross-entropy; `clean_features`: the clean batch's
        features at `disc_layer` (its code z for "z")."""
        alpha = self.config.alpha
        with self.capture(model) as found:
            code_adv = model.encode(x_adv)
            logits_adv = model.decode(code_adv.z)
        ce_adv = F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)
        out = {"ce_adv": ce_adv, "loss_delta": (1.0 - alpha) * (ce_adv - ce)}
        if self.discriminator is not None:
            adv_features = found.get("features", code_adv.z)
            disc = self.discriminator_loss(clean_features, adv_features)
            out.update(disc)
            out["loss_delta"] = out["loss_delta"] + disc["disc_loss"]
        return out
