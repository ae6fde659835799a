"""README.md as a new user reads it: every Python block runs as pasted, the quickstart is what CI runs.

A block runs on as many gloo processes as its ``mosaic.init(sp_size=N)`` asks
for (one without it), as ``torchrun --nproc_per_node=N`` would start it. A
block that trains a ``model`` must end with the gradients a single process gets
from the same block at ``sp_size=1``, and with the same weights on every rank.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from mosaic.testing import max_error, run_distributed

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, re.S | re.M)
SP_SIZE = re.compile(r"mosaic\.init\(sp_size=(\d+)")


def sp_size(block: str) -> int:
    found = SP_SIZE.search(block)
    return int(found.group(1)) if found else 1


def run_block(code: str, name: str) -> dict[str, dict[str, torch.Tensor]]:
    """On every rank: the block as a script (``__main__``); the gradients and weights of its ``model``, if any."""
    namespace = {"__name__": "__main__"}
    exec(compile(code, name, "exec"), namespace)
    model = namespace.get("model")
    if not isinstance(model, nn.Module):
        return {}
    params = dict(model.named_parameters())
    return {
        "grads": {k: p.grad.detach().cpu().clone() for k, p in params.items() if p.grad is not None},
        "weights": {k: p.detach().cpu().clone() for k, p in params.items()},
    }


def test_the_readme_has_python_blocks_and_no_other_python_fences() -> None:
    assert BLOCKS, "no ```python block in README.md"
    assert not re.search(r"^```(py|python3|pycon)$", README, re.M)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_python_block_runs_as_pasted(index: int) -> None:
    block, world = BLOCKS[index], sp_size(BLOCKS[index])
    per_rank = run_distributed(run_block, world, block, f"README.md python block {index}", timeout=240)
    if world == 1 or not per_rank[0]:
        return
    single = run_distributed(run_block, 1, SP_SIZE.sub("mosaic.init(sp_size=1", block), "one process")[0]
    assert single["grads"]
    for rank, got in enumerate(per_rank):
        assert got["grads"].keys() == single["grads"].keys()
        worst = max(max_error(got["grads"][k], g) for k, g in single["grads"].items())
        assert worst <= 1e-5, f"rank {rank}: gradients {worst:.2e} from one process's"
        # Summed gradients are the same on every rank, and so is the step.
        assert all(torch.equal(w, per_rank[0]["weights"][k]) for k, w in got["weights"].items()), rank


def _nox_arguments(line: str) -> list[str]:
    """What follows ``nox`` on a shell line, without its comment."""
    words = shlex.split(line, comments=True)
    return words[words.index("nox") + 1 :]


def test_the_quickstart_test_command_is_what_ci_runs() -> None:
    (ci_line,) = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "-m nox -s" in line]
    quickstart = README[README.index("## Quickstart") : README.index("## Use")].splitlines()
    assert any(line.startswith("python3 -m pip install nox && nox -s demo") for line in quickstart)
    tests = [line for line in quickstart if line.startswith("nox -s ")]
    assert [_nox_arguments(line) for line in tests] == [_nox_arguments(ci_line)]
