"""Tests of ib.data.cifar: CIFAR-10's python batches, the unpickler that refuses objects, missing files."""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
import torchvision.datasets

from ib.data import load_data
from ib.errors import DataError


def write_cifar(root: Path, protocol: int, per_batch: int = 4, n_test: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Write tiny CIFAR-10 batches as torchvision reads them (dicts with 'data' uint8 [N, 3072] and 'labels')."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data_all, labels_all = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        batch = {
            "batch_label": name,
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "labels": rng.integers(0, 10, n).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(n)],
        }
        data_all.append(batch["data"])
        labels_all.append(batch["labels"])
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=protocol)
    return np.concatenate(data_all), np.concatenate(labels_all)


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_cifar10_round_trip(tmp_path, protocol):
    data_rows, labels = write_cifar(tmp_path, protocol)
    splits = load_data("cifar10", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)

    x = torch.cat([splits.train.x, splits.test.x])  # [23, 3, 32, 32]
    assert splits.train.x.shape == (20, 3, 32, 32) and splits.test.x.shape == (3, 3, 32, 32)
    assert x.dtype == torch.uint8 and splits.train.y.dtype == torch.int64
    assert torch.cat([splits.train.y, splits.test.y]).tolist() == labels.tolist()
    # Each row is the R plane, then G, then B, each 32x32 row-major.
    assert np.array_equal(x[:, 0].reshape(-1, 1024).numpy(), data_rows[:, :1024])
    assert np.array_equal(x[:, 2].reshape(-1, 1024).numpy(), data_rows[:, 2048:])
    assert x[5, 1, 3, 7].item() == data_rows[5, 1024 + 3 * 32 + 7]
    assert splits.class_names[0] == "airplane" and splits.num_classes == 10


class _RunsACommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_refuses_pickled_objects(tmp_path):
    write_cifar(tmp_path, protocol=2)
    marker = tmp_path / "executed"
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    with open(evil, "wb") as f:
        pickle.dump({"data": _RunsACommand(marker), "labels": [0]}, f)

    with pytest.raises(DataError, match="refusing to load .*data_batch_1.*Python objects"):
        load_data("cifar10", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert not marker.exists()


def test_cifar10_missing_lists_files(tmp_path):
    with pytest.raises(DataError, match="data_batch_1.*cifar-10-batches-py.*data.download=true"):
        load_data("cifar10", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)


def test_failed_download_names_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\nTried https://..., got: [Errno -3]")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="download .* failed") as err:
        load_data("cifar10", root=str(tmp_path), download=True, val_fraction=0.0, seed=0)
    assert "\n" not in str(err.value)
    assert f"batches.meta in {tmp_path / 'cifar-10-batches-py'} (extract cifar-10-python.tar.gz into" in str(err.value)
