"""Static-shape decode steps, all prepared at start: one per (batch bucket, attention span, branch mix).

A decode batch of n rows is padded up to the next bucket (1, 2, 4, ... max_batch)
with rows that write into a scratch KV slot and are dropped from the output. The
inputs are copied into per-bucket static buffers, so a captured graph replays on
new values without re-launching hundreds of small kernels. Attention reads the
cache up to a power-of-two span past the longest row (``kv_bucket``). A batch whose rows all
share one branch runs that branch's own step, which reads only its residual;
a mixed batch runs the step that reads every branch's residual with a mask.
The lm_heads run after the step, outside any graph: only the heads of the
branches present are read, in one GEMM each.

``prepare`` compiles (torch.compile, one function with a dynamic batch and span:
a few compilations for every key, counted by dynamo) and captures (CUDA graphs)
every key before the server reports ready; serving never compiles or captures.
On the CPU the same buffers and padding run without graphs: that is what the tests check.
"""

from __future__ import annotations

import logging
import time

import torch

from server.engine.model import single_branch

log = logging.getLogger("branchserve.engine")


def compile_step(fn, recompile_limit: int, fullgraph: bool = False):
    """``fn`` through torch.compile, dynamic in batch and span. The weights and caches of a served model never
    change after load, so the step does not re-check its modules' tensors on every call (that check was 1 ms of a
    29 ms decode step here)."""
    return torch.compile(fn, dynamic=True, fullgraph=fullgraph, recompile_limit=recompile_limit,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})


def buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def kv_bucket(length: int, max_seq: int, smallest: int = 256) -> int:
    """The cached positions a static decode step attends over for rows of up to ``length`` tokens: a power
    of two, at least ``smallest`` and at most ``max_seq``. Few spans mean few CUDA graphs, and short
    contexts do not read the whole cache."""
    span = smallest
    while span < length:
        span *= 2
    return min(span, max_seq)


def spans(max_seq: int) -> list[int]:
    out, n = [], 1
    while not out or out[-1] < max_seq:
        out.append(kv_bucket(n, max_seq))
        n = out[-1] + 1
    return out


class DecodeGraphs:
    def __init__(self, model, max_batch: int, scratch_slot: int, capture: bool, compile: bool = False):
        self.model = model
        self.sizes = buckets(max_batch)
        self.spans = spans(model.max_seq)
        self.scratch_slot = scratch_slot
        self.capture = capture  # CUDA graphs; False: the same static buffers, run without graphs
        # Mixed steps need the host's row groups inside the layers when weights are dense per branch (rate 0):
        # those run eagerly, as the host groups them.
        n = len(model.branches)
        self.mixes: list[int | None] = list(range(n)) + ([None] if n > 1 and not model.row_grouped else [])
        self.step = self._step
        if compile:
            # One function, dynamic in batch and span; dynamo makes one version per branch mix (and for batch 1),
            # all at start. Its recompile limit (8 by default, past which it would run the step eagerly, silently)
            # is set to cover them, and fullgraph turns any fallback into an error.
            self.step = compile_step(self._step, 2 * len(self.mixes) + 4, fullgraph=True)
        dev = model.device
        self.inputs = {b: {"tokens": torch.zeros(b, 1, dtype=torch.long, device=dev),
                           "start": torch.zeros(b, dtype=torch.long, device=dev),
                           "slots": torch.full((b,), scratch_slot, dtype=torch.long, device=dev),
                           "branch": torch.zeros(b, dtype=torch.long, device=dev)} for b in self.sizes}
        # Keyed by (batch bucket, attention span, branch of every row or None for a mix). All graphs share one pool.
        self.graphs: dict[tuple[int, int, int | None], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int | None], torch.Tensor] = {}
        self.pool = None
        self.used: set[tuple[int, int, int | None]] = set()  # the keys run so far

    @property
    def keys(self) -> list[tuple[int, int, int | None]]:
        return [(b, s, m) for m in self.mixes for s in self.spans for b in self.sizes]

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def _step(self, tokens, start, branch, slots, span: int, single: int | None) -> torch.Tensor:
        # The layers only: the lm_heads run after the step, on the branches the host knows are present.
        return self.model(tokens, start, branch, slots, single=single, span=span, head=False)[:, 0]

    def _forward(self, key: tuple[int, int, int | None]) -> torch.Tensor:
        buf = self.inputs[key[0]]
        return self.step(buf["tokens"], buf["start"], buf["branch"], buf["slots"], key[1], key[2])

    def prepare(self) -> None:
        """Every key's step compiled and captured now. The buffers hold padding rows (scratch slot)."""
        t0 = time.perf_counter()
        for key in self.keys:
            if key[2] is not None:
                self.inputs[key[0]]["branch"].fill_(key[2])
            if self.capture:
                self._capture(key)
            else:
                self._forward(key)
        for buf in self.inputs.values():
            buf["branch"].zero_()
        log.info("decode steps ready: %d keys (%d batch buckets x %d spans x %d branch mixes)%s%s in %.1f s",
                 len(self.keys), len(self.sizes), len(self.spans), len(self.mixes),
                 ", compiled" if self.step is not self._step else "", ", captured" if self.capture else "",
                 time.perf_counter() - t0)

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
        pad = b - n
        key = (b, kv_bucket(max(start) + 1, self.model.max_seq), single)
        if single is None and None not in self.mixes:  # a mix that needs the host's row groups: eager
            from server.engine.model import row_groups
            from server.engine.runner import to_device

            dev = self.model.device
            rows = to_device(branch, dev)
            hidden = self.model(to_device([[t] for t in tokens], dev), to_device(start, dev), rows,
                                to_device(slots, dev), single=None, span=key[1], groups=row_groups(branch, dev),
                                head=False)[:, 0]
            return self.model.project(hidden, rows, branch)
        buf = self.inputs[b]
        host = torch.tensor([tokens + [0] * pad, start + [0] * pad, slots + [self.scratch_slot] * pad,
                             branch + [branch[0]] * pad], dtype=torch.long)
        if buf["tokens"].is_cuda:
            host = host.pin_memory()
        buf["tokens"][:, 0].copy_(host[0], non_blocking=True)
        buf["start"].copy_(host[1], non_blocking=True)
        buf["slots"].copy_(host[2], non_blocking=True)
        buf["branch"].copy_(host[3], non_blocking=True)
        self.used.add(key)
        if key in self.graphs:
            self.graphs[key].replay()
            hidden = self.outputs[key]
        else:
            if self.capture:
                raise RuntimeError(f"decode step {key} was not captured at start")
            hidden = self._forward(key)
        return self.model.project(hidden[:n], buf["branch"][:n], branch)
