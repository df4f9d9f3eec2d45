"""The family model: one Llama-family forward that serves every branch of an artifact at once.

Read it top to bottom like gpt-fast's model.py. The one new idea is the branch
id carried by every row of the batch: each ``BranchLinear`` (q/k/v together,
o, gate/up together, down) multiplies the batch once by one matrix holding the
shared trunks and every branch's V rows, masks the V part so that each row only
sees its own branch's residual, adds it back through U, and scales by s_branch:

    [t | h] = x [T | Vcat]^T,  y = s[b] * (t + (h * mask[b]) Ucat^T)

A batch whose rows share one branch reads only that branch's V and U rows.
Per-branch embeddings, norms and lm_heads are gathered per row; residuals are
never densified. Scales are applied in fp32 on every path, so a row's numbers
do not depend on which branches share its batch.

A step is one forward over a flat batch of tokens (decode rows and prompt chunks together), each token with
its branch and position; keys and values live in the paged cache (server/engine/kv_cache.py), and attention
reads each sequence's own blocks. The lm_heads run on the tokens whose next token is sampled, only.
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
from server.engine.kv_cache import BLOCK_SIZE, StepBatch, allocate, causal_attention, paged_attention, write

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


def single_branch(branches: list[int]) -> int | None:
    """The branch of every row when all rows share one (a batch that reads one residual), else None."""
    return branches[0] if all(b == branches[0] for b in branches) else None


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (..., heads, hd); cos/sin: (..., 1, hd). Half-split rotation, as HF Llama checkpoints expect.
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


@dataclass
class Rows:
    """Per-forward facts about the batch that every layer needs. The host decides them before the forward;
    nothing here is read back from the device."""

    branch: torch.Tensor  # (T,) branch index of each token of a step, or (B,) of each row of an embed job
    single: int | None  # the branch index when every row has the same one
    cos: torch.Tensor  # (T, 1, hd) or (B, L, 1, hd)
    sin: torch.Tensor
    batch: StepBatch | None = None  # a step: where keys and values go and what each query reads; None: no cache
    groups: list[tuple[int, torch.Tensor]] | None = None  # mixed batches: (branch, its token indices) per branch


class Member(NamedTuple):
    """One linear layer of a family: its trunk and, per branch, its scale and low-rank residual factors."""

    trunk: torch.Tensor  # (out, in)
    scales: list[float]
    us: list[torch.Tensor | None]  # (out, r) per branch, None: no residual
    vs: list[torch.Tensor | None]  # (r, in)


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in)^T. On the CPU up to 64 rows go through w @ x^T (``linear_t``): MKL's x @ w^T
    with 2-16 rows ran at a third of its one-row speed here."""
    if x.device.type != "cpu" or x.dim() < 2:
        return F.linear(x, w)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > 64 or (rows.shape[0] == 1 and w.shape[0] < 512):
        return F.linear(x, w)
    return linear_t(rows, w).T.reshape(*x.shape[:-1], w.shape[0])


def feature_major(x: torch.Tensor) -> bool:
    """Whether a step's rows x (T, in) go through the CPU's few-row layout, outputs kept as (out, T)."""
    return x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= 64


