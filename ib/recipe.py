"""Recipes: YAML files loaded into typed dataclasses, with `key.sub=value` overrides.

Every field has a type, a default and a reason. Loading rejects, before any work starts and with one line naming
the key, the bad value and what is allowed: unknown keys, wrong types, NaN/inf, out-of-range numbers and unknown
registry names. Components that come from a registry (encoder, bottleneck, critic, schedules, estimator, data set)
are written either as a bare name or as a mapping `{name: ..., <option>: ...}`; their options are checked against
the keyword-only parameters of the registered function or class, which are the schema for that entry.
"""
from __future__ import annotations

import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Literal, Optional, Sequence, Tuple, Union

import yaml

from ib.config import (Component, FieldError, apply_overrides, build_dataclass, check_settings, component, parse_yaml,
                       setting, show, to_plain)
from ib.errors import ConfigError
from ib.registry import Registry

Precision = Literal["fp32", "bf16"]  # of the training forward passes (ib.engine.step.autocast)


@dataclass
class DataConfig:
    name: str = setting("digits", "data set: digits (bundled), mnist, fashion_mnist, cifar10, image_folder",
                        registry="data set")
    root: str = setting("data", "folder holding (or receiving) the data set files")
    download: bool = setting(False, "fetch the data set into `root` when it is missing (needs internet)")
    val_fraction: float = setting(0.1, "share of the training set held out for validation", ge=0.0, lt=1.0)
    batch_size: int = setting(100, "training batch, global: split over the processes of a torchrun job; MINE pairs z "
                                "across it, so at least 2", ge=2, le=1_000_000)
    eval_batch_size: int = setting(1000, "batch for evaluation passes (no gradients)", ge=1, le=1_000_000)
    augment: Literal["none", "crop_flip"] = setting("none", "batched on-device augmentation for training images")
    image_size: Optional[int] = setting(None, "image_folder only: resize images to this square size", ge=1, le=4096)
    label_noise: float = setting(0.0, "share of the training labels replaced by uniformly random classes (seeded; "
                                 "validation and test labels are kept), for random-label experiments", ge=0.0, le=1.0)


@dataclass
class ModelConfig:
    encoder: Component = component({"name": "mlp"}, "encoder", "network from the input to features")
    bottleneck: Component = component(
        {"name": "gaussian", "z_dim": 256}, "bottleneck", "code Z: gaussian, additive, propagated (MINE paper) or deterministic"
    )
    decoder_hidden: Tuple[int, ...] = setting((), "hidden widths of the decoder; empty = linear softmax decoder")
    eval_samples: int = setting(12, "samples of Z averaged for the sampled test prediction (0: mean code only)", ge=0,
                               le=10_000)
    channels_last: bool = setting(True, "conv weights, and so their activations, in NHWC order, which CPU "
                                  "convolutions run faster (benchmarks/results/train_speed.md); no effect on MLPs")


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = setting("adam", "optimizer")
    lr: float = setting(1e-3, "base learning rate", gt=0.0, le=10.0)
    betas: Tuple[float, ...] = setting((0.9, 0.999), "Adam(W) betas (beta1, beta2)")
    momentum: float = setting(0.9, "SGD momentum", ge=0.0, lt=1.0)
    nesterov: bool = setting(False, "SGD Nesterov momentum")
    weight_decay: float = setting(0.0, "weight decay (decoupled for adamw)", ge=0.0, le=1.0)
    grad_clip: Optional[float] = setting(None, "clip the global norm of this optimizer's gradients to this value",
                                        gt=0.0)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise FieldError("betas", f"must be two numbers in [0, 1), got {list(self.betas)}")


def _critic_optimizer() -> OptimConfig:
    return OptimConfig(name="adam", lr=2e-4, betas=(0.5, 0.999))


