"""The MI benchmark's smoke run: it trains every estimator a few steps and writes its markdown report."""
import csv
import json
import importlib.util
import math
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from ib.models.critics import CRITICS
from ib.recipe import load_recipe
from ib.sweep import run_name

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


def test_mi_gaussian_fixed_protocol_resumes_from_its_cache(tmp_path, monkeypatch):
    bench = _load("mi_gaussian")
    out = tmp_path / "fixed.md"
    argv = ["--protocol", "fixed", "--steps", "5", "--seeds", "1", "--levels", "2", "--variants", "gaussian",
            "--estimators", "mine", "smile", "--peers", "--out", str(out)]
    assert bench.main(argv) == 0
    cache = json.loads(out.with_suffix(".json").read_text())
    mine, smile = bench.fingerprint("ib", "mine"), bench.fingerprint("ib", "smile")
    assert mine != smile  # their default batches differ, and a cell depends on its estimator's
    assert sorted(cache) == [f"gaussian|2|0|ib|mine|5|{mine}|n=20000", f"gaussian|2|0|ib|smile|5|{smile}|n=20000"]
    assert all(math.isfinite(r["value"]) and r["se"] > 0 for r in cache.values())
    first = out.read_text()
    assert "| ib mine | " in first and "(n=1)" in first and "| 2 | " in first
    se_rows = first.split("Standard error of our held-out reports")[1].splitlines()
    se_mine = next(r for r in se_rows if r.startswith("| ib mine | ")).split("|")[2].split()  # "se (largest)"
    assert float(se_mine[0]) == pytest.approx(cache[f"gaussian|2|0|ib|mine|5|{mine}|n=20000"]["se"], abs=0.005)

    def refuse(*args, **kwargs):
        raise AssertionError("a cached cell was computed again")

    monkeypatch.setattr(bench, "fixed_ours", refuse)
    assert bench.main(argv) == 0  # every cell from the cache
    assert out.read_text() == first


def test_mi_gaussian_fixed_report_tabulates_mean_and_largest_standard_error(tmp_path):
    bench = _load("mi_gaussian")
    args = bench.parse_args(["--protocol", "fixed", "--seeds", "2", "--levels", "2", "4", "--variants", "gaussian",
                             "--estimators", "mine", "--peers", "--out", str(tmp_path / "r.md")])
    key = lambda level, seed: bench.cell_key("gaussian", level, seed, "ib", "mine", args.steps)  # noqa: E731
    cache = {key(2, 0): dict(value=1.9, se=0.10, seconds=1.0), key(2, 1): dict(value=2.1, se=0.30, seconds=1.0),
             key(4, 0): dict(value=3.8, se=0.05, seconds=1.0)}  # level 4: one seed done
    text = bench.fixed_report(args, [], cache, "python benchmarks/mi_gaussian.py")
    assert "| ib mine | 2.00 ± 0.14 (n=2) | 3.80 (n=1) |" in text
    assert "| ib mine | 0.20 (0.30) | 0.05 (0.05) |" in text.split("Standard error of our held-out reports")[1]
    assert "log N = 8.29 nats" in text  # the held-out ceiling of 4,000 samples


def test_report_bias_exact_critic_reads_the_truth_and_smile_above_it():
    # The DV bound of the exact critic over all pairs of the 4,000 held-out samples: its spread over data seeds
    # is 0.04 nats at 2 nats and 0.06 at 4 (report_bias.md), so 0.2 is over 3 sd. SMILE's clip from above lowers
    # the partition term and its clip from below raises it; with the exact critic the first wins by far (the
    # marginal pairs scored above 5 carry most of E_Q[e^T]), so it reads above the DV bound, by 0.26 at 4 nats.
    bench = _load("report_bias")
    for mi in (2.0, 4.0):
        x, y = bench.held_out(mi, 0)
        critic = bench.ExactCritic(mi)
        dv, smile = bench.all_pairs(critic, x, y), bench.all_pairs(critic, x, y, tau=5.0)
        assert abs(dv - mi) < 0.2 and smile > dv
    assert smile - dv > 0.15  # at 4 nats


