"""Training speed of `ib` against a plain PyTorch loop, measured in one process on one machine.

    python benchmarks/train_speed.py                      # PI-MLP on Fashion-MNIST (+ CIFAR if --cifar-root)
    python benchmarks/train_speed.py --cifar-root /tmp/cifar10-jpeg --cifar-steps 20

What it measures (after a warm-up, the median over --repeats rounds in which the training loops take turns, so a
change in the machine's load falls on all of them alike; the goals' ratios are also computed round by round):
  1. matmul peak: FLOP/s of torch.mm at a large square, and at each loop's own matmuls (the (M, K, N) of every
     matrix product of one training step, recorded as dispatched, timed alone);
  2. a plain PyTorch reference loop: tensors in memory, the same network, cross-entropy only, torch's default Adam
     (ib's own path uses fused Adam where torch has it); and MINE-IB written in plain PyTorch with the same
     algorithm as ib's step (`reference_mine_loop`), the peer of ib's MINE-IB loop;
  3. ib's training code path (`ib.engine.train_one_epoch` on a `BatchLoader`) with beta = 0 (deterministic
     encoder, no critic) and with MINE (the recipe's statistics network);
  4. model FLOPs per sample counted by torch.utils.flop_counter.FlopCounterMode on one real step, achieved
     FLOP/s and utilisation = achieved / peak at the step's own matmuls;
  5. the data path alone: batches per second of ib's in-memory loader against torchvision's per-sample path.
Results are written to benchmarks/results/train_speed.md (or --out) with the command, the machine and the date.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ib.data import BatchLoader, Split  # noqa: E402
from ib.recipe import Precision, load_recipe  # noqa: E402
from ib.engine import StepStats, autocast, build_run, train_one_epoch, train_step  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"
NOISE_OFF = ["mi.critic.input_noise=0", "mi.critic.hidden_noise=0"]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_report(out: Path, lines: List[str]) -> None:
    """Write a benchmark's markdown report to `out` (its folder made) and echo it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    sys.stdout.write(out.read_text())


def gpu_name(device: torch.device) -> str:
    return f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_together(fns: Dict[str, Callable[[], None]], device: torch.device, repeats: int) -> Dict[str, List[float]]:
    """Wall seconds of each function in each of `repeats` rounds, the functions taking turns within each round
    (after one warm-up call each), so that a change in the machine's load falls on all of them alike."""
    for fn in fns.values():
        fn()
    sync(device)
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def per_round(times: Dict[str, List[float]], figure: Callable[[Dict[str, float]], float]) -> Tuple[float, float, float]:
    """A figure computed from the times of each round alone (e.g. a ratio of two loops measured a few seconds
    apart): its median over the rounds, and its smallest and largest value."""
    values = [figure({k: v[i] for k, v in times.items()}) for i in range(len(next(iter(times.values()))))]
    return statistics.median(values), min(values), max(values)


def spread(figure: Tuple[float, float, float], fmt: str) -> str:
    median, lo, hi = figure
    return f"{median:{fmt}} (rounds {lo:{fmt}}-{hi:{fmt}})"


