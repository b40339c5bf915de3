"""Tests of ib.models: every registry entry's shapes and gradients, the bottlenecks' noise, the critics' pair
bookkeeping, the classifier, the settings' validation and the factory convention the recipe validator relies on."""
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
SMALL_CRITIC = {
    "joint": {"hidden": (16, 16), "x_channels": (4,), "x_features": 8},
    "separable": {"hidden": (16,), "embed_dim": 8, "x_channels": (4,), "x_features": 8},
}
K = 6


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _small_encoder(shape):
    return mlp(shape, hidden=(16,))


def _bottleneck(name, shape=(1, 8, 8), **kwargs):
    return BOTTLENECKS.create(name, _small_encoder, shape, **{"z_dim": K, **kwargs})


def _critic(name, shape, **kwargs):
    return CRITICS.create(name, shape, K, **{**SMALL_CRITIC.get(name, {}), **kwargs})


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


# Critics.


CRITIC_CASES = [
    (n, s, br)
    for n in CRITICS.names()
    for s, br in [((1, 8, 8), "flatten"), ((1, 28, 28), "flatten"), ((3, 32, 32), "conv")]
]


@pytest.mark.parametrize("name,shape,branch", CRITIC_CASES)
def test_critic_shapes_and_pairs(name, shape, branch):
    critic = _critic(name, shape, x_branch=branch).eval()
    x, z, z2 = torch.rand(5, *shape), torch.randn(5, K), torch.randn(5, K)
    t = critic(x, z)
    assert t.shape == (5,) and torch.isfinite(t).all()
    scores = critic.scores(x, z)
    assert scores.shape == (5, 5)
    torch.testing.assert_close(scores.diagonal(), t)
    # Every entry: row i is x_i, column j is z_j.
    tiled = critic(x.repeat_interleave(5, dim=0), z.repeat(5, 1)).view(5, 5)
    torch.testing.assert_close(scores, tiled)
    joint_t, marg_t = critic.pair_scores(x, z, z2)
    torch.testing.assert_close(joint_t, t)
    torch.testing.assert_close(marg_t, critic(x, z2))


def test_joint_critic_noisy_all_pairs_pair_row_i_with_column_j():
    # In training with input noise, scores() tiles the B x M pairs (each needs its own draw); with a vanishing
    # noise they must equal the eval-mode scores, whose row i is x_i and column j is z_j.
    critic = _critic("joint", (1, 8, 8), input_noise=1e-12, hidden_noise=0.0)
    x, z = torch.rand(5, 1, 8, 8), torch.randn(4, K)
    noisy = critic.train().scores(x, z)
    torch.testing.assert_close(noisy, critic.eval().scores(x, z))
    assert noisy.shape == (5, 4) and not torch.allclose(noisy, noisy[:, :1].expand(5, 4))  # columns differ


@pytest.mark.parametrize("name", CRITICS.names())
def test_critic_backward_in_training(name):
    critic = _critic(name, (1, 8, 8)).train()
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K, requires_grad=True)
    joint_t, marg_t = critic.pair_scores(x, z, z.roll(1, 0))
    scores = critic.scores(x, z)
    assert scores.shape == (4, 4) and torch.isfinite(scores).all()
    _assert_backward(critic, joint_t.mean() - marg_t.exp().mean() + scores.mean())
    assert z.grad is not None


@pytest.mark.parametrize("name", CRITICS.names())
def test_critic_noise_only_in_training(name):
    critic = _critic(name, (1, 8, 8))
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K)
    noisy = {"input_noise", "hidden_noise"} & set(CRITICS.options(name))
    critic.train()
    assert torch.equal(critic(x, z), critic(x, z)) is not bool(noisy)
    critic.eval()
    assert torch.equal(critic(x, z), critic(x, z))


@pytest.mark.parametrize("noise", ["input_noise", "hidden_noise"])
def test_joint_critic_each_noise(noise):
    other = {"input_noise", "hidden_noise"} - {noise}
    critic = _critic("joint", (1, 8, 8), **{noise: 0.5, other.pop(): 0.0}).train()
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, K)
    assert not torch.equal(critic(x, z), critic(x, z))
    assert not torch.equal(critic.scores(x, z), critic.scores(x, z))


def test_joint_critic_pairings_of_a_row_share_its_noise_draws():
    critic = _critic("joint", (1, 8, 8), input_noise=0.3, hidden_noise=0.5).train()
    x, z = torch.rand(6, 1, 8, 8), torch.randn(6, K)
    for p in (1, 2):  # P shufflings that happen to be z itself: the same inputs in every block
        joint_t, marg_t = critic.pair_scores(x, z, z.repeat(p, 1))
        assert torch.equal(marg_t[:6], joint_t)  # the joint pairs reuse the first shuffled block's draws
        assert p == 1 or not torch.equal(marg_t[6:], joint_t)  # later blocks draw their own
    assert not torch.equal(joint_t, critic.pair_scores(x, z, z.repeat(2, 1))[0])  # fresh draws on each call


