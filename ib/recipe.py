"""Recipes: YAML files loaded into typed dataclasses, with `key.sub=value` overrides.

Every field has a type, a default and a reason. Loading rejects, before any work starts and with one line naming
the key, the bad value and what is allowed: unknown keys, wrong types, NaN/inf, out-of-range numbers and unknown
registry names. Components that come from a registry (encoder, bottleneck, critic, schedules, estimator, data set)
are written either as a bare name or as a mapping `{name: ..., <option>: ...}`; their options are checked against
the keyword-only parameters of the registered function or class, which are the schema for that entry.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml

from ib.errors import ConfigError
from ib.registry import Registry

# ---------------------------------------------------------------------------------------------------------------------
# YAML: safe loading (no object construction) that also reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`).


class _Loader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> Dict[Any, Any]:
        """A mapping, refusing a key given twice (plain YAML keeps the last one silently)."""
        first: Dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class reports unhashable keys
            if key in first:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_show(key)} (first given at line {first[key] + 1})",
                    key_node.start_mark)
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


_MAX_DEPTH = 32


def _nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether lists/mappings nest deeper than `limit`; iterative, visiting an aliased node once per depth."""
    stack, seen = [(value, 1)], {}
    while stack:
        v, depth = stack.pop()
        if not isinstance(v, (dict, list)):
            continue
        if depth > limit:
            return True
        if seen.get(id(v), 0) >= depth:
            continue
        seen[id(v)] = depth
        stack.extend((child, depth + 1) for child in (v.values() if isinstance(v, dict) else v))
    return False


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; a syntax error or a Python tag becomes a one-line ConfigError naming the line."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
        if _nested_deeper_than(value, _MAX_DEPTH):  # checking and copying recurse; a recipe needs ~4 levels
            raise ConfigError(f"{source}: invalid YAML: nested deeper than {_MAX_DEPTH} levels")
        return value
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"{source}: invalid YAML{where}: {_one_line(problem)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(e)}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested deeper than {_MAX_DEPTH} levels") from None


# ---------------------------------------------------------------------------------------------------------------------
# Schema


@dataclass
class Component:
    """A registry entry and its options, e.g. `{name: mlp, hidden: [1024, 1024]}`."""

    name: str
    options: Dict[str, Any] = field(default_factory=dict)


class FieldError(ConfigError):
    """A section's `__post_init__` rejects one of its fields; `build_dataclass` names the field by its whole path
    (`mi.optimizer.betas`), which the section itself does not know."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def _field(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with its reason and numeric bounds (ge, gt, le, lt) kept as metadata."""
    kw = {"default_factory": lambda: default} if isinstance(default, (Component, list, dict)) else {"default": default}
    return field(metadata={"help": help, **bounds}, **kw)


def _component(default: str | Dict[str, Any], registry: str, help: str) -> Any:
    if isinstance(default, str):
        comp = Component(default)
    else:
        comp = Component(default["name"], {k: v for k, v in default.items() if k != "name"})
    return field(
        default_factory=lambda: Component(comp.name, dict(comp.options)), metadata={"help": help, "registry": registry}
    )


Precision = Literal["fp32", "bf16"]  # of the training forward passes (ib.train.autocast)


@dataclass
class DataConfig:
    name: str = _field("digits", "data set: digits (bundled), mnist, fashion_mnist, cifar10, image_folder")
    root: str = _field("data", "folder holding (or receiving) the data set files")
    download: bool = _field(False, "fetch the data set into `root` when it is missing (needs internet)")
    val_fraction: float = _field(0.1, "share of the training set held out for validation", ge=0.0, lt=1.0)
    batch_size: int = _field(100, "training batch, global: split over the processes of a torchrun job; MINE pairs z "
                                "across it, so at least 2", ge=2, le=1_000_000)
    eval_batch_size: int = _field(1000, "batch for evaluation passes (no gradients)", ge=1, le=1_000_000)
    augment: Literal["none", "crop_flip"] = _field("none", "batched on-device augmentation for training images")
    image_size: Optional[int] = _field(None, "image_folder only: resize images to this square size", ge=1, le=4096)

    def __post_init__(self) -> None:
        datasets = registries()["data set"]
        if self.name not in datasets:
            raise ConfigError(f"data.name: unknown data set {_show(self.name)}; valid: {', '.join(datasets.names())}")


