"""Phi-3-small served natively: tokens/s with its block-sparse layers against the same weights all dense.

Random weights at Phi-3-small's widths (hidden 4096, 32 heads, 8 kv heads, GeGELU 14336, vocab 100352, blocks
of 64, 16 local blocks, vertical stride 8) with ``--layers`` layers, written in the hub's layout and served
through the engine twice: as the checkpoint says (every second layer block-sparse), and with
``dense_attention_every_n_layers: 1`` (every layer dense). ``--batch`` requests of ``--prompt`` random tokens,
greedy, ``--new-tokens`` each (ignore_eos), submitted together.

    python bench/phi3small.py [--device cpu|cuda] [--layers 2] [--batch 16] [--prompt 1536] [--new-tokens 32]

On a GPU: --layers 32 --dtype bfloat16 is the real model's shape. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.synthetic import PHI3_SMALL_CONFIG, build_phi3small  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.core import Engine  # noqa: E402


def run(path: Path, args) -> dict:
    engine = Engine(max_waiting=args.batch, kv_cache_memory=int(args.kv_gib * 2**30))
    engine.add_standalone("small", path, device=args.device, dtype=getattr(torch, args.dtype), max_batch=args.batch,
                          max_seq=args.prompt + args.new_tokens, prefill_chunk=args.prefill_chunk)
    engine.start()
    engine.wait_ready(600)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 100000, (args.prompt,), generator=gen).tolist() for _ in range(args.batch)]
    firsts, ends, outputs = [], [], []

    async def one(p):
        stream = engine.submit("small", p, SamplingParams(temperature=0.0, max_tokens=args.new_tokens,
                                                           ignore_eos=True))
        tokens = []
        async for ev in stream:
            if ev.token_ids and not tokens:
                firsts.append(time.perf_counter())
            tokens += ev.token_ids
        ends.append(time.perf_counter())
        return tokens

    async def all_():
        return await asyncio.gather(*(one(p) for p in prompts))

    start = time.perf_counter()
    outputs = asyncio.run(all_())
    engine.stop()
    total = sum(len(o) for o in outputs)
    decode = total - len(outputs)
    return {"seconds": round(max(ends) - start, 3), "prefill_seconds": round(max(firsts) - start, 3),
            "decode_tok_s": round(decode / (max(ends) - max(firsts)), 2), "tokens": total, "outputs": outputs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1536)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--kv-gib", type=float, default=4.0)
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()
    shape = {k: PHI3_SMALL_CONFIG[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                                               "ff_intermediate_size", "blocksparse_block_size",
                                               "blocksparse_num_local_blocks", "blocksparse_vert_stride",
                                               "max_position_embeddings")}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, every in (("block-sparse (as shipped)", 2), ("all dense", 1)):
            path = build_phi3small(Path(tmp) / name.split()[0], seed=0, std=0.02, dtype=getattr(torch, args.dtype),
                                   num_hidden_layers=args.layers, dense_attention_every_n_layers=every, **shape)
            results[name] = run(path, args)
    sparse, dense = results["block-sparse (as shipped)"], results["all dense"]
    print(f"Phi-3-small widths, {args.layers} layers, {args.dtype}, {args.device} ({platform.processor() or 'cpu'}), "
          f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} new tokens")
    print(f"{'attention':<28} {'prefill s':>10} {'decode tok/s':>13} {'total s':>9}")
    for name, r in results.items():
        print(f"{name:<28} {r['prefill_seconds']:>10} {r['decode_tok_s']:>13} {r['seconds']:>9}")
    ratio = sparse["decode_tok_s"] / dense["decode_tok_s"]
    print(f"block-sparse / dense decode tok/s: {ratio:.2f}x; prefill time {sparse['prefill_seconds'] / dense['prefill_seconds']:.2f}x")
    out = {"args": vars(args), "results": {k: {kk: vv for kk, vv in v.items() if kk != "outputs"}
                                           for k, v in results.items()},
           "decode_ratio": round(ratio, 3),
           "same_tokens": sparse["outputs"] == dense["outputs"]}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
