"""`BatchLoader`, which batches a `Split` held on a device, and the batched augmentations in `AUGMENTATIONS`."""
from __future__ import annotations

import math
import warnings
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from torch import Tensor

from ib.data.base import Split
from ib.errors import CheckpointError, ConfigError

Augment = Callable[[Tensor, torch.Generator], Tensor]


class BatchLoader:
    """Iterates over a `Split` held on a device, in batches of float32 inputs in [0, 1].

    The split's tensors move to `device` once, staying uint8 where they are; each batch is gathered and converted
    there. Shuffling draws a new permutation each epoch (each `iter`) from the loader's own CPU generator, which it
    also passes to `augment`, so `state_dict()` captures everything random about the next epoch.

    Args:
        split: The samples.
        batch_size: Samples per batch.
        shuffle: Whether each epoch visits the samples in a new random order.
        drop_last: Whether to drop a final batch smaller than `batch_size` (training: MINE needs >= 2 per batch).
        device: Where the split is held and batches are made.
        augment: Optional `fn(x [B, C, H, W] float, generator) -> x` applied to each batch.
        seed: Seed of the loader's generator.
        rank, world_size: Data parallelism: every process draws the same order of global batches of `batch_size`
            and keeps rows [rank * b, (rank + 1) * b) of each, b = batch_size / world_size. Augmentation runs on
            the whole global batch, so the generator advances alike in every process and `state_dict()` is the
            same everywhere: a run stopped with N processes resumes with any other number.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        device: torch.device | str = "cpu",
        augment: Optional[Augment] = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % world_size:
            raise ConfigError(f"data.batch_size={batch_size} is the global batch and must divide by the number of "
                              f"processes ({world_size})")
        if world_size > 1 and not drop_last:
            raise ValueError("a loader shared by several processes needs drop_last (whole global batches)")
        part = batch_size // world_size
        self._rows = slice(rank * part, (rank + 1) * part)  # this process's rows of each global batch
        self.device = torch.device(device)
        self.x = split.x.to(self.device)  # [N, C, H, W], dtype kept (uint8 for images)
        self.y = split.y.to(self.device)  # [N]
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)
        self._order: Optional[Tensor] = None  # [N] order of the epoch in progress (None between epochs)
        self._position = 0  # batches of that epoch already yielded
        if drop_last and 0 < len(split) < batch_size:
            warnings.warn(
                f"BatchLoader: {len(split)} samples and batch size {batch_size} with drop_last: no batches",
                stacklevel=2,
            )

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches_left(self) -> int:
        """Batches the next `iter` yields: all of an epoch, or the rest of one that was stopped part-way."""
        return len(self) - self._position

    def __iter__(self) -> Iterator[Tuple[Tensor, Tensor]]:
        if self._order is None:  # a new epoch: draw its order
            n = self.x.shape[0]
            self._order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)  # [N]
            self._position = 0
        order = self._order.to(self.device)
        while self._position < len(self):
            i = self._position
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]  # the global batch [B]
            if self.augment is None:
                idx = idx[self._rows]  # this process's rows [B / world_size]
            x = self.x[idx]
            x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()  # [B, C, H, W] in [0, 1]
            y = self.y[idx]
            if self.augment is not None:
                x, y = self.augment(x, self.generator)[self._rows], y[self._rows]
            self._position += 1
            yield x, y
        self._order, self._position = None, 0

    def state_dict(self) -> Dict[str, Tensor | int]:
        """Everything random about the rest of this epoch and the next ones: the generator, and, when an epoch was
        stopped part-way, its order and how many batches it has yielded."""
        order = self._order if self._order is not None else torch.empty(0, dtype=torch.long)
        return {"generator": self.generator.get_state(), "order": order, "position": self._position}

    def load_state_dict(self, state: Dict[str, Tensor | int]) -> None:
        if "generator" not in state:
            raise ValueError(f"BatchLoader state needs a 'generator' entry, got {sorted(state)}")
        order = state.get("order")
        order = order.cpu() if isinstance(order, Tensor) and order.numel() else None
        position = int(state.get("position", 0)) if order is not None else 0
        if order is not None and order.numel() != self.x.shape[0]:
            raise CheckpointError(f"the saved loader position is for a training set of {order.numel()} samples, "
                                  f"this one has {self.x.shape[0]}: the data set changed since the checkpoint was "
                                  f"saved; resume needs the same data")
        self.generator.set_state(state["generator"])
        self._order, self._position = order, position


def random_crop_flip(x: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """CIFAR-style augmentation of a batch: a random crop of the zero-padded image, then a random horizontal flip.

    Random numbers come from `generator` on the CPU, in this order: row offsets [B], column offsets [B], flips [B].

    Args:
        x: Images, [B, C, H, W].
        generator: CPU generator for the offsets and flips.
        padding: Zero padding on each side; offsets are uniform in 0..2*padding.

    Returns:
        Augmented images, [B, C, H, W], on x's device.
    """
    if x.dim() != 4:
        raise ValueError(f"random_crop_flip expects [B, C, H, W], got {list(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    b, c, h, w = x.shape
    # 1. Draw a window offset per sample and whether to flip it.
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)  # [B]
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)  # [B]
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)  # [B]
    # 2. Row and column indices of each window in the padded image; a flip reverses the columns.
    rows = dy[:, None] + torch.arange(h, device=x.device)  # [B, H]
    cols = dx[:, None] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # [B, W]
    # 3. Gather all windows at once.
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))  # [B, C, H+2p, W+2p]
    batch = torch.arange(b, device=x.device)[:, None, None, None]  # [B, 1, 1, 1]
    channel = torch.arange(c, device=x.device)[None, :, None, None]  # [1, C, 1, 1]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # [B, C, H, W]


AUGMENTATIONS: Dict[str, Optional[Augment]] = {"none": None, "crop_flip": random_crop_flip}