@dataclass
class ModelConfig:
    encoder: Component = _component({"name": "mlp"}, "encoder", "network from the input to features")
    bottleneck: Component = _component(
        {"name": "gaussian", "z_dim": 256}, "bottleneck", "code Z: gaussian, additive, propagated (MINE paper) or deterministic"
    )
    decoder_hidden: Tuple[int, ...] = _field((), "hidden widths of the decoder; empty = linear softmax decoder")
    eval_samples: int = _field(12, "samples of Z averaged for the sampled test prediction (0: mean code only)", ge=0,
                               le=10_000)
    channels_last: bool = _field(True, "conv weights, and so their activations, in NHWC order, which CPU "
                                 "convolutions run faster (benchmarks/results/train_speed.md); no effect on MLPs")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = _field("adam", "optimizer")
    lr: float = _field(1e-3, "base learning rate", gt=0.0, le=10.0)
    betas: Tuple[float, ...] = _field((0.9, 0.999), "Adam(W) betas (beta1, beta2)")
    momentum: float = _field(0.9, "SGD momentum", ge=0.0, lt=1.0)
    nesterov: bool = _field(False, "SGD Nesterov momentum")
    weight_decay: float = _field(0.0, "weight decay (decoupled for adamw)", ge=0.0, le=1.0)
    grad_clip: Optional[float] = _field(None, "clip the global norm of this optimizer's gradients to this value",
                                        gt=0.0)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")


def _critic_optimizer() -> OptimConfig:
    return OptimConfig(name="adam", lr=2e-4, betas=(0.5, 0.999))


@dataclass
class MIConfig:
    enabled: bool = _field(True, "train a critic and estimate I(X;Z); required when beta > 0")
    estimator: Component = _component("mine", "estimator", "the I(X;Z) term: mine, mine_f, infonce, smile, jsd, vib_kl (see README)")
    critic: Component = _component("joint", "critic", "statistics network T(x, z)")
    optimizer: OptimConfig = field(
        default_factory=_critic_optimizer, metadata={"help": "the critic's own optimizer (it maximises the bound)"}
    )
    critic_steps: int = _field(1, "critic updates per encoder update, on the same batch", ge=1, le=100)
    fused: bool = _field(True, "one critic forward serves both players (gradient reversal); false: the critic "
                         "steps first on detached z, then the encoder meets the updated critic (always so when "
                         "critic_steps > 1, and for jsd/smile, whose critic loss is not minus their penalty)")
    eval_permutations: int = _field(10, "shuffled pairings per sample for the held-out estimate", ge=1, le=1000)


@dataclass
class MonitorConfig:
    units: Literal["nats", "bits"] = _field("nats", "units of every information quantity: logs, plots, metrics.json")
    probe_size: int = _field(2000, "held-out probe set for the information plane: the first N validation images",
                             ge=2, le=1_000_000)
    plane_figure: bool = _field(True, "draw the information-plane trajectory into TensorBoard each epoch")
    test_every: int = _field(0, "evaluate the test split every N epochs too (0: only in a run's last epoch and "
                                "at a --stop-after epoch); the validation split, which chooses best.pt, is "
                                "evaluated every epoch", ge=0, le=1_000_000)


AttackName = Literal["fgsm", "pgd_linf", "pgd_l2", "eot_pgd", "noise"]