def test_mi_gaussian_samples_have_the_stated_mi():
    bench = _load("mi_gaussian")
    rho = bench.rho_for(4.0)
    assert -bench.DIM / 2 * math.log(1 - rho**2) == pytest.approx(4.0)
    x, y = bench.sample(20000, 4.0, cubic=False, g=torch.Generator().manual_seed(0))
    corr = ((x - x.mean(0)) * (y - y.mean(0))).mean(0) / (x.std(0) * y.std(0))  # [20]
    assert corr.mean().item() == pytest.approx(rho, abs=0.01)


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_speed_smoke_writes_the_report(tmp_path, precision):
    bench = _load("train_speed")
    out = tmp_path / "train_speed.md"
    bench.main(["--steps", "2", "--repeats", "2", "--data-batches", "2", "--device", "cpu", "--precision", precision,
                "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# Training speed: ib against a plain PyTorch loop")
    assert "Command: `python benchmarks/train_speed.py --steps 2 --repeats 2" in text
    assert f"batch 100), {precision}" in text and ("torch.bfloat16" in text) == (precision == "bf16")
    ranges = re.findall(r"(\d+\.\d+) \(rounds (\d+\.\d+)-(\d+\.\d+)\)", text)
    assert len(ranges) == 7 and all(float(lo) <= float(mid) <= float(hi) for mid, lo, hi in ranges)
    fixed = re.search(r"beta=0 (\d+\.\d+) ms, MINE-IB (\d+\.\d+) ms", text)
    # Both fixed costs are measured; their order is a timing of 2 steps, which load on the machine can flip (it did
    # with two other jobs on 2 cores), so it is not asserted: that MINE's step does more is checked on the FLOPs below.
    assert fixed and 0 < float(fixed[1]) and 0 < float(fixed[2])
    for row in ("| plain PyTorch reference (CE, torch's default Adam) |", "| ib, beta=0 (deterministic, no critic) |",
                "| ib, MINE-IB (paper critic) |"):
        cells = [c.strip() for c in next(l for l in text.splitlines() if l.startswith(row)).strip("|").split("|")]
        assert float(cells[1].replace(",", "")) > 0 and 0 < float(cells[5]) < 2  # samples/s, utilisation
    assert "FLOP ratio: 1.7" in text  # the paper critic's counted arithmetic over the beta=0 model's
    flops = {row: next(l for l in text.splitlines() if l.startswith(row)).split("|")[4].strip()
             for row in ("| ib, MINE-IB (paper critic) |", "| plain PyTorch MINE-IB (the same algorithm, torch alone) |")}
    assert len(set(flops.values())) == 1 and float(flops["| ib, MINE-IB (paper critic) |"][:-2]) > 18  # same arithmetic
    assert "(FLOP ratio 1.7" in text
    assert "critic's noise off (mi.critic.input_noise=0 mi.critic.hidden_noise=0) takes" in text


def test_noise_ablation_turns_the_critics_noise_off():
    bench = _load("train_speed")
    recipe = load_recipe(BENCHMARKS.parent / "recipes" / "fashion_mnist.yaml", bench.NOISE_OFF)
    critic = CRITICS.create(recipe.mi.critic.name, (1, 28, 28), 256, **recipe.mi.critic.options).train()
    x, z = torch.rand(4, 1, 28, 28), torch.randn(4, 256)
    assert torch.equal(critic(x, z), critic(x, z))  # in training mode, so only the absence of noise makes it repeat


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_recorded_matmuls_are_the_counted_flops(precision):
    """The peak is timed at the products MatmulShapes records; their 2*M*K*N must be the FLOPs the counter counts
    for the same MINE-IB step (no product missed or invented, e.g. the critic's split first layer)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ib.engine import train_step
    from ib.estimators import ESTIMATORS
    from ib.models.classifier import build_classifier
    from ib.models.critics import CRITICS

    bench = _load("train_speed")
    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (32, 16)}, "gaussian", {"z_dim": 8}, in_shape=(1, 6, 6),
                             num_classes=4, mean=(0.5,), std=(0.25,))
    est = ESTIMATORS.create("mine", CRITICS.create("joint", (1, 6, 6), 8, hidden=(16, 16)))
    opts = [torch.optim.SGD(net.parameters(), lr=0.1) for net in (model, est)]
    x, y = torch.rand(10, 1, 6, 6), torch.randint(0, 4, (10,))
    counter, matmuls = FlopCounterMode(display=False), bench.MatmulShapes()
    with counter, matmuls:
        train_step(model, est, *opts, x, y, beta=0.1, fused=True, precision=precision)
    assert sum(2 * m * k * n for m, k, n in matmuls.shapes) == counter.get_total_flops() > 0
    assert (10, 36, 16) in matmuls.shapes and (20, 8, 16) in matmuls.shapes  # the critic's x half and z half
    assert not any(k == 36 + 8 for _, k, _ in matmuls.shapes)  # never the unsplit [x, z] first layer


@pytest.mark.parametrize("compiled", [False, True])
def test_mine_step_smoke_writes_its_tables(tmp_path, compiled):
    bench = _load("mine_step")
    out = tmp_path / "mine_step.md"
    bench.main(["--steps", "2", "--chunk", "1", "--batch-sizes", "8", "--population", "2", "--out", str(out)]
               + ([] if compiled else ["--no-compile"]))
    text = out.read_text()
    assert "- command: `python benchmarks/mine_step.py --steps 2 --chunk 1" in text
    tables = [[line.strip("|").split("|") for line in block.splitlines() if line.startswith("|")]
              for block in text.split("\n\n") if block.startswith("|")]
    assert len(tables) == (3 if compiled else 2)  # ms per step, ratios, first steps
    for header, rule, row in tables:
        assert len(header) == len(rule) == len(row) and row[0].strip() == "8"  # every header has its cell
    (names, _, ms), (ratio_names, _, ratios) = tables[:2]
    ms = {n.strip(): float(v) for n, v in zip(names[1:], ms[1:])}
    assert ("ib mine, compiled" in ms) == ("plain floor, compiled" in ms) == compiled
    assert all(v > 0 for n, v in ms.items() if n != "torch-mist mine")  # nan without torch-mist
    assert float(ratios[-1]) == pytest.approx(ms["ib mine"] / ms["plain floor"], abs=0.01)  # rounded to 2 places
    if compiled:
        firsts = dict(zip([n.strip() for n in tables[2][0][1:]], map(float, tables[2][2][1:])))
        assert firsts["ib mine, compiled"] > 0 and firsts["plain floor, compiled"] > 0


def test_mi_gaussian_takes_torch_mists_other_estimators_in_the_fixed_protocol_only():
    bench = _load("mi_gaussian")
    assert bench.parse_args(["--protocol", "fixed", "--peers", "doe", "js"]).peers == ["doe", "js"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--peers", "doe"])  # the staircase steps mine, smile and infonce only


def test_cpu_kernels_smoke_writes_the_report(tmp_path):
    bench = _load("cpu_kernels")
    out = tmp_path / "cpu_kernels.md"
    bench.main(["--calls", "2", "--repeats", "1", "--out", str(out)])
    text = out.read_text()
    assert "Command: `python benchmarks/cpu_kernels.py --calls 2 --repeats 1" in text
    rows = [l for l in text.splitlines() if l.startswith("| ELU") or l.startswith("| softplus")]
    assert len(rows) == 4 and all(float(r.split("|")[2]) > 0 and float(r.split("|")[3]) > 0 for r in rows)
    assert re.search(r"normal sampler: \d+\.\d+ ns per float", text)


def test_ddp_digits_smoke_writes_the_report(tmp_path):
    bench = _load("ddp_digits")
    out = tmp_path / "ddp.md"
    bench.main(["--procs", "1,2", "--out", str(out), "epochs=2", "eval.enabled=false"])
    rows = [l for l in out.read_text().splitlines() if l.startswith("| ") and not l.startswith("| run |")]
    assert [r.split("|")[1].strip() for r in rows] == ["1 process", "2 processes",
                                                      "2 processes for 1 epochs, resumed in 1"]
    for r in rows:
        cells = [c.strip() for c in r.strip("|").split("|")]
        assert cells[2] == "40" and 0.1 < float(cells[3]) <= 1.0  # steps, test accuracy


def test_digits_band_smoke_writes_the_table(tmp_path):
    """A one-epoch version of benchmarks/digits_band.py: one row per (penalty, beta), the band within its ceiling."""
    bench = _load("digits_band")
    out = tmp_path / "results" / "digits_band.md"
    out.parent.mkdir()
    small = ["epochs=1", "model.encoder.hidden=[32]", "model.bottleneck.z_dim=4", "mi.critic.hidden=[32]",
             "model.eval_samples=0", "monitor.plane_figure=false"]
    bench.main(["--betas", "1", "--seeds", "0", "--work", str(tmp_path / "work"), "--out", str(out), *small])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()
            if re.match(r"\| (mine|vib_kl|pairwise)", line)]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [(p, "1") for p in ("mine", "vib_kl", "pairwise_kl")]
    for r in rows:
        lower, upper, ceiling = (float(c) for c in r[3:6])
        assert 0.0 <= lower <= upper <= ceiling + 1e-3 and ceiling == pytest.approx(math.log(143), abs=1e-3)
    assert (out.parent / "digits_band_mine.csv").is_file()


def test_ib_table_smoke_chooses_beta_on_validation_and_writes_the_table(tmp_path):
    """A one-epoch digits version of benchmarks/ib_table.py with two rows: the fixed beta = 0 row at both seeds, the
    MINE-IB row swept at the first seed and its best-validation beta trained at the second, each with its
    evaluation, the sweep's IB curve and the information plane of the chosen MINE-IB run."""
    bench = _load("ib_table")
    out = tmp_path / "results" / "ib_table.md"
    out.parent.mkdir()
    small = ["model.encoder.hidden=[16]", "model.bottleneck.z_dim=4", "model.eval_samples=2", "beta_schedule.delay=0",
             "monitor.plane_figure=false", "mi.critic.hidden=[16]"]
    bench.main(["--datasets", "digits", "--rows", "beta_0,mine_ib", "--seeds", "0,1", "--epochs", "1",
                "--work", str(tmp_path / "work"), "--out", str(out), "--", *small])
    runs = list(csv.DictReader((out.parent / "ib_table_runs.csv").open()))
    assert [(r["row"], r["seed"]) for r in runs] == [("beta = 0", "0"), ("beta = 0", "1"), ("MINE-IB", "0"),
                                                     ("MINE-IB", "1")]
    sweep = list(csv.DictReader((tmp_path / "work" / "digits" / "mine_ib" / "sweep.csv").open()))
    assert sorted((r["beta"], r["seed"]) for r in sweep) == sorted((b, s) for b in {r["beta"] for r in sweep}
                                                                   for s in ("0", "1"))  # every beta at both seeds
    val = {b: statistics.fmean(float(r["val_accuracy"]) for r in sweep if float(r["beta"]) == b)
           for b in {float(r["beta"]) for r in sweep}}
    assert len(val) == 4 and float(runs[2]["beta"]) == max(sorted(val), key=val.get)  # chosen on mean validation
    for r in runs:
        assert 0.0 <= float(r["test_error"]) <= 1.0 and float(r["ece"]) >= 0.0
        assert float(r["pgd20_eps_0.1"]) <= float(r["pgd20_eps_0"])  # PGD keeps the clean prediction if it must
        assert float(r["I_XZ_pairwise_lower"]) <= float(r["I_XZ_pairwise_upper"]) <= math.log(143) + 1e-9
    table = out.read_text()
    assert "| beta = 0 | 0 | 2 |" in table and "## digits" in table and "Beta sweeps at seeds 0,1" in table
    assert re.search(r"- MINE-IB: the upper end (never rises|rises \+)", table)
    for figure in ("ib_table_digits_mine_ib_ib_curve.png", "ib_table_digits_mine_ib_plane.png"):
        assert (out.parent / figure).is_file() and f"]({figure})" in table
    assert (tmp_path / "work" / "digits" / "mine_ib" / run_name(float(runs[3]["beta"]), 1) / "table_eval.json").is_file()


def test_band_cost_smoke_agrees_with_the_plain_formulation(tmp_path):
    """benchmarks/band_cost.py at tiny sizes: the fast band equals the term-by-term reference to float64 rounding
    (sums of K = 16 terms of size O(1): differences of order 1e-14), on codes that overlap (the band is well below
    its ceiling, so every pair counts)."""
    bench = _load("band_cost")
    out = tmp_path / "band_cost.md"
    bench.main(["--sizes", "40,90", "--plain-up-to", "40", "--k", "16", "--out", str(out)])
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if re.match(r"\| \d", line)]
    assert [r[0].strip() for r in rows] == ["40", "90"]
    lower, upper = (float(v) for v in rows[0][2].strip(" []").split(","))
    assert 0 < lower <= upper < float(rows[0][3]) - 0.5  # below the ceiling log 40
    assert float(rows[0][7]) < 1e-12 and rows[1][5].strip() == "-"


