"""The paged KV cache: fixed-size blocks, a block table per sequence, and attention over a step's flat batch.

Memory goes by tokens, not by worst-case slots. Each layer's keys and values are one tensor of
(blocks, block_size, kv_heads, head_dim); a sequence owns the blocks its table lists, taken from the
``BlockPool`` as it grows and handed back when it leaves or is preempted.

A step is one forward over a flat batch of T tokens: every decoding sequence's one token first, then the
prompt chunks of the sequences still prefilling. ``StepBatch`` says, once per step, where each token's key
and value go (``slots``) and what each query reads. Attention is cut into *units* of one shape: a tile of
queries of one sequence (1 for a decode row, ``TILE`` for a prompt chunk) against a chunk of ``chunk`` of
its own key positions, gathered from its blocks. A unit whose keys all lie before its queries needs no
mask; the unit that holds the queries' own positions (the causal edge) is masked. A row reads its own
positions only, rounded up to a chunk, whatever its neighbours' lengths; a sequence with several chunks gets
one unit per chunk, and their partial results are merged by their log-sum-exps, as flash-decoding does.

The number of kernels a layer launches depends on which kinds of units a step has, never on how many rows
it has: a prefill of 16 rows issues the same calls as a prefill of one.

A compiled step (limits.compile: decode rows only) plans differently, for inductor: ``DecodeUnits`` and
``decode_attention``, where the gathers fuse into the products instead of copying each unit's keys. A decode
step replayed from a CUDA graph (limits.cuda_graphs, server/engine/graphs.py) has the same plan, padded to
its bucket; run eagerly, ``gathered_decode_attention`` copies its units' blocks and makes one fused call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BLOCK_SIZE = 16  # tokens per block, vLLM's default
TILE = 64  # prompt queries per attention unit
MAX_CHUNK = 256  # key positions per attention unit
SPLIT_BLOCKS = 16  # most blocks one unit of a compiled decode step reads; a longer row is split (decode_attention)
FLASH_ON_CPU = True  # the CPU's fused flash kernel (with log-sum-exp); False: the reference path every device has


NULL_BLOCK = 0  # the block a pool keeps back when asked (``reserved``): padding rows of captured steps write there


class BlockPool:
    """The free blocks of one model's cache. Host side only: the engine thread allocates, nothing else.

    ``reserved``: blocks from id 0 up that no sequence is ever given (1 when steps are replayed from CUDA
    graphs: their padding rows write their keys to ``NULL_BLOCK``)."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE, reserved: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.reserved = reserved
        self.free = list(range(num_blocks - 1, reserved - 1, -1))  # popped from the end: low ids first

    @property
    def usable(self) -> int:
        """Blocks sequences can hold."""
        return self.num_blocks - self.reserved

    @property
    def capacity(self) -> int:
        """Tokens the cache holds for sequences."""
        return self.usable * self.block_size

    @property
    def used(self) -> int:
        return self.usable - len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def grow(self, blocks: list[int], tokens: int) -> bool:
        """Extend a block table to hold ``tokens`` tokens; False (and nothing taken) when too few are free."""
        need = self.blocks_for(tokens) - len(blocks)
        if need > len(self.free):
            return False
        for _ in range(need):
            blocks.append(self.free.pop())
        return True

    def release(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))
        blocks.clear()


def allocate(num_layers: int, num_blocks: int, kv_heads: int, head_dim: int, dtype, device,
             block_size: int = BLOCK_SIZE) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Keys and values per layer, (blocks, block_size, kv_heads, head_dim). Zeros, not empty: a unit's
    padding reads some block's stale entries with weight 0, which must be finite."""
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
    for t in k + v:  # a compiled step's trace reads their sizes as constants (kv heads, block size)
        torch._dynamo.mark_static(t)
    return k, v


