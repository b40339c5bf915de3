"""The IB classifier: normalise, encode to a (stochastic) code Z, decode Z to class logits."""
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ib import checks
from ib.errors import ConfigError
from ib.models.bottlenecks import BOTTLENECKS, Bottleneck, Code
from ib.models.encoders import ENCODERS, MLP


class IBClassifier(nn.Module):
    """Normalise [0,1] inputs, encode to a (stochastic) code Z, decode Z to class logits.

    Args:
        bottleneck: The stochastic encoder p(z|x).
        num_classes: Number of classes.
        mean: Per-channel mean of the inputs (one value, or one per channel).
        std: Per-channel std of the inputs, positive.
        decoder_hidden: Hidden widths of the decoder; empty for the linear softmax decoder of the papers.
    """

    def __init__(
        self,
        bottleneck: Bottleneck,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        decoder_hidden: Sequence[int] = (),
    ) -> None:
        super().__init__()
        checks.integer("num_classes", num_classes, minimum=1)
        decoder_hidden = checks.widths("decoder_hidden", decoder_hidden)
        in_shape = bottleneck.in_shape
        channels = in_shape[0] if in_shape else 1
        if len(mean) not in (1, channels) or len(std) != len(mean):
            allowed = "1 value" if channels == 1 else f"1 or {channels} values"
            raise ConfigError(f"mean and std must have {allowed} each, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {tuple(std)!r}")
        self.bottleneck = bottleneck
        self.num_classes = num_classes
        # [1, C, 1, 1] for images: broadcast over the batch and the pixels.
        stat_shape = (1, len(mean)) + (1,) * (len(in_shape) - 1)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(stat_shape))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(stat_shape))
        self.decoder = MLP(bottleneck.z_dim, decoder_hidden, "relu", out_features=num_classes)

    def normalise(self, x: Tensor) -> Tensor:
        """(x - mean) / std per channel, x in [0, 1] [B, C, H, W]."""
        return (x - self.pixel_mean) / self.pixel_std

    def encode(self, x: Tensor, sample: bool = True) -> Code:
        """The code of x in [0, 1] [B, C, H, W]; `sample=False` gives the noise-free code."""
        return self.bottleneck(self.normalise(x), sample=sample)

    def decode(self, z: Tensor) -> Tensor:
        """Logits [..., num_classes] of codes [..., K], in float32 also under bf16 autocast: the code's noise is
        below bf16's resolution, and the decoder is a small share of the work."""
        with torch.autocast(z.device.type, enabled=False):
            return self.decoder(z.to(self.decoder[0].weight.dtype))

    def forward(self, x: Tensor, sample: bool = True) -> Tensor:
        """Logits [B, num_classes] of x in [0, 1] [B, C, H, W]."""
        return self.decode(self.encode(x, sample=sample).z)

    @torch.no_grad()
    def predict_proba(self, x: Tensor, samples: int = 0) -> Tensor:
        """Class probabilities [B, num_classes].

        The caller chooses the mode (`eval()` for batch-norm encoders); this method does not switch it.

        Args:
            x: Inputs in [0, 1], [B, C, H, W].
            samples: 0 for the softmax of the noise-free code; k > 0 for the mean softmax over k sampled codes
                (the MINE paper predicts with 12), drawn in one batched pass over k copies of x (one encoder
                pass for the Gaussian encoder).
        """
        checks.integer("samples", samples, minimum=0, error=ValueError)
        if samples == 0:
            return self.decode(self.encode(x, sample=False).z).softmax(-1)
        z = self.bottleneck.sample_z(self.normalise(x), samples)  # [S, B, K]
        return self.decode(z).softmax(-1).mean(0)

    @torch.no_grad()
    def predict_proba_both(self, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """`predict_proba(x, 0)` and `predict_proba(x, samples)` (samples >= 1) from one encoder pass where the
        bottleneck allows (Gaussian: the mean and the samples share it), each [B, num_classes]."""
        mean, z = self.bottleneck.mean_and_samples(self.normalise(x), samples)  # [B, K], [S, B, K]
        return self.decode(mean).softmax(-1), self.decode(z).softmax(-1).mean(0)


def build_classifier(
    encoder: str,
    encoder_kwargs: Mapping[str, Any],
    bottleneck: str,
    bottleneck_kwargs: Mapping[str, Any],
    in_shape: Sequence[int],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    decoder_hidden: Sequence[int] = (),
) -> IBClassifier:
    """Builds an `IBClassifier` from registry names and their settings.

    Args:
        encoder: Name in `ENCODERS`.
        encoder_kwargs: Its keyword settings.
        bottleneck: Name in `BOTTLENECKS`.
        bottleneck_kwargs: Its keyword settings.
        in_shape: (C, H, W) of one input.
        num_classes: Number of classes.
        mean: Per-channel mean for normalisation.
        std: Per-channel std for normalisation.
        decoder_hidden: Hidden widths of the decoder; empty for a linear decoder.

    Raises:
        ConfigError: An unknown name or setting, or a value out of range.
    """
    def make_encoder(shape: tuple[int, ...]) -> nn.Module:
        return ENCODERS.create(encoder, tuple(shape), **encoder_kwargs)

    model = BOTTLENECKS.create(bottleneck, make_encoder, tuple(in_shape), **bottleneck_kwargs)
    return IBClassifier(model, num_classes, mean, std, decoder_hidden)