@dataclass
class MIConfig:
    enabled: bool = setting(True, "train a critic and estimate I(X;Z); required when beta > 0")
    estimator: Component = component("mine", "estimator", "the I(X;Z) term: mine, mine_f, infonce, smile, jsd, "
                                     "vib_kl, pairwise_kl (see docs/estimators.md)")
    critic: Component = component("joint", "critic", "statistics network T(x, z)")
    optimizer: OptimConfig = field(
        default_factory=_critic_optimizer, metadata={"help": "the critic's own optimizer (it maximises the bound)"}
    )
    critic_steps: int = setting(1, "critic updates per encoder update, on the same batch", ge=1, le=100)
    fused: bool = setting(True, "one critic forward serves both players (gradient reversal: simultaneous descent-"
                         "ascent, the encoder's gradient taken at the critic before its update); false: the critic "
                         "steps first on detached z, then the encoder meets the updated critic (always so when "
                         "critic_steps > 1, and for jsd/smile, whose critic loss is not minus their penalty)")
    adaptive_clip: bool = setting(False, "MINE's adaptive gradient clipping (Belghazi et al. 2018, sec. 3.1): the "
                                  "encoder's gradient of beta * penalty scaled to at most the norm of the "
                                  "cross-entropy's; runs the two-pass step (one more backward pass), one process")
    eval_permutations: int = setting(10, "shuffled pairings per sample for the held-out estimate", ge=1, le=1000)


@dataclass
class AlignmentConfig:
    enabled: bool = setting(False, "log the tangent-kernel alignment of the logits with the labels (Baratin et al. "
                            "2021; docs/monitoring.md) on a fixed probe of training and test inputs")
    probe_size: int = setting(100, "inputs in each probe, class-balanced: this many from the training split (with "
                              "the labels it trains on) and as many from the test split", ge=2, le=10_000)
    every: Union[Literal["log"], int] = setting("log", "when: log = at step 0, the steps floor(5 * 1.15^k) and the "
                                               "last step (the paper's); N = every N steps and the last", ge=1)
    layers: Tuple[str, ...] = setting((), "layers logged one by one (align/layer/<name>, names as in "
                                      "docs/monitoring.md); empty: every layer")


@dataclass
class MonitorConfig:
    units: Literal["nats", "bits"] = setting("nats", "units of every information quantity: logs, plots, metrics.json")
    probe_size: int = setting(2000, "held-out probe set for the information plane: the first N validation images",
                             ge=2, le=1_000_000)
    plane_figure: bool = setting(True, "draw the information-plane trajectory into TensorBoard")
    plane_figures: int = setting(10, "how many times a run draws it, at evenly spaced epochs, the last included "
                                 "(every epoch when there are no more epochs; TensorBoard keeps 10 images a tag by "
                                 "default, and each costs about 0.14 s)", ge=1, le=1_000_000)
    test_every: int = setting(0, "evaluate the test split every N epochs too (0: only in a run's last epoch and "
                                "at a --stop-after epoch); the validation split, which chooses best.pt, is "
                                "evaluated every epoch", ge=0, le=1_000_000)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig,
                                       metadata={"help": "the tangent-kernel alignment beside the plane"})


def _discriminator_optimizer() -> OptimConfig:
    return OptimConfig(name="adam", lr=1e-3, betas=(0.5, 0.999))


@dataclass
class AdversarialConfig:
    name: Literal["none", "pgd", "a3t"] = setting("none", "adversarial training: none; pgd (Madry et al. 2018); a3t "
                                                  "(Erraqabi et al. 2018: pgd's loss and a discriminator on the code "
                                                  "that the encoder learns to fool); see docs/adversarial.md")
    attack: Literal["pgd", "fgsm"] = setting("pgd", "how training examples are perturbed (L-inf, on the sampled "
                                             "model): pgd, or fgsm (one step of eps, A3T's choice)")
    eps: float = setting(0.3, "L-inf radius in the [0, 1] pixel scale (MNIST 0.3, Fashion-MNIST 0.1, CIFAR 8/255)",
                         ge=0.0, le=1.0)
    steps: int = setting(40, "PGD steps (Madry's MNIST: 40; CIFAR: 10)", ge=1, le=10_000)
    step_size: float = setting(0.01, "PGD step in the [0, 1] pixel scale (Madry's MNIST: 0.01; CIFAR: 2/255)", gt=0.0,
                               le=1.0)
    random_start: bool = setting(True, "PGD starts at a uniform point of the eps-ball")
    alpha: float = setting(0.0, "weight of the clean cross-entropy: alpha * CE(x) + (1 - alpha) * CE(x_adv) (0: "
                           "Madry's; 0.5: A3T's and DIAL's even mix)", ge=0.0, le=1.0)
    disc_layer: str = setting("z", "a3t: the features the discriminator reads: z (the code) or a layer of the model "
                              "(encoder.net.2, head, ...)")
    disc_hidden: Tuple[int, ...] = setting((256,), "a3t: hidden widths of the discriminator (ReLU MLP)")
    disc_weight: float = setting(1.0, "a3t: lambda, the weight of the encoder's reversed discriminator gradient",
                                 ge=0.0, le=1000.0)
    disc_optimizer: OptimConfig = field(default_factory=_discriminator_optimizer,
                                        metadata={"help": "a3t: the discriminator's own optimiser"})


