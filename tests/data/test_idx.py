"""Tests of ib.data.idx: MNIST and Fashion-MNIST from small IDX files, plain and gzip, and their download."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch
import torchvision.datasets

from ib.data import load_data, read_idx
from ib.errors import DataError

MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


def write_idx(path: Path, array: np.ndarray, gz: bool) -> Path:
    """Write a uint8 array in IDX format (magic 0x0000080N, big-endian int32 dims), gzip-compressed if `gz`."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path = path.with_name(path.name + ".gz") if gz else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@pytest.fixture
def idx_arrays() -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (50, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 50, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 20, dtype=np.uint8),
    }


def write_idx_set(folder: Path, arrays: Dict[str, np.ndarray], gz: bool) -> None:
    for name, array in arrays.items():
        write_idx(folder / name, array, gz)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_data_sets_round_trip(tmp_path, idx_arrays, name, layout, gz):
    folder = tmp_path / MNIST_FOLDERS[name] / "raw" if layout == "torchvision" else tmp_path
    write_idx_set(folder, idx_arrays, gz)

    splits = load_data(name, root=str(tmp_path), download=False, val_fraction=0.0, seed=0)

    assert splits.train.x.dtype == torch.uint8 and splits.train.y.dtype == torch.int64
    assert splits.train.x.shape == (50, 1, 28, 28) and splits.test.x.shape == (20, 1, 28, 28)
    assert np.array_equal(splits.train.x[:, 0].numpy(), idx_arrays["train-images-idx3-ubyte"])
    assert np.array_equal(splits.train.y.numpy(), idx_arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(splits.test.x[:, 0].numpy(), idx_arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(splits.test.y.numpy(), idx_arrays["t10k-labels-idx1-ubyte"])
    assert splits.in_shape == (1, 28, 28) and splits.num_classes == 10
    assert len(splits.val) == 0 and splits.val.x.shape == (0, 1, 28, 28)
    assert splits.class_names[0] == ("0" if name == "mnist" else "T-shirt/top")


def test_idx_mean_std_from_train_part(tmp_path, idx_arrays):
    write_idx_set(tmp_path, idx_arrays, gz=False)
    splits = load_data("mnist", root=str(tmp_path), download=False, val_fraction=0.2, seed=0)
    x = splits.train.x.double() / 255
    assert len(splits.train) == 40 and len(splits.val) == 10
    assert splits.mean == pytest.approx([x.mean().item()], abs=1e-12)
    assert splits.std == pytest.approx([x.std(unbiased=False).item()], abs=1e-12)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
def test_truncated_idx_raises_naming_file(tmp_path, idx_arrays, gz):
    write_idx_set(tmp_path, idx_arrays, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    raw = bad.read_bytes()[:-100]
    bad.unlink()
    bad = bad.with_name(bad.name + ".gz") if gz else bad
    bad.write_bytes(gzip.compress(raw)[:-10] if gz else raw)

    with pytest.raises(DataError, match=str(bad)):
        load_data("mnist", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)


def test_read_idx_rejects_bad_magic(tmp_path):
    path = tmp_path / "x"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(str(path))


def test_read_idx_big_endian_int32(tmp_path):
    values = np.array([[1, -2], [70000, 3]], dtype=">i4")
    path = tmp_path / "ints"
    path.write_bytes(struct.pack(">HBB", 0, 0x0C, 2) + struct.pack(">2I", 2, 2) + values.tobytes())
    assert read_idx(str(path)).tolist() == values.tolist()


def test_missing_idx_names_searched_folders(tmp_path):
    with pytest.raises(DataError) as err:
        load_data("fashion_mnist", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    message = str(err.value)
    assert "\n" not in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message and str(tmp_path) in message
    assert "data.download=true" in message and "dataset-fashion-mnist" in message


def test_download_uses_torchvision_class(tmp_path, idx_arrays, monkeypatch):
    calls = []

    def fake_fashion_mnist(root, train, download):  # stands in for the network: writes what torchvision would
        calls.append((root, train, download))
        write_idx_set(Path(root) / "FashionMNIST" / "raw", idx_arrays, gz=True)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", fake_fashion_mnist)
    splits = load_data("fashion_mnist", root=str(tmp_path), download=True, val_fraction=0.0, seed=0)
    assert calls and calls[0][2] is True
    assert np.array_equal(splits.test.y.numpy(), idx_arrays["t10k-labels-idx1-ubyte"])


def test_failed_download_raises_data_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://..., got: [Errno -3]")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DataError, match="download .* failed") as err:
        load_data("mnist", root=str(tmp_path), download=True, val_fraction=0.0, seed=0)
    assert "\n" not in str(err.value)
    assert "put the four IDX files (train-images-idx3-ubyte" in str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in str(err.value)  # the folders the loader searches