def linear_t(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w @ rows^T -> (out, n): the CPU's layout for a few rows, not transposed back. One row goes through it
    as two (the row twice) where w has 512 rows or more: MKL's one-row product (a GEMV) ran on one core, at
    two thirds of the speed of this layout with two rows. A narrower w (a residual's V, say) is faster as the
    GEMV: the two-row call costs more than the weight takes to read."""
    if rows.shape[0] == 1 and w.shape[0] >= 512:
        return (w @ torch.cat([rows, rows]).T)[:, :1]
    return w @ rows.T


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros(rows - t.shape[0], *t.shape[1:])])


def _scaled(y: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """y * scale computed in fp32 and rounded once: a Python float and an fp32 tensor give the same numbers."""
    if isinstance(scale, float):
        return y * scale  # the scalar stays in fp32 (or wider) inside the kernel
    return (y.float() * scale).to(y.dtype)


class BranchLinear(nn.Module):
    """Linear layers that read one input (q/k/v, gate/up, or just one); member j's weight for branch b is
    s_j[b] * (T_j + U_jb V_jb).

    One matrix holds every member's trunk and then every residual's V rows (member-major, branch-minor,
    each block padded with zero rows to a multiple of ``rank_multiple``), so a mixed batch reads x once:

        z = x [T_1 .. T_m | V]^T,  h = z[:, O:] * mask[b],  y_j = s_j[b] * (z_j + h_j U_j^T)

    A batch of one branch multiplies by the trunk rows and by that branch's V rows only. A step of a few
    rows on the CPU stays feature-major, (out, rows), from x's product to the scale: MKL's U_j h_j^T with
    the residual's small inner dimension ran in two thirds of the time of h_j U_j^T here, whose one
    thread the U factors' bytes kept waiting.
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
            start, us, spans = offset, [], []
            for b, (u, v) in enumerate(zip(m.us, m.vs)):
                r = 0 if u is None else u.shape[1]
                padded = -(-r // rank_multiple) * rank_multiple
                if padded:
                    v_blocks.append(_pad_rows(v, padded))
                    us.append(_pad_rows(u.T, padded))
                    owner.append(torch.full((padded,), b))
                spans.append((offset, padded))
                offset += padded
            self.spans.append(spans)
            self.h_spans.append((start, offset - start))
            if us:  # (out_j, R_j): every branch's U side by side
                self.register_buffer(f"U{j}", torch.cat(us).T.contiguous(), persistent=False)
        self.trunk_rows = sum(w for _, w in self.out_spans)
        self.rank = offset
        self.weight = nn.Parameter(torch.cat([m.trunk for m in members] + v_blocks), requires_grad=False)
        # fp32 whatever the weights' dtype: a bf16 scale (93.7 -> 93.5) would make mixed rows differ from alone.
        self.register_buffer("scales", torch.tensor(self.scale_list, dtype=torch.float32,
                                                    device=self.weight.device), persistent=False)
        if offset:
            self.register_buffer("owner", torch.cat(owner).to(self.weight.device), persistent=False)  # (R,)

    @property
    def trunk(self) -> torch.Tensor:
        return self.weight[:self.trunk_rows]

    def u(self, j: int) -> torch.Tensor:
        """Member j's U factors, (out_j, R_j): branch b's are the columns of its span less the member's start."""
        return getattr(self, f"U{j}")

    def forward(self, x: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        outs = self._feature_major(x, rows) if feature_major(x) else self._row_major(x, rows)
        return outs[0] if len(outs) == 1 else outs

    def _feature_major(self, x: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        """A few rows x (T, in) on the CPU: every product as (out, T); the outputs are (T, out) views."""
        O, outs = self.trunk_rows, []
        if rows.single is not None:
            b = rows.single
            zt = linear_t(x, self.trunk)
            for j, (o0, width) in enumerate(self.out_spans):
                yt = zt[o0:o0 + width]
                off, r = self.spans[j][b]
                if r:
                    start = off - self.h_spans[j][0]
                    yt = torch.addmm(yt, self.u(j)[:, start:start + r], linear_t(x, self.weight[O + off:O + off + r]))
                outs.append(_scaled(yt, self.scale_list[j][b]).T)
            return outs
        zt = linear_t(x, self.weight)  # (O + R, T)
        if self.rank:
            ht = zt[O:] * (self.owner[:, None] == rows.branch)
        scales = self.scales[:, rows.branch]  # (m, T) fp32
        for j, (o0, width) in enumerate(self.out_spans):
            yt = zt[o0:o0 + width]
            h0, r = self.h_spans[j]
            if r:
                yt = torch.addmm(yt, self.u(j), ht[h0:h0 + r])
            outs.append(_scaled(yt, scales[j]).T)
        return outs

    def _row_major(self, x: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        lead, n_in = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, n_in)
        O, outs = self.trunk_rows, []
        if rows.single is not None:
            b = rows.single
            t = linear(x2, self.trunk)
            for j, (o0, width) in enumerate(self.out_spans):
                y = t[:, o0:o0 + width]
                off, r = self.spans[j][b]
                if r:
                    h = linear(x2, self.weight[O + off:O + off + r])
                    start = off - self.h_spans[j][0]
                    y = torch.addmm(y, h, self.u(j)[:, start:start + r].T)
                outs.append(_scaled(y, self.scale_list[j][b]).view(*lead, width))
            return outs
        per_row = (-1,) + (1,) * (x.dim() - 1)  # a row's value broadcast over its tokens and columns
        z = linear(x, self.weight)  # (B, [L,] O + R)
        if self.rank:
            h = (z[..., O:] * (self.owner == rows.branch.view(per_row))).reshape(-1, self.rank)
        z = z.reshape(-1, z.shape[-1])
        scales = self.scales[:, rows.branch].view(len(self.out_spans), *per_row)  # (m, B, [1,] 1) fp32
        for j, (o0, width) in enumerate(self.out_spans):
            y = z[:, o0:o0 + width]
            h0, r = self.h_spans[j]
            if r:
                y = torch.addmm(y, h[:, h0:h0 + r], self.u(j).T)
            outs.append(_scaled(y.view(*lead, width), scales[j]))
        return outs

    def lookup(self, tokens: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Rows ``tokens`` (T,) or (B, L) of each one's branch weight (a compressed embedding; one member)."""
        O = self.trunk_rows
        x = self.weight[:O][tokens]
        if rows.single is not None:
            off, r = self.spans[0][rows.single]
            if r:
                x = x + self.U0[tokens, off:off + r] @ self.weight[O + off:O + off + r]
            return _scaled(x, self.scale_list[0][rows.single])
        per_token = rows.branch.view(-1, *(1,) * tokens.dim())  # (T, 1) or (B, 1, 1)
        if self.rank:
            u = self.U0[tokens] * (self.owner == per_token)  # (T, R) or (B, L, R)
            x = x + u @ self.weight[O:]
        return _scaled(x, self.scales[0][per_token])


class DenseBranches(nn.Module):
    """Linear layers stored as one dense weight per branch: s_b * (T + D_b) folded at load (a rate-0 artifact,
    whose residuals are exact). A mixed batch multiplies each present branch's rows by its own weight."""

    def __init__(self, weights: list[torch.Tensor], widths: list[int]):
        super().__init__()
        self.widths = widths  # output width of each member (q, k, v ...)
        self.weight = nn.Parameter(torch.stack(weights), requires_grad=False)  # (branches, out, in)

    def forward(self, x: torch.Tensor, rows: Rows) -> list[torch.Tensor]:
        if rows.single is not None:
            y = linear(x, self.weight[rows.single])
        else:
            flat = x.reshape(-1, x.shape[-1])
            per_row = flat.shape[0] // rows.branch.shape[0]
            out = flat.new_empty(flat.shape[0], self.weight.shape[1])
            for b, idx in rows.groups:
                tok = idx if per_row == 1 else (idx[:, None] * per_row + torch.arange(per_row, device=idx.device)
                                                ).reshape(-1)
                out[tok] = linear(flat[tok], self.weight[b])
            y = out.view(*x.shape[:-1], -1)
        outs = list(y.split(self.widths, dim=-1))
        return outs[0] if len(outs) == 1 else outs


class PerBranch(nn.Module):
    """A stack of per-branch tensors (norm weights, embeddings), gathered per row; one tensor: shared by all."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self.shared = len(tensors) == 1
        self.weight = nn.Parameter(torch.stack(tensors), requires_grad=False)

    def select(self, branch: torch.Tensor) -> torch.Tensor:
        return self.weight[0] if self.shared else self.weight[branch]

    def lookup(self, tokens: torch.Tensor, rows: Rows) -> torch.Tensor:
        """Embedding rows: tokens (T,) or (B, L) of each one's branch -> (..., H), without copying whole tables."""
        if self.shared:
            return self.weight[0][tokens]
        n, vocab, hidden = self.weight.shape
        branch = rows.branch if tokens.dim() == 1 else rows.branch[:, None]
        return self.weight.view(n * vocab, hidden)[branch * vocab + tokens]

    def __call__(self, x: torch.Tensor, rows: Rows) -> torch.Tensor:
        """As an lm_head: each present branch's head reads its own rows, found by the host (rows.groups)."""
        if self.shared:
            return linear(x, self.weight[0])
        if rows.single is not None:
            return linear(x, self.weight[rows.single])
        out = x.new_empty(*x.shape[:-1], self.weight.shape[1])
        for b, idx in rows.groups:
            out[idx] = linear(x[idx], self.weight[b])
        return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # weight: (H,), or one per token (T, H) for x (T, H), or one per row (B, H) for x (B, L, H)
    if weight.dim() == 2 and x.dim() == 3:
        weight = weight[:, None, :]
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class Block(nn.Module):
    def __init__(self, cfg: FamilyConfig, linears: dict[str, nn.Module], norms: dict[str, PerBranch]):
        super().__init__()
        self.cfg = cfg
        self.qkv, self.o = linears["qkv"], linears["o"]  # q, k and v read one input: one fused matrix
        self.gate_up, self.down = linears["gate_up"], linears["down"]
        self.attn_norm, self.mlp_norm = norms["input_layernorm"], norms["post_attention_layernorm"]

    def attention(self, x: torch.Tensor, rows: Rows, k_cache: torch.Tensor | None, v_cache: torch.Tensor | None):
        cfg = self.cfg
        lead = x.shape[:-1]  # (T,) for a step, (B, L) for an embed job
        q, k, v = self.qkv(x, rows)
        q = apply_rope(q.view(*lead, cfg.num_heads, cfg.head_dim), rows.cos, rows.sin)
        k = apply_rope(k.view(*lead, cfg.num_kv_heads, cfg.head_dim), rows.cos, rows.sin)
        v = v.view(*lead, cfg.num_kv_heads, cfg.head_dim)
        if rows.batch is None:  # a one-off forward (router embeddings): attend to this input only, causally
            return self.o(causal_attention(q, k, v), rows)
        write(k_cache, v_cache, k, v, rows.batch)
        return self.o(paged_attention(q, k_cache, v_cache, rows.batch), rows)

    def forward(self, x, rows: Rows, k_cache, v_cache):
        eps = self.cfg.rms_norm_eps
        x = x + self.attention(rms_norm(x, self.attn_norm.select(rows.branch), eps), rows, k_cache, v_cache)
        h = rms_norm(x, self.mlp_norm.select(rows.branch), eps)
        gate, up = self.gate_up(h, rows)
        return x + self.down(F.silu(gate) * up, rows)


def row_groups(branches: list[int], device: torch.device) -> list[tuple[int, torch.Tensor]]:
    """For a mixed batch: each present branch with the indices of its rows, built on the host."""
    groups: dict[int, list[int]] = {}
    for i, b in enumerate(branches):
        groups.setdefault(b, []).append(i)
    return [(b, torch.tensor(idx, device=device)) for b, idx in sorted(groups.items())]


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
        self.k_cache: list[torch.Tensor] = []  # per layer: (blocks, block_size, kv_heads, head_dim)
        self.v_cache: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def row_grouped(self) -> bool:
        """Whether a mixed batch needs the host's token groups inside the layers (dense per-branch weights)."""
        return any(isinstance(m, DenseBranches) for b in self.blocks for m in (b.qkv, b.o, b.gate_up, b.down))

    @property
    def kv_heads(self) -> int:
        return self.cfg.num_kv_heads

    def allocate_cache(self, num_blocks: int, block_size: int = BLOCK_SIZE) -> None:
        cfg = self.cfg
        self.k_cache, self.v_cache = allocate(cfg.num_layers, num_blocks, cfg.num_kv_heads, cfg.head_dim,
                                              self.dtype, self.device, block_size)

    def _rows(self, branch: torch.Tensor, pos: torch.Tensor, single: int | None, groups: list | None) -> Rows:
        freqs = pos[..., None].float() * self.inv_freq  # (..., hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[..., None, :]
        return Rows(branch, single, emb.cos().to(self.dtype), emb.sin().to(self.dtype), groups=groups)

    @torch.no_grad()  # not inference_mode: torch.compile cannot trace steps over the (normal) cache tensors
    def forward(self, tokens: torch.Tensor, branch: torch.Tensor, batch: StepBatch, *, single: int | None,
                groups: list[tuple[int, torch.Tensor]] | None = None, last: torch.Tensor | None = None,
                last_branches: list[int] | None = None, head: bool = True) -> torch.Tensor:
        """One step over a flat batch: tokens (T,) of branches branch (T,) at batch.positions; their keys and
        values go to the cache -> the logits (S, V) of the tokens at indices ``last`` (S,), whose branches the
        host knows (``last_branches``), or of every token without ``last``.

        ``single``: the branch of every token when all share one, None when they do not. ``groups``: for a mixed
        batch of a model with dense per-branch weights, each branch's token indices. ``head=False`` stops before
        the lm_head: final normed hidden states (see ``project``).
        """
        rows = self._rows(branch, batch.positions, single, groups)
        rows.batch = batch
        x = self.embed.lookup(tokens, rows)
        for block, kc, vc in zip(self.blocks, self.k_cache, self.v_cache):
            x = block(x, rows, kc, vc)
        if last is not None:
            x, branch = x[last], branch[last]
        x = rms_norm(x, self.norm.select(branch), self.cfg.rms_norm_eps)
        if not head:
            return x
        return self.project(x, branch, last_branches if last is not None else branch.tolist())

    @torch.no_grad()
    def project(self, x: torch.Tensor, branch: torch.Tensor, branches: list[int]) -> torch.Tensor:
        """Each row's own lm_head over final hidden states x (B, ..., H); ``branches``: each row's branch as the
        host knows it, so that only the present heads are read and nothing is read back from the device."""
        single = single_branch(branches)
        rows = Rows(branch, single, None, None,
                    groups=None if single is not None else row_groups(branches, x.device))
        return (self.heads or self.embed)(x, rows)

    @torch.inference_mode()
    def hidden(self, tokens: list[list[int]], branches: list[int], layer: int = -1) -> list[torch.Tensor]:
        """Each sequence's (L_i, H) hidden states at one layer, for its branch, without the KV cache: an embed
        job's forward. The sequences are right-padded into one batch; causal attention keeps the padding out.

        Index 0 is the embeddings and -1 the final normed output, as in transformers' hidden_states.
        """
        n = len(self.blocks)
        if not -n - 1 <= layer <= n:
            raise UserError(f"layer {layer} is out of range: the model has {n} layers (0..{n}, or -1..{-n - 1})")
        index = layer % (n + 1)
        longest = max(len(t) for t in tokens)
        t = torch.tensor([ids + [0] * (longest - len(ids)) for ids in tokens], device=self.device)
        b = torch.tensor(branches, device=self.device)
        single = single_branch(branches)
        pos = torch.arange(longest, device=self.device).expand(len(tokens), longest)
        rows = self._rows(b, pos, single, None if single is not None else row_groups(branches, self.device))
        x = self.embed.lookup(t, rows)
        for block in self.blocks[:index]:  # layers past the one asked for are not run
            x = block(x, rows, None, None)
        if index == n:
            x = rms_norm(x, self.norm.select(b), self.cfg.rms_norm_eps)
        return [x[i, :len(ids)] for i, ids in enumerate(tokens)]

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
                us.append(load(r.U) if r.kind == "lowrank" else None)
                vs.append(load(r.V) if r.kind == "lowrank" else None)
            return Member(load(artifact.trunk(name)), [artifact.scale(b, name) for b in branches], us, vs)

        def has_dense(names: list[str]) -> bool:
            return any(artifact.residual(b, n).kind == "dense" for b in branches for n in names)

        def dense_branches(names: list[str]) -> DenseBranches:
            # Exact residuals (rate 0): each branch's own weight, s * (T + D) folded in fp32; no trunk is kept.
            weights = []
            for b in branches:
                parts = []
                for n in names:
                    r, t = artifact.residual(b, n), artifact.trunk(n).float()
                    if r.kind == "dense":
                        t = t + r.D.float()
                    elif r.kind == "lowrank":
                        t = t + r.U.float() @ r.V.float()
                    parts.append(t * artifact.scale(b, n))
                weights.append(load(torch.cat(parts)))
            return DenseBranches(weights, [artifact.trunk(n).shape[0] for n in names])

        def group_linear(names: list[str]) -> nn.Module:
            if has_dense(names):
                return dense_branches(names)
            return BranchLinear([member(n) for n in names], rank_multiple)

        def matrix_or_per_branch(name: str):
            if not artifact.is_compressed(name):
                return per_branch(name)
            if has_dense([name]):  # exact residuals: the branches' own tables
                return PerBranch([dense_branches([name]).weight[i] for i in range(len(branches))])
            return BranchLinear([member(name)], rank_multiple)

        blocks = []
        for i in range(cfg.num_layers):
            linears = {}
            for group, hf_names in LINEARS.items():
                names = [f"model.layers.{i}.{n}.weight" for n in hf_names]
                for name in names:
                    if not artifact.is_compressed(name):
                        raise UserError(f"{artifact.path}: {name} is not stored as trunk + residual")
                linears[group] = group_linear(names)
            norms = {n: per_branch(f"model.layers.{i}.{n}.weight")
                     for n in ("input_layernorm", "post_attention_layernorm")}
            blocks.append(Block(cfg, linears, norms))
        embed = matrix_or_per_branch("model.embed_tokens.weight")
        heads = None if cfg.tie_word_embeddings or "lm_head.weight" not in artifact.tensor_names \
            else matrix_or_per_branch("lm_head.weight")
        model = cls(cfg, list(branches), blocks, embed, per_branch("model.norm.weight"), heads)
        return model.to(device).eval()  # the buffers built on the host (rope frequencies) join the weights