def kv_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def split_kv(budget: int, models: list[tuple[int, int]], block_size: int = BLOCK_SIZE) -> list[int]:
    """Blocks for each of ``models`` ((worst-case tokens, bytes per token)) sharing ``budget`` bytes on one
    device: an even split, none given more than its worst case (every sequence at full context), what that
    leaves going to the others. In the input's order."""
    order = sorted(range(len(models)), key=lambda i: models[i][0] * models[i][1])
    blocks = [0] * len(models)
    for k, i in enumerate(order):
        worst, per_token = models[i]
        share = budget // (len(order) - k)
        blocks[i] = max(0, min(share // (per_token * block_size), -(-worst // block_size)))
        budget -= blocks[i] * block_size * per_token
    return blocks


def parse_bytes(value) -> int:
    """``9GB``, ``512MiB``, ``1.5GB`` or a number of bytes -> bytes (GB and GiB both count 2**30, as vLLM's
    ``--kv-cache-memory`` and most users do)."""
    if isinstance(value, (int, float)):
        return int(value)
    text = str(value).strip().upper().replace(" ", "")
    for unit, scale in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 2**30), ("MB", 2**20),
                        ("KB", 2**10), ("G", 2**30), ("M", 2**20), ("K", 2**10), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[:-len(unit)]) * scale)
    return int(float(text))


