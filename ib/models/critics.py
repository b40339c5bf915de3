"""Statistics networks T(x, z) for MINE and other variational MI bounds.

A factory takes the input shape and the code width positionally and its settings by keyword, and returns a
`Critic`. Here x is the raw [0, 1] input [B, *x_shape] and z a code [B, K].
"""
import math
from typing import Any, Literal, Optional, get_args

import torch
from torch import Tensor, nn

from ib import checks
from ib.models import noise
from ib.models.encoders import MLP, Activation, ConvNet, make_activation
from ib.registry import Registry

CRITICS = Registry("critic")

XBranch = Literal["flatten", "conv"]


class Critic(nn.Module):
    """Base of the statistics networks.

    A subclass implements `features` (the x branch, run once per x), `_pair` (scores of row-aligned feature/code
    pairs) and `_all_pairs` (scores of every feature/code pair); the public methods are built on them.
    """

    def features(self, x: Tensor) -> Tensor:
        """Features of x [B, *x_shape] -> [B, F]."""
        raise NotImplementedError

    def _pair(self, fx: Tensor, z: Tensor) -> Tensor:
        """fx [N, F], z [N, K] -> [N]."""
        raise NotImplementedError

    def _all_pairs(self, fx: Tensor, z: Tensor) -> Tensor:
        """fx [B, F], z [M, K] -> [B, M]."""
        raise NotImplementedError

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """Scores T(x_i, z_i) of the given pairs: x [B, *x_shape], z [B, K] -> [B]."""
        return self._pair(self.features(x), z)

    def scores(self, x: Tensor, z: Tensor) -> Tensor:
        """T(x_i, z_j) for all pairs, [B, B]; row i is x_i, so the diagonal holds the joint pairs."""
        return self._all_pairs(self.features(x), z)

    def pair_scores(self, x: Tensor, z: Tensor, z_shuffled: Tensor) -> tuple[Tensor, Tensor]:
        """Scores of the joint pairs (x_i, z_i), [B], and of shuffled pairs (x_i, z_shuffled_{p*B+i}), [P*B].

        `z_shuffled` stacks P shufflings of z ([P*B, K]; usually P = 1). One forward pass on the (P+1)*B pairs;
        the features of x are computed once and reused for every pairing.
        """
        b = x.shape[0]
        p = z_shuffled.shape[0] // b
        fx = self.features(x)  # [B, F]
        t = self._pair(fx.repeat(p + 1, 1), torch.cat([z, z_shuffled]))  # [(P+1)*B]
        return t[:b], t[b:]


