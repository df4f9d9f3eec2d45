"""Static-shape decode steps, one per batch bucket, replayed from CUDA graphs on a GPU.

A decode batch of n rows is padded up to the next bucket (1, 2, 4, ... max_batch)
with rows that write into a scratch KV slot and are dropped from the output. The
inputs are copied into per-bucket static buffers, so a captured graph replays on
new values without re-launching hundreds of small kernels. On the CPU the same
buffers and padding run eagerly: that is what the tests check.
"""

from __future__ import annotations

import torch


def buckets(max_batch: int) -> list[int]:
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


class DecodeGraphs:
    def __init__(self, model, max_batch: int, scratch_slot: int, capture: bool):
        self.model = model
        self.sizes = buckets(max_batch)
        self.scratch_slot = scratch_slot
        self.capture = capture  # CUDA graphs; False: eager replay of the same static buffers
        dev = model.device
        self.inputs = {b: {"tokens": torch.zeros(b, 1, dtype=torch.long, device=dev),
                           "start": torch.zeros(b, dtype=torch.long, device=dev),
                           "slots": torch.full((b,), scratch_slot, dtype=torch.long, device=dev),
                           "branch": torch.zeros(b, dtype=torch.long, device=dev)} for b in self.sizes}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def bucket(self, n: int) -> int:
        return next(b for b in self.sizes if b >= n)

    def _forward(self, buf: dict) -> torch.Tensor:
        return self.model(buf["tokens"], buf["start"], buf["slots"], buf["branch"])[:, 0]

    def _capture(self, b: int) -> None:
        buf = self.inputs[b]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up the kernels outside the capture
            for _ in range(2):
                self._forward(buf)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs[b] = self._forward(buf)
        self.graphs[b] = graph

    def run(self, tokens: list[int], start: list[int], slots: list[int], branch: list[int]) -> torch.Tensor:
        """One decode step for n rows -> (n, V) logits."""
        n = len(tokens)
        b = self.bucket(n)
        buf = self.inputs[b]
        pad = b - n
        buf["tokens"].copy_(torch.tensor([[t] for t in tokens] + [[0]] * pad))
        buf["start"].copy_(torch.tensor(start + [0] * pad))
        buf["slots"].copy_(torch.tensor(slots + [self.scratch_slot] * pad))
        buf["branch"].copy_(torch.tensor(branch + [0] * pad))
        if not self.capture:
            return self._forward(buf)[:n]
        if b not in self.graphs:
            self._capture(b)
        self.graphs[b].replay()
        return self.outputs[b][:n]
