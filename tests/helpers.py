"""Helpers shared by the test modules (imported as `helpers`: pytest puts the tests folder on sys.path)."""
import torch

from ib.cli import main


def run_main(argv, capsys):
    """`ib.cli.main(argv)` -> (exit status, stderr lines); argparse's SystemExit counts as a status."""
    capsys.readouterr()
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    return status, capsys.readouterr().err.splitlines()


def assert_one_error_line(status, lines, phrases):
    assert status == 2, (status, lines)
    assert not any("Traceback" in line for line in lines), lines
    assert len(lines) == 1 and lines[0].startswith("ib: error: "), lines
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])


def tensors(obj):
    """Every tensor in a nested checkpoint structure, dict keys in sorted order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def through_a_checkpoint(state, tmp_path):
    """A schedule's `state_dict()` after `torch.save` and `torch.load(weights_only=True)`, checked to hold plain
    numbers and strings only and to come back equal."""
    assert all(type(v) in (int, float, str) for v in state.values()), state
    path = tmp_path / "schedule.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == state
    return loaded
