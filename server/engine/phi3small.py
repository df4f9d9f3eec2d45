"""Phi-3-small (``Phi3SmallForCausalLM``, ``model_type: phi3small``), natively, on the engine's paged cache.

Transformers has no Phi-3-small and the hub's remote code needs Triton on CUDA; this reads the hub's checkpoint
as shipped and runs it through the same attention entry point as every other model. What sets it apart from
a Llama:

- ``query_key_value`` is one fused projection, head-major per key-value group: for each of the kv groups, its
  G query heads, then its key head, then its value head. Every linear has a bias.
- LayerNorm with bias (``layer_norm_epsilon``), not RMSNorm.
- GeGELU: ``up_proj`` gives 2 x ``ff_intermediate_size`` interleaved columns; even ones go through quick-GELU
  (x * sigmoid(1.702 x)) clamped above at ``gegelu_limit``, odd ones are clamped to +-limit, plus 1, and
  multiply. ``down_proj`` maps back.
- muP: embeddings times ``mup_embedding_multiplier``; attention scale ``mup_attn_multiplier / head_dim`` (with
  ``mup_use_scaling``), else 1/sqrt(head_dim); logits divided by ``mup_width_multiplier``.
- Block-sparse attention on every layer but each ``dense_attention_every_n_layers``-th: the pattern of
  server/engine/kv_cache.BlockSparse, applied through the same units as dense attention (per-head masks).
- Rotary embeddings over the whole head (rotate-half), base ``rope_embedding_base``, positions divided by
  ``rope_position_scale``; the 128k variant's long-context scaling (``rope_scaling`` type ``su``/``longrope``:
  per-frequency short and long factors, cos and sin scaled by ``short_mscale``/``long_mscale``; a sequence
  uses the long factors once it is longer than ``original_max_position_embeddings``, as transformers' Phi-3
  does).
- The lm_head is the embedding matrix unless the checkpoint has its own ``lm_head.weight``; the tokenizer's
  dummy tokens (and ``dummy_token_indices`` when the config lists them) get logit -inf: never sampled.

The module keeps transformers' calling convention (``input_ids``, ``position_ids``, ``cache``, ``logits_to_keep``,
``output_hidden_states``), so the standalone runner and embed jobs drive it like any causal LM.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from compression.errors import UserError
from compression.checkpoint import Checkpoint
from compression.safetensors_io import read_tensor
from server.engine.kv_cache import BlockSparse, StepBatch, causal_attention, paged_attention, write
from server.engine.phi3small_tokenizer import dummy_token_ids


@dataclass
class Phi3SmallConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    layer_norm_epsilon: float = 1e-5
    rope_embedding_base: float = 1e6
    rope_position_scale: float = 1.0
    rope_scaling: dict | None = None
    gegelu_limit: float | None = 20.0
    mup_embedding_multiplier: float | None = None
    mup_attn_multiplier: float = 1.0
    mup_use_scaling: bool = True
    mup_width_multiplier: float | None = None
    blocksparse_block_size: int = 64
    blocksparse_num_local_blocks: int = 16
    blocksparse_vert_stride: int = 8
    blocksparse_homo_head_pattern: bool = False
    dense_attention_every_n_layers: int | None = None
    dummy_token_indices: list[int] = field(default_factory=list)
    tie_word_embeddings: bool = True
    torch_dtype: str | None = None
    model_type: str = "phi3small"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_file(cls, path: Path) -> "Phi3SmallConfig":
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise UserError(f"{path}: not JSON ({e})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{path}: not a JSON object")
        raw = dict(raw)
        # the hub names the MLP width ff_intermediate_size
        if raw.get("ff_intermediate_size") is not None:
            raw["intermediate_size"] = raw["ff_intermediate_size"]
        known = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        for key in required:
            if raw.get(key) is None:
                name = "ff_intermediate_size" if key == "intermediate_size" else key
                raise UserError(f"{path}: Phi-3-small config has no {name!r}")
        cfg = cls(**{k: v for k, v in raw.items() if k in known and v is not None})
        try:
            _check(cfg)
        except (TypeError, ValueError) as e:
            raise UserError(f"{path}: {e}") from None
        return cfg


def _check(cfg: Phi3SmallConfig) -> None:
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "blocksparse_block_size",
                "blocksparse_num_local_blocks", "blocksparse_vert_stride"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError("hidden_size must divide by num_attention_heads, and that by num_key_value_heads")
    if cfg.rope_scaling is not None:
        kind = cfg.rope_scaling.get("type", cfg.rope_scaling.get("rope_type"))
        if kind not in ("su", "longrope", "linear"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (su, longrope, linear are)")
        if kind in ("su", "longrope"):
            for key in ("short_factor", "long_factor"):
                if len(cfg.rope_scaling.get(key) or []) != cfg.head_dim // 2:
                    raise ValueError(f"rope_scaling.{key} must hold head_dim / 2 = {cfg.head_dim // 2} factors")


def dense_layer(cfg: Phi3SmallConfig, layer: int) -> bool:
    """Whether a layer attends densely (every dense_attention_every_n_layers-th one; all when unset)."""
    n = cfg.dense_attention_every_n_layers
    return not n or (layer + 1) % n == 0


def pattern(cfg: Phi3SmallConfig) -> BlockSparse:
    return BlockSparse.for_heads(cfg.blocksparse_block_size, cfg.blocksparse_num_local_blocks,
                                 cfg.blocksparse_vert_stride, cfg.num_attention_heads,
                                 cfg.blocksparse_homo_head_pattern)


class Rotary(nn.Module):
    """cos and sin per token, (T, 1, head_dim), in fp32 until they are applied."""

    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        d = cfg.head_dim
        base = 1.0 / (cfg.rope_embedding_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        scaling = cfg.rope_scaling or {}
        kind = scaling.get("type", scaling.get("rope_type"))
        self.position_scale = float(scaling.get("factor", cfg.rope_position_scale) if kind == "linear"
                                    else cfg.rope_position_scale)
        self.original = None
        short = long = base
        self.mscale = (1.0, 1.0)
        if kind in ("su", "longrope"):
            self.original = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
            short = base / torch.tensor(scaling["short_factor"], dtype=torch.float64)
            long = base / torch.tensor(scaling["long_factor"], dtype=torch.float64)
            ratio = cfg.max_position_embeddings / self.original
            default = 1.0 if ratio <= 1 else math.sqrt(1 + math.log(ratio) / math.log(self.original))
            self.mscale = (float(scaling.get("short_mscale") or default), float(scaling.get("long_mscale") or default))
        self.register_buffer("short", short.float(), persistent=False)
        self.register_buffer("long", long.float(), persistent=False)

    def forward(self, positions: torch.Tensor, long: torch.Tensor | bool = False):
        """positions (...,) -> cos, sin (..., 1, head_dim). ``long``: whether each position's sequence (or
        every one) uses the long-context factors."""
        pos = positions.float()[..., None] / self.position_scale
        if self.original is None:
            angles, scale = pos * self.short, 1.0
        else:
            longs = torch.as_tensor(long, device=pos.device).expand(positions.shape)[..., None]
            angles = pos * torch.where(longs, self.long, self.short)
            scale = torch.where(longs, self.mscale[1], self.mscale[0])[..., None]  # (..., 1, 1)
        emb = torch.cat([angles, angles], dim=-1)[..., None, :]
        return emb.cos() * scale, emb.sin() * scale


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x.float() * cos + torch.cat((-x2, x1), dim=-1).float() * sin).to(x.dtype)


def gegelu(x: torch.Tensor, limit: float | None) -> torch.Tensor:
    gate, lin = x[..., ::2], x[..., 1::2]
    if limit is not None:
        gate = torch.where(torch.isinf(gate), gate, gate.clamp(max=limit))
        lin = torch.where(torch.isinf(lin), lin, lin.clamp(min=-limit, max=limit))
    return gate * torch.sigmoid(1.702 * gate) * (lin + 1)


class Attention(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig, layer: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.group = self.heads // self.kv_heads
        self.query_key_value = nn.Linear(cfg.hidden_size, (self.heads + 2 * self.kv_heads) * self.head_dim)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.scale = (cfg.mup_attn_multiplier / self.head_dim if cfg.mup_use_scaling
                      else 1.0 / math.sqrt(self.head_dim))
        self.pattern = None if dense_layer(cfg, layer) else pattern(cfg)

    def forward(self, x: torch.Tensor, cos, sin, kv: tuple[torch.Tensor, torch.Tensor] | None,
                batch: StepBatch | None) -> torch.Tensor:
        lead = x.shape[:-1]
        qkv = self.query_key_value(x).view(*lead, self.kv_heads, self.group + 2, self.head_dim)
        q = qkv[..., :self.group, :].reshape(*lead, self.heads, self.head_dim)
        k, v = qkv[..., self.group, :], qkv[..., self.group + 1, :]
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if batch is None:  # an embed job: (B, L, ...) without the cache
            out = causal_attention(q, k.contiguous(), v.contiguous(), scale=self.scale, pattern=self.pattern)
        else:
            write(kv[0], kv[1], k, v, batch)
            plan = batch if self.pattern is None else batch.sparse(self.pattern)
            out = paged_attention(q, kv[0], kv[1], plan, scale=self.scale)
        return self.dense(out)


class MLP(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        self.limit = cfg.gegelu_limit
        self.up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gegelu(self.up_proj(x), self.limit))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, kv, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class Phi3SmallModel(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)


class Phi3SmallForCausalLM(nn.Module):
    def __init__(self, cfg: Phi3SmallConfig, own_head: bool = False):
        super().__init__()
        self.config = cfg
        self.model = Phi3SmallModel(cfg)
        self.rotary = Rotary(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if own_head else None
        self.register_buffer("dummies", torch.tensor(_dummies(cfg), dtype=torch.long), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight if self.lm_head is not None else self.model.embed_tokens.weight
        logits = F.linear(hidden, weight).float()
        if self.config.mup_width_multiplier:
            logits = logits / self.config.mup_width_multiplier
        return logits.index_fill_(-1, self.dummies, float("-inf")) if self.dummies.numel() else logits

    def _long(self, batch: StepBatch | None, length: int):
        """Per token of the step (or for an embed job, its length): whether it uses long-context rope factors."""
        if self.rotary.original is None:
            return False
        if batch is None:
            return length > self.rotary.original
        # a prompt's chunks all use the factors of the whole prompt's length, as one forward over it would
        lengths = batch.lengths or [start + n for _, start, n in batch.rows]
        return torch.tensor([length > self.rotary.original for (_, _, n), length in zip(batch.rows, lengths)
                             for _ in range(n)], device=self.device)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None,
                paged: StepBatch | None = None, logits_to_keep: torch.Tensor | int | None = None,
                output_hidden_states: bool = False, use_cache: bool = False, **_):
        """With ``paged`` (a step): input_ids (1, T) the step's flat tokens, their keys and values into
        ``cache`` (server/engine/paged_hf.PagedCache). Without: (B, L) right-padded rows, no cache."""
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device).expand(B, L)
        cos, sin = self.rotary(position_ids, self._long(paged, L))
        cfg = self.config
        x = self.model.embed_tokens(input_ids)
        if cfg.mup_embedding_multiplier:
            x = x * cfg.mup_embedding_multiplier
        states = [x] if output_hidden_states else None
        if paged is not None:
            x, cos, sin = x[0], cos[0], sin[0]  # the step as T flat tokens
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, (cache.k[i], cache.v[i]) if paged is not None else None, paged)
            if states is not None and i < len(self.model.layers) - 1:
                states.append(x if paged is None else x[None])
        x = self.model.final_layernorm(x)
        if paged is not None:
            x = x[None]
        if states is not None:
            states.append(x)
        if logits_to_keep is not None and isinstance(logits_to_keep, torch.Tensor):
            x = x[:, logits_to_keep]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.logits(x), hidden_states=tuple(states) if states is not None else None)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "Phi3SmallForCausalLM":
        path = Path(path)
        cfg = Phi3SmallConfig.from_file(path / "config.json")
        tensors = Checkpoint(path).tensors  # every file's header (the index honoured), nothing read
        own_head = "lm_head.weight" in tensors and not _same_as_embedding(tensors)
        if dtype is None:
            dtype = getattr(torch, cfg.torch_dtype, None) if isinstance(cfg.torch_dtype, str) else None
            dtype = dtype if isinstance(dtype, torch.dtype) else tensors["model.embed_tokens.weight"].dtype \
                if "model.embed_tokens.weight" in tensors else torch.float32
        with torch.device("meta"):
            model = cls(cfg, own_head)
        expected = dict(model.state_dict(keep_vars=True))
        state = {}
        for name, param in expected.items():
            info = tensors.get(name)
            if info is None:
                raise UserError(f"{path}: no tensor {name!r} in its safetensors files (a Phi-3-small checkpoint has "
                                f"one; config.json says {cfg.num_hidden_layers} layers)")
            if tuple(info.shape) != tuple(param.shape):
                raise UserError(f"{info.path}: tensor {name!r} has shape {list(info.shape)}, config.json gives "
                                f"{list(param.shape)}")
            state[name] = read_tensor(info).to(device=device, dtype=dtype)
        model.load_state_dict(state, assign=True)
        model.rotary = Rotary(cfg).to(device)  # buffers computed, not loaded
        model.dummies = torch.tensor(_dummies(cfg), dtype=torch.long, device=device)
        return model.eval()


def _dummies(cfg: Phi3SmallConfig) -> list[int]:
    return sorted({i for i in [*cfg.dummy_token_indices, *dummy_token_ids()] if 0 <= i < cfg.vocab_size})


def _same_as_embedding(tensors) -> bool:
    head, embed = tensors["lm_head.weight"], tensors.get("model.embed_tokens.weight")
    return embed is not None and head.path == embed.path and head.offset == embed.offset



def load_causal_lm(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   trust_remote_code: bool = False):
    """A causal LM from a checkpoint directory: Phi-3-small natively (its remote code is never run), anything
    else through transformers."""
    from server.engine.phi3small_tokenizer import is_phi3small

    if is_phi3small(path):
        return Phi3SmallForCausalLM.from_pretrained(path, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or "auto", trust_remote_code=trust_remote_code)
    return model.to(device).eval()
