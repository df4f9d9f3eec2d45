"""A transformers causal LM on the engine's paged KV cache and attention.

``PagedCache`` is a transformers ``Cache`` that owns the per-layer block tensors of
server/engine/kv_cache.py. The runner sets the step's ``StepBatch`` on it and passes the same batch to the
forward as the ``paged`` keyword, which transformers hands down to every attention call. ``update`` writes
the step's keys and values into their slots and returns the layer's whole cache; the registered attention
("branchserve") reads each sequence's own blocks from it. No mask is built: transformers skips mask creation
for an attention implementation it does not know, and the batch says what each query sees.

A forward without ``paged`` (an embed job, no cache) attends causally over its right-padded input.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from server.engine.kv_cache import BLOCK_SIZE, StepBatch, allocate, causal_attention, paged_attention, write

ATTENTION = "branchserve"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, paged: StepBatch | None = None,
               **kwargs):
    # query (B, H, L, hd). With ``paged``: B is 1, L the step's tokens, key/value the layer's block tensors.
    # Without: key/value (B, kv, L, hd) of this input only.
    B, H, L, hd = query.shape
    if paged is None:
        out = causal_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), scale=scaling)
        return out.view(B, L, H, hd), None
    out = paged_attention(query[0].transpose(0, 1), key, value, paged, scale=scaling)
    return out.view(1, L, H, hd), None


AttentionInterface.register(ATTENTION, _attention)


class PagedCache(Cache):
    def __init__(self, num_layers: int):
        super().__init__(layers=[])
        self.num_layers = num_layers
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.batch: StepBatch | None = None  # the step being run: where its keys and values go

    def allocate(self, num_blocks: int, kv_heads: int, head_dim: int, dtype, device) -> None:
        self.k, self.v = allocate(self.num_layers, num_blocks, kv_heads, head_dim, dtype, device, BLOCK_SIZE)

    def __len__(self) -> int:
        return self.num_layers

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come from the runner (position_ids), never from here

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # key_states (1, kv, T, hd) -> the step's slots; attention reads the layer's blocks
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        write(kc, vc, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1), self.batch)
        return kc, vc
