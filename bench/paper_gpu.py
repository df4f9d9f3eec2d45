"""The paper's deployment loaded on one device at real shapes (random weights): KV capacity, and a load on it.

Three Llama-3-8B fine-tunes as one family (rate 0.95, random trunk and rank-r residuals, per-branch embeddings
and heads, ranks padded as `serve` pads them) and Phi-3-small natively (random weights), loaded onto one device
the way `serve` holds them. The engine then sizes both KV caches as it does at start (`Engine.allocate_kv`: on
CUDA, what loading left of 90% of the memory, split between the two), for:

- configs/llama3-phi3.yaml's limits (max_batch 32, max_context 8192), where each cache stops at its worst case;
- max_batch 256 (vLLM's default max_num_seqs), where the memory is what bounds the cache;
- a 48 GB card (the paper's): limits.kv_cache_memory = 90% of 48 GB less the weights as loaded here.

`branchserve plan` is set beside what the engine allocated. Then a load at max_batch 256: ``--requests`` chat-sized
rows per model (``--prompt`` tokens, ``--new-tokens`` each, the family's rows over its three branches) and
``--long-rows`` family rows of ``--long`` tokens, all queued at once, the two runners stepped in turn as the
engine thread steps them: peak rows per step, preemptions, tokens.

    python bench/paper_gpu.py [--device cuda] [--layers 32] [--tiny]

``--tiny`` scales every width down (a smoke run on the CPU). Prints tables and one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from compression.synthetic import PHI3_SMALL_CONFIG  # noqa: E402
from plan_paper import LLAMA3_8B, write_manifest  # noqa: E402
from server.bench.engine import RandomFamily, SHAPES  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from server.engine.core import GPU_MEMORY_UTILIZATION, Engine  # noqa: E402
from server.engine.kv_cache import BLOCK_SIZE  # noqa: E402
from server.engine.model import FamilyModel  # noqa: E402
from server.engine.phi3small import Phi3SmallConfig, Phi3SmallForCausalLM, Rotary  # noqa: E402
from server.engine.runner import FamilyRunner, StandaloneRunner  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.sequence import Sequence  # noqa: E402
from server.plan import loaded_bytes, make_plan  # noqa: E402

GB = 2**30
BRANCHES = ["math", "code", "medicine"]
TINY = {"hidden_size": 256, "intermediate_size": 704, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 4096}


def shapes(args) -> tuple[dict, dict]:
    """(the family's Llama config, Phi-3-small's config), at ``args.layers`` layers."""
    llama = dict(LLAMA3_8B, num_hidden_layers=args.layers)
    phi = dict(PHI3_SMALL_CONFIG, num_hidden_layers=args.layers)
    if args.tiny:
        llama.update(TINY)
        phi.update({k: v for k, v in TINY.items() if k != "intermediate_size"}, ff_intermediate_size=704,
                   blocksparse_block_size=16, blocksparse_num_local_blocks=4, dummy_token_indices=[])
    return llama, phi


def random_family(llama: dict, device, dtype) -> FamilyModel:
    source = RandomFamily("llama3-8b", len(BRANCHES), 0.95, device, dtype,
                          overrides={k: llama[k] for k in (*SHAPES["llama3-8b"], "num_hidden_layers") if k in llama})
    source.branches = list(BRANCHES)
    return FamilyModel.from_artifact(source, device=device, dtype=dtype)


def random_phi3small(phi: dict, device, dtype, root: Path) -> Phi3SmallForCausalLM:
    """Phi-3-small's module at these shapes, weights drawn on the device (no checkpoint written or read)."""
    (root / "config.json").write_text(json.dumps(phi))
    cfg = Phi3SmallConfig.from_file(root / "config.json")
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Phi3SmallForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.normal_(0.0, 0.02)
    model.rotary = Rotary(cfg).to(device)  # fp32 buffers, as from_pretrained builds them
    return model.eval()


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def size_caches(family, phi, device, max_batch: int, max_context: int, prefill_chunk: int,
                kv_cache_memory: int | None):
    """Both runners with their caches sized by the engine's own start-up code."""
    family.k_cache = family.v_cache = []  # the family model holds its cache: the last setting's goes first
    engine = Engine(kv_cache_memory=kv_cache_memory)
    runners = [FamilyRunner(family, max_batch, max_context, prefill_chunk),
               StandaloneRunner(phi, max_batch, max_context, prefill_chunk)]
    for r in runners:
        engine._add_runner(r)
    engine.allocate_kv()
    return engine, runners


