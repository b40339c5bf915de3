"""The `ib` command: `ib train`, `ib eval`, `ib sweep`, `ib plane` (see `ib COMMAND --help`).

Errors in the user's input (recipe, arguments, files) print one line and exit with status 2, no traceback.

Each command imports what it runs when it runs, so that `ib --help` and a mistake in the arguments answer without
loading torch.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ib import __version__
from ib.errors import ConfigError, IBError

log = logging.getLogger("ib")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, status 2
        _usage_exit(f"{' '.join(message.split())} (see: {self.prog} --help)")


def _positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got '{text}'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _usage_exit(message: str) -> None:
    print(f"ib: error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _number(value: object) -> float:
    """A figure for a %-format: missing ones (null in metrics.json, blank in sweep.csv) print as nan."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else float("nan")


def list_items(text: str, flag: str, example: str) -> List[str]:
    """The items of an option's comma-separated list, stripped; a ConfigError naming `flag` when one is blank."""
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise ConfigError(f"{flag}: expected a comma-separated list like {example}, got '{text}'")
    return items


def parse_list(text: str, what: str, kind: Callable[[str], Any] = float) -> List[Any]:
    """`"0,1e-4,1e-3"` -> [0.0, 1e-4, 1e-3]: numbers, finite, >= 0, no duplicates; else a one-line ConfigError."""
    items = list_items(text, f"--{what}", "0,1e-3,1e-2")
    values = []
    for t in items:
        try:
            v = kind(t)
        except ValueError:
            raise ConfigError(f"--{what}: '{t}' is not a {'number' if kind is float else 'whole number'}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"--{what}: '{t}' is not finite")
        if v < 0:
            raise ConfigError(f"--{what}: '{t}' is negative; {what} must be >= 0")
        values.append(v)
    if len(set(values)) != len(values):
        raise ConfigError(f"--{what}: '{text}' lists a value twice")
    return values


def _rank() -> int:
    """This process's rank in a torchrun job (0 outside one)."""
    return int(os.environ.get("RANK", "0") or 0)


def _train(args: argparse.Namespace) -> int:
    from ib.recipe import load_recipe  # ib.engine (torch) is imported once the recipe has been read

    overrides: List[str] = list(args.overrides)
    if args.resume:
        if args.run_dir or args.overwrite:
            _usage_exit("--resume continues the run in its own folder; --run-dir and --overwrite do not apply")
        if args.recipe is not None:  # `ib train --resume DIR epochs=N`: argparse takes epochs=N as the recipe
            if "=" not in args.recipe:
                _usage_exit("with --resume give no recipe: the run folder holds its own (only epochs=N may change)")
            overrides.insert(0, args.recipe)
        run_dir = Path(args.resume)
        from ib.engine import resume_recipe

        recipe = resume_recipe(run_dir, overrides)
    else:
        if args.recipe is None:
            _usage_exit("give a recipe (e.g. ib train recipes/digits.yaml) or --resume RUN_DIR")
        recipe = load_recipe(args.recipe, overrides)
        run_dir = Path(args.run_dir) if args.run_dir else Path(recipe.output_dir) / recipe.name
    from ib.engine import fit

    metrics = fit(recipe, run_dir, resume=bool(args.resume), overwrite=args.overwrite, stop_after=args.stop_after,
                  handle_signals=True)
    from ib.evaluate import evaluate_after_training

    evaluate_after_training(recipe, run_dir, metrics)
    if metrics["status"] == "interrupted":
        if _rank() > 0:
            return EXIT_INTERRUPTED
        log.warning("interrupted: last.pt saved; continue with: ib train --resume %s", run_dir)
        return EXIT_INTERRUPTED
    if metrics["status"] == "stopped":
        log.info("stopped after epoch %d as asked; continue with: ib train --resume %s", metrics["epochs"], run_dir)
        return 0
    xz = _plane_text(metrics, (metrics.get("estimator") or {}).get("label", "estimate"), metrics.get("units", "nats"))
    log.info("done: test accuracy %.4f, %s, %.1f s; run folder %s", _number(metrics["test_accuracy"]), xz,
             metrics["train_seconds"], run_dir)
    return 0


def _plane_text(record: Dict[str, Any], label: str = "estimate", units: str = "") -> str:
    """`ib.plane.describe_xz` of a metrics.json or sweep.csv record (missing figures print as nan)."""
    from ib.plane import describe_xz

    figures = (_number(record.get(k)) for k in ("I_XZ", "I_XZ_pairwise_lower", "I_XZ_pairwise_upper", "I_ZY"))
    return describe_xz(*figures, label, units)


def _sweep(args: argparse.Namespace) -> int:
    betas = parse_list(args.beta, "beta")
    seeds = parse_list(args.seeds, "seeds", int)
    from ib.sweep import run_sweep

    rows = run_sweep(args.recipe, betas, seeds, args.overrides, args.sweep_dir, handle_signals=True,
                     nproc_per_node=args.nproc_per_node, vectorize=args.vectorize)
    if any(r["status"] != "completed" for r in rows):
        return EXIT_INTERRUPTED
    for r in rows:
        xz = _plane_text(r)
        log.info("%-24s test accuracy %.4f  %s  I(Z;Y) %.3f %s", r["run"], _number(r["test_accuracy"]), xz,
                 _number(r["I_ZY"]), r["units"])
    return 0


def saved_estimator_labels(run_dir: Path) -> Dict[str, Any]:
    """The label and bound direction of the estimator in a run folder's `recipe.yaml`, for a run whose
    `metrics.json` has no "estimator" entry (written before it had one); {} when the recipe cannot be read."""
    from ib.estimators import ESTIMATORS
    from ib.estimators.base import estimator_labels
    from ib.recipe import load_recipe

    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
    except ConfigError:
        return {}
    return estimator_labels(ESTIMATORS.get(recipe.mi.estimator.name) if recipe.mi.enabled else None)


def _plane(args: argparse.Namespace) -> int:
    from ib.monitor import write_plane_plots

    for path in write_plane_plots(Path(args.dir), saved_estimator_labels):
        log.info("wrote %s", path)
    return 0


# `ib eval` options: each is the shorthand of an `eval.<key>=value` recipe override.
_EVAL_FLAGS = ("split", "attacks", "eps", "eps_l2", "sigmas", "steps", "schedule", "targets", "samples",
               "eot_samples", "loss", "limit", "restarts", "batch_size")
_EVAL_LISTS = ("attacks", "eps", "eps_l2", "sigmas")  # given as comma-separated text


def eval_overrides(args: argparse.Namespace) -> List[str]:
    """`ib eval`'s options as `eval.key=value` overrides (lists as YAML lists), then its own `eval.*` overrides;
    the recipe checker checks them all, so its errors name the recipe key (e.g. `eval.eps`)."""
    out = []
    for key in _EVAL_FLAGS:
        value = getattr(args, key)
        if value is None:
            continue
        if key in _EVAL_LISTS:
            items = list_items(value, "--" + key.replace("_", "-"), "0.05,0.1")
            out.append(f"eval.{key}=[{','.join(items)}]")
        else:
            out.append(f"eval.{key}={value}")
    if getattr(args, "autoattack", False):
        out.append("eval.autoattack=true")
    return out + list(args.overrides)


def _eval(args: argparse.Namespace) -> int:
    from ib.evaluate import evaluate_run

    overrides = eval_overrides(args)
    report = evaluate_run(args.checkpoint, overrides)
    failed = [c["name"] for c in report["checks"] if c["passed"] is False]
    of = report["robust_accuracy_of"]
    robust = f"; robust accuracy {of['accuracy']:.4f} ({of['variant']}, {of['attack']} at eps {of['eps']:g})" if of else ""
    log.info("done: clean accuracy %s on %d %s samples%s, %.1f s; checks %s; wrote eval.json, robustness.csv and "
             "robustness.png beside %s", ", ".join(f"{k} {v['accuracy']:.4f}" for k, v in report["clean"].items()),
             report["n"], report["split"], robust, report["wall_seconds"],
             f"FAILED: {', '.join(failed)}" if failed else "passed", report["checkpoint"])
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ib", description="Information Bottleneck classifiers with MINE-estimated I(X;Z).")
    parser.add_argument("--version", action="version", version=f"ib {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    train = sub.add_parser("train", help="train a recipe", description="Train from a YAML recipe. Overrides "
                           "key.sub=value beat the file; the resolved recipe is saved as RUN_DIR/recipe.yaml.")
    train.add_argument("recipe", nargs="?", help="YAML recipe, e.g. recipes/digits.yaml")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. beta=1e-2 model.bottleneck.z_dim=64")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    train.add_argument("--run-dir", metavar="DIR", help="run folder (default: <output_dir>/<name>)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    train.add_argument("--stop-after", type=_positive_int, metavar="N",
                       help="stop, resumable, after N completed epochs")
    train.set_defaults(func=_train)

    sweep = sub.add_parser("sweep", help="train one run per beta (and seed)", description="Train RECIPE once per "
                           "beta and seed into one sweep folder; rerunning skips finished runs and resumes others.")
    sweep.add_argument("recipe", help="YAML recipe")
    sweep.add_argument("overrides", nargs="*", metavar="key=value", help="overrides applied to every run")
    sweep.add_argument("--beta", required=True, metavar="LIST", help="comma-separated betas, e.g. 0,1e-4,1e-3,1e-2")
    sweep.add_argument("--seeds", default="0", metavar="LIST", help="comma-separated seeds (default: 0)")
    sweep.add_argument("--sweep-dir", metavar="DIR", help="sweep folder (default: <output_dir>/<name>_sweep)")
    sweep.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                       help="train each run data-parallel with torchrun on N processes of this machine (default: 1)")
    sweep.add_argument("--vectorize", action="store_true", help="train the runs as one population: every (beta, "
                       "seed) at once through batched products, each run's folder as if trained alone (MLP and "
                       "convnet encoders; see docs/sweeps.md)")
    sweep.set_defaults(func=_sweep)

    plane = sub.add_parser("plane", help="write information-plane plots as PNG", description="Write plane.png "
                           "for a run folder, or ib_curve.png, accuracy_vs_beta.png and each run's plane.png for a "
                           "sweep folder.")
    plane.add_argument("dir", metavar="RUN_OR_SWEEP_DIR")
    plane.set_defaults(func=_plane)

    ev = sub.add_parser("eval", help="accuracy and adversarial robustness of a checkpoint", description="Evaluate "
                        "a run's best.pt (or a given .pt) with its recipe's eval settings, updated by the options; "
                        "writes eval.json, robustness.csv and robustness.png beside it and to its TensorBoard.")
    ev.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    ev.add_argument("overrides", nargs="*", metavar="eval.key=value", help="e.g. eval.eps=[0.1,0.2] eval.steps=40; "
                    "each option below is the shorthand of one")
    ev.add_argument("--split", choices=["test", "val"], help="split to evaluate (default: test)")
    ev.add_argument("--attacks", metavar="LIST", help="comma-separated: fgsm,pgd_linf,pgd_l2,eot_pgd,noise")
    ev.add_argument("--eps", metavar="LIST", help="L-inf radii in the [0, 1] pixel scale, e.g. 0.05,0.1,0.2")
    ev.add_argument("--eps-l2", metavar="LIST", help="L2 radii of pgd_l2, e.g. 0.5,1,2")
    ev.add_argument("--sigmas", metavar="LIST", help="std of the Gaussian noise, e.g. 0.05,0.1,0.2")
    ev.add_argument("--steps", type=int, metavar="N", help="PGD steps")
    ev.add_argument("--schedule", choices=["adaptive", "fixed"], help="PGD step lengths: APGD's adaptive ones "
                    "(default) or Madry's fixed step_size * eps / steps")
    ev.add_argument("--targets", type=int, metavar="N", help="then targeted PGD toward each sample's N likeliest "
                    "wrong classes (default 3; AutoAttack's APGD-T: 9; 0: none)")
    ev.add_argument("--samples", type=int, metavar="K", help="draws of Z of the sampled model (0: mean code only)")
    ev.add_argument("--eot-samples", type=int, metavar="S", help="draws of Z per EOT-PGD gradient")
    ev.add_argument("--loss", choices=["ce", "margin"], help="loss the gradient attacks ascend (default: ce)")
    ev.add_argument("--limit", type=int, metavar="N", help="N samples of the split only, drawn by a seeded permutation")
    ev.add_argument("--restarts", type=int, metavar="R", help="PGD random restarts")
    ev.add_argument("--batch-size", type=int, metavar="B", help="samples per attack batch")
    ev.add_argument("--autoattack", action="store_true", help="also run AutoAttack (standard on the mean code, rand "
                    "on the sampled model) and check our PGD against it; needs pip install 'ib[autoattack]'")
    ev.set_defaults(func=_eval)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    # Overrides (key=value) may also come after options, e.g. `ib sweep R --beta 0,1 epochs=5`.
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    # Under torchrun rank 0 alone reports; the others say only errors (their warnings would repeat rank 0's).
    other_rank = _rank() > 0
    level = logging.ERROR if other_rank else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args)
    except IBError as e:
        print(f"ib: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the environment (disk, permissions) rather than a bug: one line, like the others
        print(f"ib: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ib: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
