"""glibc's malloc and a critic's training loop: raising malloc's mmap threshold before the loop, once per process.

glibc serves each block above its mmap threshold (128 KiB when a process starts) with a fresh `mmap` and unmaps it
on `free`, so every activation of a critic step ([768 * 5, 128] floats: 2 MB) is faulted in page by page, every step.
The threshold is dynamic: freeing an mmap'd block raises it to that block's size (up to 32 MiB), and the trim
threshold to twice that, after which such blocks come from the heap and stay mapped. A process reaches that point
only when it frees a block larger than its steps' blocks, which a run of `estimate_mi` may never do. Until then it
faults: unprimed, a first call of `estimate_mi` in a fresh process took millions of page faults
(benchmarks/results/first_call.md), and in an earlier run of that benchmark (the file as of commit 559d0cb) two of
three processes went on faulting through their second call too.

`prime_allocator()` allocates and frees one block of `PRIME_BYTES` (once per process), which moves the thresholds
above the loop's blocks before it starts. Elsewhere (other C libraries, jemalloc or tcmalloc preloaded)
it costs one allocation and changes nothing.
"""
from __future__ import annotations

import platform

import torch

PRIME_BYTES = 16 << 20  # above the blocks of a training step, below glibc's 32 MiB cap on the dynamic threshold

_primed = False


def prime_allocator() -> None:
    """Allocate and free one `PRIME_BYTES` tensor, the first time it is called in a process on glibc (see the module
    note); a no-op after that and on other C libraries."""
    global _primed
    if _primed:
        return
    _primed = True
    if platform.libc_ver()[0] != "glibc":
        return
    torch.empty(PRIME_BYTES // 4, dtype=torch.float32)  # mmap'd (above the starting threshold), freed at once
