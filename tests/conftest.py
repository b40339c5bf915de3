import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture
def one_thread():
    """Tiny tensors: one thread avoids OpenMP start-up and spin costs that dominate on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DIGITS = Path(__file__).parents[1] / "recipes" / "digits.yaml"
DIGITS_RUN = ["epochs=3", "model.encoder.hidden=[64]", "model.bottleneck.z_dim=8", "mi.critic.hidden=[64]",
              "beta_schedule.delay=0", "model.eval_samples=4"]


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """A completed run folder of `ib train recipes/digits.yaml` with DIGITS_RUN's overrides, trained once for every
    test that only reads one. Read it, never write into it: copy it to `tmp_path` first."""
    from ib.cli import main

    run = tmp_path_factory.mktemp("shared") / "digits_run"
    assert main(["train", str(DIGITS), *DIGITS_RUN, "--run-dir", str(run)]) == 0
    return run
