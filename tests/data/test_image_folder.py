"""Tests of ib.data.image_folder: decoding, formats, sizes, and the cache of decoded images."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

from ib.data import image_folder, load_data
from ib.errors import DataError


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
        m.setattr(image_folder, "_decode_image", no_decoding)
        cached = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert torch.equal(cached.train.x, first.train.x) and torch.equal(cached.test.y, first.test.y)

    decoded = []
    real = image_folder._decode_image
    monkeypatch.setattr(image_folder, "_decode_image", lambda *a: decoded.append(a) or real(*a))

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

    monkeypatch.setattr(image_folder.tempfile, "mkstemp", read_only)
    splits = load_data("image_folder", root=str(tmp_path), download=False, val_fraction=0.0, seed=0)
    assert len(splits.train) == 6 and not list(tmp_path.glob(".ib_cache_*"))
