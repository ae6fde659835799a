"""``python -m mosaic``: what this machine runs — torch, CUDA, NCCL, cuDNN, every backend and kernel, and why not.

For a new machine, a bug report or a CI log: the versions Mosaic depends on,
then every installed backend and every kernel with whether it can run here
and, when not, the reasons Mosaic itself would give.
"""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from .errors import BackendUnavailable
from .kernels import get_kernel, kernel_names
from .registry import KNOWN_BACKENDS, get_backend, installed_backends

__all__ = ["main", "report"]


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    return devices


def _platform() -> Iterator[tuple[str, str]]:
    yield "python", f"{platform.python_version()} ({sys.executable})"
    yield "mosaic-core", _version("mosaic-core")
    yield "torch", torch.__version__
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            yield f"cuda:{i}", f"{torch.cuda.get_device_name(i)} (sm{major}{minor})"
    if torch.version.cuda:
        yield "CUDA", f"{torch.version.cuda} ({'available' if torch.cuda.is_available() else 'no GPU visible'})"
    else:
        yield "CUDA", "none (a CPU build of torch)"
    nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.version.cuda and dist.is_nccl_available() else "-"
    yield "NCCL", nccl
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    yield "cuDNN", str(cudnn) if cudnn else "-"
    yield "gloo", "available" if dist.is_gloo_available() else "not available"
    yield "triton", _version("triton")
    yield "flash-attn-4", _version("flash-attn-4")


def _backends() -> Iterator[tuple[str, str, str]]:
    devices = _devices()
    for name in installed_backends():
        try:
            backend = get_backend(name)
        except BackendUnavailable as exc:
            yield name, "no", str(exc)
            continue
        here = [d.type for d in devices if d.type in backend.capabilities.devices]
        package = KNOWN_BACKENDS.get(name, "a plugin")
        reasons = backend.environment_reasons()  # the engine it wraps missing
        if not here:
            wanted = ", ".join(sorted(backend.capabilities.devices))
            reasons = [f"needs {wanted}, this machine has {', '.join(d.type for d in devices)}", *reasons]
        if reasons:
            yield name, "no", f"{package}; {'; '.join(reasons)}"
        else:
            yield name, "yes", f"{package}; on {', '.join(sorted(set(here)))}"


def _kernels() -> Iterator[tuple[str, str, str]]:
    devices = _devices()
    for name in kernel_names():
        kernel = get_kernel(name)
        verdicts = {str(d): kernel.unavailable(d) for d in devices}
        runs = [d for d, why in verdicts.items() if not why]
        if runs:
            note = "" if kernel.automatic else "; runs only where named (kernel=...)"
            yield name, "yes", f"on {', '.join(runs)}{note}"
        else:
            yield name, "no", _reasons_by_device(verdicts)


def _reasons_by_device(verdicts: dict[str, list[str]]) -> str:
    """The reasons every device shares once ("flash-attn-4 is not installed"), then each device's own, devices
    with the same together ("cpu: needs a cuda device"), so a GPU's reason is not lost among the CPU's and a
    reason is never printed twice."""
    shared = [r for r in next(iter(verdicts.values())) if all(r in why for why in verdicts.values())]
    grouped: dict[str, list[str]] = {}
    for device, why in verdicts.items():
        own = "; ".join(r for r in why if r not in shared)
        if own:
            grouped.setdefault(own, []).append(device)
    # The accelerators first: theirs is the reason a user acts on.
    parts = sorted(grouped.items(), key=lambda item: item[1][0] == "cpu")
    return "; ".join([*shared, *(f"{', '.join(devices)}: {why}" for why, devices in parts)])


def report() -> str:
    """The doctor's table, as text."""
    lines = ["Mosaic doctor", ""]
    lines += [f"  {k:<14}{v}" for k, v in _platform()]
    for title, rows in (("backends", _backends()), ("kernels", _kernels())):
        lines += ["", f"  {title:<16}{'runs here':<11}why / where"]
        lines += [f"  {name:<16}{runs:<11}{why}" for name, runs, why in rows]
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0