def test_ib_table_chooses_among_completed_runs_of_its_protocol_and_waits_for_the_rest(tmp_path):
    """best_beta waits until every beta has completed or failed, never chooses a failed one, and runs planned for
    another number of epochs are not this protocol's."""
    bench = _load("ib_table")
    row = bench.Row("VIB", (), (1e-3, 1e-2, 1e-1))

    def write(beta, status, val, planned=10):
        folder = tmp_path / run_name(beta, 0)
        folder.mkdir()
        (folder / "metrics.json").write_text(json.dumps({"status": status, "val_accuracy": val,
                                                         "epochs_planned": planned}))

    write(1e-3, "completed", 0.95)
    write(1e-2, "failed", 0.99)
    write(1e-1, "completed", 0.97, planned=20)
    assert bench.best_beta(row, bench.protocol_rows(tmp_path, 10)) is None  # beta 0.1 is not of this protocol
    (tmp_path / run_name(1e-1, 0) / "metrics.json").unlink()
    (tmp_path / run_name(1e-1, 0)).rmdir()
    write(1e-1, "completed", 0.96)
    assert bench.best_beta(row, bench.protocol_rows(tmp_path, 10)) == 1e-1  # the failed 0.99 is not chosen


def test_ib_table_compression_reading_finds_rises_and_the_largest_beta_within_two_points():
    """compression_lines on hand-made means: a rise of 0.2 nats between neighbouring betas is named, and the 0.5-nat
    mark is read at the largest beta whose test accuracy is within 2 points of beta = 0's (not at a larger one that
    compresses more but costs accuracy)."""
    bench = _load("ib_table")

    def run(beta, upper, acc, status="completed"):
        return {"beta": beta, "I_XZ_pairwise_upper": upper, "test_accuracy": acc, "status": status}

    baseline = [run(0.0, 7.0, 0.98), run(0.0, 7.2, 0.98)]  # mean upper 7.1
    sweeps = {"A": [run(1e-3, 7.0, 0.98), run(1e-2, 7.2, 0.97), run(1e-1, 6.0, 0.965), run(1.0, 1.0, 0.5),
                    run(10.0, 0.0, 0.99, status="failed")],
              "B": [run(1e-3, 7.1, 0.95), run(1e-2, 7.1, 0.90)]}
    lines = bench.compression_lines(baseline, sweeps)
    a = next(line for line in lines if line.startswith("- A:"))
    assert "rises +0.200 from beta 0.001 to 0.01" in a and "at beta 0.1," in a and "1.100 nats below" in a
    assert "(at least 0.5)" in a
    b = next(line for line in lines if line.startswith("- B:"))
    assert "never rises" in b and "no beta keeps test accuracy" in b
    assert bench.compression_lines([], sweeps) == []