AttackName = Literal["fgsm", "pgd_linf", "pgd_l2", "eot_pgd", "noise"]


def check_radii(key: str, values: Sequence[float], upper: Optional[float] = None) -> Tuple[float, ...]:
    """Attack radii or noise levels, in the [0, 1] pixel scale: finite, >= 0 and <= `upper`; errors name `key`."""
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ConfigError(f"{key}: expected finite numbers, got {show(v)}")
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
            raise ConfigError(f"{key}: unknown attack {show(name)}; valid: {', '.join(sorted(valid))}")
    if not names:
        raise ConfigError(f"{key}: give at least one attack; valid: {', '.join(sorted(valid))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: an attack is named twice in {list(names)}")
    return tuple(names)


@dataclass
class EvalConfig:
    enabled: bool = setting(False, "run the robustness evaluation (`ib eval`) on best.pt when `ib train` completes")
    split: Literal["test", "val"] = setting("test", "the split evaluated")
    attacks: Tuple[AttackName, ...] = setting(
        ("fgsm", "pgd_linf", "pgd_l2", "eot_pgd", "noise"), "attacks run against the mean-code and the sampled model")
    eps: Tuple[float, ...] = setting((0.05, 0.1, 0.2), "L-inf radii of fgsm, pgd_linf, eot_pgd in the [0, 1] pixel "
                                    "scale; 0 is always added (the eps-0 sanity check)")
    eps_l2: Tuple[float, ...] = setting((0.5, 1.0, 2.0), "L2 radii of pgd_l2 in the [0, 1] pixel scale (MNIST-sized "
                                       "images; about 0.25-0.5 for CIFAR)")
    sigmas: Tuple[float, ...] = setting((0.05, 0.1, 0.2), "std of the Gaussian noise corruption, [0, 1] pixel scale")
    steps: int = setting(20, "PGD iterations", ge=1, le=100_000)
    schedule: Literal["adaptive", "fixed"] = setting(
        "adaptive", "PGD's step lengths: adaptive = APGD's (Croce & Hein 2020: 2 eps with momentum, halved where the "
        "loss stalls), fixed = step_size * eps / steps throughout (Madry et al. 2018), the weaker attack on "
        "adversarially trained models (benchmarks/results/pgd_gap.md)")
    step_size: float = setting(2.5, "PGD step = step_size * eps / steps under the fixed schedule (2.5: Madry et al. "
                               "2018)", gt=0.0, le=100.0)
    restarts: int = setting(1, "PGD random restarts; the worst case per sample is kept", ge=1, le=1000)
    targets: int = setting(3, "after each PGD attack, targeted runs toward each sample's N likeliest wrong classes on "
                           "the samples still standing, as AutoAttack's APGD-T (which takes 9); 0: none", ge=0,
                           le=1000)
    samples: Optional[int] = setting(None, "draws of Z averaged by the sampled model (null: model.eval_samples; 0: "
                                    "evaluate the mean-code model only)", ge=0, le=10_000)
    eot_samples: int = setting(8, "draws of Z averaged into each EOT-PGD gradient", ge=1, le=10_000)
    loss: Literal["ce", "margin"] = setting("ce", "what the gradient attacks ascend: cross-entropy (Madry et al.) or "
                                           "the margin max_j z_j - z_y (Carlini-Wagner)")
    sampled_loss: Literal["mean_softmax", "per_draw"] = setting(
        "mean_softmax", "what attacks on the sampled model ascend: the loss of its prediction, -log mean_z p(y|z) "
        "over its draws (eot_pgd: averaged over eot_samples predictions), or per_draw: one draw's loss per "
        "gradient (eot_pgd: averaged over eot_samples draws)")
    autoattack: bool = setting(False, "also run AutoAttack (standard on the mean code, rand on the sampled model) "
                               "at each eps, and check our PGD against it; needs pip install 'ib[autoattack]'")
    limit: Optional[int] = setting(None, "evaluate N samples of the split only, drawn by a seeded permutation (null: all)", ge=1)
    batch_size: Optional[int] = setting(None, "samples per attack batch (null: data.eval_batch_size)", ge=1,
                                       le=1_000_000)
    seed: int = setting(0, "seed of random starts, noise and sampled codes (the global RNG is left alone)", ge=0,
                       le=2**63 - 1)
    ece_bins: int = setting(15, "equal-width confidence bins of the expected calibration error", ge=1, le=10_000)
    tolerance: float = setting(0.005, "accuracy slack of the monotonicity and PGD-vs-FGSM checks", ge=0.0, le=1.0)
    check_samples: int = setting(500, "samples for the unbounded-attack check (L-inf PGD at eps 1), drawn like limit's; 0 skips it",
                                ge=0, le=1_000_000)

    def __post_init__(self) -> None:
        check_attacks("eval.attacks", self.attacks)
        check_radii("eval.eps", self.eps, upper=1.0)
        check_radii("eval.eps_l2", self.eps_l2)
        check_radii("eval.sigmas", self.sigmas)


