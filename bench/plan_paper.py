"""`branchserve plan` on the paper's deployment, and the plan's byte counts against loads of the same shapes.

1. The paper's deployment at real shapes, weights absent: three Llama-3-8B fine-tunes compressed at rate 0.95
   (bf16; a manifest written from the compressor's own rank rule, no shards) and Phi-3-small-8k-instruct (its
   hub config.json, no weights), with configs/llama3-phi3.yaml's limits, on a 48 GB device.
2. The plan against a load: the same widths with ``--layers`` layers (per-layer bytes are what scale), random
   weights on disk, loaded the way `serve` loads them (the family model, Phi-3-small natively); bytes of the
   loaded tensors counted (each storage once) against the plan's.

    python bench/plan_paper.py [--layers 2] [--skip-load]

Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compression.compress import FORMAT, FORMAT_VERSION  # noqa: E402
from compression.plan import plan_tensor  # noqa: E402
from compression.synthetic import PHI3_SMALL_CONFIG, build_family, build_phi3small  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.plan import family_plan, loaded_bytes, make_plan, standalone_plan, table  # noqa: E402

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
             "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, ff, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_key_value_heads"]
    hd = h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv * hd, h),
                       p + "self_attn.v_proj.weight": (kv * hd, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (ff, h), p + "mlp.up_proj.weight": (ff, h),
                       p + "mlp.down_proj.weight": (h, ff), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes.update({"model.norm.weight": (h,), "lm_head.weight": (cfg["vocab_size"], h)})
    return shapes


def write_manifest(out: Path, cfg: dict, branches: list[str], rate: float) -> Path:
    """A family artifact's manifest.json at these shapes, as `compress --rate` would plan it (no shards)."""
    tensors = {}
    for name, shape in llama_shapes(cfg).items():
        plan = plan_tensor(name, shape, rate, None)
        if not plan.compressed:
            tensors[name] = {"kind": "per_branch", "shape": list(shape), "dtype": "bfloat16"}
            continue
        tensors[name] = {"kind": "compressed", "shape": list(shape), "dtype": "bfloat16", "residual": plan.residual,
                         "rank": plan.rank, "branches": {b: {"scale": 1.0, "rank": plan.rank} for b in branches}}
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "bfloat16", "config": cfg,
                "branches": {b: {"dir": f"branches/{b}"} for b in branches}, "shards": [], "weight_map": {},
                "tensors": tensors}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def paper_config(root: Path) -> ServerConfig:
    """configs/llama3-phi3.yaml with its paths under ``root``."""
    data = yaml.safe_load((ROOT / "configs" / "llama3-phi3.yaml").read_text())
    fam = data["families"][0]
    write_manifest(root / "llama3-family", LLAMA3_8B, list(fam["branches"].values()), 0.95)
    fam["artifact"] = str(root / "llama3-family")
    small = root / "Phi-3-small-8k-instruct"
    small.mkdir(parents=True, exist_ok=True)
    (small / "config.json").write_text(json.dumps(PHI3_SMALL_CONFIG))
    for sa in data["standalone"]:
        sa["path"] = str(small)
    return ServerConfig.model_validate({k: data[k] for k in ("families", "standalone", "limits")})


def check_loads(root: Path, layers: int) -> list[dict]:
    from compression.artifact import Artifact
    from compression.compress import CompressOptions, compress
    from server.config import FamilyConfig, StandaloneConfig
    from server.engine.model import FamilyModel
    from server.engine.phi3small import load_causal_lm

    rows = []
    t = time.perf_counter()
    small = build_phi3small(root / "phi3-small", seed=0, dtype=torch.bfloat16, std=0.02,
                            **{k: PHI3_SMALL_CONFIG[k] for k in ("hidden_size", "num_attention_heads",
                                                                  "num_key_value_heads", "ff_intermediate_size",
                                                                  "blocksparse_block_size")},
                            num_hidden_layers=layers, blocksparse_num_local_blocks=16, blocksparse_vert_stride=8)
    planned = standalone_plan(StandaloneConfig(name="phi3-small", path=small), 32, 8192).weight_bytes
    loaded = loaded_bytes(load_causal_lm(small))
    rows.append({"model": f"Phi-3-small widths, {layers} layers, bf16", "planned": planned, "loaded": loaded,
                 "seconds": round(time.perf_counter() - t, 1)})
    t = time.perf_counter()
    members = build_family(root / "members", ["math", "code", "medicine"], hidden=4096, layers=layers,
                           intermediate=14336, heads=32, kv_heads=8, dtype=torch.bfloat16, seed=0)
    compress(members, root / "family", CompressOptions(rate=0.95, progress=False))
    for device, multiple in (("cpu", 1), ("cuda", 64)):
        fam = FamilyConfig(artifact=root / "family", device=device)
        planned = family_plan(fam, 32, 8192).weight_bytes
        model = FamilyModel.from_artifact(Artifact(root / "family"), device="cpu", rank_multiple=multiple)
        rows.append({"model": f"Llama-3-8B widths, {layers} layers, 3 branches, rate 0.95, bf16, ranks padded to "
                              f"{multiple} ({device})", "planned": planned, "loaded": loaded_bytes(model),
                     "seconds": round(time.perf_counter() - t, 1)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--device-memory", default="48GB")
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    from server.engine.kv_cache import parse_bytes

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plan = make_plan(paper_config(root / "paper"), parse_bytes(args.device_memory))
        print(f"The paper's deployment (configs/llama3-phi3.yaml) at real shapes, {args.device_memory}:")
        print("\n".join(table(plan)))
        out["paper"] = plan.to_json()
        if not args.skip_load:
            rows = check_loads(root / "load", args.layers)
            print("\nPlanned against loaded bytes:")
            print(f"{'shapes':<90} {'planned':>14} {'loaded':>14} {'diff':>8}")
            for r in rows:
                r["diff_percent"] = round(100 * (r["planned"] - r["loaded"]) / r["loaded"], 3)
                print(f"{r['model']:<90} {r['planned']:>14} {r['loaded']:>14} {r['diff_percent']:>7}%")
            out["loads"] = rows
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
