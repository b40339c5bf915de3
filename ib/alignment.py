"""Tangent-kernel alignment (Baratin, George, Laurent, Hjelm, Lajoie, Vincent & Lacoste-Julien, "Implicit
Regularization via Neural Feature Alignment", AISTATS 2021): how far the tangent features of a network line up
with the labels, layer by layer and in all.

For the c logits of n probe inputs, the tangent kernel is the (c n) x (c n) Gram matrix of the logits' gradients,
K[(a,i),(b,j)] = <d f_a(x_i)/d theta, d f_b(x_j)/d theta>, a sum over layers, K = sum_l K_l. Rows are ordered
logit-major: row a * n + i. Its alignment with the labels is the centred kernel-target alignment of the authors'
code (github.com/tfjgeorge/ntk_alignment, `alignment.py`):

    A = y^T K_c y / (||K_c||_F ||y||^2),   K_c = C K C,  C = I - 11^T / n on the example index,

with y the one-hot labels centred over the probe, flattened logit-major. A is 1 when K_c is proportional to y y^T
and does not change when K is scaled.

Each layer's block is built from what backpropagation gives, never from the Jacobian itself (the MNIST MLP's 2.4 M
parameters against 1,000 logits would be 9.5 GB):
- a Linear layer applied once per example: K_l = (D D^T) * (H H^T + 1) elementwise, with H [n, d_in] the layer's
  inputs and D [c n, d_out] the gradient of each logit with respect to the layer's outputs (the 1 is the bias);
- a Conv2d layer (or a Linear layer over extra positions): the per-example gradients G [c n, d_out (d_in k k + 1)]
  from the unfolded inputs and D, and K_l = G G^T.

Supported layers are `nn.Linear` and `nn.Conv2d` (groups 1, zero padding); `kernel_layers` names any other module
that holds parameters, since the whole network's kernel would silently leave it out.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ib.errors import ConfigError

SUPPORTED = (nn.Linear, nn.Conv2d)
MAX_GRADIENT_ELEMENTS = 1 << 28  # per-example gradients of one conv layer (1 GiB in float32) before it is refused


def kernel_layers(model: nn.Module, prefix_drop: str = "") -> Dict[str, nn.Module]:
    """The model's layers that hold trainable parameters, by module path (less `prefix_drop` where it starts
    one), in registration order.

    Raises:
        ConfigError: a module holding parameters is not a supported layer (`SUPPORTED`), or is a Conv2d with groups
            or a padding mode other than zeros.
    """
    layers, other = {}, []
    for name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if not isinstance(module, SUPPORTED) or (isinstance(module, nn.Conv2d) and (
                module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding, str))):
            other.append(f"{name} ({type(module).__name__})")
            continue
        layers[name.removeprefix(prefix_drop) if prefix_drop else name] = module
    if other:
        raise ConfigError(f"the tangent-kernel alignment supports Linear and Conv2d layers (groups 1, zero padding "
                          f"given as numbers); this model also has parameters in {', '.join(other[:4])}")
    return layers


def layer_kernels(fn: Callable[[Tensor], Tensor], layers: Mapping[str, nn.Module], x: Tensor,
                  dtype: Optional[torch.dtype] = None) -> Dict[str, Optional[Tensor]]:
    """Each layer's tangent kernel of the outputs of `fn` (logits [n, c]) on the inputs `x` [n, ...].

    `fn` must treat examples independently (eval mode: no batch statistics, no dropout). Gradients are taken with
    respect to the layers' parameters only; the caller's `.grad` fields are left alone.

    Args:
        fn: the network, x -> logits [n, c].
        layers: the layers, by name (`kernel_layers`).
        x: the probe inputs.
        dtype: of the kernels' products (default: the logits' dtype).

    Returns:
        {name: K_l [c n, c n]}, None for a layer that the logits do not depend on.
    """
    inputs: Dict[str, Tensor] = {}
    outputs: Dict[str, Tensor] = {}

    def keep(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:
            if name in outputs:
                raise ConfigError(f"layer {name} is applied twice in one forward pass; the alignment needs each layer "
                                  "once per example")
            inputs[name], outputs[name] = args[0].detach(), out
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    try:
        with torch.enable_grad():
            logits = fn(x)  # [n, c]
    finally:
        for h in handles:
            h.remove()
    n, c = logits.shape
    names = [name for name in layers if name in outputs and outputs[name].requires_grad]
    dtype = dtype or logits.dtype
    # D[name]: [c, n, *out_shape[1:]], the gradient of logit a summed over examples w.r.t. each layer's outputs
    # (examples are independent, so row i holds d f_a(x_i) / d out_i).
    grads: Dict[str, list] = {name: [] for name in names}
    for a in range(c):
        got = torch.autograd.grad(logits[:, a].sum(), [outputs[name] for name in names],
                                  retain_graph=a < c - 1, allow_unused=True)
        for name, g in zip(names, got):
            grads[name].append(g)
    kernels: Dict[str, Optional[Tensor]] = {name: None for name in layers}
    for name in names:
        if any(g is None for g in grads[name]):
            continue
        d = torch.stack(grads[name]).to(dtype)  # [c, n, *out]
        kernels[name] = _layer_kernel(layers[name], inputs[name].to(dtype), d)
    return kernels


def _layer_kernel(layer: nn.Module, h: Tensor, d: Tensor) -> Tensor:
    """One layer's block from its inputs `h` [n, ...] and output gradients `d` [c, n, ...]: [c n, c n]."""
    c, n = d.shape[:2]
    bias = layer.bias is not None and layer.bias.requires_grad
    weight = layer.weight.requires_grad
    if isinstance(layer, nn.Linear) and h.dim() == 2:  # one position per example: no per-example gradient formed
        dd = d.reshape(c * n, -1) @ d.reshape(c * n, -1).T  # [c n, c n]
        hh = (h @ h.T if weight else torch.zeros(n, n, dtype=h.dtype, device=h.device)) + (1.0 if bias else 0.0)
        return dd * hh.repeat(c, c)
    if isinstance(layer, nn.Linear):  # [n, ..., d_in]: positions are the middle dimensions
        u = h.reshape(n, -1, h.shape[-1])  # [n, P, d_in]
        dp = d.reshape(c, n, -1, d.shape[-1])  # [c, n, P, d_out]
    else:
        u = F.unfold(h, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                     stride=layer.stride).transpose(1, 2)  # [n, P, d_in k k]
        dp = d.flatten(3).transpose(2, 3)  # [c, n, P, d_out]
    parts = []
    if weight:
        size = c * n * dp.shape[-1] * u.shape[-1]
        if size > MAX_GRADIENT_ELEMENTS:
            raise ConfigError(f"a {tuple(layer.weight.shape)} layer's per-example gradients on {n} inputs would hold "
                              f"{size:,} numbers; use a smaller probe or name fewer layers")
        parts.append(torch.einsum("anpo,npi->anoi", dp, u).reshape(c * n, -1))
    if bias:
        parts.append(dp.sum(2).reshape(c * n, -1))
    g = torch.cat(parts, dim=1)  # [c n, parameters]
    return g @ g.T


