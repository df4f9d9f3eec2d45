"""Many clients at once against a running server (the demo, say): nothing but 200 or 429, nothing dropped.

    python bench/load.py --url http://127.0.0.1:8000 [--clients 64] [--seconds 60] [--json out.json]

Each client loops for ``--seconds``: a chat completion (half of them streamed, to
``auto`` and to each served model in turn, short max_tokens), waiting
``Retry-After`` after a 429. Counts every answer by status, every transport error
(a dropped connection, a timeout), every stream that ended without ``[DONE]``,
and the latency of the 200s. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections import Counter

import httpx

TEXTS = ["add 3 5", "reverse house", "shift hello", "What is the capital of France?", "Tell me a joke",
         "add 12 30", "reverse lighthouse", "How do I boil an egg?"]


async def one(client: httpx.AsyncClient, url: str, model: str, text: str, stream: bool) -> tuple[str, float | None,
                                                                                               float]:
    """-> (outcome, Retry-After seconds for a 429, seconds taken)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 16, "stream": stream}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(url + "/v1/chat/completions", json=body)
            retry = float(r.headers["retry-after"]) if r.status_code == 429 and "retry-after" in r.headers else None
            outcome = str(r.status_code) if r.status_code != 429 or retry is not None else "429 without Retry-After"
            return outcome, retry, time.perf_counter() - t0
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                retry = float(r.headers["retry-after"]) if "retry-after" in r.headers else None
                outcome = str(r.status_code) if r.status_code != 429 or retry is not None else "429 without Retry-After"
                return outcome, retry, time.perf_counter() - t0
            last = ""
            async for line in r.aiter_lines():
                if line:
                    last = line
                    if '"error"' in line:
                        try:
                            why = json.loads(line.removeprefix("data: "))["error"]["message"][:60]
                        except (ValueError, KeyError, TypeError):
                            why = line[:60]
                        return f"error event in stream: {why}", None, time.perf_counter() - t0
            return ("200" if last == "data: [DONE]" else "stream cut before [DONE]"), None, time.perf_counter() - t0
    except httpx.TransportError as e:
        return f"transport error ({type(e).__name__}: {str(e)[:40]})", None, time.perf_counter() - t0


async def run(args) -> dict:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        models = ["auto"] + [m["id"] for m in (await client.get(args.url + "/v1/models")).json()["data"]
                             if m["id"] != "auto" and m.get("kind") != "embedding"]
        outcomes: Counter = Counter()
        latencies: list[float] = []
        deadline = time.monotonic() + args.seconds

        async def worker(k: int) -> None:
            i = k
            while time.monotonic() < deadline:
                outcome, retry, took = await one(client, args.url, models[i % len(models)], TEXTS[i % len(TEXTS)],
                                                 stream=i % 2 == 0)
                outcomes[outcome] += 1
                if outcome == "200":
                    latencies.append(took)
                if retry is not None:
                    await asyncio.sleep(retry)
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(args.clients)))
        wall = time.perf_counter() - t0
    ordered = sorted(latencies)
    return {"url": args.url, "clients": args.clients, "seconds": wall, "models": models,
            "outcomes": dict(outcomes), "requests": sum(outcomes.values()),
            "server_errors": sum(n for o, n in outcomes.items() if o.startswith("5")),
            "dropped": sum(n for o, n in outcomes.items() if not o[0].isdigit() or o.startswith("429 without")),
            "ok_per_s": outcomes["200"] / wall,
            "latency_p50_s": statistics.median(ordered) if ordered else None,
            "latency_p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    report = asyncio.run(run(args))
    print(f"{args.clients} clients for {report['seconds']:.0f} s against {args.url} ({', '.join(report['models'])})")
    print(f"{'outcome':<90} {'count':>7}")
    for outcome, n in sorted(report["outcomes"].items()):
        print(f"{outcome:<90} {n:>7}")
    p50, p95 = report["latency_p50_s"], report["latency_p95_s"]
    print(f"5xx: {report['server_errors']}   dropped or malformed: {report['dropped']}   200/s: "
          f"{report['ok_per_s']:.2f}   200 latency p50 {p50 or 0:.2f} s, p95 {p95 or 0:.2f} s")
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["server_errors"] or report["dropped"] else 0


if __name__ == "__main__":
    sys.exit(main())
