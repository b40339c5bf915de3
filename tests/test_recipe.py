"""Recipe loading: every shipped recipe loads; bad input gives one clear line naming the key, value and choices."""
from pathlib import Path

import pytest
import yaml

from ib.config import apply_overrides, parse_yaml
from ib.errors import ConfigError
from ib.recipe import Recipe, dump_recipe, load_recipe, recipe_from_dict, recipe_to_dict

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = load_recipe(path)
    again = recipe_from_dict(yaml.safe_load(dump_recipe(recipe)))
    assert recipe_to_dict(again) == recipe_to_dict(recipe)


def test_paper_mnist_recipe_values():
    r = load_recipe(Path(__file__).parents[1] / "recipes" / "mnist.yaml")
    assert r.model.encoder.options["hidden"] == [1024, 1024]
    assert r.model.bottleneck.options == {"z_dim": 256, "std_offset": 5.0}
    assert (r.beta, r.optimizer.lr, r.optimizer.betas[0], r.data.batch_size, r.epochs) == (1e-3, 1e-4, 0.5, 100, 200)
    assert r.lr_schedule.options == {"step_size": 2, "gamma": 0.97}
    assert r.mi.critic.options["hidden"] == [512, 512]
    assert (r.mi.critic.options["input_noise"], r.mi.critic.options["hidden_noise"]) == (0.3, 0.5)
    assert (r.mi.optimizer.lr, tuple(r.mi.optimizer.betas)) == (2e-4, (0.5, 0.999))
    assert r.model.eval_samples == 12


@pytest.mark.parametrize("name,train_images,val_images", [("mnist", 60_000, 5_000),
                                                           ("fashion_mnist", 60_000, 5_000),
                                                           ("cifar10", 50_000, 5_000)])
def test_recipe_comments_hold_for_the_split_and_the_steps(name, train_images, val_images):
    """The numbers the recipes' comments state, by the project's own arithmetic: the hold-out
    (`floor(val_fraction * N)`) and the training loader's steps per epoch (whole batches only)."""
    import torch

    from ib.data import BatchLoader, Split, _hold_out

    r = load_recipe(Path(__file__).parents[1] / "recipes" / f"{name}.yaml")
    images = Split(torch.zeros(train_images, 1, dtype=torch.uint8), torch.zeros(train_images, dtype=torch.long))
    train, val = _hold_out(images, r.data.val_fraction, r.seed)
    assert len(val) == val_images
    steps = len(BatchLoader(train, r.data.batch_size, shuffle=True, drop_last=True))
    if r.beta_schedule.name == "linear":  # cifar10: "waits one epoch, then ramps up over five epochs"
        assert (r.beta_schedule.options["delay"], r.beta_schedule.options["warmup"]) == (steps, 5 * steps)


def test_defaults_are_filled_in_for_components():
    r = recipe_from_dict({"model": {"encoder": "mlp"}})
    assert r.model.encoder.options["hidden"] == [1024, 1024]  # the factory's default, visible in the saved recipe
    assert "ema_rate" in r.mi.estimator.options


def test_overrides_beat_the_file_and_parse_types():
    raw = {"beta": 0.1, "model": {"encoder": {"name": "mlp", "hidden": [8]}}, "mi": {"estimator": "mine"}}
    r = recipe_from_dict(raw, ["beta=1e-3", "epochs=3", "model.encoder.hidden=[4, 5]",
                               "mi.estimator.ema_rate=0.05", "data.download=true", "name=x1"])
    assert r.beta == 1e-3 and isinstance(r.beta, float)
    assert r.epochs == 3
    assert r.model.encoder.options["hidden"] == [4, 5]
    assert r.mi.estimator.options["ema_rate"] == 0.05
    assert r.data.download is True
    assert r.name == "x1"
    assert raw["beta"] == 0.1  # the input mapping is not modified


def test_class_entries_resolve_their_options_from_init():
    """Estimators and schedules are registered as classes: their options, defaults and types come from `__init__`."""
    r = recipe_from_dict({"mi": {"estimator": {"name": "mine", "ema_rate": 0.01, "marginals": 1}}})
    assert r.mi.estimator.options == {"ema_rate": 0.01, "marginals": 1}
    assert recipe_from_dict({}, ["mi.estimator=smile"]).mi.estimator.options == {"tau": 5.0, "marginals": 1}
    r = recipe_from_dict({}, ["beta_schedule=linear", "lr_schedule=cosine"])
    assert r.beta_schedule.options == {"warmup": 1000, "start": 0.0, "delay": 0}
    assert r.lr_schedule.options == {"warmup": 0, "min_factor": 0.0}
    ema_rate = recipe_from_dict({}, ["mi.estimator.ema_rate=1"]).mi.estimator.options["ema_rate"]
    assert type(ema_rate) is float  # read as the annotation says
    with pytest.raises(ConfigError, match="mi.estimator.ema_rate: expected a number, got 'fast'"):
        recipe_from_dict({}, ["mi.estimator.ema_rate=fast"])
    with pytest.raises(ConfigError, match="beta_schedule.warmup: expected an integer, got 1.5"):
        recipe_from_dict({}, ["beta_schedule=linear", "beta_schedule.warmup=1.5"])


