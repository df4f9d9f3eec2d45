"""Static-shape decode steps, one per (batch bucket, attention span, branch mix), replayed from CUDA graphs.

A decode batch of n rows is padded up to the next bucket (1, 2, 4, ... max_batch)
with rows that write into a scratch KV slot and are dropped from the output. The
inputs are copied into per-bucket static buffers, so a captured graph replays on
new values without re-launching hundreds of small kernels. Attention reads the
cache up to a power-of-two span past the longest row (model.kv_bucket). A batch whose rows all
share one branch replays that branch's own graph, which reads only its residual;
a mixed batch replays the graph that reads every branch's residual with a mask.
The lm_heads run after the replay, outside the graph: only the heads of the
branches present are read, in one GEMM each.
On the CPU the same buffers and padding run eagerly: that is what the tests check.
"""

from __future__ import annotations

import functools

import torch

from server.engine.model import kv_bucket, single_branch


def buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, max_batch: int, scratch_slot: int, capture: bool, compile: bool = False):
        self.model = model
        self.sizes = buckets(max_batch)
        self.scratch_slot = scratch_slot
        self.capture = capture  # CUDA graphs; False: eager replay of the same static buffers
        self.compile = compile  # each key's step through torch.compile (inductor) before it is captured
        self.compiled: dict[tuple[int, int, int | None], object] = {}
        dev = model.device
        self.inputs = {b: {"tokens": torch.zeros(b, 1, dtype=torch.long, device=dev),
                           "start": torch.zeros(b, dtype=torch.long, device=dev),
                           "slots": torch.full((b,), scratch_slot, dtype=torch.long, device=dev),
                           "branch": torch.zeros(b, dtype=torch.long, device=dev)} for b in self.sizes}
        # Keyed by (batch bucket, attention span, branch of every row or None for a mix); captured when first
        # needed. All graphs share one memory pool.
        self.graphs: dict[tuple[int, int, int | None], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int | None], torch.Tensor] = {}
        self.pool = None
        self.used: set[tuple[int, int, int | None]] = set()  # the keys run so far, captured or not

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def _forward(self, key: tuple[int, int, int | None]) -> torch.Tensor:
        if self.compile:
            if key not in self.compiled:  # one compiled function per key: each has static shapes and branches
                self.compiled[key] = torch.compile(functools.partial(self._step, key), dynamic=False)
            return self.compiled[key]()
        return self._step(key)

    def _step(self, key: tuple[int, int, int | None]) -> torch.Tensor:
        buf = self.inputs[key[0]]
        # The layers only: the lm_heads run after the replay, on the branches the host knows are present.
        return self.model(buf["tokens"], buf["start"], buf["slots"], buf["branch"], kv_len=key[1],
                          single=key[2], head=False)[:, 0]

    def _capture(self, key: tuple[int, int, int | None]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up the kernels outside the capture
            for _ in range(2):
                self._forward(key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[key] = self._forward(key)
        self.graphs[key] = graph

    def run(self, tokens: list[int], start: list[int], slots: list[int], branch: list[int]) -> torch.Tensor:
        """One decode step for n rows -> (n, V) logits."""
        n = len(tokens)
        b = self.bucket(n)
        single = single_branch(branch)
        buf = self.inputs[b]
        pad = b - n
        pad_branch = branch[0]  # padding rows never add a branch to the mix
        buf["tokens"].copy_(torch.tensor([[t] for t in tokens] + [[0]] * pad))
        buf["start"].copy_(torch.tensor(start + [0] * pad))
        buf["slots"].copy_(torch.tensor(slots + [self.scratch_slot] * pad))
        buf["branch"].copy_(torch.tensor(branch + [pad_branch] * pad))
        key = (b, kv_bucket(max(start) + 1, self.model.max_seq), single)
        self.used.add(key)
        if not self.capture:
            hidden = self._forward(key)
        else:
            if key not in self.graphs:
                self._capture(key)
            self.graphs[key].replay()
            hidden = self.outputs[key]
        return self.model.project(hidden[:n], buf["branch"][:n], sorted(set(branch)))
