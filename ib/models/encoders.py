"""Encoders: networks mapping inputs [B, *in_shape] to features [B, out_features].

A factory takes the input shape positionally (the library supplies it) and its settings by keyword (a recipe sets
them); the module it returns has an ``out_features`` attribute that bottleneck heads size themselves from. Settings
are checked with `ib.checks`.
"""
import math
from typing import Literal, Optional, Sequence, get_args

from torch import Tensor, nn

from ib import checks
from ib.models import functional
from ib.registry import Registry

ENCODERS = Registry("encoder")

Activation = Literal["relu", "elu", "gelu", "tanh"]


class ELU(nn.ELU):
    """nn.ELU (alpha 1), computed through `exp` on the CPU (see `ib.models.functional`)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.inplace and self.alpha == 1.0:
            return functional.elu(x)
        return super().forward(x)


_ACTIVATIONS = {"relu": nn.ReLU, "elu": ELU, "gelu": nn.GELU, "tanh": nn.Tanh}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module for one of the names in `Activation`."""
    return _ACTIVATIONS[checks.choice("activation", name, get_args(Activation))]()


class MLP(nn.Sequential):
    """Linear layers, each followed by an activation, then an optional last Linear without one.

    Args:
        in_features: Input width.
        hidden: Widths of the activated layers; empty for none.
        activation: Name of the activation.
        out_features: Width of a last, linear layer; None for no such layer.
        dropout: Probability of dropping each activated unit in training (nn.Dropout after each activation); 0 for
            none.
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int],
        activation: str = "relu",
        out_features: Optional[int] = None,
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_features is not None:
            layers.append(nn.Linear(width, out_features))
            width = out_features
        super().__init__(*layers)
        self.out_features = width


class MLPEncoder(nn.Module):
    """Flattens the input and applies an `MLP`: the 784-1024-1024 ReLU encoder of the MNIST experiments."""

    def __init__(self, in_shape: Sequence[int], hidden: Sequence[int], activation: str, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = MLP(math.prod(in_shape), hidden, activation, dropout=dropout)
        self.out_features = self.net.out_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))  # [B, out_features]


class ConvNet(nn.Module):
    """Stages of conv3x3-activation-maxpool, then flatten -> Linear -> activation.

    A stage pools only while the feature map is at least 2x2, so the same settings fit 8x8, 28x28 and 32x32 images.

    Args:
        in_shape: (C, H, W) of the input.
        channels: Output channels of each stage.
        hidden: Width of the final Linear layer, which is `out_features`.
        activation: Name of the activation.
    """

    def __init__(self, in_shape: Sequence[int], channels: Sequence[int], hidden: int, activation: str) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        for out_channels in channels:
            layers += [nn.Conv2d(c, out_channels, 3, padding=1), make_activation(activation)]
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out_channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c * h * w, hidden)
        self.act = make_activation(activation)
        self.out_features = hidden

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(self.features(x).flatten(1)))  # [B, hidden]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-18 with the CIFAR stem: a stride-1 3x3 convolution and no max-pool, then global average pooling.

    Args:
        in_channels: Channels of the input image.
        width: Channels of the first stage; the stages have width * (1, 2, 4, 8) and `out_features` = 8 * width.
        blocks: BasicBlocks per stage.
    """

    def __init__(self, in_channels: int, width: int = 64, blocks: Sequence[int] = (2, 2, 2, 2)) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_planes = width
        for i, n in enumerate(blocks):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            stage = [BasicBlock(in_planes, planes, stride)] + [BasicBlock(planes, planes) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_features = in_planes
        # Initialisation as in torchvision's ResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)  # [B, 8 * width]


@ENCODERS.register()
def mlp(
    in_shape: tuple[int, ...],
    /,
    *,
    hidden: tuple[int, ...] = (1024, 1024),
    activation: Activation = "relu",
    dropout: float = 0.0,
) -> nn.Module:
    """Flatten, then Linear + activation per hidden width (the MNIST setup is 784-1024-1024 ReLU).

    Args:
        in_shape: Shape of one input, without the batch dimension.
        hidden: Widths of the layers; empty for the flattened input itself.
        activation: Activation after each layer.
        dropout: Dropout probability after each activation, in training only (the classic regulariser of the
            MNIST comparisons; 0 for none).
    """
    hidden = checks.widths("hidden", hidden)
    checks.choice("activation", activation, get_args(Activation))
    dropout = checks.probability("dropout", dropout)
    return MLPEncoder(in_shape, hidden, activation, dropout)


@ENCODERS.register()
def convnet(
    in_shape: tuple[int, ...],
    /,
    *,
    channels: tuple[int, ...] = (32, 64),
    hidden: int = 256,
    activation: Activation = "relu",
) -> nn.Module:
    """A small conv net (conv3x3-act-maxpool per stage), then flatten -> Linear(hidden) -> act.

    Args:
        in_shape: (C, H, W) of one input.
        channels: Output channels of each stage.
        hidden: Width of the final layer.
        activation: Activation after each convolution and the final layer.
    """
    shape = checks.image_shape("convnet", in_shape)
    channels = checks.widths("channels", channels)
    checks.integer("hidden", hidden, minimum=1)
    checks.choice("activation", activation, get_args(Activation))
    return ConvNet(shape, channels, hidden, activation)


@ENCODERS.register()
def resnet18_cifar(in_shape: tuple[int, ...], /, *, width: int = 64) -> nn.Module:
    """ResNet-18 with the CIFAR stem; `out_features` = 8 * width.

    Args:
        in_shape: (C, H, W) of one input.
        width: Channels of the first stage (64 in the standard network).
    """
    c, _, _ = checks.image_shape("resnet18_cifar", in_shape)
    return ResNetCifar(c, checks.integer("width", width, minimum=1))
