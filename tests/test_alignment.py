"""ib.alignment: the fast per-layer tangent kernels against full Jacobians, and the alignment's closed forms."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ib.alignment import (alignments, centre, effective_rank, kernel_alignment, kernel_layers, layer_kernels,
                          target)
from ib.errors import ConfigError


def brute_force_kernels(model: nn.Module, x: torch.Tensor) -> dict:
    """K_l = J_l J_l^T with J_l the full Jacobian of the logit-major flattened logits [c n] with respect to layer
    l's parameters, from torch.autograd.functional.jacobian."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = {}
    for layer, module in kernel_layers(model).items():
        names = [f"{layer}.{p}" for p, _ in module.named_parameters(recurse=False)]

        def logits(*values, names=names):
            return functional_call(model, {**params, **dict(zip(names, values))}, (x,)).T.reshape(-1)

        jac = torch.autograd.functional.jacobian(logits, tuple(params[k] for k in names))
        j = torch.cat([part.reshape(part.shape[0], -1) for part in jac], dim=1)  # [c n, parameters of the layer]
        out[layer] = j @ j.T
    return out


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def tiny_convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, bias=False),
                         nn.ELU(), nn.Flatten(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("make, shape", [(tiny_mlp, (7, 6)), (tiny_convnet, (7, 2, 4, 4))])
def test_fast_layer_kernels_equal_full_jacobians(make, shape):
    """Each layer's kernel (the Linear identity (D D^T) * (H H^T + 1), the conv per-example gradients) equals
    J_l J_l^T to float64 rounding, and so does their sum, the whole network's kernel."""
    model = make()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    fast = layer_kernels(model, kernel_layers(model), x)
    slow = brute_force_kernels(model, x)
    assert fast.keys() == slow.keys() and len(fast) == 3
    scale = max(float(k.abs().max()) for k in slow.values())
    for name in slow:
        assert fast[name].shape == (3 * 7, 3 * 7)
        torch.testing.assert_close(fast[name], slow[name], rtol=0, atol=1e-12 * scale)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    for name in slow:
        assert kernel_alignment(fast[name], y, 3) == pytest.approx(kernel_alignment(slow[name], y, 3), abs=1e-12)
    whole = sum(slow.values())
    assert alignments(fast, y, 3)["all"] == pytest.approx(kernel_alignment(whole, y, 3), abs=1e-12)


def test_the_caller_s_gradients_are_left_alone():
    model = tiny_mlp()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    layer_kernels(model, kernel_layers(model), torch.randn(4, 6, dtype=torch.float64))
    assert all(bool((p.grad == 1).all()) for p in model.parameters())


def test_alignment_closed_forms():
    """A = 1 for K proportional to the centred label kernel y y^T (centred or not: C y = y), A = 0 for a K_c
    orthogonal to it, and A does not change when K is scaled."""
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    v = target(y, 3)  # [c n] = [24]
    assert float(v.reshape(3, 8).sum(1).abs().max()) < 1e-15  # centred over the examples
    assert kernel_alignment(3.7 * torch.outer(v, v), y, 3) == pytest.approx(1.0, abs=1e-12)
    # orthogonal: the projection of a random PSD kernel off v (P K P with P = I - v v^T / |v|^2), centred
    a = torch.randn(24, 24, generator=g, dtype=torch.float64)
    p = torch.eye(24, dtype=torch.float64) - torch.outer(v, v) / (v @ v)
    k = centre(p @ a @ a.T @ p, 8)
    assert kernel_alignment(k, y, 3) == pytest.approx(0.0, abs=1e-12)
    psd = a @ a.T
    assert kernel_alignment(1e-6 * psd, y, 3) == pytest.approx(kernel_alignment(psd, y, 3), rel=1e-12)
    assert math.isnan(kernel_alignment(psd, torch.zeros(8, dtype=torch.long), 3))  # one class: no target


def test_random_feature_linear_model_matches_its_closed_form():
    """For logits f_a(x) = sum_k W[a,k] phi_k(x) with fixed random features phi [n, m], the tangent kernel is
    delta_ab <phi(x_i), phi(x_j)> (identity over logits, the feature Gram over examples), so
    A = sum_a Y_a^T (C G C) Y_a / (sqrt(c) ||C G C||_F ||Y||^2) with Y the centred one-hot labels."""
    g = torch.Generator().manual_seed(3)
    n, d, m, c = 12, 5, 40, 4
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    features = torch.cos(x @ torch.randn(d, m, generator=g, dtype=torch.float64))  # [n, m]
    readout = nn.Linear(m, c, bias=False).double()
    kernels = layer_kernels(readout, kernel_layers(readout), features)
    y = torch.arange(n) % c
    gram = centre(features @ features.T, n)  # [n, n]
    labels = torch.nn.functional.one_hot(y, c).double()
    labels = labels - labels.mean(0)
    expected = float(torch.einsum("ia,ij,ja->", labels, gram, labels)) / (
        math.sqrt(c) * float(gram.norm()) * float((labels ** 2).sum()))
    (kernel,) = kernels.values()
    assert kernel_alignment(kernel, y, c) == pytest.approx(expected, abs=1e-12)


def test_effective_rank():
    assert effective_rank(torch.eye(6, dtype=torch.float64) * 2.5) == pytest.approx(6.0, rel=1e-12)
    v = torch.randn(6, dtype=torch.float64)
    assert effective_rank(torch.outer(v, v)) == pytest.approx(1.0, rel=1e-9)
    assert math.isnan(effective_rank(torch.zeros(3, 3)))


def test_a_layer_the_logits_do_not_use_gives_nan_not_a_crash():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            self.unused(x)  # computed, not part of the logits
            return self.used(x)

    model = TwoHeads().double()
    kernels = layer_kernels(model, kernel_layers(model), torch.randn(5, 3, dtype=torch.float64))
    assert kernels["unused"] is None and kernels["used"] is not None
    result = alignments(kernels, torch.tensor([0, 1, 0, 1, 1]), 2)
    assert math.isnan(result["unused"]) and not math.isnan(result["used"]) and result["all"] == result["used"]


def test_unsupported_layers_are_named():
    with pytest.raises(ConfigError, match=r"bn \(BatchNorm1d\)"):
        kernel_layers(nn.ModuleDict({"fc": nn.Linear(2, 2), "bn": nn.BatchNorm1d(2)}))
