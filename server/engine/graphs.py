"""``limits.cuda_graphs``: decode steps replayed from CUDA graphs, captured before the server says it is ready.

An eager step on a GPU waits on the host, not on the memory: a decode step of a 32-layer family is about 4,500
aten calls (bench/step_ops.py), and on an H200 one row at Llama-3-8B's shape took 57 ms a step, for 15 GB of
weights the card reads in under 4 ms. A CUDA graph replays a step's kernels with one launch; the host is left
the inputs' copy, the lm_heads and sampling (9-42 calls).

A graph's shapes are fixed, so a step is padded to a bucket: its rows to a power of two (at most max_batch), and
its attention units (``DecodeUnits`` of ``SPLIT_BLOCKS`` blocks each, one width for all) to the row bucket times a
power of two. A padding row decodes token 0 at position 0 and writes its key and value into the pool's reserved
``NULL_BLOCK``, which no sequence is given; a padding unit holds no keys and adds nothing to its row. A short row
still reads its own blocks only; a long one beside it moves the step to a larger unit bucket, not every row.
Each step's inputs reach the device in one copy, from one pinned buffer.

Graphs are captured per branch mix the family forward specializes on (each branch alone, and mixed), for every
bucket, largest first, in one memory pool. The family's lm_heads run after the replay, on the branches present;
a standalone model's logits come out of its graph. Each graph's output is compared with the eager step's on the
same inputs when it is captured; a capture that fails or differs turns graphs off for that model, with a
warning, and its steps run eagerly as before.

``capture=False`` runs the same plans, padding and static inputs on any device, calling the step instead of
replaying it: how the tests check all of the above on the CPU.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from server.engine.kv_cache import NULL_BLOCK, SPLIT_BLOCKS, DecodeUnits, StepBatch, decode_units

log = logging.getLogger("branchserve.engine")


def row_buckets(max_batch: int) -> list[int]:
    """1, 2, 4 ... and max_batch itself."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def unit_buckets(rows: int, max_seq: int, block_size: int, blocks: int | None = None) -> list[int]:
    """Units a step of ``rows`` rows may plan: rows times 1, 2, 4 ... up to what every row at max_seq needs, or
    what ``blocks`` blocks (the pool's, shared by the rows) can fill with a partial unit per row, if less."""
    most = rows * -(-(-(-max_seq // block_size)) // SPLIT_BLOCKS)
    if blocks is not None:
        most = min(most, -(-blocks // SPLIT_BLOCKS) + rows)
    sizes = [rows]
    while sizes[-1] < most:
        sizes.append(sizes[-1] * 2)
    return sizes


@dataclass
class Plan:
    """A decode step's device inputs on the host, padded to a bucket (int64 arrays)."""

    tokens: np.ndarray  # (rows,)
    branch: np.ndarray
    positions: np.ndarray
    slots: np.ndarray
    blocks: np.ndarray  # (units * SPLIT_BLOCKS,) flattened
    row: np.ndarray  # (units,)
    keys: np.ndarray

    def flat(self) -> np.ndarray:
        return np.concatenate([self.tokens, self.branch, self.positions, self.slots, self.blocks, self.row,
                               self.keys])


def units_needed(positions: list[int], rows: int, block_size: int) -> int:
    """Units a step of decode rows at ``positions`` plans when padded to ``rows`` rows."""
    per = block_size * SPLIT_BLOCKS
    return sum(-(-(p + 1) // per) for p in positions) + rows - len(positions)


def plan(decode: list[tuple[list[int], int, int, int]], rows: int, units: int, block_size: int) -> Plan:
    """``decode``: (block table, position, token, branch) of each real row -> its plan padded to ``rows`` rows
    and ``units`` units. A row's keys are its positions 0..position, in units of SPLIT_BLOCKS blocks, in row
    order (``decode_units``)."""
    n, pad = len(decode), rows - len(decode)
    pos = np.fromiter((d[1] for d in decode), np.int64, n)
    tables = [d[0] for d in decode]
    blocks, row, keys = decode_units(tables, pos, SPLIT_BLOCKS, block_size)
    spare = units - len(row) - pad  # padding units: no keys
    fill = decode[0][3] if n else 0
    last_block = np.fromiter((t[p // block_size] for t, p in zip(tables, pos.tolist())), np.int64, n)
    return Plan(
        tokens=np.concatenate([np.fromiter((d[2] for d in decode), np.int64, n), np.zeros(pad, np.int64)]),
        branch=np.concatenate([np.fromiter((d[3] for d in decode), np.int64, n), np.full(pad, fill, np.int64)]),
        positions=np.concatenate([pos, np.zeros(pad, np.int64)]),
        # padding rows: their own key, in the null block
        slots=np.concatenate([last_block * block_size + pos % block_size,
                              NULL_BLOCK * block_size + np.arange(pad, dtype=np.int64) % block_size]),
        blocks=np.concatenate([blocks, np.full((pad + spare) * SPLIT_BLOCKS, NULL_BLOCK, np.int64)]),
        row=np.concatenate([row, np.arange(n, rows, dtype=np.int64), np.zeros(spare, np.int64)]),
        keys=np.concatenate([keys, np.ones(pad, np.int64), np.zeros(spare, np.int64)]))


class Static:
    """One bucket's inputs on the device (one int64 buffer, its views in Plan's order), its pinned host twin,
    and, once captured, its graph and output."""

    def __init__(self, rows: int, units: int, device: torch.device):
        self.rows, self.units = rows, units
        sizes = [rows] * 4 + [units * SPLIT_BLOCKS, units, units]
        self.inputs = torch.zeros(sum(sizes), dtype=torch.long, device=device)
        self.host = torch.zeros(sum(sizes), dtype=torch.long, pin_memory=device.type == "cuda")
        tokens, branch, positions, slots, blocks, row, keys = self.inputs.split(sizes)
        self.tokens, self.branch = tokens, branch
        self.batch = StepBatch.of_units(slots, positions, DecodeUnits(blocks.view(units, SPLIT_BLOCKS), row, keys))
        self.graph = None
        self.output: torch.Tensor | None = None

    def load(self, p: Plan) -> None:
        values = torch.from_numpy(p.flat())
        if self.inputs.device.type == "cuda":  # the previous step's copy is done: its tokens were fetched
            self.host.copy_(values)
            self.inputs.copy_(self.host, non_blocking=True)
        else:
            self.inputs.copy_(values)


class DecodeGraphs:
    """A runner's decode steps over static, padded inputs: replayed from CUDA graphs (``capture``), or called
    on them (``capture=False``).

    ``step(tokens, branch, batch, single)`` is the runner's decode forward over a Static's tensors; ``mixes``
    the values of ``single`` the runner passes (a branch, or None for mixed)."""

    def __init__(self, step: Callable, mixes: list[int | None], max_batch: int, block_size: int,
                 device: torch.device, capture: bool):
        self.step, self.mixes, self.block_size, self.device = step, mixes, block_size, device
        self.capture = capture
        self.rows = row_buckets(max_batch)
        self.units: dict[int, list[int]] = {}
        self.static: dict[tuple, Static] = {}
        self.enabled = True
        self.replays = 0  # steps run through a bucket (tests, the bench)
        self.pool = None

    def prepare(self, max_seq: int, num_blocks: int, vocab: int) -> None:
        """Build (and capture) every bucket, largest first: a graph's memory comes from one pool, and the largest
        step's is enough for all."""
        usable = num_blocks - (NULL_BLOCK + 1)
        self.units = {r: unit_buckets(r, max_seq, self.block_size, usable) for r in self.rows}
        keys = [(mix, r, u) for mix in self.mixes for r in self.rows for u in self.units[r]]
        keys.sort(key=lambda k: (-k[1] * k[2], -k[1]))
        t0 = time.perf_counter()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()
        for n, key in enumerate(keys):
            mix, rows, units = key
            static = Static(rows, units, self.device)
            static.load(self._check_plan(mix, rows, units, max_seq, num_blocks, vocab))
            try:
                self._build(static, mix)
            except Exception as e:  # a step that cannot be captured runs eagerly; the server still starts
                log.warning("CUDA graphs are off for this model: capturing its decode step (%d rows, %d units) "
                            "failed: %s", rows, units, str(e).splitlines()[0] if str(e) else type(e).__name__)
                self.enabled, self.static = False, {}
                return
            self.static[key] = static
            if n % 16 == 15:
                log.info("decode graphs: %d/%d, %.1f s", n + 1, len(keys), time.perf_counter() - t0)
        log.info("decode steps %s: %d buckets (rows %s; attention units up to %d per row) in %.1f s",
                 "captured as CUDA graphs" if self.capture else "planned over static inputs", len(keys),
                 self.rows, self.units[self.rows[-1]][-1] // self.rows[-1], time.perf_counter() - t0)

    def _check_plan(self, mix, rows: int, units: int, max_seq: int, num_blocks: int, vocab: int) -> Plan:
        """Rows that fill the bucket's units as far as max_seq allows, over the pool's blocks (no sequence holds
        any yet), each writing a slot of its own: what a capture runs, and the eager step is compared on."""
        per, usable = self.block_size * SPLIT_BLOCKS, list(range(NULL_BLOCK + 1, num_blocks))
        decode = []
        for r in range(rows):
            want = units // rows + (1 if r < units % rows else 0)
            pos = min(want * per, max_seq) - 1 - r % self.block_size
            pos = max(pos, 0)
            span = pos // self.block_size + 1
            own = usable[r % len(usable)] if usable else NULL_BLOCK
            table = [usable[(r + i) % len(usable)] if usable else NULL_BLOCK for i in range(span - 1)] + [own]
            branch = mix if mix is not None else r % max(1, len(self.mixes) - 1)  # mixed: every branch
            decode.append((table, pos, (17 * r + 3) % vocab, branch))
        if len({d[0][-1] for d in decode}) < len(decode):  # too few blocks for a slot each: one real row
            decode = decode[:1]
        return plan(decode, rows, units, self.block_size)

    def _build(self, static: Static, mix) -> None:
        def run():
            return self.step(static.tokens, static.branch, static.batch, mix)

        if not self.capture:
            run()  # what a capture would run first (a compiled step compiles this bucket's shapes now)
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            eager = run().clone()  # warm-up, as CUDA graphs need; and what the graph must give
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static.output = run()
        graph.replay()
        torch.cuda.synchronize()
        err = (static.output.float() - eager.float()).abs().max().item()
        scale = eager.float().abs().max().item()
        if not err <= 1e-2 * scale + 1e-3:
            raise RuntimeError(f"the replayed step differs from the eager one by {err:.3g} (largest value "
                               f"{scale:.3g})")
        static.graph = graph

    def run(self, decode: list[tuple[list[int], int, int, int]], single
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step through its bucket -> the step's output for the real rows and their branches on the
        device (views of the bucket's buffers: read them before the next step), or None when no bucket holds
        it (it runs eagerly)."""
        if not self.enabled or not self.static:
            return None
        n = len(decode)
        rows = next((r for r in self.rows if r >= n), None)
        if rows is None:
            return None
        need = units_needed([d[1] for d in decode], rows, self.block_size)
        units = next((u for u in self.units[rows] if u >= need), None)
        static = self.static.get((single, rows, units))
        if static is None:
            return None
        static.load(plan(decode, rows, units, self.block_size))
        if static.graph is not None:
            static.graph.replay()
            out = static.output
        else:
            out = self.step(static.tokens, static.branch, static.batch, single)
        self.replays += 1
        return out[:n], static.branch[:n]