def centre(kernel: Tensor, n: int) -> Tensor:
    """C K C with C = I - 11^T / n acting on the example index of each (logit, logit) block: [c n, c n]."""
    c = kernel.shape[0] // n
    k4 = kernel.reshape(c, n, c, n)
    k4 = k4 - k4.mean(1, keepdim=True) - k4.mean(3, keepdim=True) + k4.mean((1, 3), keepdim=True)
    return k4.reshape(c * n, c * n)


def target(y: Tensor, num_classes: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """One-hot labels centred over the probe, flattened logit-major: [c n]."""
    one_hot = F.one_hot(y, num_classes).to(dtype)  # [n, c]
    return (one_hot - one_hot.mean(0)).T.reshape(-1)


def kernel_alignment(kernel: Tensor, y: Tensor, num_classes: int) -> float:
    """Centred kernel-target alignment A = y^T K_c y / (||K_c||_F ||y||^2) of `kernel` [c n, c n] with the labels
    `y` [n], in float64; NaN when K_c or the centred labels are zero (one class only)."""
    n = y.shape[0]
    kc = centre(kernel.double(), n)
    v = target(y, num_classes).to(kc.device)
    denominator = float(kc.norm()) * float(v @ v)
    return float(v @ kc @ v) / denominator if denominator > 0 else math.nan


def effective_rank(kernel: Tensor) -> float:
    """exp of the entropy of the normalised eigenvalues of the PSD matrix `kernel` (1 for rank one, N for a multiple
    of the identity); NaN for the zero matrix."""
    eigenvalues = torch.linalg.eigvalsh(kernel.double()).clamp_min(0.0)
    total = float(eigenvalues.sum())
    if total <= 0:
        return math.nan
    p = eigenvalues / total
    return math.exp(float(-(p * p.clamp_min(1e-300).log()).sum()))


def alignments(kernels: Mapping[str, Optional[Tensor]], y: Tensor, num_classes: int,
               groups: Mapping[str, Sequence[str]] = ()) -> Dict[str, float]:
    """The alignment of the whole kernel ("all"), of each group of layers (their kernels summed), and of each layer;
    NaN for a layer or group that the logits do not depend on."""
    def total(names: Sequence[str]) -> Optional[Tensor]:
        present = [kernels[k] for k in names if kernels.get(k) is not None]
        return sum(present[1:], present[0].clone()) if present else None

    def align(k: Optional[Tensor]) -> float:
        return math.nan if k is None else kernel_alignment(k, y, num_classes)

    out = {"all": align(total(list(kernels)))}
    out.update({group: align(total(names)) for group, names in dict(groups).items()})
    out.update({name: align(k) for name, k in kernels.items()})
    return out
