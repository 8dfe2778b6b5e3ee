"""train.compile under the parallel layouts trains like one compiled process: CPU, gloo, torchrun, each rank
traced and partitioned as inductor does it (tests/compiled_probe.py). Its own file so that the suite's
workers share test_parallel_layouts.py's ~6 minutes (xdist hands out whole files)."""

import re
from pathlib import Path

import pytest

from test_parallel_layouts import LAYOUTS, _assert_same, _config, _trajectory, torchrun


@pytest.fixture(scope="module")
def compiled_reference(tmp_path_factory):
    """One process with train.compile (tests/compiled_probe.py's backend), 3 steps."""
    tmp = tmp_path_factory.mktemp("compiled_reference")
    out = torchrun(1, _config(tmp), tmp / "run", "train.compile=true", entry=(str(PROBE),))
    assert [(b > 0, o > 0) for b, o in _graphs(out)] == [(True, True)]  # the blocks and the final norm
    return _trajectory(tmp / "run")


def _graphs(out: str) -> list[tuple[int, int]]:
    """Each rank's compiled graphs with attention (blocks) and of the final norm, by rank
    (compiled_probe.py's last line)."""
    found = {int(r): (int(b), int(o)) for r, b, o in re.findall(r"compiled_probe rank (\d+): (\d+) block graphs, "
                                                                 r"(\d+) norm", out)}
    return [found[r] for r in sorted(found)]


PROBE = Path(__file__).parent / "compiled_probe.py"


@pytest.mark.parametrize("name", ["fsdp", "tp_sp", "pp_1f1b"])
def test_compiled_layouts_train_like_one_compiled_process(tmp_path, compiled_reference, name):
    """train.compile under FSDP, TP + SP (DTensors through the compiled blocks and final norm) and PP (each
    stage's blocks, the last stage's norm): the same losses, gradient norms and validation losses as one
    compiled process, traced and partitioned as inductor does it (tests/compiled_probe.py)."""
    n, sets = LAYOUTS[name]
    out = tmp_path / name
    log = torchrun(n, _config(tmp_path), out, "train.compile=true", *sets, entry=(str(PROBE),))
    # Every rank compiled its blocks, and the final norm where it has it (PP: the last stage only).
    graphs = _graphs(log)
    assert len(graphs) == n and all(blocks > 0 for blocks, _ in graphs), log[-3000:]
    assert [norm > 0 for _, norm in graphs] == ([False, True] if name.startswith("pp") else [True] * n)
    _assert_same(_trajectory(out), compiled_reference, steps=(1, 2, 3))
