import json
import platform
import subprocess
import sys

import pytest

# A fresh process trains estimate_mi's default mine critic (128-128, batch 768, 4 pairings: [3840, 128] activations,
# 1.9 MiB = 480 pages each) for 40 steps and reports the page faults of the last 30. Unprimed, glibc maps each such
# block anew (they are above its starting 128 KiB mmap threshold, and nothing larger has been freed yet) and every
# step faults its activations in page by page; primed, they come from the heap, mapped since the first steps. (A
# preloaded jemalloc or tcmalloc, or MALLOC_MMAP_THRESHOLD_ set, would make the unprimed arm fault little too.)
CHILD = """
import json, resource, torch
import ib.allocator
from ib.estimators import ESTIMATORS
from ib.models.critics import CRITICS
from ib.optim import adam
torch.set_num_threads(1)
if {prime}:
    ib.allocator.prime_allocator()
torch.manual_seed(0)
critic = CRITICS.create("joint", (20,), 20, hidden=(128, 128), activation="gelu", input_noise=0.0, hidden_noise=0.0)
est = ESTIMATORS.create("mine", critic, marginals=4)
opt = adam(est.parameters(), lr=2e-3)
x, y = torch.randn(768, 20), torch.randn(768, 20)
for step in range(40):
    if step == 10:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    opt.zero_grad(set_to_none=True)
    est.loss(x, y).backward()
    opt.step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
"""


def _step_faults(prime: bool) -> int:
    done = subprocess.run([sys.executable, "-c", CHILD.format(prime=prime)], capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the mmap threshold it moves is glibc's")
def test_primed_allocator_keeps_a_critic_step_from_faulting_its_activations_in():
    unprimed, primed = _step_faults(prime=False), _step_faults(prime=True)
    # unprimed: at least one activation (480 pages) a step faults in again, 30 steps
    assert unprimed > 30 * 480
    assert primed < unprimed / 10


def test_prime_allocator_allocates_once_per_process_and_only_on_glibc(monkeypatch):
    import ib.allocator

    sizes = []
    monkeypatch.setattr(ib.allocator, "_primed", False)  # as in a fresh process
    monkeypatch.setattr(ib.allocator.torch, "empty", lambda n, dtype: sizes.append(n * 4))
    ib.allocator.prime_allocator()
    ib.allocator.prime_allocator()
    assert sizes == ([ib.allocator.PRIME_BYTES] if platform.libc_ver()[0] == "glibc" else [])

    sizes.clear()
    monkeypatch.setattr(ib.allocator, "_primed", False)
    monkeypatch.setattr(ib.allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    ib.allocator.prime_allocator()
    assert sizes == []  # another C library: nothing to move
