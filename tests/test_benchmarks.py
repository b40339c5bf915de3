"""The MI benchmark's smoke run: it trains every estimator a few steps and writes its markdown report."""
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_mi_gaussian_smoke_writes_the_report(tmp_path):
    bench = _load("mi_gaussian")
    out = tmp_path / "mi_gaussian.md"
    assert bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# MI estimators on correlated Gaussians")
    assert "- command: `python benchmarks/mi_gaussian.py --smoke --out" in text
    assert "- machine: " in text and "torch " in text and "- date: " in text
    assert "## gaussian, batch 32" in text
    for name in bench.OURS:
        row = next(line for line in text.splitlines() if line.startswith(f"| ib {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 5  # estimator, MI = 2, abs bias, sd, s/1k steps
        assert all(float(c.split(" ")[0]) == float(c.split(" ")[0]) for c in cells[1:])  # numbers, not NaN
    if bench.peers_available():
        for name in bench.PEERS:
            assert f"| torch-mist {name} |" in text
        assert "MINE time per step, ours / torch-mist's:" in text


def test_mi_gaussian_samples_have_the_stated_mi():
    bench = _load("mi_gaussian")
    rho = bench.rho_for(4.0)
    assert -bench.DIM / 2 * math.log(1 - rho**2) == pytest.approx(4.0)
    x, y = bench.sample(20000, 4.0, cubic=False, g=torch.Generator().manual_seed(0))
    corr = ((x - x.mean(0)) * (y - y.mean(0))).mean(0) / (x.std(0) * y.std(0))  # [20]
    assert corr.mean().item() == pytest.approx(rho, abs=0.01)