class _SharedFirstLayer(torch.autograd.Function):
    """h = (fx W_x^T + b) tiled P+1 times + zz W_z^T, with W = [W_x | W_z] one Linear's weight.

    Autograd through two slices of W would build the weight's gradient from two zero-filled copies of W added
    together; this backward writes it in one piece, with no zero-filled copies to allocate and add.
    """

    generate_vmap_rule = True  # works under torch.func transforms (vmap over a population of models)

    @staticmethod
    def forward(fx: Tensor, zz: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        (b, f), h = fx.shape, weight.shape[0]
        h_x = torch.addmm(bias, fx, weight[:, :f].t())  # [B, H], once per x
        # broadcast over the P+1 tiles rather than `h_x.repeat`: no tiled copy to write and read back
        return ((zz @ weight[:, f:].t()).view(-1, b, h) + h_x).view(-1, h)  # [(P+1)*B, H]

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        fx, zz, weight, _ = inputs
        ctx.save_for_backward(fx, zz, weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        # Under bf16 autocast the forward ran in bf16 and so does this; autograd casts the gradients back to the
        # inputs' dtypes.
        fx, zz, weight = (t.to(grad.dtype) for t in ctx.saved_tensors)
        b, f = fx.shape
        grad_hx = grad.view(-1, b, grad.shape[1]).sum(0)  # [B, H]: the tiles of h_x add up
        need = ctx.needs_input_grad
        grad_fx = grad_hx @ weight[:, :f] if need[0] else None
        grad_zz = grad @ weight[:, f:] if need[1] else None
        grad_w = torch.cat([grad_hx.t() @ fx, grad.t() @ zz], dim=1) if need[2] else None  # [H, F + K]
        grad_b = grad_hx.sum(0) if need[3] else None
        return grad_fx, grad_zz, grad_w, grad_b


def shared_first_layer(fx: Tensor, zz: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """The first layer of a joint critic on (P+1)*B pairs whose x half repeats: fx [B, F] once, zz [(P+1)*B, K];
    weight [H, F + K], bias [H] -> [(P+1)*B, H] (row p*B + i pairs x_i with zz_{p*B+i})."""
    return _SharedFirstLayer.apply(fx, zz, weight, bias)


class JointCritic(Critic):
    """T(x, z) = MLP(concat(features(x), z)), with Gaussian noise on the MLP's input and after each hidden layer.

    This is the statistics network of the public MINE-IB ports (noise 0.3 on the input, 0.5 after each ELU layer).
    The noise is active only in training mode.

    Args:
        x_branch: Module computing features [B, F] of x.
        x_features: Width F of those features.
        z_dim: Width K of the code.
        hidden: Widths of the hidden layers (at least one).
        activation: Activation of the hidden layers.
        input_noise: Std of the noise added to concat(features(x), z).
        hidden_noise: Std of the noise added after each hidden activation.
    """

    def __init__(
        self,
        x_branch: nn.Module,
        x_features: int,
        z_dim: int,
        hidden: tuple[int, ...],
        activation: str,
        input_noise: float,
        hidden_noise: float,
    ) -> None:
        super().__init__()
        self.x_branch = x_branch
        self.x_features = x_features
        self.input_noise = input_noise
        self.hidden_noise = hidden_noise
        widths = (x_features + z_dim, *hidden)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.acts = nn.ModuleList(make_activation(activation) for _ in hidden)
        self.out = nn.Linear(hidden[-1], 1)

    def _noise(self, h: Tensor, std: float, joint_rows: int = 0) -> Tensor:
        """h + N(0, std^2) noise in training mode. With `joint_rows` = B > 0, h stacks B joint pairs over P*B
        shuffled ones [(P+1)*B, ...]: the shuffled rows take independent draws and the joint rows reuse the first
        shuffled block's (joint pair i shares its noise with its first shuffled twin)."""
        if not (self.training and std > 0):
            return h
        eps = noise.gaussian((h.shape[0] - joint_rows, *h.shape[1:]), like=h)
        if joint_rows and eps.shape[0] == joint_rows:  # P = 1: both blocks add the one draw (broadcast, no copy)
            return torch.add(h.view(2, joint_rows, *h.shape[1:]), eps, alpha=std).view(h.shape)
        if joint_rows:
            eps = torch.cat([eps[:joint_rows], eps])
        return torch.add(h, eps, alpha=std)

    def _from_first(self, h: Tensor, joint_rows: int = 0) -> Tensor:
        """Scores [...] from the pre-activation [..., H1] of the first hidden layer; `joint_rows` as in `_noise`."""
        h = self._noise(self.acts[0](h), self.hidden_noise, joint_rows)
        for layer, act in zip(self.layers[1:], self.acts[1:]):
            h = self._noise(act(layer(h)), self.hidden_noise, joint_rows)
        return self.out(h).squeeze(-1)

    def features(self, x: Tensor) -> Tensor:
        return self.x_branch(x)  # [B, F]

    def _pair(self, fx: Tensor, z: Tensor) -> Tensor:
        inputs = self._noise(torch.cat([fx, z], dim=-1), self.input_noise)  # [N, F + K]
        return self._from_first(self.layers[0](inputs))

    def pair_scores(self, x: Tensor, z: Tensor, z_shuffled: Tensor) -> tuple[Tensor, Tensor]:
        """As `Critic.pair_scores`, with the first layer split as W_x fx + W_z z + b: the x half (and its input
        noise) is computed once per x and shared by all its pairings, the z half per pair. On MNIST-sized inputs
        this saves about a quarter of the critic's arithmetic (784 of the first layer's 1,040 inputs).

        Every pair sees the paper network's noise (on x, on z, after each hidden layer). The joint pair (x_i, z_i)
        reuses the draws of its first shuffled twin (common random numbers): every score keeps its distribution and
        the shuffled scores stay independent of each other given the x draw, so the bound's expectation is
        unchanged, while the joint and shuffled scores of a row move together (the bound's spread over draws:
        0.0072 against 0.048 nats with independent draws on a random paper-sized critic, tests/test_models.py)
        and the noise costs B fewer normal draws per layer. The x draw is shared by all pairings of x_i, as the x
        half is computed once: with P > 1 it correlates the P shuffled scores of a row.
        """
        b = x.shape[0]
        first = self.layers[0]
        fx = self._noise(self.features(x), self.input_noise)  # [B, F]
        zz = self._noise(torch.cat([z, z_shuffled]), self.input_noise, joint_rows=b)  # [(P+1)*B, K]
        h = shared_first_layer(fx, zz, first.weight, first.bias)  # [(P+1)*B, H1]
        t = self._from_first(h, joint_rows=b)  # [(P+1)*B]
        return t[:b], t[b:]

    def _all_pairs(self, fx: Tensor, z: Tensor) -> Tensor:
        # Cost: the MLP runs on all B * M pairs, so memory and time grow as B^2; fine for batches of a few
        # hundred. Without input noise the first layer splits as W_x fx_i + W_z z_j + b, which avoids building the
        # [B, M, F + K] input; with input noise each pair needs its own noise, so the pairs are tiled.
        b, m = fx.shape[0], z.shape[0]
        first = self.layers[0]
        if self.training and self.input_noise > 0:
            pairs = torch.cat([fx.unsqueeze(1).expand(b, m, -1), z.unsqueeze(0).expand(b, m, -1)], dim=-1)
            return self._from_first(first(self._noise(pairs, self.input_noise)))  # [B, M]
        w_x, w_z = first.weight[:, : self.x_features], first.weight[:, self.x_features :]  # [H1, F], [H1, K]
        h = (fx @ w_x.T).unsqueeze(1) + (z @ w_z.T + first.bias).unsqueeze(0)  # [B, M, H1]
        return self._from_first(h)


class SeparableCritic(Critic):
    """T(x, z) = <g(x), h(z)> with two MLP embeddings, so all B x B scores cost one matmul.

    Args:
        x_branch: Module computing features [B, F] of x.
        x_features: Width F of those features.
        z_dim: Width K of the code.
        hidden: Hidden widths of both embeddings.
        embed_dim: Width of the embeddings.
        activation: Activation of the hidden layers.
    """

    def __init__(
        self,
        x_branch: nn.Module,
        x_features: int,
        z_dim: int,
        hidden: tuple[int, ...],
        embed_dim: int,
        activation: str,
    ) -> None:
        super().__init__()
        self.x_branch = x_branch
        self.g = MLP(x_features, hidden, activation, out_features=embed_dim)
        self.h = MLP(z_dim, hidden, activation, out_features=embed_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.g(self.x_branch(x))  # [B, D]

    def _pair(self, fx: Tensor, z: Tensor) -> Tensor:
        return (fx * self.h(z)).sum(-1)  # [N]

    def _all_pairs(self, fx: Tensor, z: Tensor) -> Tensor:
        return fx @ self.h(z).T  # [B, M]


def _x_branch(
    x_shape: tuple[int, ...], kind: str, channels: tuple[int, ...], features: int, activation: str
) -> tuple[nn.Module, int]:
    """The x branch and its width: the flattened input, or a conv net (conv3x3-act-pool stages, Linear, act)."""
    if kind == "flatten":
        return nn.Flatten(), math.prod(x_shape)
    net = ConvNet(checks.image_shape("x_branch 'conv'", x_shape), channels, features, activation)
    return net, net.out_features


def _check_branch(
    x_branch: str, x_channels: tuple[int, ...], x_features: int, activation: str
) -> tuple[int, ...]:
    checks.choice("x_branch", x_branch, get_args(XBranch))
    checks.choice("activation", activation, get_args(Activation))
    checks.integer("x_features", x_features, minimum=1)
    return checks.widths("x_channels", x_channels)


@CRITICS.register()
def joint(
    x_shape: tuple[int, ...],
    z_dim: int,
    /,
    *,
    hidden: tuple[int, ...] = (512, 512),
    activation: Activation = "elu",
    input_noise: float = 0.3,
    hidden_noise: float = 0.5,
    x_branch: XBranch = "flatten",
    x_channels: tuple[int, ...] = (32, 64),
    x_features: int = 128,
) -> Critic:
    """Statistics network on concat(x, z), with Gaussian noise on its input and hidden layers in training.

    Args:
        x_shape: Shape of one input x.
        z_dim: Width K of the code.
        hidden: Widths of the hidden layers (at least one).
        activation: Activation of the hidden layers (and of the conv branch).
        input_noise: Std of the noise on the concatenated input.
        hidden_noise: Std of the noise after each hidden layer.
        x_branch: "flatten" feeds the raw pixels; "conv" (for images such as CIFAR) feeds conv-net features.
        x_channels: Channels of the conv branch's stages.
        x_features: Width of the conv branch's output.
    """
    hidden = checks.widths("hidden", hidden, allow_empty=False)
    x_channels = _check_branch(x_branch, x_channels, x_features, activation)
    input_noise = checks.non_negative("input_noise", input_noise)
    hidden_noise = checks.non_negative("hidden_noise", hidden_noise)
    branch, width = _x_branch(x_shape, x_branch, x_channels, x_features, activation)
    return JointCritic(branch, width, z_dim, hidden, activation, input_noise, hidden_noise)


@CRITICS.register()
def separable(
    x_shape: tuple[int, ...],
    z_dim: int,
    /,
    *,
    hidden: tuple[int, ...] = (256,),
    embed_dim: int = 64,
    activation: Activation = "elu",
    x_branch: XBranch = "flatten",
    x_channels: tuple[int, ...] = (32, 64),
    x_features: int = 128,
) -> Critic:
    """Separable critic T(x, z) = <g(x), h(z)>.

    Args:
        x_shape: Shape of one input x.
        z_dim: Width K of the code.
        hidden: Hidden widths of both embeddings g and h.
        embed_dim: Width of the embeddings.
        activation: Activation of the hidden layers (and of the conv branch).
        x_branch: "flatten" feeds the raw pixels to g; "conv" feeds conv-net features.
        x_channels: Channels of the conv branch's stages.
        x_features: Width of the conv branch's output.
    """
    hidden = checks.widths("hidden", hidden)
    checks.integer("embed_dim", embed_dim, minimum=1)
    x_channels = _check_branch(x_branch, x_channels, x_features, activation)
    branch, width = _x_branch(x_shape, x_branch, x_channels, x_features, activation)
    return SeparableCritic(branch, width, z_dim, hidden, embed_dim, activation)
