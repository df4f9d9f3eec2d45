"""Do constrained rows slow their unconstrained neighbours? 16 concurrent rows of SmolLM2-135M-Instruct, 8 of them
under a JSON schema, against the same 16 rows with no schema: output tok/s of the 8 unconstrained rows.

    python bench/constrained_mix.py [--rounds 3] [--new-tokens 64] [--json out.json]

In-process, through the engine's own API. The schema is one string field of at least 2000 characters, so every
constrained token is masked and no constrained row ends early; the unconstrained rows use ignore_eos, so every
row makes exactly ``--new-tokens`` tokens. Rounds alternate A B A B. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.report import text_table  # noqa: E402
from server.engine.sampling import SamplingParams  # noqa: E402
from server.engine.core import Engine  # noqa: E402
from server.engine.structured import Constraint  # noqa: E402

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 2000}}, "required": ["text"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    from server.demo.build import smollm2
    from server.engine.text import render_chat

    engine = Engine()
    engine.add_standalone("smollm2", smollm2(), max_batch=16, max_seq=2048, prefill_chunk=512)
    engine.start()
    tok = engine.tokenizer("smollm2")
    prompts = [render_chat(tok, [{"role": "user", "content": f"Describe item number {i} in a JSON object."}])
               for i in range(16)]
    grammar = engine.compile_now("smollm2", Constraint.json_schema(SCHEMA))

    async def run(constrained: bool) -> dict:
        async def one(i: int):
            schema = constrained and i % 2 == 1
            params = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True,
                                    grammar=grammar if schema else None)
            n = 0
            async for ev in engine.submit("smollm2", prompts[i], params):
                n += len(ev.token_ids)
            return schema, n, time.perf_counter()

        t0 = time.perf_counter()
        rows = await asyncio.gather(*(one(i) for i in range(16)))
        plain = [r for i, r in enumerate(rows) if i % 2 == 0]  # the same 8 rows in both runs
        end = max(r[2] for r in plain)
        return {"plain_rows_tok_s": sum(r[1] for r in plain) / (end - t0),
                "tokens": [r[1] for r in rows], "seconds": time.perf_counter() - t0}

    try:
        asyncio.run(run(False))  # warm-up
        runs = {"none": [], "8 of 16 constrained": []}
        for _ in range(args.rounds):
            runs["none"].append(asyncio.run(run(False)))
            runs["8 of 16 constrained"].append(asyncio.run(run(True)))
    finally:
        engine.stop()
    med = {k: statistics.median(r["plain_rows_tok_s"] for r in v) for k, v in runs.items()}
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "new_tokens": args.new_tokens, "rounds": args.rounds, "median_tok_s": med,
              "ratio": med["8 of 16 constrained"] / med["none"], "runs": runs}
    print(f"SmolLM2-135M-Instruct, 16 concurrent rows x {args.new_tokens} tokens; tok/s of the 8 unconstrained rows "
          f"(median of {args.rounds} alternating rounds); {report['machine']}, {report['date']}")
    print(text_table(["neighbours", "tok/s per round", "median", "ratio"],
                     [[k, " / ".join(f"{r['plain_rows_tok_s']:.1f}" for r in v), f"{med[k]:.1f}",
                       f"{med[k] / med['none']:.2f}x"] for k, v in runs.items()]))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
