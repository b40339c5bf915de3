"""The CPU versions of ELU and softplus against torch's kernels, in value and gradient, over the float range."""
import pytest
import torch
import torch.nn.functional as F

from ib.models import functional
from ib.models.encoders import make_activation
from ib.models.functional import _ELUByExp, _SoftplusByExp

SPECIAL = [0.0, -1e-8, 1e-8, -20.0, 20.0, 20.5, -88.0, -103.0, -200.0, 88.0, 1e30, -1e30]


def test_elu_by_exp_matches_torch_elu_in_value_and_gradient():
    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor(SPECIAL)]).requires_grad_()
    ours = make_activation("elu")(x)  # the activation the recipes' "elu" builds
    ref = F.elu(x)
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)
    g = torch.randn_like(x)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad_ours, grad_ref, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(_ELUByExp.apply, (torch.randn(7, dtype=torch.float64, requires_grad=True),))


def test_softplus_matches_torch_to_float_rounding_over_the_whole_range():
    x = torch.cat([torch.linspace(-110, 110, 400_001), torch.tensor(SPECIAL)])
    ours, ref = functional.softplus(x), F.softplus(x.double())
    normal = ref > torch.finfo(torch.float32).tiny  # below it the result is subnormal (or 0) in both
    rel = ((ours.double() - ref).abs() / ref)[normal]
    assert rel.max() < 3e-7  # torch's own float32 softplus: 1.7e-7 against float64
    assert (ours[~normal] <= 2 * torch.finfo(torch.float32).tiny).all()
    assert ours.dtype == torch.float32 and (ours >= 0).all()
    # the Gaussian bottleneck's working range, where the std sits (softplus(-5) ~ 0.0067): 2 ulp of torch's
    mid = torch.linspace(-30, 30, 10_001)
    torch.testing.assert_close(functional.softplus(mid), F.softplus(mid), rtol=2.5e-7, atol=0)


def test_softplus_edge_values_and_gradient():
    edge = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0])
    out = functional.softplus(edge)
    assert out[0] == float("inf") and out[1] == 0 and out[2].isnan()
    assert abs(out[3].item() - 0.6931471805599453) < 1e-7
    x = torch.cat([torch.linspace(-40, 40, 801), torch.tensor(SPECIAL[:6])]).requires_grad_()
    g = torch.randn_like(x)
    (ours,) = torch.autograd.grad(functional.softplus(x), x, g)
    (ref,) = torch.autograd.grad(F.softplus(x), x, g)
    torch.testing.assert_close(ours, ref, atol=1e-7, rtol=1e-6)
    x64 = (torch.randn(9, dtype=torch.float64) * 5).requires_grad_()
    assert torch.autograd.gradcheck(_SoftplusByExp.apply, (x64,))


def test_float64_goes_through_exp_to_double_rounding():
    x = torch.linspace(-30, 30, 6001, dtype=torch.float64)  # non-integer points, 0 and near-0 included
    exact = torch.logaddexp(x, torch.zeros_like(x))  # (torch's softplus returns x above 20: e^-x, ~2e-9, off)
    torch.testing.assert_close(functional.softplus(x), exact, rtol=1e-14, atol=0)
    torch.testing.assert_close(functional.elu(x), F.elu(x), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_uses_torch_kernels(dtype):
    # in bf16, e^x - 1 near 0 would lose its digits (elu(-0.001) would read 0): torch's kernels are used instead
    x = torch.linspace(-0.05, 0.05, 101).to(dtype)
    assert torch.equal(functional.elu(x), F.elu(x)) and torch.equal(functional.softplus(x), F.softplus(x))
    assert float(functional.elu(torch.tensor(-0.001, dtype=dtype))) < 0


def test_other_devices_use_torch_kernels():
    m = torch.linspace(-5, 5, 11, device="meta")
    assert functional.softplus(m).device.type == "meta" and functional.elu(m).shape == (11,)