def test_joint_critic_shared_noise_keeps_each_score_distribution():
    # One (x, z) pair and one marginal z' tiled over n rows: the rows' scores are n independent draws of the
    # pair's noisy score, which pair_scores (P = 2 shuffled blocks, the joint pairs reusing the first block's
    # draws) and the plain forward (its own draws for every pair) must give with the same mean and spread.
    torch.manual_seed(0)
    critic = _critic("joint", (1, 8, 8), input_noise=0.0, hidden_noise=0.5).train()
    n = 20000
    x, z, z2 = torch.rand(1, 1, 8, 8).expand(n, 1, 8, 8), torch.randn(1, K).expand(n, K), torch.randn(1, K).expand(n, K)
    with torch.no_grad():
        joint_t, marg_t = critic.pair_scores(x, z, z2.repeat(2, 1))
        plain_j, plain_m = critic(x, z), critic(x, z2)
    for ours, plain in ((joint_t, plain_j), (marg_t[:n], plain_m), (marg_t[n:], plain_m)):
        se = float(plain.std()) / math.sqrt(n)
        assert abs(float(ours.mean() - plain.mean())) < 5 * math.sqrt(2) * se
        assert abs(float(ours.std() / plain.std()) - 1) < 0.05
    corr = torch.corrcoef(torch.stack([joint_t, marg_t[:n], marg_t[n:]]))
    assert corr[0, 1] > 0.5  # the joint pairs share the first block's draws
    assert abs(float(corr[1, 2])) < 0.05 and abs(float(corr[0, 2])) < 0.05  # the shuffled blocks do not
    # and the draws themselves have the configured scale, shared or not
    for p in (1, 3):
        noise = critic._noise(torch.zeros((p + 1) * n, 4), 0.5, joint_rows=n).view(p + 1, n, 4)
        assert torch.equal(noise[0], noise[1])
        for block in noise[1:]:
            assert abs(float(block.std()) - 0.5) < 0.01 and abs(float(block.mean())) < 0.01
        assert p == 1 or abs(float(torch.corrcoef(noise[1:, :, 0])[0, 1])) < 0.05


def test_shared_noise_lowers_the_spread_of_the_bound():
    """The paper's critic (784 + 256 inputs, 512-512 ELU, noise 0.3/0.5) on one batch of dependent (x, z): the DV
    bound's spread over noise draws with the joint pairs reusing their twins' draws, against independent draws for
    every pair (measured 0.0072 against 0.048 nats; the README cites it), with the same mean."""
    from ib.estimators.base import dv_bound

    torch.manual_seed(0)
    critic = CRITICS.create("joint", (784,), 256, hidden=(512, 512)).train()
    x = torch.rand(100, 784)
    z = torch.randn(100, 256) + x[:, :256]
    shuffled = z.roll(1, 0)
    with torch.no_grad():
        shared = torch.tensor([float(dv_bound(*critic.pair_scores(x, z, shuffled))) for _ in range(200)])
        independent = torch.tensor([float(dv_bound(critic(x, z), critic(x, shuffled))) for _ in range(200)])
    assert shared.std() < independent.std() / 3
    assert abs(float(shared.mean() - independent.mean())) < 4 * float(independent.std()) / math.sqrt(200)


def test_separable_scores_are_a_matmul():
    critic = _critic("separable", (1, 8, 8))
    x, z = torch.rand(5, 1, 8, 8), torch.randn(7, K)
    torch.testing.assert_close(critic.scores(x, z), critic.g(x.flatten(1)) @ critic.h(z).T)


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
    with pytest.raises(ConfigError, match="widht.*valid: activation, hidden"):
        build_classifier("mlp", {"widht": 3}, "deterministic", {}, *args)


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
    hints = typing.get_type_hints(fn)
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


@pytest.mark.parametrize("tiles", [1, 2, 3])
def test_shared_first_layer_matches_autograd_through_the_concatenated_input(tiles):
    """The joint critic's first layer on pairs sharing x: values and every gradient against the plain Linear on
    concat(x, z) (double precision gradcheck too)."""
    from ib.models.critics import shared_first_layer

    torch.manual_seed(0)
    b, f, k, h = 4, 5, 3, 6
    fx = torch.randn(b, f, dtype=torch.float64, requires_grad=True)
    zz = torch.randn(tiles * b, k, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(h, f + k, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(h, dtype=torch.float64, requires_grad=True)
    ours = shared_first_layer(fx, zz, weight, bias)
    plain = torch.nn.functional.linear(torch.cat([fx.repeat(tiles, 1), zz], dim=1), weight, bias)
    torch.testing.assert_close(ours, plain)
    g = torch.randn_like(plain)
    grads_ours = torch.autograd.grad(ours, (fx, zz, weight, bias), g)
    grads_plain = torch.autograd.grad(plain, (fx, zz, weight, bias), g)
    for a, e in zip(grads_ours, grads_plain):
        torch.testing.assert_close(a, e)
    assert torch.autograd.gradcheck(shared_first_layer, (fx, zz, weight, bias))
