"""The scaling model of issue #28: nanoTabPFN's training step on 2 to 1024 H200s — a model, not a measurement.

For every strategy it builds the row attention's ``AttentionProblem`` as mosaic
builds it (batch' = tables x columns, rows sharded evenly in order, ``kv_len`` =
the training rows) and asks the strategy itself for the plan's cost
(``Backend.estimate``: FLOPs, bytes received, the share of them its schedule
hides, collective launches and extra memory, forward and backward apart). The
cost becomes seconds with

- the kernel rate: FLOPs/s of the one-GPU kernel on the row-attention shape
  (FA4 or cuDNN), read from the measured one-GPU kernel timings;
- the links (:class:`Cluster`): which process group carries each part of a
  plan's bytes (:func:`routes`), whether it stays in a node (NVLink) or spans
  nodes (one 400 Gb/s NIC per GPU), and how its collective uses them;
- the rest of the step (feature attention, MLPs, norms, projections, optimizer),
  measured on one GPU as the step minus the layers' row-attention kernels, per row,
  and divided by P (every row's work stays on the rank that holds the row).

Overlap follows each estimate's ``Pass.hidden``: a hidden transfer runs under the
kernels (it costs only what exceeds the compute, plus ``overlap_tax`` of its
time for the SMs NCCL takes), the rest is waited for. Memory per GPU is the
step's activations per row (measured on one GPU) times this rank's rows, plus
the plan's ``Cost.memory`` once (the call that runs holds it).

    python benchmarks/scaling_model.py --out prediction.json --plot prediction.png
    python benchmarks/scaling_model.py --validate --out validation.json

docs/benchmarks.md ("Scaling model") has the parameters, their sources and the
tables; the multi-GPU runs of #28 must confirm them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import mosaic
from mosaic.backend import Backend
from mosaic.cost import Cost, Pass, default_machine
from mosaic.layout import SeqLayout
from mosaic.options import Options
from mosaic.problem import AttentionProblem

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The shapes and strategy settings the measured tables ran with.
import bench_kernels
import bench_sp

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TODAY = RESULTS / "2026-12-04_1xH200"
GiB = 2**30

ROWS = (10**6, 10**7, 10**8)
SIZES = tuple(2**k for k in range(1, 11))  # 2 .. 1024 GPUs: 1 to 128 nodes of 8
STRATEGIES = ("local", "allgather", "ring", "mesh2d", "ulysses", "composed", "hierarchical", "switch", "magi",
              "ring_flash_attn")  # fmt: skip
# How a group's collective uses the links (see transfer_seconds).
COLLECTIVE, P2P, ALL_TO_ALL = "collective", "p2p", "all_to_all"
# Budget a plan may fill: the margin bench_capacity.py predicts its largest runs with.
MEMORY_MARGIN = 0.95
# Above this group size magi's estimate (PackedMask.remote_keys for every rank) takes minutes: 2.5 s at P = 128,
# 15 s at 256 on this machine, growing as P^3.
MAGI_MAX_P = 128
# The measured tables the validation predicts (file under docs/results: its GPUs, all on one host).
VALIDATION_RUNS = {
    "2026-11-27_2xH200/bench_sp_P2.json": 2,
    "2026-11-27_4xH200/bench_sp_P4.json": 4,
    "2026-11-27_4xH200/bench_sp_P4_hierarchical.json": 4,
}
TARGET = 0.15
# bench_kernels.py's shape of nanoTabPFN's row attention at 150,000 rows (11 columns, 75,000 train rows as keys).
ROW_SHAPE = "rows_b11_L150k_kv75k"
# The one fitted parameter, Cluster.overlap_tax: fitted (--validate --fit) on the 2-GPU table only, so the
# 4-GPU tables and the nanoTabPFN steps test it.
FIT_ON = "2026-11-27_2xH200/bench_sp_P2.json"
FITTED_OVERLAP_TAX = 1.0


# ---------------------------------------------------------------------------------------------------- the links


@dataclass(frozen=True)
class Cluster:
    """Nodes of GPUs, their links and the memory each GPU has.

    Args:
        gpus_per_node: GPUs joined by NVLink; a group spanning nodes uses the NICs.
        nvlink_bytes_per_s: what NCCL reaches per GPU within a node (all patterns).
        nic_bytes_per_s: one NIC per GPU between nodes (rail-optimised network).
        launch_s: per collective launch (host, kernel start).
        hop_intra_s, hop_inter_s: per sequential step of a message within / between nodes.
        overlap_tax: share of a hidden transfer's time that still delays the kernels
            (NCCL's kernels hold SMs while they run under compute).
        memory_gib: memory per GPU, as torch reports it.
    """

    gpus_per_node: int
    nvlink_bytes_per_s: float
    nic_bytes_per_s: float
    launch_s: float
    hop_intra_s: float
    hop_inter_s: float
    overlap_tax: float
    memory_gib: float


def default_cluster(**overrides: Any) -> Cluster:
    """Nodes of 8 H200s; NVLink and the launch latency are mosaic's measured CUDA defaults (``mosaic.cost``)."""
    measured = default_machine(torch.device("cuda"))
    values: dict[str, Any] = {
        "gpus_per_node": 8,
        # NCCL on the 4 x H200 box (DESIGN.md §6): P2P ring 271, all-to-all 285, all-gather 309 GB/s against
        # NVLink 4's 450 GB/s line rate; mosaic.cost keeps the ring's figure, the slowest of the three.
        "nvlink_bytes_per_s": measured.bytes_per_s,
        "nic_bytes_per_s": 400e9 / 8,  # 400 Gb/s per GPU, line rate
        "launch_s": measured.latency_s,
        "hop_intra_s": 1e-6,  # an NVLink message, NCCL's low-latency protocol
        "hop_inter_s": 5e-6,  # an InfiniBand message through NCCL's proxy
        "overlap_tax": FITTED_OVERLAP_TAX,
        "memory_gib": read_json(TODAY / "inference.json")["total_gib"],
    }
    values.update(overrides)
    return Cluster(**values)


@dataclass(frozen=True)
class Group:
    """Where a process group's ranks sit: how many, at most how many on one node, on how many nodes."""

    size: int
    per_node: int
    nodes: int


def group_of(ranks: Iterable[int], gpus_per_node: int) -> Group:
    counts = Counter(r // gpus_per_node for r in ranks)
    return Group(sum(counts.values()), max(counts.values()), len(counts))


@dataclass(frozen=True)
class Leg:
    """The part of a pass's bytes one group carries: its share, how much of it is hidden, and how it moves."""

    share: float
    hidden: float
    group: Group
    pattern: str


def transfer_seconds(nbytes: float, group: Group, pattern: str, cluster: Cluster) -> float:
    """Seconds to receive ``nbytes`` per rank through ``group``'s collective.

    Within a node everything moves at NVLink's rate. Across nodes:

    - ``collective`` (NCCL's all-gather, reduce-scatter: ring algorithm over channels): each of the group's
      GPUs on a node drives its own NIC, so a node's ranks receive at ``per_node`` NICs' rate (NVLink caps it);
    - ``p2p`` (mosaic's own ring of send/recv in rank order): each step waits for its slowest hop, one NIC;
    - ``all_to_all``: the bytes from other nodes through this GPU's NIC, the rest over NVLink, at once.
    """
    if nbytes <= 0 or group.size <= 1:
        return 0.0
    nvlink, nic = cluster.nvlink_bytes_per_s, cluster.nic_bytes_per_s
    if group.nodes == 1:
        return nbytes / nvlink
    if pattern == COLLECTIVE:
        return nbytes / min(nvlink, group.per_node * nic)
    if pattern == P2P:
        return nbytes / min(nvlink, nic)
    across = (group.size - group.per_node) / (group.size - 1)
    return max(nbytes * (1 - across) / nvlink, nbytes * across / nic)


def message_seconds(group: Group, pattern: str, cluster: Cluster) -> float:
    """Latency of one collective: its launch, and one hop per sequential step (a ring collective has size - 1)."""
    hop = cluster.hop_inter_s if group.nodes > 1 else cluster.hop_intra_s
    steps = group.size - 1 if pattern == COLLECTIVE else 1
    return cluster.launch_s + steps * hop


@dataclass(frozen=True)
class PassTime:
    """Seconds of one pass on the busiest rank: kernels, transfers not hidden under them, latency."""

    compute: float
    comm: float
    latency: float

    @property
    def total(self) -> float:
        return self.compute + self.comm + self.latency

    def __add__(self, other: PassTime) -> PassTime:
        return PassTime(self.compute + other.compute, self.comm + other.comm, self.latency + other.latency)


def pass_seconds(step: Pass, legs: Sequence[Leg], flops_per_s: float, cluster: Cluster) -> PassTime:
    """``Machine.pass_seconds`` with a rate per leg: exposed transfers add, hidden ones cost what outlasts the
    kernels (or ``overlap_tax`` of their time, whichever is more)."""
    compute = step.flops / flops_per_s
    times = [(transfer_seconds(step.bytes * leg.share, leg.group, leg.pattern, cluster), leg.hidden) for leg in legs]
    exposed = sum(t * (1 - hidden) for t, hidden in times)
    hideable = sum(t * hidden for t, hidden in times)
    overlap = max(cluster.overlap_tax * hideable, hideable - compute)
    # Every collective of the pass is charged the latency of the slowest group's message.
    message = max((message_seconds(leg.group, leg.pattern, cluster) for leg in legs), default=cluster.launch_s)
    return PassTime(compute, exposed + overlap, step.collectives * message)


# ---------------------------------------------------------------------------------- which group carries what


def routes(name: str, problem: AttentionProblem, cost: Cost, gpus_per_node: int) -> tuple[list[Leg], list[Leg]]:
    """The legs of ``name``'s forward and backward: the groups its collectives run on (the estimate counts
    bytes, not where they travel; the split follows each strategy's docstring and docs/hier.md)."""
    p, o = problem, problem.options
    size = p.size
    whole = group_of(range(size), gpus_per_node)
    if name == "local" or size == 1:
        return [], []
    if name in ("ring", "ring_flash_attn"):
        return _uniform(cost, whole, P2P)
    if name == "allgather":
        return _uniform(cost, whole, COLLECTIVE)
    if name in ("ulysses", "switch", "magi"):
        return _uniform(cost, whole, ALL_TO_ALL)
    if name == "mesh2d":
        return _mesh2d_routes(p, cost, gpus_per_node)
    if name == "composed":
        return _composed_routes(p, cost, gpus_per_node)
    if name == "hierarchical":
        from mosaic_hier.backend import delegation

        delegated = delegation(p, o)
        if delegated is not None:
            inner, options, _ = delegated
            parsed = mosaic.get_backend(inner).parse_options(options)
            return routes(inner, dataclasses.replace(p, options=parsed), cost, gpus_per_node)
        return _hierarchical_routes(p, cost, gpus_per_node)
    raise ValueError(f"no route for strategy {name!r}")


def _uniform(cost: Cost, group: Group, pattern: str) -> tuple[list[Leg], list[Leg]]:
    return [Leg(1.0, cost.forward.hidden, group, pattern)], [Leg(1.0, cost.backward.hidden, group, pattern)]


def _pattern_of(strategy: str) -> str:
    return P2P if strategy == "ring" else COLLECTIVE


def _mesh2d_routes(p: AttentionProblem, cost: Cost, gpus_per_node: int) -> tuple[list[Leg], list[Leg]]:
    """Queries travel in the row group (``C`` contiguous ranks), keys in the column group (stride ``C``):
    ``comm_bytes`` on a ``(1, C)`` and an ``(R, 1)`` mesh gives each side's bytes."""
    from mosaic_mesh2d.mesh2d import comm_bytes

    rows, cols = p.options.mesh_shape
    facts = dict(
        batch=p.batch,
        heads=p.heads,
        kv_heads=p.kv_heads,
        head_dim=p.head_dim,
        q_rows=max(p.q_layout.lengths),
        kv_rows=max(p.kv_block(r).size for r in range(p.size)),
        dtype=p.dtype,
    )
    query_side, key_side = comm_bytes((1, cols), **facts), comm_bytes((rows, 1), **facts)
    row_group = group_of(range(cols), gpus_per_node)
    col_group = group_of(range(0, p.size, cols), gpus_per_node)
    legs = []
    for i, step in enumerate((cost.forward, cost.backward)):
        total = query_side[i] + key_side[i]
        legs.append(
            [
                Leg(query_side[i] / total, step.hidden, row_group, COLLECTIVE),
                Leg(key_side[i] / total, step.hidden, col_group, COLLECTIVE),
            ]
        )
    return legs[0], legs[1]


def _composed_routes(p: AttentionProblem, cost: Cost, gpus_per_node: int) -> tuple[list[Leg], list[Leg]]:
    """The head exchange runs in the head group (``h`` contiguous ranks), the sequence strategy in the seq group
    (stride ``h``); ``exchange_cost`` is the exchange's part of the estimate, the rest is the inner strategy's."""
    from mosaic_compose.ulysses import exchange_cost

    o = p.options
    inner_pattern = _pattern_of(o.seq_parallel)
    if not o.head_parallel:
        return _uniform(cost, group_of(range(p.size), gpus_per_node), inner_pattern)
    h, s = o.mesh_shape
    exchange = exchange_cost(p, [range(c * h, (c + 1) * h) for c in range(s)])
    head_group = group_of(range(h), gpus_per_node)
    seq_group = group_of(range(0, p.size, h), gpus_per_node)
    legs = []
    for step, part in ((cost.forward, exchange.forward), (cost.backward, exchange.backward)):
        inner = step.bytes - part.bytes
        # Pass.__add__ weighs hidden by bytes and the exchange hides nothing: the inner strategy's share is left.
        inner_hidden = step.hidden * step.bytes / inner if inner > 0 else 0.0
        share = part.bytes / step.bytes if step.bytes else 0.0
        legs.append([Leg(share, 0.0, head_group, ALL_TO_ALL), Leg(1 - share, inner_hidden, seq_group, inner_pattern)])
    return legs[0], legs[1]


def _hierarchical_routes(p: AttentionProblem, cost: Cost, gpus_per_node: int) -> tuple[list[Leg], list[Leg]]:
    """docs/hier.md: of a flat ring's ``(P-1)`` blocks a rank receives ``nodes - 1`` over its rail (stride ``L``),
    the rest within its node. The estimate's hidden share applies to both."""
    o = p.options
    local = o.intra_node_size
    nodes = p.size // local
    across = (nodes - 1) / (p.size - 1)
    rail = group_of(range(0, p.size, local), gpus_per_node)
    node = group_of(range(local), gpus_per_node)
    legs = []
    for step in (cost.forward, cost.backward):
        legs.append(
            [
                Leg(across, step.hidden, rail, _pattern_of(o.inter_node_strategy)),
                Leg(1 - across, step.hidden, node, _pattern_of(o.intra_node_strategy)),
            ]
        )
    return legs[0], legs[1]


# ------------------------------------------------------------------------------------- problems and estimates


def attention_problem(
    *,
    batch: int,
    heads: int,
    head_dim: int,
    length: int,
    size: int,
    kv_len: int | None,
    options: Options,
    batch_shape: tuple[int, ...],
) -> AttentionProblem:
    """One attention call as mosaic's agreement builds it on the busiest rank's group (bf16, CUDA, rows
    sharded evenly in order as ``ctx.shard`` does); no process group: pricing needs none."""
    layout = SeqLayout.even(length, size)
    return AttentionProblem(
        batch=batch,
        heads=heads,
        kv_heads=heads,
        head_dim=head_dim,
        dtype=torch.bfloat16,
        device=torch.device("cuda"),
        q_layout=layout,
        kv_layout=layout,
        rank=0,
        causal=False,
        kv_len=kv_len,
        scale=head_dim**-0.5,
        options=options,
        batch_shape=batch_shape,
    )


def refusal_reasons(backend: Backend, problem: AttentionProblem) -> list[str]:
    """The backend's own reasons to refuse ``problem``, less those about the process running the model: an
    engine not installed here, or no process group (pricing builds none). The modeled cluster has both."""
    environment = set(getattr(backend, "environment_reasons", list)())
    return [
        r
        for r in backend.not_supported_reasons(problem)
        if r not in environment and not r.startswith("needs torch.distributed initialised")
    ]


def kernel_for(strategy: str, kernel: str) -> str:
    """The block kernel a strategy's time is priced on: its FFA is priced as cuDNN by magi's own estimate."""
    return "cudnn" if strategy == "magi" else kernel


def label(strategy: str, options: Options | None) -> str:
    """A short name of one option set, e.g. ``mesh2d (8, 16)`` or ``hierarchical ring/allgather``."""
    if options is None:
        return strategy
    if strategy == "mesh2d":
        return f"mesh2d {options.mesh_shape}"
    if strategy == "composed":
        return f"composed {options.mesh_shape} {options.seq_parallel}"
    if strategy == "hierarchical":
        return f"hierarchical {options.inter_node_strategy}/{options.intra_node_strategy}"
    if strategy == "allgather" and options.chunks > 1:
        return f"allgather, {options.chunks} chunks"
    return strategy


# ------------------------------------------------------------------------------------- the nanoTabPFN step


@dataclass(frozen=True)
class TabPFNShape:
    """nanoTabPFN's row attention: batch' = tables x columns (features + target), training rows as ``kv_len``."""

    tables: int = 1
    columns: int = 11
    heads: int = 4
    head_dim: int = 24
    layers: int = 3
    train_fraction: float = 0.5

    @classmethod
    def of_run(cls, run: dict) -> TabPFNShape:
        """The shape of a measured run (``examples/nanotabpfn/train.py``'s JSON)."""
        model = run["model"]
        return cls(
            run["batch_size"],
            run["features"] + 1,
            model["num_attention_heads"],
            model["embedding_size"] // model["num_attention_heads"],
            model["num_layers"],
            run["train_rows"] / run["rows"],
        )

    def problem(self, rows: int, size: int, options: Options) -> AttentionProblem:
        return attention_problem(
            batch=self.tables * self.columns,
            heads=self.heads,
            head_dim=self.head_dim,
            length=rows,
            size=size,
            kv_len=round(rows * self.train_fraction),
            options=options,
            batch_shape=(self.tables, self.columns),
        )


def attention_seconds(
    name: str, problem: AttentionProblem, cost: Cost, flops_per_s: float, cluster: Cluster, recompute: bool = False
) -> PassTime:
    """Forward + backward of one call on the busiest rank (a second forward when layers are checkpointed)."""
    forward, backward = routes(name, problem, cost, cluster.gpus_per_node)
    fwd = pass_seconds(cost.forward, forward, flops_per_s, cluster)
    total = fwd + pass_seconds(cost.backward, backward, flops_per_s, cluster)
    return total + fwd if recompute else total


def local_cost(shape: TabPFNShape, rows: int) -> Cost:
    return mosaic.get_backend("local").estimate(shape.problem(rows, 1, mosaic.get_backend("local").parse_options()))


@dataclass(frozen=True)
class StepModel:
    """One GPU's measured step, split into row-attention kernels and the rest, per row.

    Args:
        shape: the model.
        flops_per_s: the row-attention kernel's rate, per kernel name.
        rest_s_per_row: the step minus its row-attention kernels, per row (divided by P when sharded).
        bytes_per_row: the one-GPU step's peak memory per row (activations; the rank's rows when sharded).
        checkpoint: layers checkpointed: each layer's forward runs again in the backward.
        kernel: the kernel the step's row attention runs on.
    """

    shape: TabPFNShape
    flops_per_s: dict[str, float]
    rest_s_per_row: float
    bytes_per_row: float
    checkpoint: bool
    kernel: str
    sources: tuple[str, ...] = ()

    @classmethod
    def calibrate(
        cls,
        run: dict,
        flops_per_s: dict[str, float],
        kernel: str,
        *,
        bytes_per_row: float | None = None,
        sources: tuple[str, ...] = (),
    ) -> StepModel:
        """From a one-GPU step (``train.py``'s JSON): its time less its kernels' is the rest; its peak per row
        the activations, unless ``bytes_per_row`` is given."""
        shape, rows = TabPFNShape.of_run(run), run["rows"]
        checkpoint = run["checkpoint_layers"]
        cost = local_cost(shape, rows)
        per_layer = (cost.flops + (cost.forward.flops if checkpoint else 0.0)) / flops_per_s[kernel]
        rest = (run["step_time_s"]["median"] - shape.layers * per_layer) / rows
        per_row = peak_bytes_per_row(run) if bytes_per_row is None else bytes_per_row
        return cls(shape, flops_per_s, rest, per_row, checkpoint, kernel, sources)

    def one_gpu_seconds(self, rows: int, cluster: Cluster) -> float:
        """The step of the whole table on one GPU (``local``): at the calibration's rows, the measured step."""
        return self.predict("local", rows, 1, cost_options("local"), cluster)["step_s"]

    def predict(self, name: str, rows: int, size: int, options: Options, cluster: Cluster) -> dict[str, Any]:
        """Step seconds and peak GiB per GPU of strategy ``name`` with ``options``, on ``size`` GPUs."""
        backend = mosaic.get_backend(name)
        problem = self.shape.problem(rows, size, options)
        reasons = refusal_reasons(backend, problem)
        if reasons:
            return {"reasons": reasons}
        cost = backend.estimate(problem)
        rate = self.flops_per_s[kernel_for(name, self.kernel)]
        attn = attention_seconds(name, problem, cost, rate, cluster, self.checkpoint)
        local_rows = max(problem.q_layout.lengths)
        rest = self.rest_s_per_row * local_rows
        memory = (self.bytes_per_row * local_rows + cost.memory) / GiB
        return {
            "step_s": self.shape.layers * attn.total + rest,
            "attention_s_per_layer": attn.total,
            "compute_s_per_layer": attn.compute,
            "comm_s_per_layer": attn.comm,
            "latency_s_per_layer": attn.latency,
            "rest_s": rest,
            "memory_gib": memory,
            "fits": memory <= MEMORY_MARGIN * cluster.memory_gib,
            "auto_estimate_s": default_machine(torch.device("cuda")).seconds(cost),
        }


def cost_options(name: str) -> Options:
    return mosaic.get_backend(name).parse_options()


def option_sets(name: str, problem: AttentionProblem, cluster: Cluster) -> tuple[list[Options], str | None]:
    """The option sets to price for ``name`` (as ``auto`` lists them), or why there are none."""
    from mosaic_hier.options import INTER_STRATEGIES, INTRA_STRATEGIES, HierOptions

    size = problem.size
    if name == "local":
        return [cost_options("local")], None
    if name == "magi" and size > MAGI_MAX_P:
        return [], f"its estimate takes minutes above P = {MAGI_MAX_P} (O(P^3): PackedMask.remote_keys per rank)"
    if name == "hierarchical":
        local = cluster.gpus_per_node
        if size <= local or size % local:
            return [], f"P = {size} is one node of {local}: hierarchical runs as its intra-node strategy"
        return [HierOptions(local, a, b) for a in INTER_STRATEGIES for b in INTRA_STRATEGIES], None
    found = mosaic.get_backend(name).candidate_options(problem)
    if not found:
        why = {"mesh2d": "no R x C mesh with R, C >= 2", "composed": "no 1 < h < P dividing the heads"}
        return [], f"P = {size}: {why.get(name, 'no option set')}"
    return found, None


def predict_all(
    model: StepModel,
    cluster: Cluster,
    rows_list: Sequence[int],
    sizes: Sequence[int],
    strategies: Sequence[str] = STRATEGIES,
) -> dict[str, list[dict[str, Any]]]:
    """Every strategy's option sets at every (rows, P): their predictions and the skips, with reasons."""
    predictions, skipped = [], []
    for rows in rows_list:
        for size in sizes:
            for name in strategies:
                # local is the baseline: the whole table on one GPU, whatever P (a table can't be split without sp).
                problem = model.shape.problem(rows, 1 if name == "local" else size, cost_options("ring"))
                found, why = option_sets(name, problem, cluster)
                base = {"rows": rows, "P": size, "strategy": name}
                if why is not None:
                    skipped.append({**base, "reasons": [why]})
                for options in found:
                    result = model.predict(name, rows, 1 if name == "local" else size, options, cluster)
                    entry = {**base, "label": label(name, options), "options": str(options), **result}
                    (skipped if "reasons" in result else predictions).append(entry)
    return {"predictions": predictions, "skipped": skipped}


def best_per_strategy(predictions: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each strategy's fastest option set at each (rows, P), among those that fit (else the fastest)."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = {}
    for p in predictions:
        groups.setdefault((p["rows"], p["P"], p["strategy"]), []).append(p)
    return [min(g, key=lambda p: (not p["fits"], p["step_s"])) for g in groups.values()]


# ---------------------------------------------------------------------------------------------- calibration


def read_json(path: Path) -> Any:
    with open(path) as f:
        return json.load(f)


def kernel_log_ms(path: Path) -> dict[tuple[str, str], float]:
    """``bench_kernels.py``'s printed table: ``(shape, variant) -> ms`` for the lines that timed."""
    found = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 3:
            try:
                found[(parts[0], parts[1])] = float(parts[2])
            except ValueError:
                continue
    return found


def kernel_rate(shape: str, ms: float) -> float:
    """FLOPs per second of a one-GPU kernel that ran ``bench_kernels.py``'s ``shape`` forward + backward in ``ms``
    (the FLOPs as mosaic counts them: the local plan's cost)."""
    batch, heads, length, head_dim, *keys = bench_kernels.SHAPES[shape]
    local = mosaic.get_backend("local")
    keys = keys[0] if keys else None
    problem = attention_problem(
        batch=batch,
        heads=heads,
        head_dim=head_dim,
        length=length,
        size=1,
        kv_len=keys,
        options=local.parse_options(),
        batch_shape=(batch,),
    )
    return local.estimate(problem).flops / (ms / 1e3)


def today_rates() -> dict[str, float]:
    """FA4's and cuDNN's rate on nanoTabPFN's row attention at 150,000 rows through ``local`` (one H200)."""
    timed = kernel_log_ms(TODAY / "bench_kernels.log")
    return {k: kernel_rate(ROW_SHAPE, timed[(ROW_SHAPE, f"mosaic_{k}")]) for k in ("fa4", "cudnn")}


def peak_bytes_per_row(run: dict) -> float:
    """A one-GPU step's peak memory per row (``train.py``'s JSON)."""
    return max(run["peak_memory_gib"]) * GiB / run["rows"]


def capacity_bytes_per_row(mode: dict) -> float:
    """Memory per row between the two sizes of a one-GPU ``bench_capacity.py`` mode (the slope: no fixed part)."""
    small, large = mode["points"][:2]
    return (large["peak_gib"] - small["peak_gib"]) * GiB / (large["rows"] - small["rows"])


def prediction_model(kernel: str, checkpoint: bool) -> StepModel:
    """Today's code on one H200: the kernels' rates and the step (``train.py`` at 150,000 rows)."""
    step = read_json(TODAY / f"bench_train_rows150000_sp1_dp1_allgather_{'auto' if kernel == 'fa4' else kernel}.json")
    rates = today_rates()
    sources = (
        f"2026-12-04_1xH200/bench_kernels.log ({ROW_SHAPE})",
        f"2026-12-04_1xH200/bench_train_rows150000_sp1_dp1_allgather_{step['kernel']}.json",
    )
    model = StepModel.calibrate(step, rates, kernel, sources=sources)
    if not checkpoint:
        return model
    # No checkpointed one-GPU step of today's code: its activations from 2026-12-02's capacity run, the rest's
    # forward (a third of it, as for matmuls) recomputed.
    checkpointed = read_json(RESULTS / "2026-12-02_1xH200" / "checkpoint_large.json")["modes"]["checkpoint"]
    return dataclasses.replace(
        model,
        checkpoint=True,
        rest_s_per_row=model.rest_s_per_row * 4 / 3,
        bytes_per_row=capacity_bytes_per_row(checkpointed),
        sources=(*model.sources, "2026-12-02_1xH200/checkpoint_large.json"),
    )


# ----------------------------------------------------------------------------------------------- validation


def validation_rates(bench: dict) -> dict[int, float]:
    """cuDNN's rate per head dim, that code's one-GPU kernel timings: d 24 from kernels.json; d 128, which it
    did not time, from the same run's one-GPU column of bench_sp (the only d-128 timing of that code)."""
    kernels = read_json(RESULTS / "2026-11-27_4xH200" / "kernels.json")
    return {
        24: kernel_rate("tabpfn_b5_L64k", kernels["tabpfn_b5_L64k/sdpa_cudnn_ms"]),
        128: kernel_rate("llm_b1_h16_L64k", bench["llm_b1_h16_L64k"]["1gpu_cudnn"]),
    }


def shape_problem(shape: bench_sp.Shape, size: int, options: Options) -> AttentionProblem:
    """bench_sp's call: ``mosaic.attention`` on ``(B, H, N/P, d)``, batch shape ``(B,)``."""
    return attention_problem(
        batch=shape.batch,
        heads=shape.heads,
        head_dim=shape.head_dim,
        length=shape.length,
        size=size,
        kv_len=shape.kv_len,
        options=options,
        batch_shape=(shape.batch,),
    )


def _row(source: str, case: str, size: int, measured: float, predicted: float, unit: str) -> dict[str, Any]:
    error = (predicted - measured) / measured
    return {
        "source": source,
        "case": case,
        "P": size,
        "unit": unit,
        "measured": measured,
        "predicted": predicted,
        "error": error,
        "within_target": abs(error) <= TARGET,
    }


@dataclass(frozen=True)
class BenchCase:
    """One measured cell of a bench_sp table and the plan priced for it."""

    source: str
    case: str
    size: int
    measured_ms: float
    strategy: str
    problem: AttentionProblem
    cost: Cost
    flops_per_s: float

    def predict(self, cluster: Cluster) -> dict[str, Any]:
        host = dataclasses.replace(cluster, gpus_per_node=self.size)  # one host: every link is NVLink
        seconds = attention_seconds(self.strategy, self.problem, self.cost, self.flops_per_s, host).total
        return _row(self.source, self.case, self.size, self.measured_ms, seconds * 1e3, "ms")


def bench_cases(sources: Iterable[str] = VALIDATION_RUNS) -> list[BenchCase]:
    """Every Mosaic strategy of the 2-/4-GPU bench_sp tables (attention fwd + bwd, ms), priced once."""
    out = []
    for source in sources:
        size = VALIDATION_RUNS[source]
        bench = read_json(RESULTS / source)
        rates = validation_rates(bench)
        for variant, config in bench_sp._strategies(size).items():
            name = config["backend"]
            if name in ("ring_flash_attn", "auto"):  # FA2's kernels, and a choice among the others
                continue
            values = dict(config.get("options", {}))
            if "mesh_shape" in config:
                values["mesh_shape"] = config["mesh_shape"]
            options = mosaic.get_backend(name).parse_options(values)
            for shape in bench_sp.SHAPES:
                measured = bench.get(shape.name, {}).get(variant)
                if measured is None:
                    continue
                problem = shape_problem(shape, size, options)
                cost = mosaic.get_backend(name).estimate(problem)
                case = f"{shape.name} {variant}"
                out.append(BenchCase(source, case, size, measured, name, problem, cost, rates[shape.head_dim]))
    return out


def validate_steps(cluster: Cluster) -> list[dict[str, Any]]:
    """The nanoTabPFN steps at P = 2, 4 (allgather), each against its one-GPU run: seconds and peak GiB."""
    four = RESULTS / "2026-11-27_4xH200"
    steps = read_json(four / "nanotabpfn_steps.json")
    one_gpu = {
        "2xH200": read_json(RESULTS / "2026-11-27_2xH200" / "nanotabpfn_150k_P1.json"),
        "4xH200": next(s for s in steps if s["sp_size"] == 1),
        "4xH200 checkpointed": read_json(four / "nanotabpfn_1M_1gpu_separate_H200.json"),
    }
    runs = [("2xH200", read_json(RESULTS / "2026-11-27_2xH200" / "nanotabpfn_150k_P2.json"))]
    runs += [("4xH200 checkpointed" if s["checkpoint_layers"] else "4xH200", s) for s in steps if s["sp_size"] > 1]
    rate = {"cudnn": validation_rates(read_json(RESULTS / FIT_ON))[24]}
    # Activations per row from one-GPU runs after 2026-12-01: those of 2026-11-27 held fp32 dQ/dK/dV accumulators
    # around the whole-table kernel (1.9 GB at 150,000 rows, docs/benchmarks.md) that no sharded plan has.
    per_row = {
        False: peak_bytes_per_row(read_json(TODAY / "bench_train_rows150000_sp1_dp1_allgather_cudnn.json")),
        True: capacity_bytes_per_row(
            read_json(RESULTS / "2026-12-02_1xH200" / "checkpoint_large.json")["modes"]["checkpoint"]
        ),
    }
    out = []
    for where, run in runs:
        model = StepModel.calibrate(one_gpu[where], rate, "cudnn", bytes_per_row=per_row[run["checkpoint_layers"]])
        size = run["sp_size"]
        host = dataclasses.replace(cluster, gpus_per_node=size)
        result = model.predict(run["backend"], run["rows"], size, cost_options(run["backend"]), host)
        case = f"nanoTabPFN {run['rows']:,} rows {run['backend']}{', checkpointed' if run['checkpoint_layers'] else ''}"
        source = f"2026-11-27_{where.split()[0]}"
        out.append(_row(source, case, size, run["step_time_s"]["median"], result["step_s"], "s"))
        out.append(_row(source, case + " peak", size, max(run["peak_memory_gib"]), result["memory_gib"], "GiB"))
    return out


def fit_overlap_tax(cluster: Cluster, cases: Sequence[BenchCase]) -> float:
    """The overlap tax in [0, 1] (steps of 0.05) that minimises the squared relative errors of ``cases``."""

    def loss(tax: float) -> float:
        fitted = dataclasses.replace(cluster, overlap_tax=tax)
        return sum(c.predict(fitted)["error"] ** 2 for c in cases)

    return min((i / 20 for i in range(21)), key=loss)


# ------------------------------------------------------------------------------------------------- printing


def print_validation(rows: Sequence[dict[str, Any]]) -> None:
    width = max(len(r["source"]) for r in rows) + 2
    cases = max(len(r["case"]) for r in rows) + 2
    print(f"{'source':<{width}}{'case':<{cases}}{'P':>3}{'measured':>13}{'model':>13}{'error':>9}  within 15 %")
    for r in rows:
        mark = "yes" if r["within_target"] else "NO"
        print(
            f"{r['source']:<{width}}{r['case']:<{cases}}{r['P']:>3}{r['measured']:>10.2f} {r['unit']:<3}"
            f"{r['predicted']:>9.2f} {r['unit']:<3}{r['error'] * 100:>+8.1f}%  {mark}"
        )
    hits = sum(r["within_target"] for r in rows)
    print(f"{hits} of {len(rows)} rows within 15 %")


def print_predictions(
    best: Sequence[dict[str, Any]], skipped: Sequence[dict[str, Any]], strategies: Sequence[str]
) -> None:
    """Per row count: P down, strategies across; step seconds / GiB per GPU, 'x' where it does not fit."""
    cell: dict[tuple[int, int, str], str] = {}
    for p in best:
        cell[(p["rows"], p["P"], p["strategy"])] = f"{p['step_s']:.3g}/{p['memory_gib']:.0f}{'' if p['fits'] else 'x'}"
    width = 17
    strategies = [s for s in strategies if any(p["strategy"] == s for p in best)]
    for rows in sorted({p["rows"] for p in best}):
        print(
            f"\nrows {rows:,}: step seconds / GiB per GPU of each strategy's best option set "
            f"(x: over {MEMORY_MARGIN:.0%} of the H200's memory)"
        )
        print(f"{'P':>5}" + "".join(f"{s[: width - 1]:>{width}}" for s in strategies))
        for size in sorted({p["P"] for p in best if p["rows"] == rows}):
            print(f"{size:>5}" + "".join(f"{cell.get((rows, size, s), '-'):>{width}}" for s in strategies))
    priced = {(p["rows"], p["P"], p["strategy"]) for p in best}
    print("\nnot priced ('-' above), first reason:")
    seen = set()
    for s in skipped:
        key = (s["strategy"], s["reasons"][0][:40])
        if (s["rows"], s["P"], s["strategy"]) not in priced and key not in seen:
            seen.add(key)
            print(f"  {s['strategy']:<16} P = {s['P']:<5} {s['reasons'][0][:150]}")


def winners(predictions: Sequence[dict[str, Any]], one_gpu: dict[int, float]) -> list[dict[str, Any]]:
    """The fastest option set that fits, per (rows, P), with its efficiency against one GPU's step / P, and
    what ``backend="auto"`` would pick from the same candidates with its one-link machine model."""
    out = []
    for rows in sorted({p["rows"] for p in predictions}):
        for size in sorted({p["P"] for p in predictions if p["rows"] == rows}):
            here = [p for p in predictions if p["rows"] == rows and p["P"] == size and p["strategy"] != "local"]
            fitting = [p for p in here if p["fits"]]
            # Where nothing fits, the option set that needs the least memory says how far off it is.
            pick = min(fitting, key=lambda p: p["step_s"]) if fitting else min(here, key=lambda p: p["memory_gib"])
            auto = min(here, key=lambda p: p["auto_estimate_s"])
            auto_step = auto["step_s"] / pick["step_s"]
            out.append(
                {
                    "rows": rows,
                    "P": size,
                    "fits": bool(fitting),
                    "best": pick["label"],
                    "step_s": pick["step_s"],
                    "memory_gib": pick["memory_gib"],
                    "efficiency": one_gpu[rows] / size / pick["step_s"],
                    "auto_picks": auto["label"],
                    "auto_pick_vs_best": auto_step,
                }
            )
    return out


def print_winners(table: Sequence[dict[str, Any]]) -> None:
    print(
        f"\n{'rows':>12}{'P':>6}  {'fastest that fits':<40}{'step s':>10}{'GiB/GPU':>9}{'eff.':>7}"
        "  auto's one-link pick (its step / the fastest)"
    )
    for w in table:
        line = f"{w['rows']:>12,}{w['P']:>6}  "
        if w["fits"]:
            line += f"{w['best']:<40}{w['step_s']:>10.3g}{w['memory_gib']:>9.1f}{w['efficiency']:>7.0%}  "
            print(line + f"{w['auto_picks']} ({w['auto_pick_vs_best']:.2f}x)")
        else:
            print(line + f"none fits (least memory: {w['best']}, {w['memory_gib']:.0f} GiB)")


def _line(ax: Any, xs: Sequence[float], ys: Sequence[float], fits: Sequence[bool], color: str, name: str) -> None:
    """One strategy's line, dots where it fits in memory and crosses where it does not."""
    ax.plot(xs, ys, "-", color=color, label=name)
    for marker, wanted in (("o", True), ("x", False)):
        chosen = [(x, y) for x, y, f in zip(xs, ys, fits, strict=True) if f == wanted]
        ax.plot([x for x, _ in chosen], [y for _, y in chosen], marker, color=color)


def plot(best: Sequence[dict[str, Any]], one_gpu: dict[int, float], path: str, title: str) -> None:
    """Step time against P (log-log) and efficiency (one GPU's step / P over the step), a column per row count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_list = sorted({p["rows"] for p in best})
    fig, axes = plt.subplots(2, len(rows_list), figsize=(6 * len(rows_list), 9), squeeze=False, sharex=True)
    for column, rows in enumerate(rows_list):
        here = [p for p in best if p["rows"] == rows]
        top, bottom = axes[0][column], axes[1][column]
        sizes = sorted({p["P"] for p in here})
        top.plot(sizes, [one_gpu[rows] / s for s in sizes], "k--", lw=1, label="ideal: one GPU / P")
        for name in dict.fromkeys(p["strategy"] for p in here):
            points = sorted((p["P"], p["step_s"], p["fits"]) for p in here if p["strategy"] == name)
            xs, ys, fits = ([point[k] for point in points] for k in range(3))
            color = f"C{STRATEGIES.index(name) % 10}"  # one colour per strategy in every panel
            _line(top, xs, ys, fits, color, name)
            _line(bottom, xs, [one_gpu[rows] / x / y for x, y in zip(xs, ys, strict=True)], fits, color, name)
        top.set_yscale("log")
        top.set_title(f"{rows:.0e} rows (model)")
        top.set_ylabel("predicted step seconds")
        bottom.set_ylabel("predicted efficiency: (one GPU / P) / step")
        bottom.set_ylim(0, 1.1)
        bottom.set_xlabel("GPUs (8 per node)")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title + "\no: fits in the H200's memory, x: does not")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------------------------------ main


def run_validation(cluster: Cluster) -> dict[str, Any]:
    rows = [case.predict(cluster) for case in bench_cases()] + validate_steps(cluster)
    return {
        "model": "a model, not a measurement",
        "target": TARGET,
        "parameters": dataclasses.asdict(cluster),
        "rows": rows,
        "within_target": sum(r["within_target"] for r in rows),
        "total": len(rows),
    }


def run_prediction(args: argparse.Namespace, cluster: Cluster) -> dict[str, Any]:
    model = prediction_model(args.kernel, args.checkpoint_layers)
    found = predict_all(model, cluster, args.rows, args.sizes, args.strategies)
    best = best_per_strategy(found["predictions"])
    one_gpu = {rows: model.one_gpu_seconds(rows, cluster) for rows in args.rows}
    return {
        "model": "a model, not a measurement",
        "kernel": args.kernel,
        "checkpoint_layers": args.checkpoint_layers,
        "parameters": dataclasses.asdict(cluster),
        "calibration": {
            "flops_per_s": model.flops_per_s,
            "rest_s_per_row": model.rest_s_per_row,
            "bytes_per_row": model.bytes_per_row,
            "one_gpu_step_s": one_gpu,
            "sources": list(model.sources),
            "shape": dataclasses.asdict(model.shape),
        },
        "best_per_strategy": best,
        "winners": winners(found["predictions"], one_gpu),
        **found,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validate", action="store_true", help="predict the measured 2-/4-GPU tables instead")
    parser.add_argument("--out", help="write the JSON here")
    parser.add_argument("--plot", help="write the prediction's plot here (PNG)")
    parser.add_argument("--kernel", choices=("fa4", "cudnn"), default="fa4", help="row-attention kernel (fa4)")
    parser.add_argument("--checkpoint-layers", action="store_true", help="predict with checkpointed layers")
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbps", type=float, help="GB/s per GPU within a node (default: mosaic.cost's)")
    parser.add_argument("--nic-gbps", type=float, default=50.0, help="GB/s per GPU between nodes (400 Gb/s)")
    parser.add_argument("--overlap-tax", type=float, default=None, help=f"default {FITTED_OVERLAP_TAX}")
    parser.add_argument("--fit", action="store_true", help="with --validate: fit the overlap tax on P = 2")
    args = parser.parse_args(argv)
    overrides: dict[str, Any] = {"gpus_per_node": args.gpus_per_node, "nic_bytes_per_s": args.nic_gbps * 1e9}
    if args.nvlink_gbps is not None:
        overrides["nvlink_bytes_per_s"] = args.nvlink_gbps * 1e9
    if args.overlap_tax is not None:
        overrides["overlap_tax"] = args.overlap_tax
    cluster = default_cluster(**overrides)
    if args.validate:
        if args.fit:
            cluster = dataclasses.replace(cluster, overlap_tax=fit_overlap_tax(cluster, bench_cases([FIT_ON])))
            print(f"overlap tax fitted on the 2-GPU bench_sp rows: {cluster.overlap_tax}")
        result = run_validation(cluster)
        print_validation(result["rows"])
    else:
        result = run_prediction(args, cluster)
        print_predictions(result["best_per_strategy"], result["skipped"], args.strategies)
        print_winners(result["winners"])
        if args.plot:
            kernel = "FA4" if args.kernel == "fa4" else "cuDNN"
            title = (
                f"Scaling model (a model, not a measurement): nanoTabPFN train step, {kernel} row attention, "
                f"H200, NVLink {cluster.nvlink_bytes_per_s / 1e9:.0f} GB/s, "
                f"NIC {cluster.nic_bytes_per_s / 1e9:.0f} GB/s per GPU"
            )
            plot(result["best_per_strategy"], result["calibration"]["one_gpu_step_s"], args.plot, title)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