def timed(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median wall seconds of `fn` over `repeats` calls (after one warm-up call)."""
    return statistics.median(timed_together({"fn": fn}, device, repeats)["fn"])


# ---------------------------------------------------------------------------------------------------------------------
# 1. Matmul peak


def mm_loop(shapes: List[Tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
            inner: int = 20) -> Tuple[Callable[[], None], float]:
    """A function running torch.mm once per (M, K, N) in `shapes`, `inner` times over, and its FLOPs."""
    mats = [(torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype))
            for m, k, n in shapes]
    flops = inner * sum(2 * m * k * n for m, k, n in shapes)

    def run() -> None:
        for _ in range(inner):
            for a, b in mats:
                torch.mm(a, b)

    return run, flops


class MatmulShapes(TorchDispatchMode):
    """Records (M, K, N) of every matrix product (mm, addmm) dispatched while active: the step's own matmuls, as
    the FLOP counter sees them (e.g. no input gradient for a first layer, a critic's split first layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: List[Tuple[int, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2:] if func is torch.ops.aten.mm.default else args[1:3]
            self.shapes.append((a.shape[0], a.shape[1], b.shape[1]))
        return func(*args, **(kwargs or {}))


def linear_step_shapes(model: nn.Module, batch: int) -> List[Tuple[int, int, int]]:
    """Three matmuls per Linear in `model` (forward, grad wrt input, grad wrt weight): the shapes this benchmark
    timed its peak at before it recorded the step's own (see MatmulShapes)."""
    shapes = []
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            k, n = mod.in_features, mod.out_features
            shapes += [(batch, k, n), (batch, n, k), (k, batch, n)]
    return shapes


# ---------------------------------------------------------------------------------------------------------------------
# 2. The plain reference loop


def reference_mlp(in_features: int, hidden: List[int], z_dim: int, classes: int) -> nn.Module:
    layers: List[nn.Module] = [nn.Flatten()]
    widths = [in_features, *hidden]
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers += [nn.Linear(widths[-1], z_dim), nn.Linear(z_dim, classes)]
    return nn.Sequential(*layers)


def counted(step: Callable[[], object]) -> Tuple[float, List[Tuple[int, int, int]]]:
    """The FLOPs of one call of `step` (torch's FlopCounterMode) and its matrix products (MatmulShapes)."""
    counter, matmuls = FlopCounterMode(display=False), MatmulShapes()
    with counter, matmuls:
        step()
    return counter.get_total_flops(), matmuls.shapes


def counted_flops(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Tuple[float, List[Tuple[int, int, int]]]:
    """FLOPs per sample of one forward and backward of the plain loop, counted as for ib's step, and its matmuls."""
    flops, matmuls = counted(lambda: F.cross_entropy(model(x), y).backward())
    model.zero_grad(set_to_none=True)
    return flops / len(y), matmuls


def in_memory_loop(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device,
                   step: Callable[[torch.Tensor, torch.Tensor], None]) -> Callable[[], None]:
    """`steps` batches of the in-memory uint8 images x and labels y, in a fresh random order on each call, each
    indexed, scaled to [0, 1] and passed to `step`: the plain loops' data path."""
    g = torch.Generator().manual_seed(0)

    def run() -> None:
        order = torch.randperm(len(y), generator=g).to(device)
        for i in range(steps):
            idx = order[i * batch:(i + 1) * batch]
            step(x[idx].float().div_(255.0), y[idx])

    return run


def reference_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, steps: int,
                   device: torch.device, precision: Precision) -> Callable[[], None]:
    """`steps` of the textbook loop: index a batch of in-memory tensors, forward (under bf16 autocast for
    --precision bf16), CE, backward, Adam."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def step(xb: torch.Tensor, yb: torch.Tensor) -> None:
        with autocast(device, precision):
            loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return in_memory_loop(x, y, batch, steps, device, step)


def reference_mine_loop(x: torch.Tensor, y: torch.Tensor, batch: int, steps: int, device: torch.device,
                        precision: Precision) -> Tuple[Callable[[], None], float]:
    """`steps` of MINE-IB written in plain PyTorch, as a user would with the same algorithm as ib's one-pass step:
    the Gaussian encoder (784-1024-1024, K=256, std = softplus(pre - 5)); the paper's statistics network on
    concat(x, z) (512-512 F.elu, N(0, 0.3^2) input and N(0, 0.5^2) hidden noise, the x half of the first layer
    computed once per x and the joint pairs reusing their shuffled twins' draws, as ib does); one shuffled batch
    for the marginal; the DV bound with MINE's moving-average correction; gradient reversal by detach arithmetic;
    one backward pass; torch's default Adam for each player. Unlike ib's step it has no finiteness check, and its
    ELU is torch's (on the CPU a scalar expm1 per element). Returns the loop and its counted FLOPs per sample."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 512)).to(device)
    decoder = nn.Linear(256, 10).to(device)
    first, second, out = (nn.Linear(a, b).to(device) for a, b in ((784 + 256, 512), (512, 512), (512, 1)))
    opt = torch.optim.Adam([*body.parameters(), *decoder.parameters()], lr=1e-4, betas=(0.5, 0.999))
    critic_opt = torch.optim.Adam([*first.parameters(), *second.parameters(), *out.parameters()], lr=2e-4,
                                  betas=(0.5, 0.999))
    state = {"log_ema": None}
    g = torch.Generator().manual_seed(1)  # the marginal's shifts

    def noisy(h: torch.Tensor, std: float) -> torch.Tensor:  # [2B, H]: one draw for both halves
        eps = torch.randn(h.shape[0] // 2, h.shape[1], device=h.device, dtype=h.dtype)
        return (h.view(2, -1, h.shape[1]) + std * eps).view(h.shape)

    def step(xb: torch.Tensor, yb: torch.Tensor, beta: float = 1e-3) -> None:
        b = yb.shape[0]
        with autocast(device, precision):
            mean, pre = body(xb).chunk(2, dim=1)
            z = mean + F.softplus(pre - 5.0) * torch.randn_like(mean)
            ce = F.cross_entropy(decoder(z.float()), yb)
            z = (1 + beta) * z.detach() - beta * z  # the value z; the gradient reaching z, times -beta
            zz = torch.cat([z, z.roll(int(torch.randint(1, b, (1,), generator=g)), 0)])  # joint, then shuffled
            x_in = xb.flatten(1) + 0.3 * torch.randn(b, 784, device=device)
            h = F.linear(x_in, first.weight[:, :784], first.bias).repeat(2, 1) + F.linear(
                noisy(zz, 0.3), first.weight[:, 784:])
            h = noisy(F.elu(second(noisy(F.elu(h), 0.5))), 0.5)
            t = out(h).squeeze(1).float()
        lme = torch.logsumexp(t[b:], 0) - math.log(b)
        with torch.no_grad():
            ema = state["log_ema"]
            state["log_ema"] = lme.detach() if ema is None else torch.logaddexp(ema + math.log(0.99),
                                                                                lme + math.log(0.01))
        log_ema = state["log_ema"]
        bound = t[:b].mean() - torch.exp(lme - log_ema) + 1 - log_ema  # MINE's bias-corrected DV surrogate
        opt.zero_grad(set_to_none=True)
        critic_opt.zero_grad(set_to_none=True)
        (ce - bound).backward()  # the critic ascends the bound; the encoder descends CE + beta * bound
        opt.step()
        critic_opt.step()

    flops, _ = counted(lambda: step(x[:batch].float().div(255.0), y[:batch]))
    return in_memory_loop(x, y, batch, steps, device, step), flops / batch


# ---------------------------------------------------------------------------------------------------------------------
# 3-4. ib's own code path


@dataclass
class IBLoop:
    epoch: Callable[[], None]  # one epoch of `steps` batches through ib.engine.train_one_epoch
    flops: float  # counted FLOPs per sample of one step
    matmuls: List[Tuple[int, int, int]]  # (M, K, N) of that step's matrix products
    run: Any  # the ib.engine.Run it trains


def ib_loop(recipe_path: Path, overrides: List[str], steps: int, device: torch.device, precision: Precision = "fp32"
            ) -> IBLoop:
    """ib's training path on the first `steps` batches of a recipe's data, with one step counted."""
    recipe = load_recipe(recipe_path, [*overrides, f"device={device.type}", f"precision={precision}",
                                       "log_every=1000000000", "max_nonfinite_steps=1000000000"])
    run = build_run(recipe)
    b = recipe.data.batch_size
    n = steps * b
    split = Split(run.data.train.x[:n], run.data.train.y[:n])
    loader = BatchLoader(split, b, shuffle=True, drop_last=True, device=device, seed=0)
    state = {"step": 0}

    def run_epoch() -> None:
        state["step"] = train_one_epoch(run, loader, StepStats.zeros(device), step=state["step"])

    x, y = next(iter(BatchLoader(split, b, shuffle=False, drop_last=True, device=device)))
    flops, matmuls = counted(lambda: train_step(
        run.model, run.estimator, run.optimizer, run.critic_optimizer, x, y, run.beta_schedule.value(10**6),
        critic_steps=recipe.mi.critic_steps, fused=recipe.mi.fused, precision=recipe.precision))
    return IBLoop(run_epoch, flops / b, matmuls, run)


# ---------------------------------------------------------------------------------------------------------------------
# 5. Data path


def torchvision_fashion(root: Path, files: Path):
    """torchvision's FashionMNIST over a copy of the IDX .gz files in `files`, unpacked into torchvision's raw
    layout."""
    from torchvision import datasets, transforms

    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for gz in files.glob("*.gz"):
        with gzip.open(gz) as src, open(raw / gz.stem, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return datasets.FashionMNIST(str(root), train=True, download=False, transform=transforms.ToTensor())


def data_rates(run, files: Path, batch: int, batches: int, device: torch.device, repeats: int
               ) -> Tuple[float, float]:
    from torch.utils.data import DataLoader

    loader = BatchLoader(run.data.train, batch, shuffle=True, drop_last=True, device=device, seed=0)

    def ours() -> None:
        for i, (x, y) in enumerate(loader):
            if i + 1 == batches:
                break
        loader.load_state_dict({"generator": loader.generator.get_state()})  # drop the half-read epoch

    with tempfile.TemporaryDirectory() as tmp:
        ds = torchvision_fashion(Path(tmp), files)
        tv_loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=0)

        def theirs() -> None:
            for i, (x, y) in enumerate(tv_loader):
                x, y = x.to(device), y.to(device)
                if i + 1 == batches:
                    break

        return batches / timed(ours, device, repeats), batches / timed(theirs, device, repeats)


# ---------------------------------------------------------------------------------------------------------------------


def fixed_costs(recipe: Path, plain: List[str], data: List[str], device: torch.device, args) -> Tuple[float, float]:
    """Seconds per step of ib's beta=0 and MINE-IB loops with tiny layers: what a step costs besides arithmetic."""
    tiny = ["model.encoder.hidden=[8,8]", "model.bottleneck.z_dim=4", "mi.critic.hidden=[8,8]", "data.batch_size=4"]
    steps = max(args.steps, 20)
    loops = {k: ib_loop(recipe, [*overrides, *tiny], steps, device, args.precision).epoch
             for k, overrides in (("ib0", plain), ("mine", [*data, "beta=1e-3"]))}
    times = timed_together(loops, device, args.repeats)
    return statistics.median(times["ib0"]) / steps, statistics.median(times["mine"]) / steps


def mlp_section(args, device: torch.device, lines: List[str]) -> None:
    recipe = ROOT / "recipes" / "fashion_mnist.yaml"
    data = [f"data.root={args.fashion_root}"]
    plain = [*data, "beta=0", "mi.enabled=false", "model.bottleneck=deterministic", "model.bottleneck.z_dim=256"]
    b = 100
    ib0 = ib_loop(recipe, plain, args.steps, device, args.precision)
    mine = ib_loop(recipe, [*data, "beta=1e-3"], args.steps, device, args.precision)
    # An ablation, not a setting to train with: the MINE-IB loop with the critic's Gaussian noise off, to weigh
    # what drawing and adding the noise costs (it adds no FLOPs).
    quiet = ib_loop(recipe, [*data, "beta=1e-3", *NOISE_OFF], args.steps, device, args.precision)
    flops0, flops_mine = ib0.flops, mine.flops
    x = ib0.run.data.train.x[: args.steps * b].to(device)
    y = ib0.run.data.train.y[: args.steps * b].to(device)
    torch.manual_seed(0)
    ref_model = reference_mlp(784, [1024, 1024], 256, 10).to(device)
    ref_loop = reference_loop(ref_model, x, y, b, args.steps, device, args.precision)
    ref_flops, ref_matmuls = counted_flops(ref_model, x[:b].float().div(255.0), y[:b])
    ref_mine_loop, ref_mine_flops = reference_mine_loop(x, y, b, args.steps, device, args.precision)
    # Each loop's peak: its own step's matmuls timed alone, taking turns with the training loops so that
    # utilisation compares rates measured under one load.
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32  # the peaks in the matmuls' own dtype
    square, square_flops = mm_loop([(2048, 2048, 2048)], device, dtype, inner=3)
    peak_loops = {name: mm_loop(shapes, device, dtype) for name, shapes in (
        ("mm_ref", ref_matmuls), ("mm0", ib0.matmuls), ("mm_mine", mine.matmuls),
        ("mm_mine_old", linear_step_shapes(mine.run.model, b) + linear_step_shapes(mine.run.estimator, 2 * b)))}
    times = timed_together({"ref": ref_loop, "ib0": ib0.epoch, "mine": mine.epoch, "quiet": quiet.epoch,
                            "ref_mine": ref_mine_loop,
                            "square": square,
                            **{k: fn for k, (fn, _) in peak_loops.items()}}, device, args.repeats)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    ref, rate0, rate_mine, ref_mine = (args.steps * b / seconds[k] for k in ("ref", "ib0", "mine", "ref_mine"))
    square = square_flops / seconds["square"]
    peak_ref, peak0, peak_mine, peak_mine_old = (peak_loops[k][1] / seconds[k]
                                                 for k in ("mm_ref", "mm0", "mm_mine", "mm_mine_old"))
    # The goals' figures round by round: a loop against the loop and the peak timed beside it.
    ib0_vs_ref = per_round(times, lambda t: t["ref"] / t["ib0"])
    util_mine = per_round(times, lambda t: args.steps * b * flops_mine / t["mine"]
                          / (peak_loops["mm_mine"][1] / t["mm_mine"]))
    epoch_ratio = per_round(times, lambda t: t["mine"] / t["ib0"])
    ref_epoch_ratio = per_round(times, lambda t: t["ref_mine"] / t["ref"])
    mine_vs_ref = per_round(times, lambda t: t["ref_mine"] / t["mine"])
    quiet_vs_mine = per_round(times, lambda t: t["quiet"] / t["mine"])
    quiet_ratio = per_round(times, lambda t: t["quiet"] / t["ib0"])
    fixed0, fixed_mine = fixed_costs(recipe, plain, data, device, args)
    fm_ours, fm_tv = data_rates(mine.run, Path(args.fashion_root), b, args.data_batches, device, args.repeats)

    lines += [
        f"## PI-MLP on Fashion-MNIST (784-1024-1024, K=256, batch 100), {args.precision}",
        "",
        f"Matmul peak ({dtype}): {square / 1e9:.1f} GFLOP/s at 2048x2048x2048; at the matmuls of one training step "
        f"(recorded as dispatched, timed alone): {peak_ref / 1e9:.1f} GFLOP/s (reference), {peak0 / 1e9:.1f} "
        f"(ib, beta=0), {peak_mine / 1e9:.1f} (ib, MINE-IB: {len(mine.matmuls)} products).",
        "",
        "| loop | samples/s | vs reference | FLOPs/sample (counted) | achieved GFLOP/s "
        "| utilisation of its matmuls' peak |",
        "|---|---|---|---|---|---|",
        f"| plain PyTorch reference (CE, torch's default Adam) | {ref:,.0f} | 1.00 | {ref_flops / 1e6:.2f} M | "
        f"{ref * ref_flops / 1e9:.1f} | {ref * ref_flops / peak_ref:.2f} |",
        f"| ib, beta=0 (deterministic, no critic) | {rate0:,.0f} | {rate0 / ref:.2f} | {flops0 / 1e6:.2f} M | "
        f"{rate0 * flops0 / 1e9:.1f} | {rate0 * flops0 / peak0:.2f} |",
        f"| ib, MINE-IB (paper critic) | {rate_mine:,.0f} | {rate_mine / ref:.2f} | {flops_mine / 1e6:.2f} M | "
        f"{rate_mine * flops_mine / 1e9:.1f} | {rate_mine * flops_mine / peak_mine:.2f} |",
        f"| plain PyTorch MINE-IB (the same algorithm, torch alone) | {ref_mine:,.0f} | {ref_mine / ref:.2f} | "
        f"{ref_mine_flops / 1e6:.2f} M | {ref_mine * ref_mine_flops / 1e9:.1f} | |",
        "",
        f"MINE-IB epoch time / beta=0 epoch time: {rate0 / rate_mine:.2f}x; FLOP ratio: {flops_mine / flops0:.2f}x. "
        f"The same algorithm in plain PyTorch against the plain CE loop: {ref / ref_mine:.2f}x "
        f"(FLOP ratio {ref_mine_flops / ref_flops:.2f}x); ib's MINE-IB step runs {rate_mine / ref_mine:.2f}x as "
        f"fast as it.",
        "",
        f"The same figures round by round (each from loops timed seconds apart; median and range over "
        f"{args.repeats} rounds): ib beta=0 / reference {spread(ib0_vs_ref, '.2f')}; MINE-IB utilisation "
        f"{spread(util_mine, '.2f')}; MINE-IB / beta=0 epoch {spread(epoch_ratio, '.2f')}; plain MINE-IB / plain "
        f"CE epoch {spread(ref_epoch_ratio, '.2f')}; ib MINE-IB speed / plain MINE-IB speed "
        f"{spread(mine_vs_ref, '.2f')}.",
        "",
        f"Ablation (not a setting to train with): the MINE-IB loop with the critic's noise off ("
        f"{' '.join(NOISE_OFF)}) takes {spread(quiet_vs_mine, '.2f')} of the MINE-IB epoch's time and "
        f"{spread(quiet_ratio, '.2f')}x the beta=0 epoch's, round by round: drawing and adding the noise costs "
        f"the rest (torch's CPU normal sampler is serial).",
        "",
        f"Before 2026-11-28 the peak was timed at three products per Linear layer (forward, input and weight "
        f"gradients, the critic's first layer unsplit), not at the products the step runs: "
        f"{peak_mine_old / 1e9:.1f} GFLOP/s for MINE-IB, utilisation {rate_mine * flops_mine / peak_mine_old:.2f} "
        f"by that measure.",
        "",
        f"Fixed cost per step (the same code path with 8-wide layers, K=4 and batch 4, so that the arithmetic is "
        f"negligible: Python, dispatch, small ops): beta=0 {fixed0 * 1e3:.2f} ms, MINE-IB {fixed_mine * 1e3:.2f} ms.",
        "",
        f"Data path alone ({args.data_batches} batches of 100): ib's in-memory loader {fm_ours:,.0f} batches/s, "
        f"torchvision's per-sample FashionMNIST + DataLoader {fm_tv:,.0f} batches/s: {fm_ours / fm_tv:.0f}x.",
        "",
    ]


def cifar_section(args, device: torch.device, lines: List[str]) -> None:
    recipe = ROOT / "recipes" / "cifar10.yaml"
    data = ["data.name=image_folder", f"data.root={args.cifar_root}"]
    plain = [*data, "beta=0", "mi.enabled=false", "model.bottleneck=deterministic", "model.bottleneck.z_dim=256"]
    ib0 = ib_loop(recipe, plain, args.cifar_steps, device, args.precision)
    mine = ib_loop(recipe, [*data, "beta_schedule=constant"], args.cifar_steps, device, args.precision)
    nchw = ib_loop(recipe, [*plain, "model.channels_last=false"], args.cifar_steps, device, args.precision)
    flops0, flops_mine = ib0.flops, mine.flops
    times = timed_together({"ib0": ib0.epoch, "mine": mine.epoch, "nchw": nchw.epoch}, device, args.cifar_repeats)
    seconds = {k: statistics.median(v) for k, v in times.items()}
    rate0, rate_mine, rate_nchw = (args.cifar_steps * 128 / seconds[k] for k in ("ib0", "mine", "nchw"))
    nhwc_gain = per_round(times, lambda t: t["nchw"] / t["ib0"])
    lines += [
        f"## ResNet-18 (CIFAR stem) on the CIFAR-10 JPEG copy, batch 128, {args.cifar_steps} steps, {args.precision}",
        "",
        "| loop | samples/s | FLOPs/sample (counted) | achieved GFLOP/s |",
        "|---|---|---|---|",
        f"| ib, beta=0 | {rate0:,.1f} | {flops0 / 1e9:.2f} G | {rate0 * flops0 / 1e9:.1f} |",
        f"| ib, MINE-IB (conv x-branch critic) | {rate_mine:,.1f} | {flops_mine / 1e9:.2f} G | "
        f"{rate_mine * flops_mine / 1e9:.1f} |",
        f"| ib, beta=0, model.channels_last=false (NCHW) | {rate_nchw:,.1f} | {nchw.flops / 1e9:.2f} G | "
        f"{rate_nchw * nchw.flops / 1e9:.1f} |",
        "",
        f"MINE-IB epoch time / beta=0 epoch time: {rate0 / rate_mine:.2f}x; FLOP ratio: {flops_mine / flops0:.2f}x. "
        f"Channels-last (the default) against NCHW at beta=0, round by round ({args.cifar_repeats} rounds): "
        f"{spread(nhwc_gain, '.2f')}x the samples/s. (The convolutions run through oneDNN's own kernels, which can "
        f"beat the square-matmul peak above.)",
        "",
    ]


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="training steps per timed repeat (PI-MLP)")
    parser.add_argument("--repeats", type=int, default=9,
                        help="timed rounds; in each the loops take turns (the median per loop is reported)")
    parser.add_argument("--data-batches", type=int, default=200)
    parser.add_argument("--fashion-root", default=FASHION, help="the folder of Fashion-MNIST's four IDX .gz files")
    parser.add_argument("--cifar-root", help="the extracted CIFAR-10 JPEG copy (train/, test/); skipped if absent")
    parser.add_argument("--cifar-steps", type=int, default=20)
    parser.add_argument("--cifar-repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: ib with precision=bf16, the reference loop under autocast, the peaks in bf16")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train_speed.md"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    lines = [
        "# Training speed: ib against a plain PyTorch loop",
        "",
        f"Command: `{' '.join(['python', f'benchmarks/{Path(__file__).name}', *(sys.argv[1:] if argv is None else argv)])}`",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads), device {device}{gpu_name(device)}; {dt.datetime.now():%Y-%m-%d %H:%M}.",
        "",
    ]
    mlp_section(args, device, lines)
    if args.cifar_root and Path(args.cifar_root, "train").is_dir():
        cifar_section(args, device, lines)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
