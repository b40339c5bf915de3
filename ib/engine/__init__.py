"""The training engine: build a run from a recipe, step it, loop over epochs, keep its folder.

    build.py     `build_run`, `Run` and its `Progress`, the builders, `load_run` (a checkpoint back as a model)
    step.py      `train_step` (two-pass or fused minimax), `critic_step`, `StepStats`
    loop.py      `fit`: the epoch loop, evaluation during training, stopping
    run_dir.py   the run folder: preparing it, `RunFolder` (what an epoch writes), `metrics.json`, resuming
"""
from ib.engine.build import LoadedRun, Progress, Run, build_run, load_run
from ib.engine.loop import StopFlag, evaluate, fit, train_one_epoch
from ib.engine.run_dir import resume_recipe
from ib.engine.step import StepStats, TrainingError, autocast, critic_step, train_step

__all__ = ["LoadedRun", "Progress", "Run", "StepStats", "StopFlag", "TrainingError", "autocast", "build_run",
           "critic_step", "evaluate", "fit", "load_run", "resume_recipe", "train_one_epoch", "train_step"]
