"""Tests of ib.models: every encoder's and bottleneck's shapes and gradients, the bottlenecks' noise, the classifier,
the settings' validation and the factory convention the recipe validator relies on (the critics: test_critics.py)."""
import inspect
import math
import types
import typing
from typing import Literal, Union

import pytest
import torch
import torch.nn.functional as F

from ib.errors import ConfigError
from ib.models import BOTTLENECKS, CRITICS, ENCODERS, IBClassifier, build_classifier
from ib.models.encoders import mlp

SHAPES = [(1, 8, 8), (1, 28, 28), (3, 32, 32)]
# Small settings so that the file runs in seconds; an entry not listed runs with its defaults.
SMALL_ENCODER = {
    "mlp": {"hidden": (16, 16)},
    "convnet": {"channels": (4, 8), "hidden": 16},
    "resnet18_cifar": {"width": 8},
}
ENCODER_SHAPES = {"resnet18_cifar": [(3, 32, 32)]}
K = 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small_encoder(shape):
    return mlp(shape, hidden=(16,))


def _bottleneck(name, shape=(1, 8, 8), **kwargs):
    return BOTTLENECKS.create(name, _small_encoder, shape, **{"z_dim": K, **kwargs})


def _assert_backward(module, out):
    out.square().mean().backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


# Encoders.


@pytest.mark.parametrize(
    "name,shape",
    [(n, s) for n in ENCODERS.names() for s in ENCODER_SHAPES.get(n, SHAPES)],
)
def test_encoder_shape_and_backward(name, shape):
    enc = ENCODERS.create(name, shape, **SMALL_ENCODER.get(name, {}))
    out = enc(torch.rand(2, *shape))
    assert out.shape == (2, enc.out_features)
    assert torch.isfinite(out).all()
    _assert_backward(enc, out)


def test_mlp_paper_widths():
    enc = ENCODERS.create("mlp", (1, 28, 28))
    assert [m.weight.shape for m in enc.modules() if isinstance(m, torch.nn.Linear)] == [(1024, 784), (1024, 1024)]


def test_resnet18_cifar_structure():
    enc = ENCODERS.create("resnet18_cifar", (3, 32, 32), width=8)
    assert enc.out_features == 64
    convs = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].stride == (1, 1) and convs[0].kernel_size == (3, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in enc.modules())
    # 1 stem conv + 8 blocks x 2 convs + 3 projection shortcuts.
    assert len(convs) == 20
    bns = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in bns)


# Bottlenecks.


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", BOTTLENECKS.names())
def test_bottleneck_shape_and_backward(name, shape):
    b = _bottleneck(name, shape)
    assert b.z_dim == K
    for sample in (False, True):
        code = b(torch.rand(3, *shape), sample=sample)
        assert code.z.shape == (3, K)
        assert torch.isfinite(code.z).all()
    _assert_backward(b, code.z)  # through the sampled code
    assert b.sample_z(torch.rand(3, *shape), 4).shape == (4, 3, K)


def test_gaussian_code_is_reparameterised():
    # z = mean + std * eps: d(w . z)/d mean = w and d(w . z)/d std = w * eps, with eps = (z - mean) / std.
    torch.manual_seed(0)
    code = _bottleneck("gaussian")(torch.rand(3, 1, 8, 8))
    code.mean.retain_grad()
    code.std.retain_grad()
    w = torch.randn(3, K)
    (w * code.z).sum().backward()
    torch.testing.assert_close(code.mean.grad, w)
    torch.testing.assert_close(code.std.grad, w * (code.z - code.mean).detach() / code.std.detach())


@pytest.mark.parametrize("name", BOTTLENECKS.names())
def test_bottleneck_with_convnet(name):
    make = lambda s: ENCODERS.create("convnet", s, channels=(4,), hidden=8)  # noqa: E731
    b = BOTTLENECKS.create(name, make, (3, 32, 32), z_dim=K)
    assert b(torch.rand(2, 3, 32, 32)).z.shape == (2, K)


@pytest.mark.parametrize("name", BOTTLENECKS.names())
def test_mean_code_is_deterministic(name):
    b, x = _bottleneck(name), torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(b(x, sample=False).z, b(x, sample=False).z, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in BOTTLENECKS.names() if n != "deterministic"])
