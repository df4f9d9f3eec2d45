"""`branchserve plan`: what a config's models take and how much KV cache is left, before anything loads.

Nothing here reads a weight. A family's bytes come from its artifact's manifest.json (each tensor's shape,
and each branch's residual rank), counted as the family model loads them: one trunk per compressed matrix,
each served branch's U and V (ranks padded to 64 on CUDA, as the engine pads them), each branch's own
embeddings, head and norms, tensors shared by all branches once. A standalone model's bytes come from its
safetensors headers, or, when the directory has no weights yet, from its config.json (Phi-3-small natively,
other architectures instantiated on the meta device). Bytes are counted in the dtype the model will be served
in. The KV budget and its split between models are the engine's own (server/engine/core.Engine.allocate_kv).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from compression.compress import DTYPES, FORMAT
from compression.errors import UserError
from server.config import ServerConfig
from server.engine.kv_cache import BLOCK_SIZE, kv_bytes_per_token, split_kv

GiB = 2**30
CONTEXTS = (1024, 4096, 8192)  # context lengths the table counts sequences at
# What a CUDA process holds beyond its tensors once the models are loaded (the CUDA context, the libraries'
# workspaces, the allocator's cache): the engine's budget is what is free then, so the plan leaves this out of it.
# Measured on an H200 (torch 2.11, driver 580) with the paper's deployment loaded: total - free - allocated was
# 871781888 bytes (bench/RESULTS.md, "On an H200").
CUDA_CONTEXT_BYTES = 832 * 2**20


@dataclass
class ModelPlan:
    names: str  # the exposed names
    kind: str  # "family" | "standalone"
    device: str
    parts: dict[str, int]  # family: trunk, residuals, per-branch; standalone: weights
    kv_per_token: int
    worst_case_tokens: int  # every sequence at full context: the cache never needs more
    kv_tokens: int = 0  # what its share of the budget holds
    graphs: bool = True  # whether limits.cuda_graphs applies to it (on CUDA; not Phi-3-small)
    reserved_blocks: int = 0  # with CUDA graphs, the null block its padding rows write

    @property
    def weight_bytes(self) -> int:
        return sum(self.parts.values())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def family_plan(fam, max_batch: int, max_context: int) -> ModelPlan:
    path = Path(fam.artifact)
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except OSError as e:
        raise UserError(f"family {path}: cannot read manifest.json ({e.strerror or e})") from None
    except ValueError as e:
        raise UserError(f"{path / 'manifest.json'}: not JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: not a branchserve artifact")
    try:
        return _family_plan(fam, path, manifest, max_batch, max_context)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path / 'manifest.json'}: unreadable ({type(e).__name__}: {e})") from None


def _family_plan(fam, path: Path, manifest: dict, max_batch: int, max_context: int) -> ModelPlan:
    branches = list(dict.fromkeys((fam.branches or {b: b for b in manifest["branches"]}).values()))
    for b in branches:
        if b not in manifest["branches"]:
            raise UserError(f"family {path}: unknown branch {b!r} (it has: {', '.join(manifest['branches'])})")
    size = _dtype(fam.dtype or manifest["dtype"]).itemsize
    multiple = 64 if fam.device.startswith("cuda") else 1
    cfg = manifest["config"]
    tied = cfg.get("tie_word_embeddings", False)
    parts = {"trunk": 0, "residuals": 0, "per-branch": 0}
    for name, spec in manifest["tensors"].items():
        if name == "lm_head.weight" and tied:
            continue  # the engine uses the embeddings
        shape = spec["shape"]
        if spec["kind"] == "shared":
            parts["per-branch"] += _numel(shape) * size
        elif spec["kind"] == "per_branch":
            parts["per-branch"] += _numel(shape) * size * len(branches)
        elif spec["residual"] == "dense":  # exact residuals: each branch's own matrix, no trunk
            parts["residuals"] += _numel(shape) * size * len(branches)
        else:
            parts["trunk"] += _numel(shape) * size
            if spec["residual"] == "lowrank":
                m, n = shape
                for b in branches:
                    r = spec["branches"][b].get("rank", spec["rank"])
                    parts["residuals"] += -(-r // multiple) * multiple * (m + n) * size
    kv = _kv_per_token(cfg, fam.dtype or manifest["dtype"], path / "manifest.json")
    names = ", ".join(fam.branches or {b: b for b in manifest["branches"]})
    return ModelPlan(names, "family", fam.device, parts, kv, max_batch * max_context)


def _kv_per_token(cfg: dict, dtype: str, source: Path) -> int:
    try:
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
        return kv_bytes_per_token(int(cfg["num_hidden_layers"]), int(cfg.get("num_key_value_heads") or heads),
                                  head_dim, _dtype(dtype))
    except KeyError as e:
        raise UserError(f"{source}: the model's config has no {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError):
        raise UserError(f"{source}: the model's config has unreadable attention sizes") from None


def _dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def standalone_plan(sa, max_batch: int, max_context: int) -> ModelPlan:
    from compression.checkpoint import Checkpoint

    path = Path(sa.path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except OSError as e:
        raise UserError(f"standalone model {sa.name!r}: cannot read {path / 'config.json'} ({e.strerror or e})") \
            from None
    except ValueError as e:
        raise UserError(f"{path / 'config.json'}: not JSON ({e})") from None
    dtype = sa.dtype or (cfg.get("torch_dtype") if cfg.get("torch_dtype") in DTYPES else None)
    if any(path.glob("*.safetensors")):
        infos = list(Checkpoint(path).tensors.values())  # headers only
        dtype = dtype or str(infos[0].dtype).removeprefix("torch.")
        numel = sum(_numel(info.shape) for info in infos)
    else:
        numel = _config_numel(path, cfg)
    dtype = dtype or "float32"
    kv = _kv_per_token(cfg, dtype, path / "config.json")
    from server.engine.phi3small_tokenizer import is_phi3small

    return ModelPlan(sa.name, "standalone", sa.device, {"weights": numel * _dtype(dtype).itemsize}, kv,
                     max_batch * max_context, graphs=not is_phi3small(path))


def _config_numel(path: Path, cfg: dict) -> int:
    """Parameters of a checkpoint without weights, from its config.json."""
    from server.engine.phi3small_tokenizer import is_phi3small

    if is_phi3small(path):
        from compression.synthetic import phi3small_tensors

        cfg = dict(cfg)
        cfg.setdefault("ff_intermediate_size", cfg.get("intermediate_size"))
        return sum(_numel(s) for s in phi3small_tensors(cfg).values())
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"{path}: no weights, and its config.json cannot be read by transformers ({e})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())  # tied parameters count once


@dataclass
class Plan:
    models: list[ModelPlan]
    device_memory: dict[str, int]  # per CUDA device, when known
    budgets: dict[str, int]  # KV bytes per device
    shortfall: dict[str, int]  # per device: bytes the weights lack to fit

    def to_json(self) -> dict:
        return {"models": [{**asdict(m), "weight_bytes": m.weight_bytes,
                            "sequences": {str(c): m.kv_tokens // c for c in CONTEXTS}} for m in self.models],
                "device_memory": self.device_memory, "kv_budget": self.budgets, "shortfall": self.shortfall}


def make_plan(config: ServerConfig, device_memory: int | None = None) -> Plan:
    """``device_memory``: bytes of each CUDA device (default: what torch reports for it, when it can)."""
    from server.engine.core import DEFAULT_CPU_KV_BYTES, GPU_MEMORY_UTILIZATION

    limits = config.limits
    models = [family_plan(f, limits.max_batch, limits.max_context) for f in config.families]
    models += [standalone_plan(s, limits.max_batch, limits.max_context) for s in config.standalone]
    memory, budgets, shortfall = {}, {}, {}
    for m in models:
        m.reserved_blocks = 1 if limits.cuda_graphs and m.graphs and m.device.startswith("cuda") else 0
    for device in dict.fromkeys(m.device for m in models):
        on = [m for m in models if m.device == device]
        weights = sum(m.weight_bytes for m in on)
        if device.startswith("cuda"):
            total = device_memory or _cuda_memory(device)
            if total is None:
                raise UserError(f"the size of {device} is unknown here (no such CUDA device): give --device-memory")
            memory[device] = total
            usable = int(GPU_MEMORY_UTILIZATION * total) - CUDA_CONTEXT_BYTES
            if weights > usable:
                shortfall[device] = weights - usable
            budget = limits.kv_cache_memory if limits.kv_cache_memory is not None else max(0, usable - weights)
            if limits.kv_cache_memory is not None and weights + budget + CUDA_CONTEXT_BYTES > total:
                shortfall[device] = weights + budget + CUDA_CONTEXT_BYTES - total
        else:
            budget = limits.kv_cache_memory if limits.kv_cache_memory is not None else DEFAULT_CPU_KV_BYTES
        budgets[device] = budget
        blocks = split_kv(budget, [(m.worst_case_tokens + m.reserved_blocks * BLOCK_SIZE, m.kv_per_token)
                                   for m in on])
        for m, b in zip(on, blocks):
            m.kv_tokens = max(0, b - m.reserved_blocks) * BLOCK_SIZE
    return Plan(models, memory, budgets, shortfall)


def _cuda_memory(device: str) -> int | None:
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def loaded_bytes(module: torch.nn.Module) -> int:
    """Bytes a loaded model's tensors take (parameters and buffers), each storage once: what a plan is checked
    against."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def table(plan: Plan) -> list[str]:
    """The plan as text lines: one row per model, then one line per device."""
    head = ["model", "kind", "device", "weights GiB", "trunk", "residuals", "per-branch", "KV/token KiB",
            "KV tokens", *[f"seqs@{c // 1024}k" for c in CONTEXTS]]
    rows = []
    for m in plan.models:
        p = m.parts
        rows.append([m.names, m.kind, m.device, _gib(m.weight_bytes),
                     *(_gib(p[k]) if k in p else "-" for k in ("trunk", "residuals", "per-branch")),
                     f"{m.kv_per_token / 1024:g}", str(m.kv_tokens), *(str(m.kv_tokens // c) for c in CONTEXTS)])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    for device, budget in plan.budgets.items():
        weights = sum(m.weight_bytes for m in plan.models if m.device == device)
        line = f"{device}: weights {_gib(weights)} GiB, KV cache {_gib(budget)} GiB"
        if device in plan.device_memory:
            line += (f" (of {_gib(plan.device_memory[device])} GiB: 90% usable, less {_gib(CUDA_CONTEXT_BYTES)} GiB "
                     f"for CUDA itself)")
        tokens = sum(m.kv_tokens for m in plan.models if m.device == device)
        line += f": {tokens} tokens, {tokens // 1024} sequences of 1k, {tokens // 8192} of 8k"
        if device in plan.shortfall:
            line += f"; DOES NOT FIT: short by {_gib(plan.shortfall[device])} GiB"
        lines.append(line)
    return lines