@dataclass(frozen=True)
class BlockSparse:
    """A block-sparse causal pattern (Phi-3-small's): positions fall in blocks of ``block_size``; a query in
    block qb sees a key in block kb <= qb when kb is one of its ``local_blocks`` latest blocks (qb - kb <
    local_blocks), or when (kb + h * head_step + 1) is a multiple of ``vert_stride`` for its query head h (the
    "vertical" blocks; ``head_step`` 0 gives every head the same ones). Causal within a block, as everywhere."""

    block_size: int
    local_blocks: int
    vert_stride: int
    head_step: int = 0

    @classmethod
    def for_heads(cls, block_size: int, local_blocks: int, vert_stride: int, heads: int, homo_heads: bool):
        """Phi-3-small's head offset: each head's vertical blocks shift by max(1, vert_stride // heads)."""
        return cls(block_size, local_blocks, vert_stride, 0 if homo_heads else max(1, vert_stride // heads))

    def sees(self, q_first: int, q_last: int, k_start: int, k_end: int) -> str:
        """What queries at positions q_first..q_last see of keys k_start..k_end-1, all of which precede them:
        "all" (every key in a local block of every query: no mask needed), "none" (no key in a local block of
        any query and, the pattern being the same for all heads, none in a vertical block: nothing to
        compute), or "some" (masked per head)."""
        bs = self.block_size
        if q_last // bs - k_start // bs < self.local_blocks:
            return "all"
        first, last = k_start // bs, (k_end - 1) // bs
        if (self.head_step == 0 and q_first // bs - last >= self.local_blocks
                and not any((kb + 1) % self.vert_stride == 0 for kb in range(first, last + 1))):
            return "none"
        return "some"

    def allows(self, q_pos: torch.Tensor, k_pos: torch.Tensor, heads: int) -> torch.Tensor:
        """q_pos (..., Q), k_pos (..., K) -> (..., heads, Q, K): whether the pattern lets each head's query see
        each key (causality aside)."""
        qb = torch.div(q_pos, self.block_size, rounding_mode="floor")[..., None, :, None]
        kb = torch.div(k_pos, self.block_size, rounding_mode="floor")[..., None, None, :]
        h = torch.arange(heads, device=q_pos.device).view(heads, 1, 1)
        vertical = (kb + h * self.head_step + 1) % self.vert_stride == 0  # (..., heads, 1, K)
        return (qb - kb < self.local_blocks) | vertical


@dataclass
class Units:
    """Same-shaped attention units of one kind (decode or prefill), masked or not."""

    tile: torch.Tensor | None  # (U,) the query tile of each unit; None: unit i is tile i
    blocks: torch.Tensor  # (U, chunk // block_size) the blocks whose keys it reads
    mask: torch.Tensor | None  # (U, 1 or kv, G * Qt or G, chunk) additive, in the model's dtype; None: all visible


@dataclass
class Kind:
    """Decode rows (one query per tile) or prompt chunks (``TILE`` queries per tile) of a step."""

    tiles: int
    queries: int  # per tile
    q_index: torch.Tensor | None  # (tiles, queries) flat token of each query; None: tiles are tokens 0..tiles-1
    real: torch.Tensor | None  # (tokens,) the tile-major query slots that are real tokens, in token order
    unit_tile: torch.Tensor | None  # (U,) each unit's tile, masked units then unmasked ones; None: one unit per
    # tile, in order (nothing to merge)
    empty: torch.Tensor | None  # (U_masked, 1 or kv, G * queries): queries of a masked unit that see none of its keys
    parts: list[Units]  # the masked units first, then the unmasked ones


@dataclass
class DecodeUnits:
    """A compiled decode step's attention plan: each row's blocks in units of at most ``SPLIT_BLOCKS`` blocks,
    all units as wide as the widest (short rows padded with block 0, whose keys they mask out)."""

    blocks: torch.Tensor  # (U, C) the blocks each unit reads
    row: torch.Tensor  # (U,) the row (the flat token) it belongs to
    keys: torch.Tensor  # (U,) how many of its C * block_size keys are the row's: the rest are padding

    @classmethod
    def of(cls, rows: list[tuple[list[int], int, int]], block_size: int, device: torch.device) -> "DecodeUnits":
        last = np.fromiter((start + n - 1 for _, start, n in rows), np.int64, len(rows))  # each row's last key
        width = min(int(last.max()) // block_size + 1, SPLIT_BLOCKS)
        blocks, row, keys = decode_units([table for table, _, _ in rows], last, width, block_size)
        return cls(_device(blocks.reshape(-1, width), device), _device(row, device), _device(keys, device))


def decode_units(tables: list[list[int]], last: np.ndarray, width: int, block_size: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode rows whose keys are positions 0..last[r] of block table tables[r] -> their attention units of
    ``width`` blocks, row by row: the blocks each reads (U * width,), padded with block 0 (``NULL_BLOCK``), its
    row (U,) and how many of its keys are the row's (U,). With numpy: 32 rows at 8k tokens are 1024 units,
    which a Python loop took 3 ms a step to list."""
    n = len(tables)
    spans = last // block_size + 1  # blocks holding each row's keys
    per_row = -(-spans // width)  # units of each row
    most = int(per_row.max()) if n else 1
    padded = np.full((n, most * width), NULL_BLOCK, np.int64)
    for r, table in enumerate(tables):
        padded[r, :spans[r]] = table[:spans[r]]
    unit = np.arange(most)
    real = unit[None, :] < per_row[:, None]  # (n, most): the units each row has, row-major
    row = np.repeat(np.arange(n), per_row)
    first = np.broadcast_to(unit, real.shape)[real] * width * block_size  # each unit's first key
    keys = np.minimum(width * block_size, last[row] + 1 - first)
    return padded.reshape(n, most, width)[real].reshape(-1), row, keys


class StepBatch:
    """Everything a layer's attention needs for one step's flat batch, built once per step from the host's
    block tables, and moved to the device in one go (pinned, non-blocking on CUDA).

    ``rows``: (block table, first position, tokens) per sequence, its ``decode_rows`` decode rows (one token
    each) first.
    """

    def __init__(self, rows: list[tuple[list[int], int, int]], decode_rows: int, block_size: int, heads: int,
                 kv_heads: int, dtype: torch.dtype, device: torch.device, pattern: BlockSparse | None = None,
                 lengths: list[int] | None = None, compiled: bool = False):
        self.rows, self.decode_rows, self.heads, self.kv_heads = rows, decode_rows, heads, kv_heads
        self.lengths = lengths  # per row, its sequence's known length (prompt and output), when the runner gives it
        self.pattern = pattern
        self._sparse: dict[BlockSparse, StepBatch] = {}
        self.block_size = block_size
        self.group = heads // kv_heads
        self.dtype = dtype
        self.device = device
        slots = [table[p // block_size] * block_size + p % block_size
                 for table, start, n in rows for p in range(start, start + n)]
        self.slots = _device(slots, device)
        self.positions = _device([p for _, start, n in rows for p in range(start, start + n)], device)
        self.kinds: list[Kind] = []
        self.units: DecodeUnits | None = None
        if compiled:  # a compiled step of decode rows only, no block-sparse pattern: see decode_attention
            assert decode_rows == len(rows) and pattern is None
            self.units = DecodeUnits.of(rows, block_size, device)
            return
        decode, prefill = rows[:decode_rows], rows[decode_rows:]
        longest = max((s + n for _, s, n in decode), default=1)
        # A decode row's keys, rounded up to a chunk: short rows read little, whatever a long row beside them reads.
        dchunk = min(MAX_CHUNK, max(4 * block_size, 1 << (longest - 1).bit_length()))
        if decode:
            self.kinds.append(self._kind(decode, 0, 1, dchunk) if pattern else self._decode_kind(decode, dchunk))
        if prefill:
            self.kinds.append(self._kind(prefill, decode_rows, TILE, MAX_CHUNK))

    @classmethod
    def of_units(cls, slots: torch.Tensor, positions: torch.Tensor, units: DecodeUnits) -> "StepBatch":
        """A decode step given by device tensors that already hold its plan (a captured step's static inputs)."""
        batch = cls.__new__(cls)
        batch.slots, batch.positions, batch.units, batch.kinds = slots, positions, units, []
        batch.rows, batch.lengths, batch.pattern = None, None, None
        return batch

    def sparse(self, pattern: BlockSparse) -> "StepBatch":
        """The same step under a block-sparse pattern (built once per step, shared by the layers that use it): a
        unit whose keys the pattern shows whole stays unmasked, one it hides from every head is skipped, the
        others are masked per head by the pattern as well as causally."""
        if pattern not in self._sparse:
            self._sparse[pattern] = StepBatch(self.rows, self.decode_rows, self.block_size, self.heads, self.kv_heads,
                                              self.dtype, self.device, pattern, self.lengths)
        return self._sparse[pattern]

    def _decode_kind(self, rows, chunk: int) -> Kind:
        """``_kind`` for decode rows without a block-sparse pattern, planned by ``decode_units`` (32 rows at 8k
        tokens: a Python loop over their chunks took 3 ms a step): each row's last unit, the chunk holding its
        position, is masked; the units before it are not."""
        n, dev = len(rows), self.device
        pos = np.fromiter((start for _, start, _ in rows), np.int64, n)
        blocks, row, keys = decode_units([table for table, _, _ in rows], pos, chunk // self.block_size,
                                         self.block_size)
        blocks = blocks.reshape(len(row), -1)
        edge = np.cumsum(pos // chunk + 1) - 1  # each row's last unit
        full = np.ones(len(row), bool)
        full[edge] = False
        in_order = not full.any()
        kind = Kind(n, 1, None, None, None if in_order else _device(np.concatenate([row[edge], row[full]]), dev),
                    None, [])
        hidden = torch.arange(chunk, device=dev)[None, :] >= _device(keys[edge], dev)[:, None]  # (n, chunk)
        mask = torch.zeros(hidden.shape, dtype=self.dtype, device=dev).masked_fill_(hidden, float("-inf"))
        kind.parts.append(Units(_device(row[edge], dev), _device(blocks[edge], dev), mask[:, None, None]))
        if not in_order:
            kind.parts.append(Units(_device(row[full], dev), _device(blocks[full], dev), None))
        return kind

    def _kind(self, rows, first_token: int, tile: int, chunk: int) -> Kind:
        bs, per_chunk = self.block_size, chunk // self.block_size
        q_index, real, tile_pos = [], [], []
        diag, full = [], []  # (tile, key start, blocks)
        token = first_token
        for table, start, n in rows:
            for a in range(start, start + n, tile):
                b = min(a + tile, start + n)  # this tile's queries are positions a..b-1
                t = len(tile_pos)
                pos = list(range(a, b)) + [b - 1] * (tile - (b - a))
                tile_pos.append(pos)
                idx = [token + p - start for p in pos]
                q_index.append(idx)
                real.extend(t * tile + i for i in range(b - a))
                for c0 in range(0, b, chunk):
                    below = c0 + chunk <= a  # every key before every query: causally all visible
                    seen = "all" if self.pattern is None else self.pattern.sees(a, b - 1, c0, c0 + chunk)
                    if below and seen == "none":
                        continue  # the pattern hides these keys from every head's queries
                    blocks = table[c0 // bs:c0 // bs + per_chunk]
                    blocks = blocks + [0] * (per_chunk - len(blocks))
                    (full if below and seen == "all" else diag).append((t, c0, blocks))
            token += n
        tiles = len(tile_pos)
        in_order = not full and [u[0] for u in diag] == list(range(tiles))
        dev = self.device
        decoding = tile == 1  # decode rows are the batch's first tokens, one per tile, in order
        kind = Kind(tiles, tile, None if decoding else _device(q_index, dev),
                    None if decoding else _device(real, dev),
                    None if in_order else _device([u[0] for u in diag + full], dev), None, [])
        if diag:
            qpos = _device([tile_pos[u[0]] for u in diag], dev)  # (U, Qt)
            keys = _device([u[1] for u in diag], dev)[:, None] + torch.arange(chunk, device=dev)  # (U, chunk)
            visible = keys[:, None, :] <= qpos[:, :, None]  # (U, Qt, chunk)
            if self.pattern is not None:  # per query head: (U, kv, G * Qt, chunk), rows head-group-major
                U, kv = len(diag), self.heads // self.group
                visible = visible[:, None] & self.pattern.allows(qpos, keys, self.heads)  # (U, H, Qt, chunk)
                visible = visible.reshape(U, kv, self.group * tile, chunk)
                if not in_order:
                    kind.empty = ~visible.any(-1)
                mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev).masked_fill_(~visible, float("-inf"))
            else:
                if not decoding:  # query rows are head-group-major: row g * Qt + i is query i of head g
                    visible = visible[:, None].expand(-1, self.group, -1, -1).reshape(len(diag), self.group * tile,
                                                                                       chunk)
                    if not in_order:  # a query before a masked unit's first key sees none of it
                        kind.empty = ~visible.any(-1)[:, None]
                mask = torch.zeros(visible.shape, dtype=self.dtype, device=dev).masked_fill_(~visible, float("-inf"))
                mask = mask[:, None]  # decode: (U, 1, 1, chunk), broadcast over the head group
            kind.parts.append(Units(_device([u[0] for u in diag], dev), _device([u[2] for u in diag], dev), mask))
        if full:
            kind.parts.append(Units(_device([u[0] for u in full], dev), _device([u[2] for u in full], dev), None))
        return kind


def _device(values, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _unit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (U, kv, R, hd) against k/v (U, kv, C, hd) -> (out (U, kv, R, hd), log-sum-exp (U, kv, R) fp32)."""
    if q.device.type == "cpu" and FLASH_ON_CPU:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                               scale=scale)
        return out, lse.float()
    s = (q @ k.transpose(-1, -2)).float() * scale
    if mask is not None:
        s = s + mask
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.where(torch.isinf(lse), 0.0, lse)  # a query that sees none of the unit's keys: out 0, not NaN
    return (torch.exp(s - finite[..., None]).to(v.dtype) @ v), lse


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: StepBatch,
                    scale: float | None = None) -> torch.Tensor:
    """q (T, H, hd) for the step's flat tokens, whose keys and values are already in the cache ->
    (T, H * hd). Grouped query heads are folded into the query rows, so keys are never repeated."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    if batch.units is not None:  # decode rows only, planned in units of one width: compiled, or captured
        if torch.compiler.is_compiling():
            return decode_attention(q, k_cache, v_cache, batch.units, scale)
        return gathered_decode_attention(q, k_cache, v_cache, batch.units, scale)
    return attend_units(q, k_cache, v_cache, batch.kinds, scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, units: DecodeUnits,
                     scale: float) -> torch.Tensor:
    """Attention of a compiled step whose rows all decode: q (R, H, hd) -> (R, H * hd).

    Written for inductor to fuse: each unit's scores are a product summed over the head dimension and its
    output one summed over its keys, so the gather of its blocks (``k_cache[blocks]``) becomes the loads of
    those loops and no unit's keys are ever copied; the padded width costs arithmetic on block 0, not
    memory traffic. The units' partial softmaxes merge per row by their maxima and sums (flash-decoding's
    split). Eagerly it materializes every product: steps that run eagerly use ``attend_units``."""
    R, H, hd = q.shape
    block_size, kv = k_cache.shape[1], k_cache.shape[2]
    U, width = units.blocks.shape
    span = width * block_size
    # The queries are stored once before the products read them: left fused, whatever computed them (the
    # rotary embedding, its cos and sin) would be recomputed for every key.
    qf = q.reshape(R * H, hd).float()
    qf = torch.zeros_like(qf).index_copy(0, torch.arange(R * H, device=q.device), qf)
    qu = qf.view(R, kv, H // kv, hd)[units.row][:, None]  # (U, 1, kv, g, hd)
    k = k_cache[units.blocks].view(U, span, kv, 1, hd)
    s = (qu * k).sum(-1) * scale  # (U, span, kv, g), fp32
    padding = torch.arange(span, device=q.device)[None, :] >= units.keys[:, None]  # (U, span)
    s = s.masked_fill(padding[:, :, None, None], float("-inf"))
    top = s.amax(1)  # (U, kv, g): -inf only for a unit of no keys (padding of a captured step's plan)
    p = torch.exp(s - torch.where(torch.isinf(top), 0.0, top)[:, None])
    out = (p[..., None] * v_cache[units.blocks].view(U, span, kv, 1, hd)).sum(1)  # (U, kv, g, hd)
    total = p.sum(1)
    # merge the units of each row: rescale each to the row's largest maximum, then add
    index = units.row.view(U, 1, 1).expand_as(top)
    best = torch.full((R,) + top.shape[1:], float("-inf"), device=q.device).scatter_reduce(0, index, top, "amax")
    w = torch.exp(top - best[units.row])
    total = torch.zeros_like(best).index_add(0, units.row, total * w)
    out = torch.zeros((R,) + out.shape[1:], device=q.device).index_add(0, units.row, out * w[..., None])
    return (out / total[..., None]).to(q.dtype).reshape(R, H * hd)


def gathered_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, units: DecodeUnits,
                              scale: float) -> torch.Tensor:
    """``decode_attention``'s plan run eagerly (a step replayed from a CUDA graph, whose shapes are its
    plan's): each unit's blocks gathered, one fused attention call for all units, the partial results merged
    per row by their log-sum-exps. A unit of no keys (padding) adds nothing. q (R, H, hd) -> (R, H * hd)."""
    R, H, hd = q.shape
    block_size, kv = k_cache.shape[1], k_cache.shape[2]
    U, width = units.blocks.shape
    span = width * block_size
    blocks = units.blocks.view(-1)
    keys = k_cache.index_select(0, blocks).view(U, span, kv, hd).transpose(1, 2)
    values = v_cache.index_select(0, blocks).view(U, span, kv, hd).transpose(1, 2)
    hidden = torch.arange(span, device=q.device)[None, :] >= units.keys[:, None]  # (U, span)
    mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
    qu = q.contiguous().view(R, kv, H // kv, hd)[units.row]  # (U, kv, g, hd)
    out, lse = _unit_attention(qu, keys, values, mask[:, None, None], scale)
    empty = (units.keys == 0).view(U, 1, 1)
    out = out.masked_fill(empty[..., None], 0.0)
    lse = lse.masked_fill(empty, float("-inf"))
    return _merge(out, lse, units.row, R).to(q.dtype).reshape(R, H * hd)


def _merge(out: torch.Tensor, lse: torch.Tensor, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Partial attention results of units out (U, ..., hd) with log-sum-exps lse (U, ...), unit i owned by
    query tile owner[i] -> each tile's whole result (n, ..., hd), fp32. Every tile has a unit that sees a key."""
    best = lse.new_full((n,) + lse.shape[1:], float("-inf")).scatter_reduce_(
        0, owner.view((-1,) + (1,) * (lse.dim() - 1)).expand_as(lse), lse, "amax")
    w = torch.exp(lse - best[owner])
    total = torch.zeros_like(best).index_add_(0, owner, w)
    merged = torch.zeros((n,) + out.shape[1:], dtype=torch.float32, device=out.device).index_add_(
        0, owner, out.float() * w[..., None])
    return merged / total[..., None]


def write(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch) -> None:
    """The step's new keys and values (T, kv, hd) into their slots."""
    kv, hd = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kv, hd).index_copy_(0, batch.slots, k.to(k_cache.dtype))
    v_cache.view(-1, kv, hd).index_copy_(0, batch.slots, v.to(v_cache.dtype))


def attend_units(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kinds: list[Kind],
                 scale: float) -> torch.Tensor:
    """The attention op's body: each kind's units, one fused call per part, merged per tile when a tile has
    several."""
    q = q.contiguous()  # a transformers model hands q over as (heads, T) transposed; the CPU kernel misread
    T, H, hd = q.shape  # such a view for several decode rows (SmolLM2: wrong tokens from the second on)
    block_size, kv = k_cache.shape[1], k_cache.shape[2]
    g = H // kv
    outs = []
    for kind in kinds:
        Qt = kind.queries
        if Qt == 1:
            qt = q[:kind.tiles].view(kind.tiles, kv, g, hd)
        else:
            qt = q[kind.q_index].view(kind.tiles, Qt, kv, g, hd).permute(0, 2, 3, 1, 4).reshape(kind.tiles, kv, g * Qt, hd)
        results = []
        for part in kind.parts:
            qu = qt if kind.unit_tile is None else qt[part.tile]
            U, chunk = part.blocks.shape[0], part.blocks.shape[1] * block_size
            blocks = part.blocks.view(-1)  # index_select copies whole blocks: 3x aten.index's speed here
            keys = k_cache.index_select(0, blocks).view(U, chunk, kv, hd).transpose(1, 2)
            values = v_cache.index_select(0, blocks).view(U, chunk, kv, hd).transpose(1, 2)
            results.append(_unit_attention(qu, keys, values, part.mask, scale))
        if kind.unit_tile is None:
            o = results[0][0]
        else:  # several units per tile: merge their partial softmaxes by log-sum-exp
            o = torch.cat([r[0] for r in results])
            lse = torch.cat([r[1] for r in results])
            if kind.empty is not None:
                lse[:kind.empty.shape[0]].masked_fill_(kind.empty, float("-inf"))
            o = _merge(o, lse, kind.unit_tile, kind.tiles).to(q.dtype)
        if Qt == 1:
            outs.append(o.reshape(kind.tiles, H * hd))
        else:
            o = o.view(kind.tiles, kv, g, Qt, hd).permute(0, 3, 1, 2, 4).reshape(kind.tiles * Qt, H * hd)
            outs.append(o[kind.real])
    return outs[0] if len(outs) == 1 else torch.cat(outs)




def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     pattern: BlockSparse | None = None) -> torch.Tensor:
    """A forward without the cache (an embed job): q (B, L, H, hd), k/v (B, L, kv, hd), right-padded rows
    attend causally to their own input (under ``pattern`` when given) -> (B, L, H * hd)."""
    B, L, H, hd = q.shape
    kv = k.shape[2]
    g = H // kv
    qf = q.view(B, L, kv, g, hd).permute(0, 2, 3, 1, 4).reshape(B, kv, g * L, hd)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    if pattern is None:
        mask = causal[None, None, None].expand(1, 1, g, L, L).reshape(1, 1, g * L, L)
    else:
        pos = torch.arange(L, device=q.device)
        mask = (causal & pattern.allows(pos, pos, H)).reshape(1, kv, g * L, L)
    out = F.scaled_dot_product_attention(qf, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return out.view(B, kv, g, L, hd).permute(0, 3, 1, 2, 4).reshape(B, L, H * hd)