def test_sampled_code_is_random(name):
    b, x = _bottleneck(name), torch.rand(4, 1, 8, 8)
    assert not torch.equal(b(x).z, b(x).z)
    assert not torch.equal(b(x).z, b(x, sample=False).z)


def test_deterministic_ignores_sample():
    b, x = _bottleneck("deterministic"), torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(b(x, sample=True).z, b(x, sample=False).z, rtol=0, atol=0)
    assert b(x).mean is None and b(x).std is None


def test_gaussian_code():
    b, x = _bottleneck("gaussian"), torch.rand(4, 1, 8, 8)
    code = b(x, sample=False)
    assert (code.std > 0).all()
    torch.testing.assert_close(code.z, code.mean, rtol=0, atol=0)


def test_gaussian_sampling_matches_mean_and_std():
    b, x = _bottleneck("gaussian", std_offset=0.0), torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        code = b(x, sample=False)
        z = b.sample_z(x, 20000)  # [S, B, K]
        z_loop = torch.stack([b(x).z for _ in range(2000)])
    # Standard errors: std / sqrt(S) for the mean and about std / sqrt(2 S) for the std.
    torch.testing.assert_close(z.mean(0), code.mean, rtol=0, atol=float(5 * code.std.max() / math.sqrt(20000)))
    torch.testing.assert_close(z.std(0), code.std, rtol=0.04, atol=0)
    torch.testing.assert_close(z_loop.std(0), code.std, rtol=0.12, atol=0)


@pytest.mark.parametrize("name", BOTTLENECKS.names())
def test_a_float64_classifier_stays_float64(name):
    model = build_classifier("mlp", {"hidden": (8,)}, name, {"z_dim": 4}, in_shape=(1, 4, 4), num_classes=3,
                             mean=(0.5,), std=(0.25,)).double()
    x = torch.rand(5, 1, 4, 4, dtype=torch.float64)
    code = model.encode(x)
    assert code.z.dtype == model(x).dtype == torch.float64


def test_gaussian_softplus_parameterisation():
    b = _bottleneck("gaussian")
    bias = torch.linspace(-3, 8, 2 * K)
    with torch.no_grad():
        b.head.weight.zero_()
        b.head.bias.copy_(bias)
    code = b(torch.rand(3, 1, 8, 8))
    torch.testing.assert_close(code.mean, bias[:K].expand(3, K), rtol=0, atol=0)
    # (ib computes the softplus through exp on the CPU: equal to float rounding)
    torch.testing.assert_close(code.std, F.softplus(bias[K:] - 5.0).expand(3, K), rtol=2.5e-7, atol=0)


def test_additive_noise_scale():
    # A linear encoder and head: z(x + sigma eps) - z(x) = W sigma eps has std sigma * ||w_k||.
    b = BOTTLENECKS.create("additive", lambda s: mlp(s, hidden=()), (1, 4, 4), z_dim=2, sigma=0.3)
    x = torch.rand(1, 1, 4, 4).expand(20000, -1, -1, -1)
    with torch.no_grad():
        dz = b(x).z - b(x, sample=False).z
    torch.testing.assert_close(dz.std(0), 0.3 * b.head.weight.norm(dim=1), rtol=0.04, atol=0)


@pytest.mark.parametrize(
    "layout,shape,enc_in",
    [("channels", (3, 8, 8), (3 + 16) * 64), ("features", (3, 8, 8), 192 + 16), ("channels", (10,), 10 + 16)],
)
def test_propagated_encoder_input(layout, shape, enc_in):
    b = BOTTLENECKS.create("propagated", lambda s: mlp(s, hidden=(8,)), shape, z_dim=K, layout=layout)
    assert b.encoder.net[0].in_features == enc_in
    assert b(torch.rand(2, *shape)).z.shape == (2, K)


# Classifier.


