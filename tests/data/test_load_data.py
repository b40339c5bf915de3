"""Tests of ib.data.load_data: the validation hold-out, argument checks and the DATASETS registry."""
from __future__ import annotations

import inspect

import pytest
import torch

from ib.data import DATASETS, Split, load_data
from ib.errors import ConfigError


def load_digits(val_fraction: float = 0.1, seed: int = 0):
    return load_data("digits", root="unused", download=False, val_fraction=val_fraction, seed=seed)


def test_hold_out_depends_on_seed_only():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert torch.equal(a.val.x, b.val.x) and torch.equal(a.train.y, b.train.y)
    assert not torch.equal(a.val.x, c.val.x)
    assert torch.equal(a.test.x, c.test.x)  # the test split does not depend on the run's seed
    # Train and val partition the loader's training split.
    assert sorted(torch.cat([a.train.y, a.val.y]).tolist()) == sorted(torch.cat([c.train.y, c.val.y]).tolist())


def test_zero_val_fraction_gives_empty_val():
    splits = load_digits(val_fraction=0.0)
    assert splits.val.x.shape == (0, 1, 8, 8) and splits.val.y.shape == (0,)
    assert len(splits.train) == 1437


@pytest.mark.parametrize("val_fraction", [-0.1, 1.0])
def test_val_fraction_out_of_range(val_fraction):
    with pytest.raises(ConfigError, match="val_fraction"):
        load_digits(val_fraction=val_fraction)


def test_fixed_size_data_sets_reject_image_size():
    with pytest.raises(ConfigError, match="image_size"):
        load_data("digits", root="", download=False, val_fraction=0.0, seed=0, image_size=16)


def test_unknown_data_set_lists_valid_names():
    with pytest.raises(ConfigError, match="cifar10, digits, fashion_mnist, image_folder, mnist"):
        load_data("imagenet", root="", download=False, val_fraction=0.0, seed=0)


@pytest.mark.parametrize("name", DATASETS.names())
def test_loaders_take_root_download_image_size(name):
    assert list(inspect.signature(DATASETS.get(name)).parameters) == ["root", "download", "image_size"]


def test_a_subset_of_a_split_in_class_order_holds_every_class():
    """`Split.sample` draws by a seeded permutation: a probe or an evaluation subset of a split stored in class
    order (an image folder's) holds every class in proportion, and the same seed draws the same rows."""
    y = torch.arange(10).repeat_interleave(100)  # 1,000 samples, classes in order
    split = Split(torch.arange(1000).view(1000, 1, 1, 1).float(), y)
    part = split.sample(200, seed=3)
    counts = torch.bincount(part.y, minlength=10)
    assert len(part) == 200 and (counts >= 8).all()  # expected 20 each; >= 8 fails with probability < 1e-3
    assert torch.equal(split.sample(200, seed=3).x, part.x) and not torch.equal(split.sample(200, seed=4).x, part.x)
    assert split.sample(1000, seed=3) is split and split.sample(5000, seed=3) is split  # all of it, in order
