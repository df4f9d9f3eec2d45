"""The family model: one Llama-family forward that serves every branch of an artifact at once.

Read it top to bottom like gpt-fast's model.py. The one new idea is the branch
id carried by every row of the batch: each ``BranchLinear`` (q/k/v together,
o, gate/up together, down) multiplies the batch once by one matrix holding the
shared trunks and every branch's V rows, masks the V part so that each row only
sees its own branch's residual, adds it back through U, and scales by s_branch:

    [t | h] = x [T | Vcat]^T,  y = s[b] * (t + (h * mask[b]) Ucat^T)

A batch whose rows share one branch reads only that branch's V and U rows.

Per-branch embeddings, norms and lm_heads are gathered per row. Residuals are
never densified. The KV cache is preallocated per slot; a row names its slot
and the position of its first token, so rows at different positions share one
decode step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compression.artifact import Artifact
from compression.errors import UserError

# The linear layers of a block, grouped by the input they read: each group is one BranchLinear.
LINEARS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass
class FamilyConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    tie_word_embeddings: bool
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "FamilyConfig":
        if cfg.get("model_type") != "llama":
            raise UserError(f"the family model serves Llama checkpoints, not {cfg.get('model_type')!r}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UserError("the family model does not support attention or MLP biases yet")
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        )


def rope_inv_freq(cfg: FamilyConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq.float()
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return (inv_freq / scaling["factor"]).float()
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled).float()
    raise UserError(f"rope scaling {kind!r} is not supported by the family model (default, linear, llama3 are)")


def kv_bucket(length: int, max_seq: int, smallest: int = 256) -> int:
    """The cached positions a static decode step attends over for rows of up to ``length`` tokens: a power
    of two, at least ``smallest`` and at most ``max_seq``. Few spans mean few CUDA graphs, and short
    contexts do not read the whole cache."""
    span = smallest
    while span < length:
        span *= 2
    return min(span, max_seq)


def single_branch(branches: list[int]) -> int | None:
    """The branch of every row when all rows share one (a batch that reads one residual), else None."""
    return branches[0] if all(b == branches[0] for b in branches) else None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, L, heads, hd); cos/sin: (B, L, 1, hd). Half-split rotation, as HF Llama checkpoints expect.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass
class Rows:
    """Per-forward facts about the batch that every layer needs."""

    branch: torch.Tensor  # (B,) branch index of each row
    single: int | None  # the branch index when every row has the same one
    pos: torch.Tensor  # (B, L) absolute positions
    slots: torch.Tensor  # (B,) KV-cache slot of each row
    mask: torch.Tensor  # (B, 1, L, Lk) attention mask over the cached keys
    cos: torch.Tensor
    sin: torch.Tensor
    present: list[int] | None = None  # the branches among the rows, when the host knows them


class Member(NamedTuple):
    """One linear layer of a family: its trunk and, per branch, its scale and low-rank residual factors."""

    trunk: torch.Tensor  # (out, in)
    scales: list[float]
    us: list[torch.Tensor | None]  # (out, r) per branch, None: no residual
    vs: list[torch.Tensor | None]  # (r, in)


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


class BranchLinear(nn.Module):
    """Linear layers that read one input (q/k/v, gate/up, or just one); member j's weight for branch b is
    s_j[b] * (T_j + U_jb V_jb).

    One matrix holds every member's trunk and then every residual's V rows (member-major, branch-minor,
    each block padded with zero rows to a multiple of ``rank_multiple``), so a mixed batch reads x once:

        z = x [T_1 .. T_m | V]^T,  h = z[:, O:] * mask[b],  y_j = s_j[b] * (z_j + h_j U_j^T)

    A batch of one branch multiplies by the trunk rows and by that branch's V rows only.
    """

    def __init__(self, members: list[Member], rank_multiple: int = 1):
        super().__init__()
        self.out_spans: list[tuple[int, int]] = []  # (first output column in z, width) of each member
        self.h_spans: list[tuple[int, int]] = []  # (first column in h, width) of each member's residual block
        self.spans: list[list[tuple[int, int]]] = []  # per member, per branch: (first column in h, padded rank)
        self.scale_list = [[float(s) for s in m.scales] for m in members]  # the single-branch path: Python floats
        v_blocks, owner, offset = [], [], 0
        for j, m in enumerate(members):
            self.out_spans.append((sum(w for _, w in self.out_spans), m.trunk.shape[0]))
            start, uts, spans = offset, [], []
            for b, (u, v) in enumerate(zip(m.us, m.vs)):
                r = 0 if u is None else u.shape[1]
                padded = -(-r // rank_multiple) * rank_multiple
                if padded:
                    v_blocks.append(_pad_rows(v, padded))
                    uts.append(_pad_rows(u.T, padded))
                    owner.append(torch.full((padded,), b))
                spans.append((offset, padded))
                offset += padded
            self.spans.append(spans)
            self.h_spans.append((start, offset - start))
            if uts:
                self.register_buffer(f"UT{j}", torch.cat(uts).contiguous(), persistent=False)  # (R_j, out_j)
        self.trunk_rows = sum(w for _, w in self.out_spans)
        self.rank = offset
        self.weight = nn.Parameter(torch.cat([m.trunk for m in members] + v_blocks), requires_grad=False)
        self.register_buffer("scales", torch.tensor(self.scale_list, dtype=self.weight.dtype,
                                                    device=self.weight.device), persistent=False)
        if offset:
            self.register_buffer("owner", torch.cat(owner).to(self.weight.device), persistent=False)  # (R,)

    @property
    def trunk(self) -> torch.Tensor:
        return self.weight[:self.trunk_rows]

    def _ut(self, j: int) -> torch.Tensor:
        return getattr(self, f"UT{j}")

    def forward(self, x: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in)
        O, outs = self.trunk_rows, []
        if rows.single is not None:
            b = rows.single
            t = F.linear(x2, self.trunk)
            for j, (o0, width) in enumerate(self.out_spans):
                y = t[:, o0:o0 + width]
                off, r = self.spans[j][b]
                if r:
                    h = F.linear(x2, self.weight[O + off:O + off + r])
                    start = off - self.h_spans[j][0]
                    y = torch.addmm(y, h, self._ut(j)[start:start + r])
                outs.append((y * self.scale_list[j][b]).view(*lead, width))
            return outs[0] if len(outs) == 1 else outs
        per_row = (-1,) + (1,) * (x.dim() - 1)  # a row's value broadcast over its tokens and columns
        z = F.linear(x, self.weight)  # (B, [L,] O + R)
        if self.rank:
            h = (z[..., O:] * (self.owner == rows.branch.view(per_row))).reshape(-1, self.rank)
        z = z.reshape(-1, z.shape[-1])
        scales = self.scales[:, rows.branch].view(len(self.out_spans), *per_row)  # (m, B, [1,] 1)
        for j, (o0, width) in enumerate(self.out_spans):
            y = z[:, o0:o0 + width]
            h0, r = self.h_spans[j]
            if r:
                y = torch.addmm(y, h[:, h0:h0 + r], self._ut(j))
            outs.append(y.view(*lead, width) * scales[j])
        return outs[0] if len(outs) == 1 else outs

    def read_bytes(self, single: int | None) -> int:
        """Bytes of weight one forward reads: the trunk and one branch's residual, or every residual (a mix)."""
        n_in, size = self.weight.shape[1], self.weight.element_size()
        if single is None:
            return (self.weight.numel() + sum(self._ut(j).numel() for j, (_, r) in enumerate(self.h_spans) if r)) * size
        residual = sum(self.spans[j][single][1] * (n_in + width) for j, (_, width) in enumerate(self.out_spans))
        return (self.trunk_rows * n_in + residual) * size

    def lookup(self, tokens: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Rows ``tokens`` (B, L) of each row's branch weight (a compressed embedding; one member): (B, L, in)."""
        O = self.trunk_rows
        x = self.weight[:O][tokens]
        if rows.single is not None:
            off, r = self.spans[0][rows.single]
            if r:
                x = x + self.UT0[off:off + r].T[tokens] @ self.weight[O + off:O + off + r]
            return x * self.scale_list[0][rows.single]
        if self.rank:
            u = self.UT0.T[tokens] * (self.owner == rows.branch[:, None, None])  # (B, L, R)
            x = x + u @ self.weight[O:]
        return x * self.scales[0][rows.branch][:, None, None]


class PerBranch(nn.Module):
    """A stack of per-branch tensors (norm weights, embeddings), gathered per row; one tensor: shared by all."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.shared = len(tensors) == 1
        self.weight = nn.Parameter(torch.stack(tensors), requires_grad=False)

    def select(self, branch: torch.Tensor) -> torch.Tensor:
        return self.weight[0] if self.shared else self.weight[branch]

    def read_bytes(self, present: int) -> int:
        """Bytes one pass as an lm_head reads for rows of ``present`` branches: each of their heads once."""
        return (1 if self.shared else present) * self.weight[0].numel() * self.weight.element_size()

    def lookup(self, tokens: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Embedding rows: tokens (B, L) of each row's branch -> (B, L, H), without copying whole tables."""
        if self.shared:
            return self.weight[0][tokens]
        n, vocab, hidden = self.weight.shape
        return self.weight.view(n * vocab, hidden)[rows.branch[:, None] * vocab + tokens]

    def __call__(self, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        """As an lm_head: each present branch's head reads its rows only, one pass over each head's bytes."""
        if self.shared:
            return F.linear(x, self.weight[0])
        if rows.single is not None:
            return F.linear(x, self.weight[rows.single])
        out = torch.empty(*x.shape[:-1], self.weight.shape[1], dtype=x.dtype, device=x.device)
        for b in rows.present if rows.present is not None else rows.branch.unique().tolist():
            idx = (rows.branch == b).nonzero().squeeze(1)
            out[idx] = F.linear(x[idx], self.weight[b])
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # weight: (H,) or (B, H) per row
    if weight.dim() == 2:
        weight = weight[:, None, :]
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class Block(nn.Module):
    def __init__(self, cfg: FamilyConfig, linears: dict[str, BranchLinear], norms: dict[str, PerBranch]):
        super().__init__()
        self.cfg = cfg
        self.qkv, self.o = linears["qkv"], linears["o"]  # q, k and v read one input: one fused matrix
        self.gate_up, self.down = linears["gate_up"], linears["down"]
        self.attn_norm, self.mlp_norm = norms["input_layernorm"], norms["post_attention_layernorm"]

    def attention(self, x: torch.Tensor, rows: Rows, k_cache: torch.Tensor, v_cache: torch.Tensor):
        cfg = self.cfg
        B, L, _ = x.shape
        q, k, v = self.qkv(x, rows)
        q = q.view(B, L, cfg.num_heads, cfg.head_dim)
        k = k.view(B, L, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(B, L, cfg.num_kv_heads, cfg.head_dim)
        q, k = apply_rope(q, rows.cos, rows.sin), apply_rope(k, rows.cos, rows.sin)
        if k_cache is None:  # a one-off forward (router embeddings): attend to this input only
            keys, values = k.transpose(1, 2), v.transpose(1, 2)
        else:
            k_cache[rows.slots[:, None], rows.pos] = k.to(k_cache.dtype)
            v_cache[rows.slots[:, None], rows.pos] = v.to(v_cache.dtype)
            Lk = rows.mask.shape[-1]
            keys = k_cache[:, :Lk].index_select(0, rows.slots).transpose(1, 2)  # (B, kv_heads, Lk, hd)
            values = v_cache[:, :Lk].index_select(0, rows.slots).transpose(1, 2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=rows.mask, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(B, L, -1), rows)

    def forward(self, x, rows: Rows, k_cache, v_cache):
        eps = self.cfg.rms_norm_eps
        x = x + self.attention(rms_norm(x, self.attn_norm.select(rows.branch), eps), rows, k_cache, v_cache)
        h = rms_norm(x, self.mlp_norm.select(rows.branch), eps)
        gate, up = self.gate_up(h, rows)
        return x + self.down(F.silu(gate) * up, rows)


class FamilyModel(nn.Module):
    def __init__(self, cfg: FamilyConfig, branches: list[str], blocks: list[Block], embed: PerBranch | BranchLinear,
                 norm: PerBranch, heads: PerBranch | BranchLinear | None):
        super().__init__()
        self.cfg = cfg
        self.branches = branches
        self.blocks = nn.ModuleList(blocks)
        # Embeddings and heads are per branch, or trunk + residual like the layers (compress --compress-embeddings).
        self.embed, self.norm = embed, norm
        self.heads = heads  # None: tied to the embeddings
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.static = False  # see allocate_cache
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def allocate_cache(self, slots: int, max_seq: int, static: bool = False) -> None:
        """``static``: decode steps attend over a span of the cache given by the caller and never read
        shapes back to the host, so that they can be captured as CUDA graphs."""
        self.static = static
        cfg = self.cfg
        shape = (slots, max_seq, cfg.num_kv_heads, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.blocks]
        self.max_seq = max_seq

    def _rows(self, branch: torch.Tensor, start: torch.Tensor, slots: torch.Tensor | None, L: int,
              single: int | None | str = "find", kv_len: int | None = None) -> Rows:
        pos = start[:, None] + torch.arange(L, device=start.device)  # (B, L)
        if slots is not None:
            # Padding past the cache's end (right-padded prefill rows) is written onto its last entry.
            pos = pos.clamp(max=self.max_seq - 1)
        static = slots is not None and L == 1 and self.static
        Lk = kv_len or (self.max_seq if static else int(pos.max()) + 1)
        mask = torch.arange(Lk, device=start.device)[None, None, :] <= pos[:, :, None]  # (B, L, Lk)
        freqs = pos[..., None].float() * self.inv_freq  # (B, L, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        if single == "find":  # reads the branch ids back from the device; callers that know them say so
            single = None if static else (int(branch[0]) if bool((branch == branch[0]).all()) else None)
        return Rows(branch, single, pos, slots, mask[:, None], emb.cos().to(self.dtype), emb.sin().to(self.dtype))

    def weight_bytes(self) -> int:
        """Bytes of every weight and buffer the model holds (each storage once), without the KV cache."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    def step_read_bytes(self, branches: list[int], context: list[int]) -> int:
        """Bytes one decode step must read from memory: the weights its rows' branches use, each once, and
        each row's cached keys and values (``context`` tokens per row; a static step reads every row's
        cache up to the longest row's span, see kv_bucket). Norms and the embedding rows are left out:
        they are under 0.1 % at every shape."""
        single = single_branch(branches)
        total = 0
        for block in self.blocks:
            total += sum(m.read_bytes(single) for m in (block.qkv, block.o, block.gate_up, block.down))
        head = self.heads or self.embed
        total += head.read_bytes(single) if isinstance(head, BranchLinear) else head.read_bytes(len(set(branches)))
        cfg = self.cfg
        per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        tokens = len(context) * kv_bucket(max(context), self.max_seq) if self.static else sum(context)
        return total + tokens * per_token

    @torch.inference_mode()
    def hidden(self, tokens: list[int], branch: int, layer: int = -1) -> torch.Tensor:
        """(L, H) hidden states of one branch at one layer, without the KV cache.

        Index 0 is the embeddings and -1 the final normed output, as in transformers' hidden_states.
        """
        t = torch.tensor([tokens], device=self.device)
        b = torch.tensor([branch], device=self.device)
        rows = self._rows(b, torch.zeros(1, dtype=torch.long, device=self.device), None, len(tokens), branch)
        x = self.embed.lookup(t, rows)
        states = [x]
        for block in self.blocks:
            x = block(x, rows, None, None)
            states.append(x)
        states[-1] = rms_norm(x, self.norm.select(b), self.cfg.rms_norm_eps)
        return states[layer][0]

    @torch.no_grad()  # not inference_mode: torch.compile cannot trace steps over the (normal) static buffers
    def forward(self, tokens: torch.Tensor, start: torch.Tensor, slots: torch.Tensor, branch: torch.Tensor,
                last: torch.Tensor | None = None, single: int | None | str = "find",
                kv_len: int | None = None, head: bool = True) -> torch.Tensor:
        """tokens (B, L) at positions start[b] + 0..L-1 of slot slots[b] for branch branch[b] -> logits.

        Returns (B, L, V), or with ``last`` (B,) only each row's logits at index last[b]: (B, V).
        Rows may be right-padded past their real tokens: the padding's cache entries lie
        beyond the row's length, are never attended to, and are overwritten as it grows.
        ``single``: the branch of every row when all rows share one, None when they do not; by default
        it is found from ``branch``, which reads it back from the device. ``kv_len``: the cached positions
        to attend over, at least every row's last position + 1; by default found the same way.
        ``head=False`` stops before the lm_head: final normed hidden states (see ``project``).
        """
        B, L = tokens.shape
        rows = self._rows(branch, start, slots, L, single, kv_len)
        x = self.embed.lookup(tokens, rows)
        for block, kc, vc in zip(self.blocks, self.k_cache, self.v_cache):
            x = block(x, rows, kc, vc)
        if last is not None:
            x = x[torch.arange(B, device=x.device), last][:, None]
        x = rms_norm(x, self.norm.select(branch), self.cfg.rms_norm_eps)
        if not head:
            return x[:, 0] if last is not None else x
        logits = (self.heads or self.embed)(x, rows)
        return logits[:, 0] if last is not None else logits

    @torch.no_grad()
    def project(self, x: torch.Tensor, branch: torch.Tensor, present: list[int]) -> torch.Tensor:
        """Each row's own lm_head over final hidden states x (B, ..., H); ``present``: the branches among the
        rows, known on the host, so that only their heads are read, without reading ``branch`` back."""
        rows = Rows(branch, single_branch(present), None, None, None, None, None, present=present)
        return (self.heads or self.embed)(x, rows)

    @classmethod
    def from_artifact(cls, artifact: Artifact, branches: list[str] | None = None,
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                      rank_multiple: int | None = None) -> "FamilyModel":
        """``rank_multiple``: pad each residual's rank with zeros to a multiple of this (default 64 on CUDA,
        where aligned GEMM shapes are faster than the bytes saved, and 1 elsewhere)."""
        device = torch.device(device)
        if rank_multiple is None:
            rank_multiple = 64 if device.type == "cuda" else 1
        branches = branches or artifact.branches
        for b in branches:
            artifact.check_branch(b)
        cfg = FamilyConfig.from_hf(artifact.config)
        dtype = dtype or artifact.dtype

        def load(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype)

        def per_branch(name: str) -> PerBranch:
            host = [artifact.own(b, name) for b in branches]  # compared on the host: equal ones load once
            shared = all(t is host[0] or torch.equal(t, host[0]) for t in host[1:])
            return PerBranch([load(t) for t in (host[:1] if shared else host)])

        def member(name: str) -> Member:
            us, vs = [], []
            for b in branches:
                r = artifact.residual(b, name)
                if r.kind == "lowrank":
                    us.append(load(r.U))
                    vs.append(load(r.V))
                elif r.kind == "dense":  # rate 0: U = D, V = I
                    us.append(load(r.D))
                    vs.append(torch.eye(r.D.shape[1], device=device, dtype=dtype))
                else:
                    us.append(None)
                    vs.append(None)
            return Member(load(artifact.trunk(name)), [artifact.scale(b, name) for b in branches], us, vs)

        def matrix_or_per_branch(name: str):
            return BranchLinear([member(name)], rank_multiple) if artifact.is_compressed(name) else per_branch(name)

        blocks = []
        for i in range(cfg.num_layers):
            linears = {}
            for group, hf_names in LINEARS.items():
                names = [f"model.layers.{i}.{n}.weight" for n in hf_names]
                for name in names:
                    if not artifact.is_compressed(name):
                        raise UserError(f"{artifact.path}: {name} is not stored as trunk + residual")
                linears[group] = BranchLinear([member(name) for name in names], rank_multiple)
            norms = {n: per_branch(f"model.layers.{i}.{n}.weight")
                     for n in ("input_layernorm", "post_attention_layernorm")}
            blocks.append(Block(cfg, linears, norms))
        embed = matrix_or_per_branch("model.embed_tokens.weight")
        heads = None if cfg.tie_word_embeddings or "lm_head.weight" not in artifact.tensor_names \
            else matrix_or_per_branch("lm_head.weight")
        model = cls(cfg, list(branches), blocks, embed, per_branch("model.norm.weight"), heads)
        return model.to(device).eval()  # the buffers built on the host (rope frequencies) join the weights
