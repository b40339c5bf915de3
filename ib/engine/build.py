"""Building a run from a checked recipe: its model, estimator, optimisers, schedules and loaders (`build_run`),
the `Run` that `ib.engine.loop` trains and checkpoints, and a trained model loaded back for evaluation
(`load_run`)."""
from __future__ import annotations

import contextlib
import inspect
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ib import __version__, distributed
from ib.checkpoint import load_checkpoint
from ib.data import AUGMENTATIONS, BatchLoader, DataSplits, Split, load_data
from ib.adversarial import AdversarialTraining
from ib.engine.align_monitor import AlignmentMonitor
from ib.engine.step import Replicas, StepStats
from ib.errors import CheckpointError, ConfigError
from ib.estimators import ESTIMATORS, MIEstimator
from ib.models.classifier import IBClassifier, build_classifier
from ib.models.critics import CRITICS
from ib.objectives import TrainForward
from ib.optim import adam, load_optimizer
from ib.recipe import OptimConfig, Recipe, recipe_from_dict, recipe_to_dict
from ib.schedules import BetaSchedule, LRSchedule, create_beta_schedule, create_lr_schedule

CHECKPOINT_FORMAT = 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for but no CUDA device is available; use device=auto or cpu")
    return torch.device(name)


def build_model(recipe: Recipe, data: DataSplits) -> IBClassifier:
    m = recipe.model
    model = build_classifier(
        m.encoder.name, m.encoder.options, m.bottleneck.name, m.bottleneck.options,
        in_shape=data.in_shape, num_classes=data.num_classes, mean=data.mean, std=data.std,
        decoder_hidden=m.decoder_hidden,
    )
    return model.to(memory_format=_memory_format(recipe))


def _memory_format(recipe: Recipe) -> torch.memory_format:
    """NHWC convolutions under `model.channels_last` (4-D weights in channels-last order; `.to(device)` keeps it,
    and so does `load_state_dict`)."""
    return torch.channels_last if recipe.model.channels_last else torch.preserve_format


def build_estimator(recipe: Recipe, data: DataSplits, z_dim: int) -> Optional[MIEstimator]:
    if not recipe.mi.enabled:
        return None
    if not ESTIMATORS.get(recipe.mi.estimator.name).needs_critic:  # vib_kl: reads the Gaussian code
        return ESTIMATORS.create(recipe.mi.estimator.name, recipe.model.bottleneck.name, **recipe.mi.estimator.options)
    critic = CRITICS.create(recipe.mi.critic.name, data.in_shape, z_dim, **recipe.mi.critic.options)
    estimator = ESTIMATORS.create(recipe.mi.estimator.name, critic, **recipe.mi.estimator.options)
    return estimator.to(memory_format=_memory_format(recipe))


