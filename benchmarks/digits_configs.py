"""Which MINE configuration makes the penalty compress? One digits run per (configuration, beta), read against the
probe's pairwise band (`benchmarks/digits_band.py` gives the seeds-averaged sweep of the default configuration).

Each run is `ib train recipes/digits.yaml beta=B <overrides>` (seed 0, the recipe's 40 epochs) into
`<work>/<configuration>_<beta>`; a run already completed there is not trained again, so an interrupted table
resumes. Written to `benchmarks/results/digits_configs.md`.

    python benchmarks/digits_configs.py
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, List, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from ib.engine import fit  # noqa: E402
from ib.engine.build import load_run  # noqa: E402
from ib.modes import evaluating  # noqa: E402
from ib.monitor import read_json  # noqa: E402
from ib.recipe import load_recipe  # noqa: E402
from train_speed import cpu_name  # noqa: E402

NOISE_OFF = ["mi.critic.input_noise=0", "mi.critic.hidden_noise=0"]
CONFIGURATIONS: Dict[str, List[str]] = {
    "default": [],
    "critic noise off": NOISE_OFF,
    "two-pass, 5 critic steps": ["mi.fused=false", "mi.critic_steps=5"],
    "std_offset 0": ["model.bottleneck.std_offset=0"],
    "std_offset 0, critic noise off": ["model.bottleneck.std_offset=0", *NOISE_OFF],
    "std_offset 0, no delay": ["model.bottleneck.std_offset=0", "beta_schedule.delay=0"],
    "critic lr 1e-3, std_offset 0, no delay": ["mi.optimizer.lr=1e-3", "model.bottleneck.std_offset=0",
                                               "beta_schedule.delay=0"],
    "critic 1024-1024, two-pass, 5 critic steps": ["mi.critic.hidden=[1024,1024]", "mi.fused=false",
                                                   "mi.critic_steps=5"],
    "adaptive clipping": ["mi.adaptive_clip=true"],
    "adaptive clipping, std_offset 0, no delay": ["mi.adaptive_clip=true", "model.bottleneck.std_offset=0",
                                                  "beta_schedule.delay=0"],
    "pairwise_kl": ["mi.estimator=pairwise_kl"],
    "pairwise_kl, std_offset 0": ["mi.estimator=pairwise_kl", "model.bottleneck.std_offset=0"],
    "pairwise_kl, std_offset 0, no delay": ["mi.estimator=pairwise_kl", "model.bottleneck.std_offset=0",
                                            "beta_schedule.delay=0"],
}


def run_dir(work: Path, name: str, beta: str) -> Path:
    return work / f"{name.replace(' ', '_').replace(',', '')}_{beta}"


def run(work: Path, name: str, overrides: Sequence[str], beta: str) -> Dict:
    folder = run_dir(work, name, beta)
    metrics = read_json(folder / "metrics.json") or {}
    if metrics.get("status") != "completed":
        metrics = fit(load_recipe(ROOT / "recipes" / "digits.yaml", [f"beta={beta}", *overrides]), folder,
                      overwrite=True)
    return metrics


@torch.no_grad()
def code_stats(run_dir: Path) -> Dict[str, float]:
    """On the validation split, from last.pt: the code's spread (the mean code's std over inputs, averaged over
    its dimensions) and its noise (p(z|x)'s std, averaged over inputs and dimensions)."""
    run = load_run(run_dir / "last.pt", "cpu")
    x = run.data.val.x.float() / 255 if run.data.val.x.dtype == torch.uint8 else run.data.val.x
    with evaluating(run.model, device=torch.device("cpu")):
        code = run.model.encode(x)
    return {"spread": float(code.mean.std(0).mean()), "noise": float(code.std.mean())}


def cell(m: Dict, stats: Dict[str, float]) -> str:
    def num(key: str, digits: int) -> str:
        value = m.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "nan"

    return (f"{num('test_accuracy', 4)}; [{num('I_XZ_pairwise_lower', 3)}, {num('I_XZ_pairwise_upper', 3)}]; "
            f"{num('I_XZ_nats', 3)}; {num('I_ZY', 3)}; {stats['spread']:.3g} / {stats['noise']:.3g}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", default="0.1,0.3,1")
    parser.add_argument("--work", default="/tmp/digits_configs", help="the run folders (resumable)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "digits_configs.md"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    betas = args.betas.split(",")
    lines = ["| configuration | overrides | " + " | ".join(f"beta {b}" for b in betas) + " |",
             "|---|---|" + "---|" * len(betas)]
    for name, overrides in CONFIGURATIONS.items():
        cells = [cell(run(Path(args.work), name, overrides, b), code_stats(run_dir(Path(args.work), name, b)))
                 for b in betas]
        lines.append(f"| {name} | `{' '.join(overrides) or '(none)'}` | " + " | ".join(cells) + " |")
    text = [
        "# MINE configurations against the pairwise band on digits",
        "",
        "Written by `benchmarks/digits_configs.py`; do not edit by hand.",
        "",
        "- command: `python benchmarks/digits_configs.py`",
        "- protocol: `ib train recipes/digits.yaml beta=B <overrides>`, seed 0, 40 epochs, one run a cell",
        f"- machine: {cpu_name()}",
        "- each cell: test accuracy; the probe's pairwise band [Bhattacharyya, KL] (ceiling log 143 = 4.963);",
        "  the penalty's own held-out estimate of I(X;Z); I(Z;Y), all in nats; the code's spread / noise on the",
        "  validation split (the mean code's std over inputs / p(z|x)'s std, each averaged over the code's dimensions)",
        "",
        *lines,
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
