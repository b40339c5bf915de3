"""Elementwise functions whose CPU kernels in torch are not vectorised, computed through vectorised ones; and the
hidden activations with their derivatives, for backward passes written by hand.

torch's CPU ELU and softplus call scalar `expm1` and `log1p` per element (benchmarks/cpu_kernels.py: 5.8x and 3.3x
slower than these on 2 CPU cores). The paper's statistics network runs two ELUs on every pair each step and the
Gaussian bottleneck a softplus on every code; these versions give torch's values to float rounding (tests compare
them over the whole float range). They take float32 and float64 on the CPU; other dtypes (bf16, where e^x - 1 near
0 would lose its digits) and other devices use torch's kernels.
"""
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _ELUByExp(torch.autograd.Function):
    """ELU (alpha 1) as e^min(x, 0) - 1 + max(x, 0), with torch's own ELU backward (from the input, so that the
    output may be changed in place). Differences up to 6e-8 (the rounding of e^x - 1 near 0)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return torch.exp(x.clamp(max=0.0)).sub_(1.0).add_(x.clamp(min=0.0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, False, x)


class _SoftplusByExp(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log1p(e^-|x|), with log1p(w) = log(u) - ((u - 1) - w) / u for u = 1 + w
    (the rounding of 1 + w corrected to first order; relative error below 2e-7 wherever the result is a normal
    float); gradient sigmoid(x)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        w = x.abs().neg_().exp_()  # e^-|x| in (0, 1]
        u = w + 1.0
        return torch.log(u).sub_((u - 1.0).sub_(w).div_(u)).add_(x.clamp(min=0.0))

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def _by_exp(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def elu(x: Tensor) -> Tensor:
    """F.elu(x) (alpha 1)."""
    return _ELUByExp.apply(x) if _by_exp(x) else F.elu(x)


def activation_and_derivative(name: str, h: Tensor) -> tuple[Tensor, Tensor]:
    """act(h) and act'(h) elementwise for the hidden activations of `ib.models.encoders.Activation`, in
    float32/float64 on the CPU (the joint critic's hand-written MLP saves the derivative so that its backward is
    one multiply per layer). Values as the activation modules give them on the CPU (ELU as `elu` above, through
    exp); the derivative at 0 is torch's (0 for ReLU, 1 for ELU). `h` is overwritten."""
    if name == "elu":
        d = h.clamp(max=0.0).exp_()  # e^min(h, 0): 1 where h > 0, e^h elsewhere
        return (d - 1.0).add_(h.clamp_(min=0.0)), d
    if name == "relu":
        d = (h > 0).to(h.dtype)
        return h.clamp_(min=0.0), d
    if name == "tanh":
        a = h.tanh_()
        return a, torch.mul(a, a).neg_().add_(1.0)
    if name == "gelu":
        return F.gelu(h), torch.ops.aten.gelu_backward(torch.ones_like(h), h)
    raise ValueError(f"unknown activation {name!r}; expected one of: elu, gelu, relu, tanh")


def softplus(x: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20: in float32 both return x above it; in float64 this one keeps the
    e^-x that torch's drops there)."""
    return _SoftplusByExp.apply(x) if _by_exp(x) else F.softplus(x)
