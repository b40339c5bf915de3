"""ib: train classifiers under an Information Bottleneck, with I(X;Z) estimated by MINE.

Public API (imported on first use, so that `ib --help` and recipe errors answer without loading torch):
    estimate_mi(x, y, estimator="mine", ...)  -> MIEstimate: a float in nats with its standard error .se
    estimate_mi_population(x, y, seeds=...)   -> [MIEstimate]: one per seed, the critics trained together
    load_recipe(path, overrides)              -> Recipe
    fit(recipe, run_dir, ...)                 -> metrics dict
"""
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "estimate_mi": "ib.estimators.estimate",
    "estimate_mi_population": "ib.estimators.estimate",
    "load_recipe": "ib.recipe",
    "Recipe": "ib.recipe",
    "fit": "ib.engine",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ib' has no attribute '{name}'")


__all__ = ["__version__", *_LAZY]