@dataclass
class Recipe:
    name: str = setting("run", "run name: the run folder is <output_dir>/<name>")
    seed: int = setting(0, "seed for weights, noise, shuffling and the validation split", ge=0, le=2**63 - 1)
    epochs: int = setting(10, "training epochs", ge=1, le=1_000_000)
    beta: float = setting(1e-3, "weight of I(X;Z) in loss = CE + beta * I(X;Z) (the schedule's target)", ge=0.0)
    beta_schedule: Component = component("constant", "beta schedule", "how beta reaches its value, in steps")
    label_smoothing: float = setting(0.0, "label smoothing of the training cross-entropy (Szegedy et al. 2016; the "
                                     "classic regulariser the IB rows are compared with); 0 for none", ge=0.0, lt=1.0)
    device: Literal["auto", "cpu", "cuda"] = setting("auto", "auto: CUDA where present, else CPU")
    precision: Precision = setting(
        "fp32", "bf16: training forward passes under torch.autocast(bfloat16) (weights, optimiser states, the code, "
        "the decoder and the MI bound stay float32); evaluation runs in float32")
    output_dir: str = setting("checkpoints", "folder that holds run folders")
    log_every: int = setting(20, "steps between progress-bar refreshes (each costs a device sync)", ge=1)
    max_nonfinite_steps: int = setting(20, "stop after this many consecutive non-finite steps", ge=1)
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "data set and batches"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "encoder, bottleneck and decoder"})
    optimizer: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "encoder and decoder optimizer"})
    lr_schedule: Component = component("constant", "lr schedule", "learning-rate multiplier per epoch")
    mi: MIConfig = field(default_factory=MIConfig, metadata={"help": "the I(X;Z) estimator and its critic"})
    monitor: MonitorConfig = field(default_factory=MonitorConfig, metadata={"help": "the information plane"})
    eval: EvalConfig = field(default_factory=EvalConfig, metadata={"help": "accuracy and robustness (`ib eval`)"})
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig,
                                           metadata={"help": "adversarial training (PGD-AT, A3T)"})

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


def recipe_from_dict(raw: Any, overrides: Sequence[str] = (), source: str = "recipe") -> Recipe:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of settings, got {show(raw)}")
    raw = apply_overrides(raw, overrides)
    check_settings(Recipe, raw)  # the plain settings first: their mistakes are reported before torch loads
    return build_dataclass(Recipe, raw, registries)


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
        raise ConfigError(f"{path}: the top level must be a mapping of settings, got {show(raw)}")
    return raw


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Load and check a recipe file, applying `key.sub=value` overrides. Raises ConfigError on any problem."""
    return recipe_from_dict(read_recipe_file(path), overrides, source=str(path))


def recipe_to_dict(recipe: Recipe) -> Dict[str, Any]:
    """The resolved recipe as plain YAML-able data (every default filled in)."""
    return to_plain(recipe)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False, default_flow_style=None)
