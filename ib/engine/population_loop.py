"""Training several runs of one recipe (a sweep's betas and seeds) as one population (`ib.engine.population`).

    fit_population            opens or resumes every member's run folder, then trains them together
      population_blockers     why a set of recipes cannot train as one population (empty: it can)
      stack_runs              the population from the members' runs (weights, optimiser states, RNG streams)
      population_epoch        one epoch of population steps over every member's own batches
      write_back              the population's state into each member's run
      ib.engine.loop.close_epoch, per member, with its own RNG stream installed

Each member's run folder is written exactly as `ib train` writes it (`last.pt`, `best.pt`, `history.csv`,
`metrics.json`, TensorBoard), so `ib eval`, `ib plane`, `--resume` and the sweep's CSV work unchanged; a member
resumes alone or in a population alike.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set

import torch

from ib import distributed
from ib.checkpoint import load_checkpoint
from ib.engine.build import Run, build_optimizer, load_optimizer
from ib.engine.loop import StopFlag, _open_run, close_epoch, finish, probe_set
from ib.engine.population import Population, build_population, population_step
from ib.engine.run_dir import RunFolder, record_failure
from ib.engine.step import StepStats, TrainingError
from ib.errors import ConfigError
from ib.recipe import Recipe, recipe_to_dict
from ib.schedules import set_lr

log = logging.getLogger(__name__)

# What may differ between the members of one population: everything else of their recipes must be equal.
MEMBER_KEYS = ("beta", "seed", "name")


def population_blockers(recipes: Sequence[Recipe]) -> List[str]:
    """Why these recipes cannot train as one population; empty when they can."""
    reasons: List[str] = []
    first = recipe_to_dict(recipes[0])
    for r in recipes[1:]:
        other = recipe_to_dict(r)
        diff = sorted(k for k in first if k not in MEMBER_KEYS and first[k] != other.get(k))
        if diff:
            reasons.append(f"the runs' recipes differ in {', '.join(diff)} (only beta and seed may)")
            break
    r = recipes[0]
    if r.device not in ("cpu", "auto") or (r.device == "auto" and torch.cuda.is_available()):
        reasons.append("it runs on a GPU (the members' random streams are CPU RNG states for now)")
    if r.model.encoder.name not in ("mlp", "convnet"):
        reasons.append(f"the {r.model.encoder.name} encoder has batch norm (running statistics per batch)")
    if float(r.model.encoder.options.get("dropout", 0.0) or 0.0) > 0:
        reasons.append("the encoder has dropout")
    if r.adversarial.name != "none":
        reasons.append("adversarial training")
    if r.mi.adaptive_clip:
        reasons.append("mi.adaptive_clip")
    if r.precision != "fp32":
        reasons.append(f"precision {r.precision}")
    if r.monitor.alignment.enabled:
        reasons.append("monitor.alignment (measured per run inside the epoch)")
    return reasons


def available_memory() -> int:
    """Bytes of memory available to a new allocation (MemAvailable of /proc/meminfo; else the physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def population_bytes(run: Run, size: int) -> int:
    """An estimate of what a population of `size` members like `run` adds to memory: per member, its weights four
    times over (weights, gradients, two optimiser moments) and one batch's activations, taken as the batch size
    times every layer's output width, in float32, four times over (the forward's saved tensors, the backward's, the
    critic's P + 1 pairings, the stacking copies)."""
    modules = [m for m in (run.model, run.estimator) if m is not None]
    weights = sum(p.numel() for m in modules for p in m.parameters())
    widths = sum(getattr(layer, "out_features", 0) for m in modules for layer in m.modules())
    return size * 4 * (4 * weights + 4 * run.recipe.data.batch_size * widths)


def _size(n: float) -> str:
    return f"{n / 2**30:.1f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB"


def saved_step(run_dir: Path) -> int:
    """The step a run folder's `last.pt` stands at (0 without one)."""
    path = Path(run_dir) / "last.pt"
    if not path.exists():
        return 0
    return int(load_checkpoint(path)["step"])


def stack_runs(runs: Sequence[Run], rng_states: Sequence[torch.Tensor]) -> Population:
    """The population of `runs`: their weights stacked, optimisers over the stacked weights with the members'
    states stacked (they must be at the same step), and each member's RNG stream."""
    r = runs[0].recipe
    pop = build_population([run.model for run in runs], [run.estimator for run in runs],
                           lambda params: build_optimizer(r.optimizer, params),
                           lambda params: build_optimizer(r.mi.optimizer, params), rng_states)
    _stack_optimizer_state(pop.optimizer, [run.optimizer for run in runs], pop.model.leaf_is_transposed())
    if pop.critic_optimizer is not None:
        _stack_optimizer_state(pop.critic_optimizer, [run.critic_optimizer for run in runs],
                               pop.estimator.leaf_is_transposed())
    return pop


def _stack_optimizer_state(target: torch.optim.Optimizer, members: Sequence[torch.optim.Optimizer],
                           transposed: Sequence[bool]) -> None:
    """The members' optimiser states stacked into `target`'s, a weight's moments transposed as its leaf is."""
    states = [opt.state_dict() for opt in members]
    if not states[0]["state"]:
        return
    stacked: Dict[int, Dict[str, Any]] = {}
    for i in states[0]["state"]:
        entry = {}
        for key, value in states[0]["state"][i].items():
            values = [s["state"][i][key] for s in states]
            if torch.is_tensor(value) and value.dim() > 0:
                entry[key] = torch.stack(values)
                if transposed[i]:
                    entry[key] = entry[key].transpose(1, 2).contiguous()
            else:
                if any(not torch.equal(torch.as_tensor(v), torch.as_tensor(value)) for v in values):
                    raise ValueError(f"the members' optimisers differ in {key} (they are at different steps)")
                entry[key] = value
        stacked[i] = entry
    load_optimizer(target, {"state": stacked, "param_groups": target.state_dict()["param_groups"]})


def _unstack_optimizer_state(source: torch.optim.Optimizer, members: Sequence[torch.optim.Optimizer],
                             transposed: Sequence[bool]) -> None:
    """Each member's slice of the population optimiser's state, copied into its own optimiser: in place where the
    member's state already has its tensors (every epoch but the first), else through `load_optimizer`."""
    leaves = [p for group in source.param_groups for p in group["params"]]
    size = len(members)

    def part(i: int, v: Any, m: int) -> Any:
        """Member m's slice of leaf i's state entry v, shaped as the member's parameter."""
        if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size):
            return v
        return v[m].t() if transposed[i] else v[m]

    for m, member in enumerate(members):
        params = [p for group in member.param_groups for p in group["params"]]
        pairs = [(i, source.state[leaf], member.state.get(param)) for i, (leaf, param) in enumerate(zip(leaves, params))
                 if source.state.get(leaf)]
        if all(own is not None and set(own) == set(state) for _, state, own in pairs):
            with torch.no_grad():
                for i, state, own in pairs:
                    for k, v in state.items():
                        if torch.is_tensor(v):
                            own[k].copy_(part(i, v, m))
                        else:
                            own[k] = v
            continue
        per = {i: {k: (part(i, v, m).clone(memory_format=torch.contiguous_format) if torch.is_tensor(v) else v)
                   for k, v in state.items()} for i, state, _ in pairs}
        load_optimizer(member, {"state": per, "param_groups": member.state_dict()["param_groups"]})