def test_alignment_benchmark_smoke_on_digits(tmp_path):
    """benchmarks/alignment.py's cost, paper-setting and report stages on the digits recipe for one epoch: the
    label-noise runs carry their noise in the saved recipe, and the report has a row per run with alignments in
    [-1, 1], the measured cost and the figures."""
    bench = _load("alignment")
    out = tmp_path / "results" / "alignment.md"
    bench.main(["--stages", "cost,paper,report", "--recipe", str(BENCHMARKS.parent / "recipes" / "digits.yaml"), "--epochs", "1",
                "--seeds", "0", "--work", str(tmp_path / "work"), "--out", str(out), "--",
                "model.encoder.hidden=[32]"])
    saved = load_recipe(tmp_path / "work" / "paper" / "label_noise_50" / "seed_0" / "recipe.yaml")
    assert saved.data.label_noise == 0.5 and saved.optimizer.name == "sgd" and saved.monitor.alignment.enabled
    text = out.read_text()
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| label noise")]
    assert [r[0].strip() for r in rows[:3]] == ["label noise 0 %", "label noise 20 %", "label noise 50 %"]
    for r in rows[:3]:
        assert all(-1.0 <= float(c) <= 1.0 for c in r[2:8])
    assert re.search(r"one measurement .*\*\*\d+\.\d+ s\*\*", text)
    assert (out.parent / "alignment_label_noise.png").is_file() and "](alignment_label_noise.png)" in text


