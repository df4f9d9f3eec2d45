"""Peak memory of embedding many long inputs through engine embed jobs on a standalone model.

    python bench/embed_memory.py MODEL_DIR [--inputs 256] [--tokens 400]

Loads MODEL_DIR (a causal LM checkpoint, e.g. the demo's SmolLM2 conversion under $BRANCHSERVE_HOME/models) in
fp32 on the CPU, queues ``--inputs`` embed jobs of ``--tokens`` tokens at once, and prints the time and the
process's peak RSS (ru_maxrss) before and after, as a line and as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.engine.core import Engine  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=400)
    args = ap.parse_args()
    engine = Engine()
    engine.add_standalone("model", args.model, max_batch=4, max_seq=2048, dtype=torch.float32)
    engine.start()
    engine.wait_ready(300)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    tokens = [[(i * 7 + j) % 40000 + 100 for j in range(args.tokens)] for i in range(args.inputs)]

    async def run():
        return await asyncio.gather(*(engine.embed("model", t) for t in tokens))

    t0 = time.perf_counter()
    asyncio.run(run())
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    engine.stop()
    print(f"{args.inputs} inputs x {args.tokens} tokens: {seconds:.1f} s, peak RSS {peak:.2f} GiB "
          f"(before the jobs: {before:.2f} GiB)")
    print(json.dumps({"inputs": args.inputs, "tokens": args.tokens, "seconds": round(seconds, 1),
                      "peak_rss_gib": round(peak, 2), "rss_before_gib": round(before, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