def test_override_replacing_a_component_by_name_drops_its_options():
    r = recipe_from_dict({"mi": {"estimator": {"name": "mine", "ema_rate": 0.5}}}, ["mi.estimator=mine_f"])
    assert r.mi.estimator.name == "mine_f" and r.mi.estimator.options == {"marginals": 1}  # ema_rate gone


def test_beta_zero_and_scientific_notation():
    assert recipe_from_dict({}, ["beta=0"]).beta == 0.0
    assert parse_yaml("a: 1e-3", "t")["a"] == 1e-3
    assert parse_yaml("a: -2.5E+2", "t")["a"] == -250.0


BAD = [
    # (overrides on an empty recipe, words the message must contain)
    (["epoch=3"], ["unknown key 'epoch'", "epochs"]),
    (["data.batchsize=3"], ["data: unknown key 'batchsize'", "batch_size"]),
    (["model.encoder.widths=[3]"], ["model.encoder: unknown key 'widths' for encoder 'mlp'", "hidden"]),
    (["optimizer.lr=-0.1"], ["optimizer.lr", "-0.1", "> 0"]),
    (["beta=-1"], ["beta", "-1", ">= 0"]),
    (["data.batch_size=0"], ["data.batch_size", "0", ">= 2"]),
    (["epochs=2.5"], ["epochs", "expected an integer", "2.5"]),
    (["epochs=true"], ["epochs", "expected an integer"]),
    (["data.download=yes please"], ["data.download", "true or false"]),
    (["beta=.nan"], ["beta", "finite"]),
    (["optimizer.lr=.inf"], ["optimizer.lr", "finite"]),
    (["model.encoder=transformer"], ["unknown encoder 'transformer'", "convnet, mlp, resnet18_cifar"]),
    (["model.bottleneck.name=vae"], ["unknown bottleneck 'vae'", "gaussian"]),
    (["mi.critic=deep"], ["unknown critic 'deep'", "joint, separable"]),
    (["mi.estimator=nce"], ["unknown estimator 'nce'", "mine, mine_f"]),
    (["beta_schedule=sawtooth"], ["unknown beta schedule 'sawtooth'", "constant", "linear"]),
    (["lr_schedule=poly"], ["unknown lr schedule 'poly'", "cosine", "step"]),
    (["data.name=imagenet"], ["unknown data set 'imagenet'", "cifar10", "digits"]),
    (["optimizer.name=lbfgs"], ["optimizer.name", "'lbfgs'", "adam, adamw, sgd"]),
    (["data.augment=mixup"], ["data.augment", "crop_flip"]),
    (["optimizer.betas=[0.9]"], ["betas", "two numbers"]),
    (["model.encoder.hidden=[a, b]"], ["model.encoder.hidden[0]", "an integer"]),
    (["mi.enabled=false"], ["beta", "mi.enabled=true"]),
    (["data=3"], ["data", "mapping"]),
    (["data.val_fraction=1.0"], ["data.val_fraction", "< 1.0"]),
    (["epochs"], ["expected key=value"]),
    (["name=../escape"], ["name", "folder"]),
]


@pytest.mark.parametrize("overrides,words", BAD, ids=[b[0][0] for b in BAD])
def test_bad_values_are_rejected_with_one_clear_line(overrides, words):
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({}, overrides)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


BAD_FILES = [
    ("syntax.yaml", "a: [1, 2\n", ["invalid YAML", "line"]),
    ("list.yaml", "- 1\n- 2\n", ["top level must be a mapping"]),
    ("empty.yaml", "", ["empty"]),
    ("python_tag.yaml", "epochs: !!python/object/apply:os.system ['echo pwned']\n", ["invalid YAML", "python"]),
    ("tabs.yaml", "a:\n\t- 1\n", ["invalid YAML"]),
]


@pytest.mark.parametrize("override,message", [
    ("optimizer.betas=[0.9, 1.5]", "optimizer.betas must be two numbers in [0, 1), got [0.9, 1.5]"),
    ("mi.optimizer.betas=[0.5, 1.5]", "mi.optimizer.betas must be two numbers in [0, 1), got [0.5, 1.5]"),
])
def test_a_section_check_names_the_whole_key_path(override, message):
    """A check in a section's __post_init__ (OptimConfig serves two keys) names the key that was given."""
    with pytest.raises(ConfigError) as err:
        recipe_from_dict({}, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("name,text,words", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_files_are_rejected(tmp_path, name, text, words):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="'beta' is a value, not a section"):
        apply_overrides({"beta": 1.0}, ["beta.x=1"])


def test_recipe_defaults_are_valid():
    assert isinstance(recipe_from_dict({}), Recipe)


@pytest.mark.parametrize("override, message", [("optimizer.lr=-1", "optimizer.lr: -1.0 is out of range"),
                                               ("data.batch_sise=3", "data: unknown key 'batch_sise'"),
                                               ("data.name=emnist", "data.name: unknown data set 'emnist'")])
def test_a_plain_mistake_is_reported_before_torch_loads(override, message):
    """Keys, types and bounds are checked before any registry (and torch behind it) is imported; a registry name
    needs its registry."""
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    code = ("import sys; from ib.cli import main; status = main(['train', 'recipes/digits.yaml', %r]); "
            "print(status, 'torch' in sys.modules)" % override)
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert message in done.stderr
    assert done.stdout.split() == ["2", str(override.startswith("data.name"))]
