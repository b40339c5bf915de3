"""The information plane: closed forms, what a short run writes to TensorBoard, and the `ib plane` figures."""
import csv
import math
import shutil
from pathlib import Path

import pytest
import torch

from ib.cli import main
from ib.engine import build_run, fit
from ib.errors import ConfigError
from ib.monitor import write_plane_plots
from ib.estimators.pairwise import pairwise_bound
from ib.plane import entropy, gaussian_kl, information_plane, to_units
from ib.recipe import load_recipe

DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"
SMALL = ["model.encoder.hidden=[64]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[64]", "beta_schedule.delay=0",
         "model.eval_samples=2"]


def test_gaussian_kl_closed_form():
    mean = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    std = torch.tensor([[1.0, 1.0], [0.5, 2.0]])
    expected = [0.5, 0.5 * (4 + 0.25 - 1) - math.log(0.5) + 0.5 * (4 - 1) - math.log(2.0)]
    assert gaussian_kl(mean, std).tolist() == pytest.approx(expected)


def test_entropy_and_units():
    assert entropy(torch.tensor([1.0, 1.0, 1.0, 1.0])) == pytest.approx(math.log(4))
    assert entropy(torch.tensor([0.0, 3.0, 0.0])) == pytest.approx(0.0)
    assert to_units(math.log(2), "bits") == pytest.approx(1.0)
    assert to_units(1.5, "nats") == 1.5


def test_plane_terms_match_a_hand_computation():
    # The same draws by hand: codes sampled per batch after seeding, CE summed in nats over the set, H(Y) from the
    # probe labels' frequencies, the KL bound averaged over rows, and the critic's held-out DV estimate in eval mode.
    import torch.nn.functional as F

    from ib.estimators import ESTIMATORS
    from ib.models.classifier import build_classifier
    from ib.models.critics import CRITICS

    torch.manual_seed(0)
    model = build_classifier("mlp", {"hidden": (16,)}, "gaussian", {"z_dim": 4, "std_offset": 0.0}, in_shape=(1, 4, 4),
                             num_classes=3, mean=(0.5,), std=(0.25,))
    x, y = torch.rand(60, 1, 4, 4), torch.tensor([0] * 30 + [1] * 20 + [2] * 10)
    estimator = ESTIMATORS.create("mine", CRITICS.create("joint", (1, 4, 4), 4, hidden=(16,)))
    model.train(), estimator.train()  # the plane must switch both to eval mode (no critic noise) itself
    out = information_plane(model, estimator, x, y, batch_size=25, permutations=3, seed=5)
    model.eval(), estimator.eval()
    with torch.no_grad():
        torch.manual_seed(5)
        codes = [model.encode(x[s:s + 25], sample=True) for s in range(0, 60, 25)]
        ce = sum(F.cross_entropy(model.decode(c.z), y[s:s + 25], reduction="sum").item()
                 for c, s in zip(codes, range(0, 60, 25)))
        z = torch.cat([c.z for c in codes])
        mean, std = torch.cat([c.mean for c in codes]), torch.cat([c.std for c in codes])
        kl = gaussian_kl(mean, std).double().mean()
        ixz = estimator.estimate(x, z, permutations=3, generator=torch.Generator().manual_seed(5), batch_size=25)
    h_y = -(0.5 * math.log(0.5) + 1 / 3 * math.log(1 / 3) + 1 / 6 * math.log(1 / 6))
    assert out["H_Y"] == pytest.approx(h_y)
    assert out["I_ZY"] == pytest.approx(h_y - ce / 60, rel=1e-5)
    assert out["I_XZ_upper"] == pytest.approx(float(kl), rel=1e-5)
    assert out["I_XZ"] == pytest.approx(ixz, rel=1e-5)
    assert out["I_XZ_pairwise_upper"] == pairwise_bound(mean, std, "kl")  # the band of the same codes
    assert out["I_XZ_pairwise_lower"] == pairwise_bound(mean, std, "bhattacharyya")
    assert 0.0 <= out["I_XZ_pairwise_lower"] <= out["I_XZ_pairwise_upper"] <= out["I_XZ_ceiling"] == math.log(60)


