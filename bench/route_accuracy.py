"""Which model `model: "auto"` really reaches, over HTTP, for labeled messages.

    python bench/route_accuracy.py --url http://127.0.0.1:8000 --labeled bench/router_demo_heldout.jsonl

Every line of the labeled file (``{"text": ...}`` or ``{"messages": [...]}``, with its ``route``; ``none``
means the default route) is sent as a chat completion to ``auto`` (max_tokens 1, temperature 0) through the
official ``openai`` client. The route and model that answered come from the response's
``x-branchserve-route`` header and the route's target in ``GET /v1/router/routes``. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import openai


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", help="API key (and admin key for the routes listing), if the server wants one")
    p.add_argument("--labeled", required=True, type=Path)
    p.add_argument("--json", type=Path, help="also write the report here")
    args = p.parse_args()
    headers = {"authorization": f"Bearer {args.key}"} if args.key else {}
    listing = httpx.get(args.url + "/v1/router/routes", headers=headers, timeout=30).raise_for_status().json()
    targets = {r["name"]: r["target"] for r in listing["routes"]}
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=args.key or "none", max_retries=0, timeout=600)
    rows, right, by_route = [], 0, Counter()
    started = time.perf_counter()
    for line in args.labeled.read_text().splitlines():
        if not line.strip():
            continue
        example = json.loads(line)
        messages = example.get("messages") or [{"role": "user", "content": example["text"]}]
        want = listing["default_route"] if example["route"] == "none" else example["route"]
        raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages, max_tokens=1,
                                                               temperature=0)
        got = raw.headers.get("x-branchserve-route")
        ok = got == want
        right += ok
        by_route[(want, ok)] += 1
        if not ok:
            rows.append({"input": messages[-1]["content"], "turns": len(messages), "expected": want, "reached": got,
                         "model": targets.get(got)})
    n = sum(by_route.values())
    report = {"url": args.url, "labeled": str(args.labeled), "n": n, "reached_right_model": right,
              "accuracy": right / n, "seconds": time.perf_counter() - started,
              "per_route": {r: {"right": by_route[(r, True)], "n": by_route[(r, True)] + by_route[(r, False)]}
                            for r in sorted({w for w, _ in by_route})},
              "mistakes": rows}
    print(f"{right} of {n} messages reached the right model ({100 * right / n:.1f} %) through auto at {args.url}")
    print(f"{'route':<10} {'target':<14} {'right':>5} {'of':>4}")
    for r, v in report["per_route"].items():
        print(f"{r:<10} {targets.get(r, '?'):<14} {v['right']:>5} {v['n']:>4}")
    for m in rows:
        print(f"  {m['expected']} -> {m['reached']} ({m['turns']} messages): {m['input'][:80]}")
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