def write_back(pop: Population, runs: Sequence[Run]) -> None:
    """Copy the population's weights, buffers and optimiser states into each member's run."""
    for m, run in enumerate(runs):
        run.model.load_state_dict(pop.model.member_state(m))
        if pop.estimator is not None:
            run.estimator.load_state_dict(pop.estimator.member_state(m))
    _unstack_optimizer_state(pop.optimizer, [run.optimizer for run in runs], pop.model.leaf_is_transposed())
    if pop.critic_optimizer is not None:
        _unstack_optimizer_state(pop.critic_optimizer, [run.critic_optimizer for run in runs],
                                 pop.estimator.leaf_is_transposed())


def population_epoch(pop: Population, runs: Sequence[Run], stats: Sequence[StepStats], step: int,
                     stop: Optional[StopFlag]) -> int:
    """The rest of the epoch of every member's loader, in lockstep: each step stacks the members' own batches and
    betas; returns the global step. A member's non-finite steps are counted in its stats, as `train_one_epoch`
    does, and `max_nonfinite_steps` in a row raise TrainingError naming the member."""
    r = runs[0].recipe
    pop.model.skeleton.train()
    if pop.estimator is not None:
        pop.estimator.skeleton.train()
    left = runs[0].train_loader.batches_left()
    iters = [iter(run.train_loader) for run in runs]
    for _ in range(left):
        batches = [next(it) for it in iters]  # not zip: it would leave all but the first loader's epoch open
        x = torch.stack([b[0] for b in batches])  # [S, B, ...]
        y = torch.stack([b[1] for b in batches])  # [S, B]
        betas = [run.beta_schedule.value(step) for run in runs]
        out = population_step(pop, x, y, betas, critic_steps=r.mi.critic_steps, grad_clip=r.optimizer.grad_clip,
                              critic_grad_clip=r.mi.optimizer.grad_clip, fused=r.mi.fused,
                              label_smoothing=r.label_smoothing)
        step += 1
        for m, (s, run) in enumerate(zip(stats, runs)):
            if bool(out["finite"][m]):
                s.add({k: out[k][m].double() for k in ("loss", "ce", "mi_bound", "correct")}, y.shape[1])
                continue
            s.nonfinite_in_a_row += 1
            s.nonfinite += 1
            log.warning("%s: non-finite loss or gradient at step %d: step skipped (%d in a row)",
                        run.recipe.name, step, s.nonfinite_in_a_row)
            if s.nonfinite_in_a_row >= r.max_nonfinite_steps:
                raise TrainingError(f"{run.recipe.name}: {s.nonfinite_in_a_row} consecutive non-finite steps (up "
                                    f"to step {step}); stopping. Try a lower learning rate or beta")
        if stop is not None and stop:
            break
    else:
        for it in iters:
            next(it, None)  # each loader closes its epoch (the next `iter` draws a new order)
    return step