def check_radii(key: str, values: Sequence[float], upper: Optional[float] = None) -> Tuple[float, ...]:
    """Attack radii or noise levels, in the [0, 1] pixel scale: finite, >= 0 and <= `upper`; errors name `key`."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}: expected finite numbers, got {_show(v)}")
        if v < 0 or (upper is not None and v > upper):
            allowed = f">= 0 and <= {upper}" if upper is not None else ">= 0"
            raise ConfigError(f"{key}: {v} is out of range; radii are in the [0, 1] pixel scale, allowed: {allowed}")
        out.append(float(v))
    return tuple(out)


def check_attacks(key: str, names: Sequence[str]) -> Tuple[str, ...]:
    """Attack names: known, none twice, at least one; ConfigError names `key` and lists the valid names."""
    valid = typing.get_args(AttackName)
    for name in names:
        if name not in valid:
            raise ConfigError(f"{key}: unknown attack {_show(name)}; valid: {', '.join(sorted(valid))}")
    if not names:
        raise ConfigError(f"{key}: give at least one attack; valid: {', '.join(sorted(valid))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: an attack is named twice in {list(names)}")
    return tuple(names)


@dataclass
class EvalConfig:
    enabled: bool = _field(False, "run the robustness evaluation (`ib eval`) on best.pt when `ib train` completes")
    split: Literal["test", "val"] = _field("test", "the split evaluated")
    attacks: Tuple[AttackName, ...] = _field(
        ("fgsm", "pgd_linf", "pgd_l2", "eot_pgd", "noise"), "attacks run against the mean-code and the sampled model")
    eps: Tuple[float, ...] = _field((0.05, 0.1, 0.2), "L-inf radii of fgsm, pgd_linf, eot_pgd in the [0, 1] pixel "
                                    "scale; 0 is always added (the eps-0 sanity check)")
    eps_l2: Tuple[float, ...] = _field((0.5, 1.0, 2.0), "L2 radii of pgd_l2 in the [0, 1] pixel scale (MNIST-sized "
                                       "images; about 0.25-0.5 for CIFAR)")
    sigmas: Tuple[float, ...] = _field((0.05, 0.1, 0.2), "std of the Gaussian noise corruption, [0, 1] pixel scale")
    steps: int = _field(20, "PGD iterations", ge=1, le=100_000)
    step_size: float = _field(2.5, "PGD step = step_size * eps / steps (2.5: Madry et al. 2018)", gt=0.0, le=100.0)
    restarts: int = _field(1, "PGD random restarts; the worst case per sample is kept", ge=1, le=1000)
    samples: Optional[int] = _field(None, "draws of Z averaged by the sampled model (null: model.eval_samples; 0: "
                                    "evaluate the mean-code model only)", ge=0, le=10_000)
    eot_samples: int = _field(8, "draws of Z averaged into each EOT-PGD gradient", ge=1, le=10_000)
    loss: Literal["ce", "margin"] = _field("ce", "what the gradient attacks ascend: cross-entropy (Madry et al.) or "
                                           "the margin max_j z_j - z_y (Carlini-Wagner)")
    limit: Optional[int] = _field(None, "evaluate the first N samples of the split only (null: all)", ge=1)
    batch_size: Optional[int] = _field(None, "samples per attack batch (null: data.eval_batch_size)", ge=1,
                                       le=1_000_000)
    seed: int = _field(0, "seed of random starts, noise and sampled codes (the global RNG is left alone)", ge=0,
                       le=2**63 - 1)
    ece_bins: int = _field(15, "equal-width confidence bins of the expected calibration error", ge=1, le=10_000)
    tolerance: float = _field(0.005, "accuracy slack of the monotonicity and PGD-vs-FGSM checks", ge=0.0, le=1.0)
    check_samples: int = _field(500, "samples for the unbounded-attack check (L-inf PGD at eps 1); 0 skips it",
                                ge=0, le=1_000_000)

    def __post_init__(self) -> None:
        check_attacks("eval.attacks", self.attacks)
        check_radii("eval.eps", self.eps, upper=1.0)
        check_radii("eval.eps_l2", self.eps_l2)
        check_radii("eval.sigmas", self.sigmas)


@dataclass
class Recipe:
    name: str = _field("run", "run name: the run folder is <output_dir>/<name>")
    seed: int = _field(0, "seed for weights, noise, shuffling and the validation split", ge=0, le=2**63 - 1)
    epochs: int = _field(10, "training epochs", ge=1, le=1_000_000)
    beta: float = _field(1e-3, "weight of I(X;Z) in loss = CE + beta * I(X;Z) (the schedule's target)", ge=0.0)
    beta_schedule: Component = _component("constant", "beta schedule", "how beta reaches its value, in steps")
    device: Literal["auto", "cpu", "cuda"] = _field("auto", "auto: CUDA where present, else CPU")
    precision: Precision = _field(
        "fp32", "bf16: training forward passes under torch.autocast(bfloat16) (weights, optimiser states, the code, "
        "the decoder and the MI bound stay float32); evaluation runs in float32")
    output_dir: str = _field("checkpoints", "folder that holds run folders")
    log_every: int = _field(20, "steps between progress-bar refreshes (each costs a device sync)", ge=1)
    max_nonfinite_steps: int = _field(20, "stop after this many consecutive non-finite steps", ge=1)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set and batches"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "encoder, bottleneck and decoder"})
    optimizer: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "encoder and decoder optimizer"})
    lr_schedule: Component = _component("constant", "lr schedule", "learning-rate multiplier per epoch")
    mi: MIConfig = field(default_factory=MIConfig, metadata={"help": "the I(X;Z) estimator and its critic"})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"help": "the information plane"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "accuracy and robustness (`ib eval`)"})

    def __post_init__(self) -> None:
        if self.beta > 0 and not self.mi.enabled:
            raise ConfigError(f"beta={self.beta} needs an I(X;Z) estimate: set mi.enabled=true or beta=0")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", self.name):
            raise ConfigError(f"name '{self.name}' must be letters, digits, '_', '.', '+', '-' (it names a folder)")
        # The schedules check their phases against each other (e.g. a warm-up starting above beta): build them
        # here, so such a recipe fails when it is loaded, not after the data set.
        from ib.schedules import create_beta_schedule, create_lr_schedule

        create_beta_schedule(self.beta_schedule.name, self.beta, **self.beta_schedule.options)
        create_lr_schedule(self.lr_schedule.name, self.epochs, **self.lr_schedule.options)


# ---------------------------------------------------------------------------------------------------------------------
# Registries by kind. Imported lazily: the registries live beside what they build.


def registries() -> Dict[str, Registry]:
    from ib.data import DATASETS
    from ib.estimators import ESTIMATORS
    from ib.models.bottlenecks import BOTTLENECKS
    from ib.models.critics import CRITICS
    from ib.models.encoders import ENCODERS
    from ib.schedules import BETA_SCHEDULES, LR_SCHEDULES

    return {r.kind: r for r in (DATASETS, ESTIMATORS, BOTTLENECKS, CRITICS, ENCODERS, BETA_SCHEDULES, LR_SCHEDULES)}


# ---------------------------------------------------------------------------------------------------------------------
# Checking values against annotations


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else _one_line(yaml.safe_dump(value, default_flow_style=True))
    text = text.removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " or ".join(_type_name(a) for a in inner) + " or null"
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        plural = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}
        return "a list of " + (plural.get(args[0], f"values ({_type_name(args[0])})") if args else "values")
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def check_value(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for a in inner:
            try:
                return check_value(value, a, key)
            except ConfigError:
                if len(inner) == 1:
                    raise
        raise bad
    if origin is Literal:
        if value not in args or isinstance(value, bool) != any(isinstance(a, bool) for a in args):
            raise ConfigError(f"{key}: {_show(value)} is not allowed; valid: {', '.join(str(a) for a in args)}")
        return value
    if origin in (tuple, list, Sequence, typing.Sequence) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise bad
        item = args[0] if args else Any
        items = [check_value(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise ConfigError(f"{key}: must be a finite number, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r} (a bug in the schema)")


def _check_bounds(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    tests = {
        "ge": (lambda v, b: v >= b, ">="),
        "gt": (lambda v, b: v > b, ">"),
        "le": (lambda v, b: v <= b, "<="),
        "lt": (lambda v, b: v < b, "<"),
    }
    for name, (ok, sign) in tests.items():
        if name in meta and not ok(value, meta[name]):
            allowed = " and ".join(f"{s} {meta[n]}" for n, (_, s) in tests.items() if n in meta)
            raise ConfigError(f"{key}: {_show(value)} is out of range; allowed: {allowed}")


def _build_component(raw: Any, registry: Registry, key: str, default: Component) -> Component:
    if isinstance(raw, str):
        raw = {"name": raw}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key}: expected the {registry.kind}'s name or a mapping with 'name', got {_show(raw)}")
    name = raw.get("name", default.name)  # `encoder: {hidden: [64]}` keeps the default entry
    if not isinstance(name, str) or name not in registry:
        raise ConfigError(f"{key}.name: unknown {registry.kind} {_show(name)}; valid: {', '.join(registry.names())}")
    params = registry.options(name)
    hints = registry.option_hints(name)  # of the function, or of the class's __init__
    options: Dict[str, Any] = {}
    for opt, value in raw.items():
        if opt == "name":
            continue
        if opt not in params:
            valid = ", ".join(["name", *sorted(params)])
            raise ConfigError(f"{key}: unknown key '{opt}' for {registry.kind} '{name}'; valid: {valid}")
        options[opt] = _as_yaml(check_value(value, hints.get(opt, Any), f"{key}.{opt}"))
    for opt, p in params.items():  # the resolved recipe shows every setting
        if opt not in options and p.default is not p.empty:
            options[opt] = _as_yaml(p.default)
    missing = [opt for opt, p in params.items() if opt not in options]
    if missing:
        raise ConfigError(f"{key}: {registry.kind} '{name}' needs {', '.join(missing)}")
    return Component(name, options)


def _as_yaml(value: Any) -> Any:
    """Tuples as lists, so that options read the same in memory as in the saved recipe."""
    return [_as_yaml(v) for v in value] if isinstance(value, (list, tuple)) else value


def build_dataclass(cls: type, raw: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a nested mapping, checking every key, type and bound."""
    where = key or "recipe"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of settings, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for k in raw:
        if k not in fields:
            raise ConfigError(f"{where}: unknown key '{k}'; valid: {', '.join(sorted(fields))}")
    kwargs: Dict[str, Any] = {}
    regs: Dict[str, Registry] | None = None
    for name, f in fields.items():
        sub = f"{key}.{name}" if key else name
        tp = hints[name]
        if tp is Component:  # given or not, a component's options are filled in from its factory and checked
            regs = regs or registries()
            default = f.default_factory()
            value = raw.get(name, {"name": default.name, **default.options})
            kwargs[name] = _build_component(value, regs[f.metadata["registry"]], sub, default)
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = build_dataclass(tp, raw[name], sub) if name in raw else _defaults(tp, f, sub)
        elif name in raw:
            kwargs[name] = check_value(raw[name], tp, sub)
            _check_bounds(kwargs[name], f.metadata, sub)
    try:
        return cls(**kwargs)
    except FieldError as e:
        if not key:
            raise
        raise ConfigError(f"{key}.{e.field} {e.problem}") from None


