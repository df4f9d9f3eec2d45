"""A transformers causal LM on a KV cache addressed by row, like the family model's.

``RowCache`` is a transformers ``Cache`` that owns preallocated
(slots, kv_heads, max_seq + 1, head_dim) keys and values per layer. The runner
tells it, before each forward, where the rows write (slot, positions) and what
they read: in a decode step row i reads cache row i over a span, in a prefill
each row reads its own slot. ``update`` writes the new keys and values and hands
back views of the cache; only a prefill of several rows gathers their slots
(keys its attention reads once anyway), and a decode step never copies.
Attention runs through ``attend`` (registered with transformers as
"branchserve"), which folds query groups instead of expanding the keys. The
mask is built by the runner, so nothing slides out of a window, and a prefill's
left padding writes only the spare last column of its row's slot.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from server.engine.model import attend

ATTENTION = "branchserve"


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    # query (B, H, L, hd); key/value (B, kv, Lk, hd) views of the cache; attention_mask (B, 1, L, Lk) bool, or
    # None for a forward without the runner (an embed job): causal over the input, which is right-padded
    L, Lk = query.shape[2], key.shape[2]
    if attention_mask is None:
        causal = torch.arange(Lk, device=query.device)[None, :] <= torch.arange(Lk - L, Lk, device=query.device)[:, None]
        mask = causal.expand(query.shape[0], L, Lk)
    else:
        mask = attention_mask[:, 0]
    out = attend(query.transpose(1, 2), key, value, mask, scale=scaling)
    B, L = out.shape[:2]
    return out.view(B, L, query.shape[1], query.shape[3]), None


AttentionInterface.register(ATTENTION, _attention)


class RowCache(Cache):
    def __init__(self, num_layers: int, slots: int, kv_heads: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__(layers=[])
        shape = (slots, kv_heads, max_seq + 1, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.slots: torch.Tensor | None = None  # (B,) where each row writes
        self.pos: torch.Tensor | None = None  # (B, L) the positions it writes
        self.read: tuple | None = None  # decode: (rows, span); prefill: (the rows' slots, end)
        self.decoding = False

    def __len__(self) -> int:
        return len(self.k)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # positions come from the runner (position_ids), never from here

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        # key_states (B, kv, L, hd) -> written as (B, L, kv, hd) at each row's slot and positions
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        kc[self.slots[:, None], :, self.pos] = key_states.transpose(1, 2).to(kc.dtype)
        vc[self.slots[:, None], :, self.pos] = value_states.transpose(1, 2).to(vc.dtype)
        if self.decoding:
            rows, span = self.read
            return kc[:rows, :, :span], vc[:rows, :, :span]
        slots, end = self.read
        if len(slots) == 1:
            return kc[slots[0]:slots[0] + 1, :, :end], vc[slots[0]:slots[0] + 1, :, :end]
        return kc[self.slots, :, :end], vc[self.slots, :, :end]
