"""Mosaic where numpy is not installed: torch and the standard library carry the core.

numpy comes with ``mosaic-core[training]`` because torch.distributed.checkpoint
needs it with several processes; without it the checkpoint helpers stop on
every rank before they start, saying what to install, and Mosaic's own
multi-process commands print torch's "Failed to initialize NumPy" warning
once, not once per process.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch.nn as nn

import mosaic
from mosaic.testing import run_distributed
from mosaic.training import load_checkpoint, save_checkpoint

NUMPY_WARNING = "Failed to initialize NumPy"


def checkpoint_without_numpy(directory: str) -> list[tuple[str, str]]:
    """save and load at P = 2 with numpy hidden: what each raised."""
    mosaic.init(sp_size=2)
    model = nn.Linear(4, 4)
    # A None entry makes `import numpy` raise ImportError, as when it is not installed.
    hidden, sys.modules["numpy"] = sys.modules.get("numpy"), None
    raised = []
    try:
        for call in (save_checkpoint, load_checkpoint):
            path = Path(directory) / ("new" if call is save_checkpoint else "existing")
            try:
                call(path, model)
                raised.append(("nothing", ""))
            except ImportError as exc:
                raised.append((type(exc).__name__, str(exc)))
    finally:
        if hidden is None:
            del sys.modules["numpy"]
        else:
            sys.modules["numpy"] = hidden
    return raised


def test_checkpoints_of_several_processes_name_the_extra_before_they_start(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "existing", nn.Linear(4, 4))  # one process: no collective, no numpy needed
    per_rank = run_distributed(checkpoint_without_numpy, 2, str(tmp_path))
    assert per_rank[0] == per_rank[1]
    for kind, message in per_rank[0]:
        assert kind == "ImportError", message
        assert 'pip install "mosaic-core[training]"' in message and "pip install numpy" in message
    # Nothing was written: the save stopped before its first file.
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.tmp").exists()


def test_worker_processes_leave_out_torchs_numpy_warning(tmp_path: Path) -> None:
    """A numpy that fails to import, as a missing one does: the parent warns once, its worker does not."""
    fake = tmp_path / "numpy"
    fake.mkdir()
    # torch treats ModuleNotFoundError as "not installed" (torch/storage.py); the import must raise that.
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    script = textwrap.dedent(
        """
        import mosaic
        from mosaic.testing import run_distributed
        print(run_distributed(mosaic.is_initialized, 1))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    env.pop("PYTHONWARNINGS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[False]"
    assert done.stderr.count(NUMPY_WARNING) == 1, done.stderr
