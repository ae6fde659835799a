"""``python -m mosaic.testing NAME``: the conformance kit on an installed backend, from the shell.

Runs :func:`~mosaic.testing.run_conformance` on gloo processes of this machine
(CPU), prints the pass/fail table and exits 0 when the backend passes, 1 when
it fails and 2 on a bad command line::

    python -m mosaic.testing ring
    python -m mosaic.testing mesh2d --world-sizes 4 --option mesh_shape=2,2
    python -m mosaic.testing hierarchical --world-sizes 4 --option intra_node_size=2 --option inter_node_strategy=ring

``--option key=value`` is repeatable; values read as :mod:`mosaic.cli` says
(``2,2`` is the tuple ``(2, 2)``, ``true`` a bool, ``ring`` a string).
"""

from __future__ import annotations

import argparse
import sys

from ..cli import missing_options, option_example, parse_options
from ..registry import BackendUnavailable, get_backend
from .conformance import run_conformance

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mosaic.testing",
        description="Check a Mosaic backend against the local backend on the standard cases (CPU, gloo).",
    )
    p.add_argument("backend", metavar="NAME", help="an installed backend (mosaic.available_backends())")
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 3, 4], metavar="P", help="default: 1 2 3 4")
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a backend option, repeatable (e.g. mesh_shape=2,2)",
    )
    p.add_argument("--tolerance", type=float, default=1e-5, help="largest error of a passing case (default: 1e-5)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per world size (default: 300)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv``, run the kit, print the table; the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if any(p < 1 for p in args.world_sizes):
        parser.error(f"--world-sizes must be positive, got {args.world_sizes}")
    try:
        backend = get_backend(args.backend)
        options = parse_options(args.option)
    except (BackendUnavailable, ValueError) as exc:
        parser.error(str(exc))
    missing = missing_options(backend, options)
    if missing:
        examples = " ".join(f"--option {option_example(backend, n, max(args.world_sizes))}" for n in missing)
        parser.error(f"backend {args.backend!r} needs option(s) {', '.join(missing)}: e.g. {examples}")
    try:
        backend.parse_options(options)
    except ValueError as exc:
        parser.error(str(exc))
    report = run_conformance(
        args.backend,
        tuple(args.world_sizes),
        options=options,
        tolerance=args.tolerance,
        timeout=args.timeout,
        check=False,
    )
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