def _defaults(tp: type, f: dataclasses.Field, key: str) -> Any:
    """A nested section left out of the recipe: its defaults, components resolved like given ones."""
    default = f.default_factory()
    return build_dataclass(tp, {k: v for k, v in _plain(default).items()}, key)


# ---------------------------------------------------------------------------------------------------------------------
# Overrides, loading and saving


def parse_override(text: str) -> Tuple[List[str], Any]:
    """`model.encoder.hidden=[512, 512]` -> (["model", "encoder", "hidden"], [512, 512])."""
    key, sep, value = text.partition("=")
    if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise ConfigError(f"override '{text}': expected key=value or key.sub=value, e.g. beta=1e-3 or data.batch_size=64")
    return key.split("."), parse_yaml(value, f"override '{text}'") if value.strip() else ""


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Return a copy of `raw` with each `key.sub=value` set (components given as a bare name become mappings)."""
    import copy

    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # a component given by name only: open it up for its options
                child = node[part] = {"name": child}
            elif child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{'.'.join(path[: i + 1])}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def recipe_from_dict(raw: Any, overrides: Sequence[str] = (), source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {_show(raw)}")
    return build_dataclass(Recipe, apply_overrides(raw, overrides))


def read_recipe_file(path: str | Path) -> Dict[str, Any]:
    """Read a recipe file into a mapping: missing, unreadable, empty or non-mapping files raise ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"recipe file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"recipe path is a folder, not a file: {path}") from None
    except PermissionError:
        raise ConfigError(f"recipe file not readable (permission denied): {path}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"recipe file is not UTF-8 text: {path}") from None
    except OSError as e:
        raise ConfigError(f"cannot read recipe file {path}: {e.strerror or e}") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise ConfigError(f"{path}: the recipe is empty")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {_show(raw)}")
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load and check a recipe file, applying `key.sub=value` overrides. Raises ConfigError on any problem."""
    return recipe_from_dict(read_recipe_file(path), overrides, source=str(path))


def _plain(value: Any) -> Any:
    if isinstance(value, Component):
        return {"name": value.name, **{k: _plain(v) for k, v in value.options.items()}}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The resolved recipe as plain YAML-able data (every default filled in)."""
    return _plain(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