def build_optimizer(cfg: OptimConfig, params: Sequence[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser `cfg` names over `params` (tensors or param groups): SGD, or Adam(W), fused where it applies."""
    if cfg.name == "sgd":
        return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    return adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                decoupled=cfg.name == "adamw")


def build_replicas(model: IBClassifier, estimator: Optional[MIEstimator], device: torch.device) -> Replicas:
    ids = [device.index] if device.type == "cuda" else None
    critic = None
    if estimator is not None and any(True for _ in estimator.parameters()):
        # Buffers are not broadcast: MINE's moving average is updated from the global batch on every process.
        no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})  # the older torch name
        critic = DDP(estimator, device_ids=ids, **no_sync)
    return Replicas(forward=DDP(TrainForward(model), device_ids=ids), critic_loss=critic)


# ---------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Progress:
    """How far a run has got: what changes from step to step and epoch to epoch, and is checkpointed with it."""

    epoch: int = 0  # completed epochs
    step: int = 0
    stats: Optional[StepStats] = None  # sums of an epoch in progress (saved when stopped mid-epoch)
    best: Dict[str, Any] = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0})
    epoch_seconds: List[float] = field(default_factory=list)
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0  # consecutive non-finite steps at the end of the last completed epoch

    def count_faults(self) -> None:
        """Add the epoch's non-finite steps (in `stats`) to the run's count, once its steps are done."""
        self.nonfinite_steps += self.stats.nonfinite
        self.nonfinite_in_a_row = self.stats.nonfinite_in_a_row

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step,
                "epoch_stats": self.stats.state_dict() if self.stats is not None else None,
                "best": dict(self.best), "epoch_seconds": list(self.epoch_seconds),
                "nonfinite_steps": self.nonfinite_steps, "nonfinite_in_a_row": self.nonfinite_in_a_row}

    def load_state_dict(self, state: Dict[str, Any], device: torch.device, rank: int) -> None:
        self.epoch, self.step = state["epoch"], state["step"]
        self.best = dict(state["best"])
        self.epoch_seconds = list(state["epoch_seconds"])
        self.nonfinite_steps = state["nonfinite_steps"]
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)  # absent from the first checkpoint format
        self.stats = None
        if state["epoch_stats"] is not None:
            self.stats = StepStats.zeros(device)
            self.stats.load_state_dict(state["epoch_stats"], rank)


@dataclass
class Run:
    """Everything a run trains and saves, built from its recipe by `build_run`."""

    recipe: Recipe
    data: DataSplits
    device: torch.device
    model: IBClassifier
    estimator: Optional[MIEstimator]
    optimizer: torch.optim.Optimizer
    critic_optimizer: Optional[torch.optim.Optimizer]  # None without a critic (no estimator, or vib_kl)
    beta_schedule: BetaSchedule
    lr_schedule: LRSchedule
    base_lrs: List[float]
    train_loader: BatchLoader
    val_loader: BatchLoader  # this process's share of the validation split
    test_loader: BatchLoader  # this process's share of the test split
    progress: Progress = field(default_factory=Progress)
    proc: distributed.Process = distributed.SINGLE  # this process's place in a torchrun job
    replicas: Optional[Replicas] = None  # DDP wrappers under torchrun
    alignment: Optional[AlignmentMonitor] = None  # the tangent-kernel alignment monitor (main process only)
    adversarial: Optional[AdversarialTraining] = None  # adversarial training (and A3T's discriminator)
    adversarial_optimizer: Optional[torch.optim.Optimizer] = None  # the discriminator's (A3T only)

    def state_dict(self) -> Dict[str, Any]:
        """The run's state; under torchrun the same on every process but for the RNG (rank 0's is saved)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "ib_version": __version__,
            "recipe": recipe_to_dict(self.recipe),
            "model": self.model.state_dict(),
            "estimator": self.estimator.state_dict() if self.estimator is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict() if self.critic_optimizer is not None else None,
            "adversarial": self.adversarial.state_dict() if self.adversarial is not None else None,
            "adversarial_optimizer": (self.adversarial_optimizer.state_dict()
                                      if self.adversarial_optimizer is not None else None),
            "beta_schedule": self.beta_schedule.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []},
            **self.progress.state_dict(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.estimator is not None:
            self.estimator.load_state_dict(state["estimator"])
            if self.critic_optimizer is not None:  # critic-free bounds (vib_kl) have no optimiser
                load_optimizer(self.critic_optimizer, state["critic_optimizer"])
        load_optimizer(self.optimizer, state["optimizer"])
        if self.adversarial is not None:
            self.adversarial.load_state_dict(state["adversarial"])
            if self.adversarial_optimizer is not None:
                load_optimizer(self.adversarial_optimizer, state["adversarial_optimizer"])
        self.beta_schedule.load_state_dict(state["beta_schedule"])
        # The schedule spans the run's length, which `--resume DIR epochs=M` may lengthen: the epochs left follow
        # the M-epoch schedule (a cosine decay would otherwise sit at its floor for every added epoch).
        self.lr_schedule.load_state_dict({**state["lr_schedule"], "epochs": self.recipe.epochs})
        self.train_loader.load_state_dict(state["train_loader"])
        self.progress.load_state_dict(state, self.device, self.proc.rank)
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"][:torch.cuda.device_count()])
        if self.proc.rank:  # rank 0 continues the saved stream; the others draw their own (codes, marginal pairs)
            _seed_process(self.recipe.seed * 1_000_003 + self.progress.step, self.proc)


@contextlib.contextmanager
def _building(section: str) -> Iterator[None]:
    """Name the recipe section in a factory's ConfigError, and turn a failed allocation (a width far too large)
    into a ConfigError rather than a traceback."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{section}: {e}") from None
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = " ".join(str(e).split())
        if not isinstance(e, MemoryError) and "alloc" not in text and "out of memory" not in text:
            raise
        asked = re.search(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]iB)", text, re.IGNORECASE)
        if asked and asked.group(2) == "bytes":
            asked_for = f" (it asked for {float(asked.group(1)) / 2**30:.3g} GiB)"
        else:
            asked_for = f" (it asked for {asked.group(1)} {asked.group(2)})" if asked else ""
        raise ConfigError(f"{section}: the network does not fit in memory{asked_for}; check the widths in "
                          f"{section}.*") from None


def _seed_process(seed: int, proc: distributed.Process) -> None:
    """Give a process other than rank 0 its own random stream, so that processes draw different noise."""
    if proc.rank:
        torch.manual_seed((seed + 7919 * proc.rank) % 2**63)


def build_run(recipe: Recipe, proc: distributed.Process = distributed.SINGLE,
              device: Optional[torch.device] = None) -> Run:
    """Load the data and build every object of a run from a checked recipe (raises ConfigError, DataError).

    Under torchrun (`proc` from `ib.distributed.setup`) every process builds the same model (DDP checks it), takes
    its rows of each global batch and its share of the validation and test sets, and trains through DDP wrappers.
    """
    device = device or resolve_device(recipe.device)
    if recipe.precision == "bf16" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        # (torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated, on pre-Ampere GPUs)
        raise ConfigError(f"precision: 'bf16' needs a GPU with native bfloat16 (Ampere or newer); "
                          f"{torch.cuda.get_device_name(device)} has none: use precision=fp32")
    torch.manual_seed(recipe.seed)
    d = recipe.data
    if d.batch_size % proc.world_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is the global batch and must divide by the number of "
                          f"processes ({proc.world_size})")
    if d.batch_size // proc.world_size < 2 and recipe.mi.enabled:
        raise ConfigError(f"data.batch_size={d.batch_size} leaves fewer than 2 samples per process "
                          f"({proc.world_size} processes)")
    if proc.distributed and recipe.mi.adaptive_clip:
        raise ConfigError("mi.adaptive_clip takes the two gradients apart outside DistributedDataParallel's "
                          "backward: it runs in one process only (drop torchrun, or set mi.adaptive_clip=false)")
    first = proc.local_rank == 0  # under torchrun: one process per machine loads (maybe downloads) first
    if not first:
        distributed.barrier()
    data = load_data(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction, seed=recipe.seed,
                     image_size=d.image_size, label_noise=d.label_noise)
    if first:
        distributed.barrier()
    probe_share = min(recipe.monitor.probe_size, len(data.val.y) if len(data.val.y) >= 2 else len(data.test.y))
    if proc.distributed and probe_share // proc.world_size < 2:
        raise ConfigError(f"monitor.probe_size={recipe.monitor.probe_size} leaves fewer than 2 probe samples per "
                          f"process ({proc.world_size} processes)")
    if len(data.train.y) < d.batch_size:
        raise ConfigError(f"data.batch_size={d.batch_size} is larger than the training set ({len(data.train.y)})")
    with _building("model"):
        model = build_model(recipe, data).to(device)
    with _building("mi"):
        estimator = build_estimator(recipe, data, model.bottleneck.z_dim)
    critic_optimizer = None
    if estimator is not None:
        estimator = estimator.to(device)
        if any(True for _ in estimator.parameters()):  # bounds without a critic (e.g. a KL bound) train nothing
            critic_optimizer = build_optimizer(recipe.mi.optimizer, list(estimator.parameters()))
    optimizer = build_optimizer(recipe.optimizer, list(model.parameters()))
    adversarial, adversarial_optimizer = build_adversarial(recipe, model, data.in_shape, proc)
    beta_schedule = create_beta_schedule(recipe.beta_schedule.name, recipe.beta, **recipe.beta_schedule.options)
    lr_schedule = create_lr_schedule(recipe.lr_schedule.name, recipe.epochs, **recipe.lr_schedule.options)
    augment = AUGMENTATIONS[d.augment]
    replicas = None
    if proc.distributed:
        if estimator is not None:
            estimator.sync = True  # global-batch bounds (ib.distributed)
        replicas = build_replicas(model, estimator, device)
    _seed_process(recipe.seed, proc)

    def share(split: Split) -> Split:
        part = distributed.shard(len(split), proc)
        return Split(split.x[part], split.y[part])

    train_loader = BatchLoader(data.train, d.batch_size, shuffle=True, drop_last=True, device=device, augment=augment,
                               seed=recipe.seed, rank=proc.rank, world_size=proc.world_size)
    alignment = None
    if recipe.monitor.alignment.enabled:  # checked in every process; measured by the main one
        alignment = AlignmentMonitor.build(recipe.monitor.alignment, data, model, device, seed=recipe.seed,
                                           last_step=recipe.epochs * len(train_loader))
    return Run(
        recipe=recipe, data=data, device=device, model=model, estimator=estimator, optimizer=optimizer,
        critic_optimizer=critic_optimizer, beta_schedule=beta_schedule, lr_schedule=lr_schedule,
        base_lrs=[g["lr"] for g in optimizer.param_groups], train_loader=train_loader,
        val_loader=BatchLoader(share(data.val), d.eval_batch_size, shuffle=False, drop_last=False, device=device),
        test_loader=BatchLoader(share(data.test), d.eval_batch_size, shuffle=False, drop_last=False, device=device),
        proc=proc, replicas=replicas, alignment=alignment if proc.is_main else None, adversarial=adversarial,
        adversarial_optimizer=adversarial_optimizer,
    )


def build_adversarial(recipe: Recipe, model: nn.Module, in_shape: Sequence[int], proc: distributed.Process
                      ) -> Tuple[Optional[AdversarialTraining], Optional[torch.optim.Optimizer]]:
    """The recipe's adversarial training, with A3T's discriminator (on the model's device) and its optimiser."""
    cfg = recipe.adversarial
    if cfg.name == "none":
        return None, None
    if proc.distributed:
        raise ConfigError("adversarial training runs in one process only for now (drop torchrun, or set "
                          "adversarial.name=none)")
    if recipe.mi.adaptive_clip:
        raise ConfigError("mi.adaptive_clip scales the penalty against the clean cross-entropy alone; it does not "
                          "combine with adversarial training (set one of them off)")
    adversarial = AdversarialTraining(cfg, model, tuple(in_shape)).to(next(model.parameters()).device)
    params = list(adversarial.parameters())
    return adversarial, build_optimizer(cfg.disc_optimizer, params) if params else None


# ---------------------------------------------------------------------------------------------------------------------
# A trained model back from its checkpoint


def resolve_checkpoint(path: str | Path) -> Tuple[Path, Path]:
    """(checkpoint file, folder for the outputs) from a run folder (its `best.pt`) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        ckpt = path / "best.pt"
        if not ckpt.is_file():
            other = " (last.pt is there: pass it to evaluate that)" if (path / "last.pt").is_file() else ""
            raise CheckpointError(f"no best.pt in run folder {path}{other}")
        return ckpt, path
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (give a run folder holding best.pt, or a .pt file)")
    return path, path.parent


@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint, with its recipe and data."""

    model: nn.Module
    recipe: Recipe
    data: DataSplits
    checkpoint: Path
    run_dir: Path
    epoch: int


def load_run(path: str | Path, device: Optional[str] = None, *, overrides: Sequence[str] = ()) -> LoadedRun:
    """Rebuild the model of a checkpoint and load its weights (the global RNG untouched).

    Args:
        path: A run folder (its `best.pt` is read) or a checkpoint file.
        device: Where to put the model (default: the recipe's `device`).
        overrides: `key.sub=value` settings applied to the saved recipe and checked like a recipe file's (`ib eval`
            passes `eval.*` ones).

    Raises:
        CheckpointError: Missing, unreadable, or not matching its own recipe.
        ConfigError, DataError: An override is invalid, or the recipe's data set cannot be loaded.
    """
    ckpt, run_dir = resolve_checkpoint(path)
    state = load_checkpoint(ckpt)
    if "recipe" not in state or "model" not in state:
        raise CheckpointError(f"{ckpt} holds no recipe or model weights")
    recipe = recipe_from_dict(state["recipe"], overrides, source=str(ckpt))
    d = recipe.data
    data = load_data(d.name, root=d.root, download=d.download, val_fraction=d.val_fraction, seed=recipe.seed,
                     image_size=d.image_size, label_noise=d.label_noise)
    target = resolve_device(device or recipe.device)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights from the global RNG
        model = build_model(recipe, data)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt}: weights do not match the recipe: {' '.join(str(e).split())[:300]}") from None
    return LoadedRun(model.to(target), recipe, data, ckpt, run_dir, int(state.get("epoch", 0)))
