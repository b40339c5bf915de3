"""Tests of ib.data: file readers on small real-format files, the hold-out split, BatchLoader and augmentation."""
from __future__ import annotations

import gzip
import inspect
import os
import pickle
import struct
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
import torchvision.datasets
from PIL import Image

import ib.data as data
from ib.data import (
    AUGMENTATIONS,
    DATASETS,
    BatchLoader,
    Split,
    get_augment,
    load_data,
    random_crop_flip,
    read_idx,
)
from ib.errors import CheckpointError, ConfigError, DataError

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


# ---------------------------------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST)


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
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="download .* failed") as err:
        load_data("cifar10", root=str(tmp_path), download=True, val_fraction=0.0, seed=0)
    assert f"batches.meta in {tmp_path / 'cifar-10-batches-py'} (extract cifar-10-python.tar.gz into" in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# CIFAR-10 (python batches)


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


# ---------------------------------------------------------------------------------------------------------------------
# image_folder


def write_image_tree(root: Path, counts: Dict[str, Dict[str, int]], size: Tuple[int, int] = (5, 6)) -> Dict[str, list]:
    """PNG files root/<part>/<class>/<i>.png with random RGB pixels; returns {part: [(pixels [3, H, W], label)]}."""
    rng = np.random.default_rng(2)
    written: Dict[str, list] = {}
    for part, per_class in counts.items():
        written[part] = []
        for label, (cls, n) in enumerate(sorted(per_class.items())):
            (root / part / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)  # [H, W, 3]
                Image.fromarray(pixels).save(root / part / cls / f"{i}.png")
                written[part].append((pixels.transpose(2, 0, 1), label))
    return written


TREE = {"train": {"cat": 3, "dog": 3}, "test": {"cat": 2, "dog": 2}}


def test_image_folder_round_trip(tmp_path):
    written = write_image_tree(tmp_path, TREE)
    splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)

    assert splits.class_names == ["cat", "dog"] and splits.in_shape == (3, 5, 6)
    for split, part in ((splits.train, "train"), (splits.test, "test")):
        assert split.x.dtype == torch.uint8 and split.y.dtype == torch.int64
        assert split.y.tolist() == [label for _, label in written[part]]
        assert np.array_equal(split.x.numpy(), np.stack([pixels for pixels, _ in written[part]]))


def test_image_folder_mismatched_classes(tmp_path):
    write_image_tree(tmp_path, {"train": {"cat": 1, "dog": 1}, "test": {"cat": 1, "cow": 1}})
    with pytest.raises(DataError, match="different class folders"):
        load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)


def test_image_folder_missing_part(tmp_path):
    write_image_tree(tmp_path, {"train": {"cat": 1}})
    with pytest.raises(DataError, match=str(tmp_path / "test")):
        load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)


def test_image_folder_sizes(tmp_path):
    write_image_tree(tmp_path, {"train": {"cat": 1}, "test": {"cat": 1}}, size=(5, 6))
    write_image_tree(tmp_path / "odd", {"train": {"cat": 1}}, size=(7, 7))
    os.replace(tmp_path / "odd" / "train" / "cat" / "0.png", tmp_path / "train" / "cat" / "1.png")
    with pytest.raises(DataError, match="data.image_size"):
        load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0, image_size=4)
    assert splits.train.x.shape == (2, 3, 4, 4) and splits.test.x.shape == (1, 3, 4, 4)