def test_plane_point_bounds_on_a_trained_model(tmp_path):
    recipe = load_recipe(DIGITS, ["epochs=4", *SMALL])
    fit(recipe, tmp_path / "run")
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    last = rows[-1]
    # The KL upper bounds must not sit below the MINE lower estimate (the gap is what a user reads as uncertainty).
    assert float(last["mi/I_XZ_upper"]) >= float(last["mi/I_XZ"])
    assert float(last["mi/I_XZ_pairwise_upper"]) >= float(last["mi/I_XZ"])
    # The band of the probe (the 143 validation digits) is at most log 143, and never below the data-processing
    # floor I(Z;Y) once raised to it; the lower end of a nearly deterministic code sits at the ceiling.
    lower, upper = float(last["mi/I_XZ_pairwise_lower"]), float(last["mi/I_XZ_pairwise_upper"])
    assert lower <= upper <= float(last["mi/I_XZ_ceiling"]) + 1e-9 and float(last["mi/I_XZ_ceiling"]) == \
        pytest.approx(math.log(143))
    assert upper >= float(last["mi/I_ZY"])
    assert float(last["mi/I_ZY"]) > 1.0  # a trained digits decoder recovers most of H(Y) = ln 10 ~ 2.3


def test_information_plane_restores_modes_and_rng():
    run = build_run(load_recipe(DIGITS, ["epochs=1", *SMALL]))
    run.model.train()
    torch.manual_seed(7)
    state = torch.get_rng_state()
    x, y = run.data.val.x[:50], run.data.val.y[:50]
    a = information_plane(run.model, run.estimator, x, y, permutations=2, seed=3)
    b = information_plane(run.model, run.estimator, x, y, permutations=2, seed=3)
    assert a == b and run.model.training and torch.equal(state, torch.get_rng_state())
    assert set(a) == {"I_XZ", "I_XZ_se", "I_XZ_upper", "I_ZY", "H_Y", "I_XZ_pairwise_upper", "I_XZ_pairwise_lower",
                      "I_XZ_ceiling"}
    assert 0 < a["I_XZ_se"] < 1  # MINE's held-out bound on 50 probe codes carries its jackknife standard error


def test_bits_everywhere(tmp_path):
    import json

    fit(load_recipe(DIGITS, ["epochs=1", "monitor.units=bits", *SMALL]), tmp_path / "bits")
    fit(load_recipe(DIGITS, ["epochs=1", *SMALL]), tmp_path / "nats")
    mb = json.loads((tmp_path / "bits" / "metrics.json").read_text())
    mn = json.loads((tmp_path / "nats" / "metrics.json").read_text())
    assert mb["units"] == "bits" and mn["units"] == "nats"
    for key in ("I_XZ", "I_ZY", "H_Y", "I_XZ_upper"):
        assert mb[key] == pytest.approx(mn[key] / math.log(2), rel=1e-6), key
    assert mb["I_XZ_nats"] == pytest.approx(mn["I_XZ_nats"])


