"""Tests of ib.data.loader: BatchLoader's order, batches and state, and the batched augmentations."""
from __future__ import annotations

import typing

import pytest
import torch

from ib.data import AUGMENTATIONS, BatchLoader, Split, random_crop_flip
from ib.errors import CheckpointError
from ib.recipe import DataConfig


def labelled(n: int) -> Split:
    """n samples whose label is their index, so batches show the order."""
    return Split(torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1), torch.arange(n))


def epoch_order(loader: BatchLoader) -> list:
    return torch.cat([y for _, y in loader]).tolist()


def test_loader_epoch_is_a_permutation():
    loader = BatchLoader(labelled(10), 3, shuffle=True, drop_last=False, seed=0)
    assert len(loader) == 4
    first, second = epoch_order(loader), epoch_order(loader)
    assert sorted(first) == list(range(10)) and sorted(second) == list(range(10))
    assert first != second


def test_loader_drop_last():
    loader = BatchLoader(labelled(10), 3, shuffle=True, drop_last=True, seed=0)
    sizes = [len(y) for _, y in loader]
    assert len(loader) == 3 and sizes == [3, 3, 3]


def test_loader_without_shuffle_keeps_order():
    assert epoch_order(BatchLoader(labelled(7), 3, shuffle=False, drop_last=False)) == list(range(7))


def test_loader_same_seed_same_order():
    a = BatchLoader(labelled(20), 4, shuffle=True, drop_last=False, seed=5)
    b = BatchLoader(labelled(20), 4, shuffle=True, drop_last=False, seed=5)
    assert [epoch_order(a) for _ in range(3)] == [epoch_order(b) for _ in range(3)]


def test_loader_state_dict_round_trip():
    a = BatchLoader(labelled(20), 4, shuffle=True, drop_last=False, seed=0)
    epoch_order(a)
    state = a.state_dict()
    expected = epoch_order(a)
    b = BatchLoader(labelled(20), 4, shuffle=True, drop_last=False, seed=123)
    b.load_state_dict(state)
    assert epoch_order(b) == expected


@pytest.mark.parametrize("n", [12, 30])
def test_loader_refuses_a_mid_epoch_state_saved_for_another_data_size(n):
    a = BatchLoader(labelled(20), 4, shuffle=True, drop_last=True, seed=0)
    batches = iter(a)
    next(batches)  # stopped part-way: the state holds the epoch's order over 20 samples
    state = a.state_dict()
    b = BatchLoader(labelled(n), 4, shuffle=True, drop_last=True, seed=0)
    with pytest.raises(CheckpointError, match=f"training set of 20 samples, this one has {n}"):
        b.load_state_dict(state)
    assert epoch_order(b) == epoch_order(BatchLoader(labelled(n), 4, shuffle=True, drop_last=True, seed=0))


def test_loader_converts_uint8_to_unit_float():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(3, 1, 1, 1)
    loader = BatchLoader(Split(x, torch.zeros(3, dtype=torch.int64)), 3, shuffle=False, drop_last=False)
    (xb, yb), = list(loader)
    assert xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert xb.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])


def test_loader_passes_its_generator_to_augment():
    seen = []

    def augment(x, generator):
        seen.append(generator)
        return x + 1

    loader = BatchLoader(labelled(4), 2, shuffle=False, drop_last=False, augment=augment)
    xb, _ = next(iter(loader))
    assert seen == [loader.generator] and xb.min() >= 1


def test_loader_empty_split():
    loader = BatchLoader(labelled(0), 4, shuffle=True, drop_last=True)
    assert len(loader) == 0 and list(loader) == []


# ---------------------------------------------------------------------------------------------------------------------
# Augmentation


def test_crop_flip_without_padding_is_identity_or_flip():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    out = random_crop_flip(x, torch.Generator().manual_seed(1), padding=0)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same | flipped).all()) and same.any() and flipped.any()


def test_crop_flip_outputs_windows_of_padded_input():
    padding = 4
    x = torch.arange(1, 8 * 3 * 32 * 32 + 1, dtype=torch.float32).reshape(8, 3, 32, 32)
    out = random_crop_flip(x, torch.Generator().manual_seed(0), padding=padding)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = set()
    for b in range(len(x)):
        windows = []
        for dy in range(2 * padding + 1):
            for dx in range(2 * padding + 1):
                window = padded[b, :, dy:dy + 32, dx:dx + 32]  # [3, 32, 32]
                for flip in (False, True):
                    if torch.equal(out[b], window.flip(-1) if flip else window):
                        windows.append((dy, dx, flip))
        assert len(windows) == 1, f"sample {b} is not a window of the padded input"
        offsets.add(windows[0])
    assert len(offsets) > 1


def test_crop_flip_deterministic_for_a_seed():
    x = torch.rand(16, 3, 32, 32)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    c = random_crop_flip(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_augmentations_by_name():
    assert AUGMENTATIONS == {"none": None, "crop_flip": random_crop_flip}
    # The recipe refuses any other name (tests/test_recipe.py), so the trainer's lookup cannot miss.
    assert set(typing.get_args(typing.get_type_hints(DataConfig)["augment"])) == set(AUGMENTATIONS)