def test_adversarial_table_smoke_on_digits(tmp_path):
    """benchmarks/adversarial_table.py for one epoch of the bundled digits, two rows: the table has a row each with
    clean and attacked accuracies in [0, 100], Madry's PGD-40 no weaker than FGSM and our strongest PGD no weaker
    than PGD-40 (within three samples: their random starts differ), A3T's discriminator accuracy, and a CSV row per
    run."""
    bench = _load("adversarial_table")
    out = tmp_path / "adversarial_table.md"
    bench.main(["--datasets", "digits", "--models", "cnn", "--rows", "standard,a3t", "--epochs", "1",
                "--eval-limit", "40", "--work", str(tmp_path / "work"), "--out", str(out), "--",
                "model.encoder.channels=[4]", "model.encoder.hidden=16", "adversarial.steps=3"])
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.read_text().splitlines() if line.startswith("| standard") or line.startswith("| A3T")}
    assert set(rows) == {"standard", "A3T"}
    for cells in rows.values():
        assert cells[0] == "1" and all(0.0 <= float(c) <= 100.0 for c in cells[1:5])
        assert float(cells[3]) <= float(cells[2]) + 3 / 40 * 100  # PGD-40 within three samples of FGSM or below
        assert float(cells[4]) <= float(cells[3]) + 3 / 40 * 100  # ours: adaptive steps and 9 targets
    assert 0.0 <= float(rows["A3T"][9]) <= 1.0 and rows["standard"][9] == "-"
    assert len(list(csv.DictReader((tmp_path / "adversarial_table_runs.csv").open()))) == 2