def capacity_row(label: str, runners, budget_note: str) -> dict:
    fam, phi = runners
    return {"setting": label, "budget": budget_note,
            "family_tokens": fam.pool.capacity, "phi3_tokens": phi.pool.capacity,
            "family_kv_gib": fam.pool.capacity * fam.kv_bytes_per_token() / GB,
            "phi3_kv_gib": phi.pool.capacity * phi.kv_bytes_per_token() / GB,
            "sequences_at_1k": fam.pool.capacity // 1024 + phi.pool.capacity // 1024,
            "sequences_at_8k": fam.pool.capacity // 8192 + phi.pool.capacity // 8192}


def load(runners, args, vocab: dict) -> dict:
    """Queue every request at once, then step the runners in turn until all are done."""
    g = torch.Generator().manual_seed(0)
    seqs = {0: [], 1: []}

    def queue(which: int, n: int, length: int, branches: int):
        runner = runners[which]
        for i in range(n):
            prompt = torch.randint(0, vocab[which], (length,), generator=g).tolist()
            seq = Sequence(f"{which}-{length}-{i}", prompt, SamplingParams(max_tokens=args.new_tokens, temperature=0),
                           lambda ev: None, i % branches)
            runner.add(seq)
            seqs[which].append(seq)

    queue(0, args.long_rows, args.long, len(BRANCHES))
    queue(0, args.requests, args.prompt, len(BRANCHES))
    queue(1, args.requests, args.prompt, 1)
    peak = [0, 0]
    peak_blocks = [0, 0]
    steps = [0, 0]
    device = runners[0].device
    t0 = time.perf_counter()
    while any(r.has_work() for r in runners):
        for k, r in enumerate(runners):
            if r.has_work():
                r.step()
                steps[k] += 1
                peak[k] = max(peak[k], len(r.running))
                peak_blocks[k] = max(peak_blocks[k], r.pool.used)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds}
    for k, name in ((0, "family"), (1, "phi3")):
        done = [s for s in seqs[k] if s.finished]
        out[name] = {"requests": len(seqs[k]), "finished": len(done),
                     "all_full_length": all(len(s.output) == args.new_tokens for s in seqs[k]),
                     "tokens": sum(len(s.output) for s in seqs[k]), "peak_running": peak[k],
                     "peak_blocks": peak_blocks[k], "blocks": runners[k].pool.num_blocks,
                     "preemptions": runners[k].preemptions, "steps": steps[k]}
    out["tok_s"] = (out["family"]["tokens"] + out["phi3"]["tokens"]) / seconds
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="every width scaled down: a smoke run on the CPU")
    ap.add_argument("--requests", type=int, default=96, help="chat-sized requests per model in the load")
    ap.add_argument("--prompt", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--long", type=int, default=8000)
    ap.add_argument("--long-rows", type=int, default=4)
    ap.add_argument("--skip-load", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    llama, phi = shapes(args)
    paper = {"max_batch": 32, "max_context": 8192, "prefill_chunk": 2048}
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "layers": args.layers, "tiny": args.tiny}
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 160 * GB
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        family = random_family(llama, device, dtype)
        after_family = allocated(device)
        (Path(tmp) / "phi").mkdir()  # its config.json: the model's, and the plan's Phi-3-small
        model = random_phi3small(phi, device, dtype, Path(tmp) / "phi")
        weights = allocated(device)
        out["load_s"] = round(time.perf_counter() - t, 1)
        out["weights"] = {"family": loaded_bytes(family), "phi3": loaded_bytes(model),
                          "cuda_allocated_family": after_family, "cuda_allocated_both": weights}
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            out["weights"].update(cuda_free=free, cuda_total=total)
        # the plan of the same deployment, on a device of this one's memory
        write_manifest(Path(tmp) / "family", llama, BRANCHES, 0.95)
        config = {"families": [{"artifact": str(Path(tmp) / "family"), "device": "cuda", "dtype": "bfloat16",
                                "branches": {f"llama-{b}": b for b in BRANCHES}}],
                  "standalone": [{"name": "phi3", "path": str(Path(tmp) / "phi"), "device": "cuda",
                                  "dtype": "bfloat16"}]}

        def plan(max_batch: int, kv: int | None = None) -> dict:
            cfg = ServerConfig.model_validate(dict(config, limits=dict(paper, max_batch=max_batch,
                                                                       kv_cache_memory=kv)))
            p = make_plan(cfg, total).to_json()
            return {"tokens": [m["kv_tokens"] for m in p["models"]],
                    "weight_bytes": [m["weight_bytes"] for m in p["models"]], "kv_budget": p["kv_budget"]}

        rows = []
        settings = [("configs/llama3-phi3.yaml limits (max_batch 32)", 32, None),
                    ("max_batch 256", 256, None),
                    ("a 48 GB card, max_batch 256", 256, int(GPU_MEMORY_UTILIZATION * 48 * GB) - weights
                     if device.type == "cuda" else 4 * GB)]
        for label, max_batch, kv in settings:
            engine = runners = None  # the last setting's caches go before this one's budget is measured
            gc.collect()  # the runners hold reference cycles: their caches go only with a collection
            if device.type == "cuda":
                torch.cuda.empty_cache()
            engine, runners = size_caches(family, model, device, max_batch, paper["max_context"],
                                          paper["prefill_chunk"], kv)
            row = capacity_row(label, runners, "default" if kv is None else f"{kv / GB:.2f} GiB")
            planned = plan(max_batch, kv)
            row["planned"] = planned
            if device.type == "cuda":
                row["cuda_allocated"] = torch.cuda.memory_allocated(device)
            rows.append(row)
        out["capacity"] = rows
        print(f"The paper's deployment on {out['device']} ({total / GB:.1f} GiB), {args.layers} layers"
              f"{', tiny widths' if args.tiny else ''}, bf16, random weights; torch {torch.__version__}")
        w = out["weights"]
        print(f"weights: family {w['family'] / GB:.2f} GiB, Phi-3-small {w['phi3'] / GB:.2f} GiB "
              f"(CUDA allocated with both: {w['cuda_allocated_both'] / GB:.2f} GiB); loaded in {out['load_s']} s")
        print(f"{'setting':<48} {'KV budget':>10} {'family tok':>11} {'phi3 tok':>10} {'planned (fam, phi3)':>22} "
              f"{'seq@1k':>7} {'seq@8k':>7}")
        for r in rows:
            print(f"{r['setting']:<48} {r['budget']:>10} {r['family_tokens']:>11} {r['phi3_tokens']:>10} "
                  f"{str(tuple(r['planned']['tokens'])):>22} {r['sequences_at_1k']:>7} {r['sequences_at_8k']:>7}")
        if not args.skip_load:
            engine = runners = None
            gc.collect()  # the runners hold reference cycles: their caches go only with a collection
            if device.type == "cuda":
                torch.cuda.empty_cache()
            _, runners = size_caches(family, model, device, 256, paper["max_context"], paper["prefill_chunk"], None)
            vocab = {0: llama["vocab_size"], 1: phi["vocab_size"]}
            out["load"] = result = load(runners, args, vocab)
            print(f"\nload at max_batch 256: {args.requests} requests per model of {args.prompt} prompt tokens and "
                  f"{args.new_tokens} new, {args.long_rows} family rows of {args.long} tokens, all queued at once; "
                  f"{result['seconds']:.1f} s, {result['tok_s']:.0f} generated tok/s")
            print(f"{'model':<8} {'requests':>8} {'finished':>8} {'full length':>11} {'peak running':>12} "
                  f"{'peak blocks':>11} {'blocks':>8} {'preempted':>9} {'steps':>6}")
            for name in ("family", "phi3"):
                r = result[name]
                print(f"{name:<8} {r['requests']:>8} {r['finished']:>8} {str(r['all_full_length']):>11} "
                      f"{r['peak_running']:>12} {r['peak_blocks']:>11} {r['blocks']:>8} {r['preemptions']:>9} "
                      f"{r['steps']:>6}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
