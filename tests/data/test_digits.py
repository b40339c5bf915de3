"""Tests of ib.data.digits: scikit-learn's 8x8 digits and their fixed train/test split."""
from __future__ import annotations

import pytest
import torch

from ib.data import load_data


def test_digits_shapes_and_values():
    splits = load_data("digits", root="unused", download=False, val_fraction=0.1, seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 360 and len(splits.val) == int(0.1 * 1437)
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.x.min() >= 0 and split.x.max() <= 1
    assert splits.in_shape == (1, 8, 8) and splits.num_classes == 10 and splits.class_names[3] == "3"
    x = splits.train.x.double()
    assert splits.mean == pytest.approx([x.mean().item()], abs=1e-12)
    assert splits.std == pytest.approx([x.std(unbiased=False).item()], abs=1e-12)