def test_event_files_hold_scalars_figure_and_layout(digits_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    acc = EventAccumulator(str(digits_run), size_guidance={"images": 0, "tensors": 0})  # 3 epochs
    acc.Reload()
    tags = acc.Tags()
    assert {"mi/I_XZ", "mi/I_XZ_upper", "mi/I_ZY", "mi/H_Y", "time/plane_s"} <= set(tags["scalars"])
    assert "mi/information_plane" in tags["images"]
    images = acc.Images("mi/information_plane")
    assert len(images) == 3 and (images[-1].width, images[-1].height) == (550, 420)  # 5.5 x 4.2 in at 100 dpi
    layout_events = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout()
    layout.ParseFromString(layout_events[0].tensor_proto.string_val[0])
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    margin = next(c for t, c in charts.items() if t.startswith("I(X;Z)"))
    series = margin.margin.series[0]
    assert (series.value, series.lower, series.upper) == ("mi/I_XZ", "mi/I_XZ_pairwise_lower", "mi/I_XZ_pairwise_upper")


@pytest.mark.parametrize("epochs, figures", [(40, 10), (15, 10), (5, 10), (1, 10), (100, 1), (7, 3)])
def test_a_run_draws_its_plane_figures_at_evenly_spaced_epochs_the_last_included(epochs, figures):
    from ib.monitor import figure_epochs

    drawn = sorted(figure_epochs(epochs, figures))
    assert len(drawn) == min(epochs, figures) and drawn[-1] == epochs
    gaps = [b - a for a, b in zip([0, *drawn], drawn)]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    assert figure_epochs(40, 10) == {4, 8, 12, 16, 20, 24, 28, 32, 36, 40}


def test_ib_plane_writes_pngs(tmp_path, digits_run):
    shutil.copytree(digits_run, tmp_path / "run")
    assert main(["plane", str(tmp_path / "run")]) == 0
    png = (tmp_path / "run" / "plane.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ConfigError, match="neither a run"):
        write_plane_plots(tmp_path)
    assert main(["plane", str(tmp_path)]) == 2


POINTS = [{"epoch": 1, "I_XZ": 1.0, "I_XZ_se": 0.05, "I_XZ_upper": 40.0, "I_ZY": 1.5, "I_XZ_pairwise_lower": 1.2,
           "I_XZ_pairwise_upper": 3.0, "I_XZ_ceiling": 4.0},
          {"epoch": 2, "I_XZ": 1.2, "I_XZ_upper": 45.0, "I_ZY": 1.8, "I_XZ_pairwise_lower": 1.0,
           "I_XZ_pairwise_upper": 2.5, "I_XZ_ceiling": 4.0}]


def _label(estimator):
    """What the figures are told of an estimator: its class's `label`; None: no estimator."""
    from ib.estimators import ESTIMATORS

    return ESTIMATORS.get(estimator).label if estimator else ""


@pytest.mark.parametrize("estimator,label", [
    ("mine", "I(X;Z) [nats] (MINE, held-out)"),
    ("mine_f", "I(X;Z) [nats] (MINE-f, held-out)"),
    ("infonce", "I(X;Z) [nats] (InfoNCE, held-out)"),
    ("smile", "I(X;Z) [nats] (SMILE, held-out)"),
    ("jsd", "I(X;Z) [nats] (JSD, held-out)"),
    ("vib_kl", "I(X;Z) [nats] (KL upper bound, held-out)"),
    (None, "I(X;Z) [nats] (held-out)"),
])
def test_plane_figure_names_the_estimator(estimator, label):
    from ib.plots import plane_figure

    ax = plane_figure(POINTS, "nats", xz_name=_label(estimator)).axes[0]
    assert ax.get_xlabel() == label


def test_plane_figure_draws_the_band_from_the_data_processing_floor():
    """Each epoch's band runs from max(Bhattacharyya bound, I(Z;Y)) to the KL bound at its I(Z;Y); the estimate is
    drawn as it is; the ceiling log N is a dashed line; points without a band draw none."""
    from ib.plots import plane_figure

    ax = plane_figure(POINTS, "nats", xz_name="MINE").axes[0]
    bands = [c for c in ax.collections if c.get_label().startswith("pairwise band")]  # one artist, every epoch's
    assert [s.tolist() for s in bands[0].get_segments()] == [[[1.5, 1.5], [3.0, 1.5]], [[1.8, 1.8], [2.5, 1.8]]]
    ends = [line for line in ax.lines if line.get_marker() == "|"]  # lower ends raised to I(Z;Y)
    assert list(ends[0].get_xdata()) == [1.5, 3.0, 1.8, 2.5] and list(ends[0].get_ydata()) == [1.5, 1.5, 1.8, 1.8]
    assert any(line.get_linestyle() == "--" and list(line.get_xdata()) == [4.0, 4.0] for line in ax.lines)
    labels = ax.get_legend_handles_labels()[1]
    assert "MINE" in labels and any(t.startswith("impossible") for t in labels)
    bare = [{k: p[k] for k in ("epoch", "I_XZ", "I_ZY")} for p in POINTS]  # an additive encoder: no band
    ax = plane_figure(bare, "nats", xz_name="MINE").axes[0]
    assert not [line for line in ax.lines if line.get_marker() == "|"]
    assert not [c for c in ax.collections if c.get_label().startswith("pairwise band")]


def test_plane_figure_draws_two_standard_errors_around_an_estimate_and_keeps_them_in_view():
    from matplotlib.collections import LineCollection

    from ib.plots import plane_figure

    far = [{"epoch": 1, "I_XZ": 1.0, "I_XZ_se": 2.0, "I_ZY": 0.5}, {"epoch": 2, "I_XZ": 1.2, "I_ZY": 0.6}]
    ax = plane_figure(far, "nats", xz_name="MINE").axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    segments = [s.tolist() for c in bars for s in c.get_segments()]
    assert [[-3.0, 0.5], [5.0, 0.5]] in segments  # 1.0 +- 2 * 2.0 at I(Z;Y) = 0.5; the point without an se has none
    assert not any(seg[0][1] == 0.6 and seg[0][0] != seg[1][0] for seg in segments)
    assert ax.get_xlim()[1] >= 5.0  # the bar's right end is in view


def test_every_estimator_declares_its_label_and_bound():
    from ib.estimators import ESTIMATORS

    for name in ESTIMATORS.names():
        cls = ESTIMATORS.get(name)
        assert "label" in vars(cls) and cls.label != name, f"{name}: give its class a display label"
        assert cls.upper_bound == (name in ("vib_kl", "pairwise_kl")), name  # the critics' are lower bounds


@pytest.mark.parametrize("estimator,title", [
    ("mine", "I(X;Z) [bits]: MINE estimate and the pairwise band"),
    ("infonce", "I(X;Z) [bits]: InfoNCE estimate and the pairwise band"),
    ("vib_kl", "I(X;Z) [bits]: KL upper bound estimate and the pairwise band"),
])
def test_custom_scalars_layout_names_the_estimator(estimator, title):
    from ib.monitor import information_layout

    charts = information_layout("bits", _label(estimator))["information plane"]
    assert charts[title] == ["Margin", ["mi/I_XZ", "mi/I_XZ_pairwise_lower", "mi/I_XZ_pairwise_upper"]]
    assert charts["I(X;Z) [bits]: VIB's KL bound against N(0, I)"] == ["Multiline", ["mi/I_XZ_upper"]]


def test_a_vib_kl_run_is_labelled_as_the_kl_bound(tmp_path):
    """TensorBoard's layout and `ib plane` take the estimator from the run (its metrics.json)."""
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    run = tmp_path / "vib"
    fit(load_recipe(DIGITS, ["epochs=1", *SMALL, "mi.estimator=vib_kl"]), run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["estimator"] == {"name": "vib_kl", "label": "KL upper bound", "upper_bound": True}
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0})
    acc.Reload()
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors(metadata.CONFIG_SUMMARY_TAG)[0].tensor_proto.string_val[0])
    titles = [c.title for cat in layout.category for c in cat.chart]
    assert "I(X;Z) [nats]: KL upper bound estimate and the pairwise band" in titles
    assert not any("MINE" in t for t in titles)
    assert {"mi/I_XZ", "mi/I_XZ_upper"} <= set(acc.Tags()["scalars"])  # the tags themselves are unchanged
    assert write_plane_plots(run) == [run / "plane.png"]
    metrics["estimator"] = None  # a run without an estimator names none, and still gets its figure
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert write_plane_plots(run) == [run / "plane.png"]


