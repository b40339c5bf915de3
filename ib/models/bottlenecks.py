"""Stochastic encoders p(z|x): an encoder network followed by a head to a K-dimensional code Z.

These are the three stochastic encoders of the information-bottleneck experiments of MINE (Belghazi et al. 2018),
plus a deterministic baseline. A factory takes `make_encoder` (in_shape -> encoder module with `out_features`) and
the input shape positionally, and its settings by keyword.
"""
import math
from typing import Callable, Literal, NamedTuple, Optional, get_args

import torch
from torch import Tensor, nn

from ib import checks
from ib.models import functional, noise
from ib.registry import Registry

BOTTLENECKS = Registry("bottleneck")

EncoderFactory = Callable[[tuple[int, ...]], nn.Module]
NoiseLayout = Literal["channels", "features"]


class Code(NamedTuple):
    """A code Z with, for the Gaussian encoder, the parameters of p(z|x)."""

    z: Tensor  # [B, K]
    mean: Optional[Tensor] = None  # [B, K] noise-free mean (gaussian only)
    std: Optional[Tensor] = None  # [B, K] (gaussian only)


class Bottleneck(nn.Module):
    """Base of the stochastic encoders: `forward(x, sample)` returns a `Code`.

    Args:
        encoder: Network whose `out_features` the head reads.
        z_dim: Width K of the code.
        in_shape: Shape of one input, without the batch dimension.
    """

    def __init__(self, encoder: nn.Module, z_dim: int, in_shape: tuple[int, ...]) -> None:
        super().__init__()
        if not isinstance(getattr(encoder, "out_features", None), int):
            raise TypeError(f"encoder {type(encoder).__name__} has no integer attribute out_features")
        self.encoder = encoder
        self.z_dim = z_dim
        self.in_shape = tuple(in_shape)

    def forward(self, x: Tensor, sample: bool = True) -> Code:
        """Encodes x [B, *in_shape]; `sample=False` gives the noise-free (mean) code."""
        raise NotImplementedError

    def _head(self, inputs: Tensor) -> Tensor:
        """head(encoder(inputs)) in the head's own dtype. Under bf16 autocast the layers compute in bf16 (the mean
        and std are bf16-rounded like any autocast layer's output) and come back to float32 here, so that the noise
        is added in float32: the VIB std starts near 0.007, below bf16's resolution at |mean| ~ 1."""
        return self.head(self.encoder(inputs)).to(self.head.weight.dtype)

    def sample_z(self, x: Tensor, samples: int) -> Tensor:
        """`samples` independent codes per input, [S, B, K], from one batched pass over x repeated S times."""
        b = x.shape[0]
        xs = x.unsqueeze(0).expand(samples, *x.shape).reshape(samples * b, *x.shape[1:])  # [S * B, ...]
        return self(xs, sample=True).z.view(samples, b, self.z_dim)

    def mean_and_samples(self, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        """The noise-free code [B, K] and `samples` sampled codes [S, B, K] (as `sample_z`) of the same inputs."""
        return self(x, sample=False).z, self.sample_z(x, samples)


class GaussianBottleneck(Bottleneck):
    """z = mean(x) + std(x) * eps with std = softplus(pre - std_offset), the parameterisation of the VIB paper."""

    def __init__(self, encoder: nn.Module, z_dim: int, in_shape: tuple[int, ...], std_offset: float) -> None:
        super().__init__(encoder, z_dim, in_shape)
        self.std_offset = std_offset
        self.head = nn.Linear(encoder.out_features, 2 * z_dim)

    def params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std of p(z|x), each [B, K]."""
        mean, pre = self._head(x).chunk(2, dim=-1)
        return mean, functional.softplus(pre - self.std_offset)

    def forward(self, x: Tensor, sample: bool = True) -> Code:
        mean, std = self.params(x)
        z = mean + std * noise.gaussian(std.shape, like=std) if sample else mean
        return Code(z, mean, std)

    def sample_z(self, x: Tensor, samples: int) -> Tensor:
        return self.mean_and_samples(x, samples)[1]

    def mean_and_samples(self, x: Tensor, samples: int) -> tuple[Tensor, Tensor]:
        mean, std = self.params(x)  # one encoder pass for the mean and all samples
        return mean, mean + std * noise.gaussian((samples, *std.shape), like=std)  # [S, B, K]


class AdditiveBottleneck(Bottleneck):
    """z = head(enc(x + sigma * eps)), eps ~ N(0, I) shaped like x."""

    def __init__(self, encoder: nn.Module, z_dim: int, in_shape: tuple[int, ...], sigma: float) -> None:
        super().__init__(encoder, z_dim, in_shape)
        self.sigma = sigma
        self.head = nn.Linear(encoder.out_features, z_dim)

    def forward(self, x: Tensor, sample: bool = True) -> Code:
        if sample:
            x = x + self.sigma * noise.gaussian(x.shape, like=x)
        return Code(self._head(x))


class PropagatedBottleneck(Bottleneck):
    """z = head(enc([x, sigma * eps])): noise enters as extra inputs that the encoder propagates.

    With `layout="channels"` an image [B, C, H, W] gets `noise_dim` extra channels of noise; with "features" (and
    always for a flat input shape) the flattened input gets `noise_dim` extra features.
    """

    def __init__(
        self,
        encoder: nn.Module,
        z_dim: int,
        in_shape: tuple[int, ...],
        noise_dim: int,
        sigma: float,
        layout: str,
    ) -> None:
        super().__init__(encoder, z_dim, in_shape)
        self.noise_dim = noise_dim
        self.sigma = sigma
        self.layout = layout
        self.head = nn.Linear(encoder.out_features, z_dim)

    def forward(self, x: Tensor, sample: bool = True) -> Code:
        b = x.shape[0]
        if self.layout == "channels":
            noise_shape = (b, self.noise_dim, *x.shape[2:])  # [B, N, H, W]
        else:
            x = x.flatten(1)  # [B, D]
            noise_shape = (b, self.noise_dim)  # [B, N]
        if sample:
            eps = self.sigma * noise.gaussian(noise_shape, like=x)
        else:
            eps = x.new_zeros(noise_shape)
        return Code(self._head(torch.cat([x, eps], dim=1)))


class DeterministicBottleneck(Bottleneck):
    """z = head(enc(x)), with no noise: the baseline without a bottleneck on I(X;Z)."""

    def __init__(self, encoder: nn.Module, z_dim: int, in_shape: tuple[int, ...]) -> None:
        super().__init__(encoder, z_dim, in_shape)
        self.head = nn.Linear(encoder.out_features, z_dim)

    def forward(self, x: Tensor, sample: bool = True) -> Code:
        return Code(self._head(x))

    def sample_z(self, x: Tensor, samples: int) -> Tensor:
        return self(x).z.expand(samples, -1, -1)  # [S, B, K], all samples equal


@BOTTLENECKS.register()
def gaussian(
    make_encoder: EncoderFactory,
    in_shape: tuple[int, ...],
    /,
    *,
    z_dim: int = 256,
    std_offset: float = 5.0,
) -> Bottleneck:
    """Gaussian encoder: Linear(h -> 2K) gives (mean, pre); std = softplus(pre - std_offset); z = mean + std * eps.

    Args:
        make_encoder: Builds the encoder for an input shape.
        in_shape: Shape of one input.
        z_dim: Width K of the code.
        std_offset: Shift making the initial std small (softplus(-5) ~ 0.0067).
    """
    checks.integer("z_dim", z_dim, minimum=1)
    std_offset = checks.finite("std_offset", std_offset)
    return GaussianBottleneck(make_encoder(tuple(in_shape)), z_dim, in_shape, std_offset)


@BOTTLENECKS.register()
def additive(
    make_encoder: EncoderFactory,
    in_shape: tuple[int, ...],
    /,
    *,
    z_dim: int = 256,
    sigma: float = 0.3,
) -> Bottleneck:
    """Additive-noise encoder: z = head(enc(x + sigma * eps)).

    Args:
        make_encoder: Builds the encoder for an input shape.
        in_shape: Shape of one input.
        z_dim: Width K of the code.
        sigma: Std of the noise added to the (normalised) input.
    """
    checks.integer("z_dim", z_dim, minimum=1)
    sigma = checks.non_negative("sigma", sigma)
    return AdditiveBottleneck(make_encoder(tuple(in_shape)), z_dim, in_shape, sigma)


@BOTTLENECKS.register()
def propagated(
    make_encoder: EncoderFactory,
    in_shape: tuple[int, ...],
    /,
    *,
    z_dim: int = 256,
    noise_dim: int = 16,
    sigma: float = 1.0,
    layout: NoiseLayout = "channels",
) -> Bottleneck:
    """Propagated-noise encoder: z = head(enc([x, sigma * eps])).

    Args:
        make_encoder: Builds the encoder for an input shape; it gets (C + noise_dim, H, W) for the "channels"
            layout of an image and (prod(in_shape) + noise_dim,) for the "features" layout or a flat input.
        in_shape: Shape of one input.
        z_dim: Width K of the code.
        noise_dim: Noise channels (or features) concatenated to the input.
        sigma: Std of the noise.
        layout: "channels" adds HxW noise maps to an image; "features" flattens the input and appends a noise
            vector, as for an MLP on flattened MNIST (with "channels" an MLP would see noise_dim * H * W extra inputs).
    """
    checks.integer("z_dim", z_dim, minimum=1)
    checks.integer("noise_dim", noise_dim, minimum=1)
    sigma = checks.non_negative("sigma", sigma)
    checks.choice("layout", layout, get_args(NoiseLayout))
    in_shape = tuple(in_shape)
    if len(in_shape) == 1:
        layout = "features"
    if layout == "channels":
        enc_shape = (in_shape[0] + noise_dim, *in_shape[1:])
    else:
        enc_shape = (math.prod(in_shape) + noise_dim,)
    return PropagatedBottleneck(make_encoder(enc_shape), z_dim, in_shape, noise_dim, sigma, layout)


@BOTTLENECKS.register()
def deterministic(
    make_encoder: EncoderFactory,
    in_shape: tuple[int, ...],
    /,
    *,
    z_dim: int = 256,
) -> Bottleneck:
    """Deterministic baseline: z = head(enc(x)).

    Args:
        make_encoder: Builds the encoder for an input shape.
        in_shape: Shape of one input.
        z_dim: Width K of the code.
    """
    checks.integer("z_dim", z_dim, minimum=1)
    return DeterministicBottleneck(make_encoder(tuple(in_shape)), z_dim, in_shape)