@pytest.mark.parametrize("name", BOTTLENECKS.names())
def test_classifier_predict_proba(name):
    model = build_classifier("mlp", {"hidden": (16,)}, name, {"z_dim": K}, (1, 8, 8), 10, (0.5,), (0.25,)).eval()
    x = torch.rand(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    for samples in (0, 3):
        p = model.predict_proba(x, samples=samples)
        assert p.shape == (4, 10)
        torch.testing.assert_close(p.sum(-1), torch.ones(4))
    code = model.encode(x, sample=False)
    z0 = code.mean if code.mean is not None else code.z
    torch.testing.assert_close(model.predict_proba(x), model.decode(z0).softmax(-1))


def test_predict_proba_averages_sampled_softmax():
    gaussian = {"z_dim": K, "std_offset": 0.0}
    model = build_classifier("mlp", {"hidden": (16,)}, "gaussian", gaussian, (1, 8, 8), 3, (0.5,), (0.25,))
    x = torch.rand(2, 1, 8, 8)
    torch.manual_seed(1)
    p = model.predict_proba(x, samples=12)
    torch.manual_seed(1)
    code = model.encode(x, sample=False)
    z = code.mean + code.std * torch.randn(12, 2, K)
    torch.testing.assert_close(p, model.decode(z).softmax(-1).mean(0))


def test_classifier_normalises_inputs():
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    model = build_classifier("mlp", {"hidden": (8,)}, "deterministic", {"z_dim": K}, (3, 8, 8), 10, mean, std)
    state = model.state_dict()
    assert state["pixel_mean"].shape == (1, 3, 1, 1) and state["pixel_std"].shape == (1, 3, 1, 1)
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalise(x), expected)
    torch.testing.assert_close(model.encode(x).z, model.bottleneck(expected).z)


def test_classifier_decoder():
    model = build_classifier("mlp", {"hidden": (8,)}, "deterministic", {"z_dim": K}, (1, 8, 8), 10, (0.5,), (0.5,))
    assert isinstance(model.decoder[0], torch.nn.Linear) and len(model.decoder) == 1
    model = build_classifier(
        "mlp", {"hidden": (8,)}, "deterministic", {"z_dim": K}, (1, 8, 8), 10, (0.5,), (0.5,), decoder_hidden=(12,)
    )
    assert [type(m) for m in model.decoder] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert model.decode(torch.randn(5, K)).shape == (5, 10)


def test_build_classifier_rejects_unknown_names_and_settings():
    args = ((1, 8, 8), 10, (0.5,), (0.5,))
    with pytest.raises(ConfigError, match="valid: additive, deterministic, gaussian, propagated"):
        build_classifier("mlp", {}, "nope", {}, *args)
    with pytest.raises(ConfigError, match="unknown option 'widht' for encoder 'mlp'; valid: activation, dropout, hidden"):
        build_classifier("mlp", {"widht": 3}, "deterministic", {}, *args)
    with pytest.raises(ConfigError, match="unknown options 'a', 'zdim' for bottleneck 'gaussian'; valid: std_offset"):
        build_classifier("mlp", {}, "gaussian", {"zdim": 3, "a": 1}, *args)


# Validation of settings.


def _classifier(**kwargs):
    settings = {"num_classes": 10, "mean": (0.5,), "std": (0.5,), **kwargs}
    return IBClassifier(_bottleneck("deterministic"), **settings)