def test_ib_plane_reads_the_estimator_from_the_recipe_of_an_older_run(digits_run, tmp_path):
    """A run folder whose metrics.json has no "estimator" entry: `ib plane` takes it from recipe.yaml."""
    import json

    from ib.cli import saved_estimator_labels

    run = tmp_path / "run"
    shutil.copytree(digits_run, run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics.pop("estimator") == {"name": "mine", "label": "MINE", "upper_bound": False}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert saved_estimator_labels(run) == {"label": "MINE", "upper_bound": False}
    assert main(["plane", str(run)]) == 0 and (run / "plane.png").is_file()
    (run / "recipe.yaml").write_text("not: [a recipe")
    assert saved_estimator_labels(run) == {}


def test_the_log_line_states_the_plane_never_an_estimate_below_the_floor():
    """The printed I(X;Z) is the band with its lower end raised to I(Z;Y) (or the floor alone); the critic's figure
    follows in parentheses under its own name, wherever it lies."""
    from ib.plane import describe_xz

    assert describe_xz(0.176, 4.963, 4.963, 2.213, "MINE") == "I(X;Z) in [4.963, 4.963] (MINE 0.176)"
    assert describe_xz(2.5, 1.201, 2.775, 1.363, "MINE") == "I(X;Z) in [1.363, 2.775] (MINE 2.500)"
    assert describe_xz(2.752, 2.431, 2.752, 2.198, "pairwise KL bound") == "I(X;Z) in [2.431, 2.752]"
    assert describe_xz(0.9, math.nan, math.nan, 1.5, "MINE") == "I(X;Z) >= 1.500 (MINE 0.900)"
    assert describe_xz(math.nan, 3.0, 4.0, 2.0) == "I(X;Z) in [3.000, 4.000]"
    assert describe_xz(0.5, 3.0, 4.0, 2.0, "MINE", "bits") == "I(X;Z) in [3.000, 4.000] bits (MINE 0.500)"
    assert describe_xz(math.nan, 3.0, 4.0, 4.2) == "I(X;Z) in [4.000, 4.000]"  # a noisy floor above the bound
