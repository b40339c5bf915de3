"""Elementwise functions whose CPU kernels in torch are not vectorised, computed through vectorised ones.

torch's CPU ELU and softplus call scalar `expm1` and `log1p` per element, which makes them several times slower
than these exp-based versions (benchmarks/results/cpu_kernels.md). The paper's statistics network runs two ELUs on
every pair each step and the Gaussian bottleneck a softplus on every code; these versions give torch's values to
float rounding (tests compare them over the whole float range). They take float32 and float64 on the CPU; other
dtypes (bf16, where e^x - 1 near 0 would lose its digits) and other devices use torch's kernels.
"""
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


class _ELUByExp(torch.autograd.Function):
    """ELU (alpha 1) as e^min(x, 0) - 1 + max(x, 0), with torch's own ELU backward (from the input, so that the
    output may be changed in place). Differences up to 6e-8 (the rounding of e^x - 1 near 0)."""

    generate_vmap_rule = True  # works under torch.func transforms (vmap over a population of models)

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return torch.exp(x.clamp(max=0.0)).sub_(1.0).add_(x.clamp(min=0.0))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return torch.ops.aten.elu_backward(grad, 1.0, 1.0, 1.0, False, x)


class _SoftplusByExp(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log1p(e^-|x|), with log1p(w) = log(u) - ((u - 1) - w) / u for u = 1 + w
    (the rounding of 1 + w corrected to first order; relative error below 2e-7 wherever the result is a normal
    float); gradient sigmoid(x)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor) -> Tensor:
        w = x.abs().neg_().exp_()  # e^-|x| in (0, 1]
        u = w + 1.0
        return torch.log(u).sub_((u - 1.0).sub_(w).div_(u)).add_(x.clamp(min=0.0))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def _by_exp(x: Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def elu(x: Tensor) -> Tensor:
    """F.elu(x) (alpha 1)."""
    return _ELUByExp.apply(x) if _by_exp(x) else F.elu(x)


def softplus(x: Tensor) -> Tensor:
    """F.softplus(x) (beta 1, threshold 20: in float32 both return x above it; in float64 this one keeps the
    e^-x that torch's drops there)."""
    return _SoftplusByExp.apply(x) if _by_exp(x) else F.softplus(x)