def test_vectorized_sweep_smoke_on_two_tiny_digits_runs(tmp_path, monkeypatch):
    """benchmarks/vectorized_sweep.py's sweep pair on two tiny digits runs (one epoch): both sweeps complete, agree
    to float rounding (vib_kl with Adam is exact), and the report gives their wall-time ratio."""
    bench = _load("vectorized_sweep")
    monkeypatch.setattr(bench, "BETAS", "0,1e-2")
    monkeypatch.setitem(bench.PARTS, "digits", ("recipes/digits.yaml", "0", [
        "epochs=1", "model.encoder.hidden=[32]", "model.bottleneck.z_dim=8", "mi.estimator=vib_kl",
        "monitor.plane_figure=false", "model.eval_samples=0"]))
    seq = bench.sweep("digits", tmp_path, False, 1)
    vec = bench.sweep("digits", tmp_path, True, 1)
    assert seq["runs"] == vec["runs"] == 2 and seq["epochs"] == 2
    diff = bench.agreement(seq.pop("rows"), vec.pop("rows"))
    assert all(v <= 1e-6 for v in diff.values()), diff
    text = "\n".join(bench.report({"digits": {"agreement": diff, "sequential": seq, "vectorized": vec}}, 1))
    assert f"**{vec['seconds'] / seq['seconds']:.2f}**" in text and "## digits: 2 runs" in text
