"""``python -m mosaic`` and ``available_backends`` on what a machine lacks: the engine a backend wraps, a GPU's
own reason beside the CPU's."""

from __future__ import annotations

import torch

import mosaic
from mosaic import doctor
from mosaic.local import LocalBackend


class EngineMissing(LocalBackend):
    """A backend whose engine (a package installed apart from it) is not installed, as magi without
    MagiAttention on a GPU machine."""

    name = "engine_missing"

    def environment_reasons(self) -> list[str]:
        return ["the engine is not installed: pip install the-engine"]


def test_a_backend_without_its_engine_is_not_available_and_the_doctor_says_why() -> None:
    mosaic.register_backend("engine_missing", EngineMissing)
    try:
        assert "engine_missing" in mosaic.installed_backends()
        assert "engine_missing" not in mosaic.available_backends("cpu")
        row = next(line for line in doctor.report().splitlines() if line.strip().startswith("engine_missing"))
        assert " no " in row and "pip install the-engine" in row, row
    finally:
        mosaic.unregister_backend("engine_missing")


def test_every_in_tree_backend_that_runs_here_says_yes() -> None:
    rows = {line.split()[0]: line for line in doctor.report().splitlines()[1:] if line.startswith("  ")}
    for name in mosaic.available_backends("cpu"):
        assert rows[name].split()[1] == "yes", rows[name]


def test_a_kernel_says_a_shared_reason_once_and_each_devices_own_accelerator_first(monkeypatch) -> None:
    # On a GPU machine without flash-attn-4 the fa4 row must say "not installed" once and the CPU's own reason
    # (it needs CUDA) apart, not one merged list that repeats the first.
    missing, needs_cuda = "flash-attn-4 is not installed", "needs a cuda device, got cpu"
    verdicts = {"cpu": [needs_cuda, missing], "cuda:0": [missing]}
    assert doctor._reasons_by_device(verdicts) == f"{missing}; cpu: {needs_cuda}"
    assert doctor._reasons_by_device({"cpu": ["a"], "cuda:0": ["a"]}) == "a"
    assert doctor._reasons_by_device({"cpu": ["a"], "cuda:0": ["b"], "cuda:1": ["b"]}) == "cuda:0, cuda:1: b; cpu: a"
    monkeypatch.setattr(doctor, "_devices", lambda: [torch.device("cpu"), torch.device("cuda", 0)])
    fa4 = next(line for line in doctor.report().splitlines() if line.strip().startswith("fa4"))
    assert fa4.count("not installed") == 1, fa4
