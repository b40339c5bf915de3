"""The test suite's wall time against an earlier commit's, measured one after the other on this machine.

Runs `python -m pytest -q -p no:cacheprovider` in a temporary worktree of `--base` (its own `ib` first on
PYTHONPATH), then in this checkout, and writes both summary lines to `benchmarks/results/suite_time.md`. The
machine's speed drifts between runs, so only a pair measured together says whether the suite got slower.

    python benchmarks/suite_time.py --base 7282aa4
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_speed import cpu_name  # noqa: E402


def suite(folder: Path) -> Dict[str, str]:
    """pytest's closing line in `folder` and its counts and seconds."""
    env = {**os.environ, "PYTHONPATH": str(folder)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=folder, env=env,
                          capture_output=True, text=True)
    line = [t for t in done.stdout.splitlines() if re.search(r"\d+ passed", t)][-1].strip("= ")
    seconds = re.search(r"in ([\d.]+)s", line).group(1)
    return {"line": line, "seconds": seconds}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the earlier commit")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suite_time.md"))
    args = parser.parse_args(argv)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        base_dir = Path(tmp) / "base"
        subprocess.run(["git", "worktree", "add", "-q", "--detach", str(base_dir), args.base], cwd=ROOT, check=True)
        try:
            base = suite(base_dir)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT, check=True)
    new = suite(ROOT)
    ratio = float(new["seconds"]) / float(base["seconds"])
    text = [
        "# The test suite's time against an earlier commit",
        "",
        "Written by `benchmarks/suite_time.py`; do not edit by hand.",
        "",
        f"- command: `python benchmarks/suite_time.py --base {args.base}`",
        f"- machine: {cpu_name()}, {os.cpu_count()} cores; the two suites ran one after the other",
        "",
        "| code | pytest's summary |",
        "|---|---|",
        f"| {args.base} (base) | {base['line']} |",
        f"| {head.strip()} (this checkout, uncommitted changes included) | {new['line']} |",
        "",
        f"Ratio of the wall times: {ratio:.3f}.",
        "",
    ]
    Path(args.out).write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