INVALID = [
    (lambda: ENCODERS.create("mlp", (1, 8, 8), hidden=(0, 10)), "hidden.*\\(0, 10\\)"),
    (lambda: ENCODERS.create("mlp", (1, 8, 8), activation="swish"), "activation.*swish"),
    (lambda: ENCODERS.create("convnet", (1, 8, 8), channels=(4, -1)), "channels"),
    (lambda: ENCODERS.create("convnet", (1, 8, 8), hidden=0), "hidden.*0"),
    (lambda: ENCODERS.create("convnet", (784,)), "convnet.*\\(784,\\)"),
    (lambda: ENCODERS.create("resnet18_cifar", (3, 32, 32), width=0), "width.*0"),
    (lambda: _bottleneck("gaussian", z_dim=0), "z_dim.*0"),
    (lambda: _bottleneck("gaussian", std_offset=float("nan")), "std_offset.*nan"),
    (lambda: _bottleneck("additive", sigma=-1.0), "sigma.*-1.0"),
    (lambda: _bottleneck("propagated", noise_dim=0), "noise_dim.*0"),
    (lambda: _bottleneck("propagated", sigma=-0.5), "sigma.*-0.5"),
    (lambda: _bottleneck("propagated", layout="rows"), "layout.*rows"),
    (lambda: CRITICS.create("joint", (1, 8, 8), K, hidden=()), "hidden.*non-empty"),
    (lambda: CRITICS.create("joint", (1, 8, 8), K, hidden=(8, 0)), "hidden.*\\(8, 0\\)"),
    (lambda: CRITICS.create("joint", (1, 8, 8), K, input_noise=-0.1), "input_noise.*-0.1"),
    (lambda: CRITICS.create("joint", (1, 8, 8), K, x_branch="pool"), "x_branch.*pool"),
    (lambda: CRITICS.create("joint", (64,), K, x_branch="conv"), "x_branch 'conv'.*\\(64,\\)"),
    (lambda: CRITICS.create("separable", (1, 8, 8), K, embed_dim=0), "embed_dim.*0"),
    (lambda: CRITICS.create("separable", (1, 8, 8), K, x_features=0, x_branch="conv"), "x_features.*0"),
    (lambda: _classifier(num_classes=0), "num_classes.*0"),
    (lambda: _classifier(std=(0.0,)), "std.*0.0"),
    (lambda: _classifier(mean=(0.1, 0.2), std=(1.0, 1.0)), "mean and std"),
    (lambda: _classifier(decoder_hidden=(0,)), "decoder_hidden"),
]


@pytest.mark.parametrize("make,pattern", INVALID, ids=[p for _, p in INVALID])
def test_invalid_settings_raise_config_error(make, pattern):
    with pytest.raises(ConfigError, match=pattern):
        make()


# The factory convention: library arguments positional-only, recipe settings keyword-only, typed, with defaults.

_SCALARS = (int, float, bool, str)


def _allowed(tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _SCALARS:
        return True
    if origin is tuple:
        return len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float)
    if origin is Literal:
        return all(isinstance(a, (str, int)) for a in args)
    if origin in (Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return len(args) == 2 and len(rest) == 1 and _allowed(rest[0])
    return False


def _conforms(value, tp) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    if origin is tuple:
        return isinstance(value, tuple) and all(_conforms(v, args[0]) for v in value)
    if origin is Literal:
        return value in args
    rest = [a for a in args if a is not type(None)]
    return value is None or _conforms(value, rest[0])


@pytest.mark.parametrize(
    "registry,name", [(r, n) for r in (ENCODERS, BOTTLENECKS, CRITICS) for n in r.names()]
)
def test_factory_convention(registry, name):
    fn = registry.get(name)
    params = inspect.signature(fn).parameters.values()
    hints = registry.option_hints(name)  # as the recipe reads them
    kinds = {p.kind for p in params}
    assert kinds <= {inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.KEYWORD_ONLY}
    assert inspect.Parameter.POSITIONAL_ONLY in kinds
    for p in params:
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        assert p.default is not inspect.Parameter.empty, f"{name}.{p.name} has no default"
        assert p.name in hints and _allowed(hints[p.name]), f"{name}.{p.name}: {hints.get(p.name)}"
        assert _conforms(p.default, hints[p.name]), f"{name}.{p.name} default {p.default!r}"
    assert set(registry.options(name)) == {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_mlp_dropout_acts_in_training_only():
    torch.manual_seed(0)
    enc = ENCODERS.create("mlp", (1, 4, 4), hidden=(64,), dropout=0.5)
    x = torch.rand(8, 1, 4, 4)
    plain = torch.relu(enc.net[0](x.flatten(1)))  # [8, 64]: the layer without dropout
    enc.train()
    dropped = enc(x)
    zeroed = (dropped == 0) & (plain > 0)
    assert 0.3 < zeroed.float().sum() / (plain > 0).float().sum() < 0.7  # about half the active units dropped
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], 2 * plain[kept])  # the survivors scaled by 1 / (1 - p)
    enc.eval()
    torch.testing.assert_close(enc(x), plain)
    with pytest.raises(ConfigError, match="dropout"):
        ENCODERS.create("mlp", (1, 4, 4), dropout=1.0)
