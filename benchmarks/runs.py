"""What the benchmark scripts share: one training run that resumes where it stopped and is skipped when done."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ib.engine import fit, resume_recipe
from ib.monitor import read_json
from ib.recipe import load_recipe


def train_or_resume(recipe: Path, overrides: Sequence[str], run_dir: Path, epochs: int) -> None:
    """Train `recipe` with `overrides` for `epochs` epochs into `run_dir`: resume it from its `last.pt`, or skip it
    when it has completed those epochs."""
    metrics = read_json(run_dir / "metrics.json") or {}
    if metrics.get("status") == "completed" and metrics.get("epochs") == epochs:
        return
    if (run_dir / "last.pt").is_file():
        fit(resume_recipe(run_dir, [f"epochs={epochs}"]), run_dir, resume=True)
    else:
        fit(load_recipe(recipe, [*overrides, f"epochs={epochs}"]), run_dir, overwrite=True)