def fit_population(recipes: Sequence[Recipe], run_dirs: Sequence[Path], *, resume: Sequence[bool],
                   handle_signals: bool = False) -> List[Dict[str, Any]]:
    """Train (or resume) the runs of `recipes` into `run_dirs` as one population; returns each member's final
    metrics. The caller checks `population_blockers` first. Members must stand at the same step: fresh, or
    stopped together."""
    proc = distributed.SINGLE
    runs: List[Run] = []
    states: List[torch.Tensor] = []
    for recipe, run_dir, res in zip(recipes, run_dirs, resume):
        runs.append(_open_run(recipe, Path(run_dir), proc, None, resume=res, overwrite=not res))
        states.append(torch.get_rng_state())  # the member's stream, as its separate run would go on with it
    need, limit = population_bytes(runs[0], len(runs)), available_memory()
    if need > 0.8 * limit:
        raise ConfigError(f"--vectorize: a population of {len(runs)} runs needs about {_size(need)}, more than 80 % of "
                          f"the {_size(limit)} available; train fewer runs at once (fewer betas or seeds per "
                          f"command) or run without --vectorize")
    steps = {run.progress.step for run in runs}
    if len(steps) > 1:
        raise ValueError(f"the members stand at different steps {sorted(steps)}; train them apart")
    folders = [RunFolder(Path(d), run) for d, run in zip(run_dirs, runs)]
    stop = StopFlag()
    previous = stop.install() if handle_signals else {}
    try:
        statuses, lasts = _train_population(runs, folders, states, stop)
    except BaseException as e:
        for run_dir, run in zip(run_dirs, runs):
            record_failure(Path(run_dir), run, e)
        raise
    finally:
        for folder in folders:
            folder.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return [finish(run, Path(d), status, last) for run, d, status, last in zip(runs, run_dirs, statuses, lasts)]


def _train_population(runs: List[Run], folders: List[RunFolder], states: List[torch.Tensor], stop: StopFlag):
    r = runs[0].recipe
    pop = stack_runs(runs, states)
    probes = [probe_set(run) for run in runs]
    warned: List[Set[Any]] = [set() for _ in runs]
    lasts: List[Any] = [None] * len(runs)
    while runs[0].progress.epoch < r.epochs:
        epoch = runs[0].progress.epoch + 1
        t0 = time.perf_counter()
        factor = runs[0].lr_schedule.factor(runs[0].progress.epoch)
        set_lr(pop.optimizer, runs[0].base_lrs, factor)
        for run in runs:
            set_lr(run.optimizer, run.base_lrs, factor)
            if run.progress.stats is None:
                run.progress.stats = StepStats.zeros(run.device, run.progress.nonfinite_in_a_row)
        step = population_epoch(pop, runs, [run.progress.stats for run in runs], runs[0].progress.step, stop)
        write_back(pop, runs)
        shared = time.perf_counter() - t0  # the population's steps, which every member's epoch time includes
        interrupted = stop and runs[0].train_loader.batches_left() < len(runs[0].train_loader)
        for m, (run, folder) in enumerate(zip(runs, folders)):
            run.progress.step = step
            torch.set_rng_state(pop.rng_states[m])  # its evaluation and checkpoint draw and save its own stream
            if interrupted:
                folder.save_last(run)
            else:
                # its epoch time: the shared steps and its own evaluation, not the other members' evaluations
                lasts[m] = close_epoch(run, folder, probes[m], epoch, started=time.perf_counter() - shared,
                                       stop_after=None, warned=warned[m])
            pop.rng_states[m] = torch.get_rng_state()
        if interrupted or (stop and epoch < r.epochs):
            return ["interrupted"] * len(runs), lasts
    return ["completed"] * len(runs), lasts