def test_image_folder_cache_written_reused_and_invalidated(tmp_path, monkeypatch):
    write_image_tree(tmp_path, TREE)
    first = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert (tmp_path / ".ib_cache_train_native.pt").is_file() and (tmp_path / ".ib_cache_test_native.pt").is_file()
    assert not list(tmp_path.glob("*.tmp"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(data, "_decode_image", no_decoding)
        cached = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert torch.equal(cached.train.x, first.train.x) and torch.equal(cached.test.y, first.test.y)

    decoded = []
    real = data._decode_image
    monkeypatch.setattr(data, "_decode_image", lambda *a: decoded.append(a) or real(*a))

    def reload_decodes() -> int:
        decoded.clear()
        splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
        return len(decoded), splits

    # A file added in a nested folder (ImageFolder walks class folders recursively) while the folders keep their
    # times, as `tar x` or `cp -a` leave them: the train part is decoded again, the test cache still holds.
    folders = [tmp_path / "train", tmp_path / "train" / "dog"]
    times = [os.stat(f).st_mtime_ns for f in folders]
    (tmp_path / "train" / "dog" / "more").mkdir()
    Image.fromarray(np.zeros((5, 6, 3), dtype=np.uint8)).save(tmp_path / "train" / "dog" / "more" / "9.png")
    for f, t in zip([*folders, tmp_path / "train" / "dog" / "more"], [*times, times[-1]]):
        os.utime(f, ns=(t, t))
    count, splits = reload_decodes()
    assert count == 7 and splits.train.x.shape[0] == 7

    # A file replaced by one with other pixels and an older time, the folders' times put back: decoded again.
    target = tmp_path / "train" / "cat" / "0.png"
    old = os.stat(target).st_mtime_ns
    Image.fromarray(np.full((5, 6, 3), 200, dtype=np.uint8)).save(target)
    os.utime(target, ns=(old - 10**9, old - 10**9))
    os.utime(tmp_path / "train" / "cat", ns=(times[0], times[0]))
    count, splits = reload_decodes()
    assert count == 7 and int(splits.train.x[0].max()) == 200 == int(splits.train.x[0].min())
    assert reload_decodes()[0] == 0  # and cached again


def test_image_folder_other_formats(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    for part in ("train", "test"):
        (tmp_path / part / "a").mkdir(parents=True)
        Image.fromarray(rgb).save(tmp_path / part / "a" / "0.bmp")  # not decoded by torchvision: PIL's turn
        Image.fromarray(gray).save(tmp_path / part / "a" / "1.png")  # grayscale becomes 3 equal channels
    splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert np.array_equal(splits.train.x[0].numpy(), rgb.transpose(2, 0, 1))
    assert np.array_equal(splits.train.x[1].numpy(), np.stack([gray] * 3))


def test_image_folder_corrupt_image_names_file(tmp_path):
    write_image_tree(tmp_path, TREE)
    bad = tmp_path / "train" / "dog" / "1.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=f"cannot decode {bad}"):
        load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)


def test_image_folder_unwritable_root_skips_cache(tmp_path, monkeypatch):
    write_image_tree(tmp_path, TREE)

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(data.tempfile, "mkstemp", read_only)
    splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert len(splits.train) == 6 and not list(tmp_path.glob(".ib_cache_*"))


# ---------------------------------------------------------------------------------------------------------------------
# digits and the hold-out split


def load_digits(val_fraction: float = 0.1, seed: int = 0):
    return load_data("digits", root="unused", download=False, val_fraction=val_fraction, seed=seed)


def test_digits_shapes_and_values():
    splits = load_digits()
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert len(splits.test) == 360 and len(splits.val) == int(0.1 * 1437)
    for split in (splits.train, splits.val, splits.test):
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (1, 8, 8)
        assert split.x.min() >= 0 and split.x.max() <= 1
    assert splits.in_shape == (1, 8, 8) and splits.num_classes == 10 and splits.class_names[3] == "3"
    x = splits.train.x.double()
    assert splits.mean == pytest.approx([x.mean().item()], abs=1e-12)
    assert splits.std == pytest.approx([x.std(unbiased=False).item()], abs=1e-12)


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


# ---------------------------------------------------------------------------------------------------------------------
# BatchLoader


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


def test_get_augment():
    assert get_augment("none") is None and get_augment("crop_flip") is random_crop_flip
    assert set(AUGMENTATIONS) == {"none", "crop_flip"}
    with pytest.raises(ConfigError, match="crop_flip, none"):
        get_augment("mixup")
