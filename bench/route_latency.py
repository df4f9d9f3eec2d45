"""Time to route, alone and under load, against a running server (the demo, say).

    python bench/route_latency.py --url http://127.0.0.1:8000 [--concurrent 16] [--huge-mb 2] [--long 20]

Through ``POST /v1/router/decide`` (the router alone, no generation): the p50 of
one request at a time, then the p50 and p95 of ``--concurrent`` requests sent at
once; the same bursts to ``GET /health``, which routes nothing (the floor that
HTTP and request handling set on the same cores); ``--long`` requests one at a
time with a message of about 200 tokens (LONG: 202 tokens for
all-MiniLM-L6-v2's tokenizer, 199 for SmolLM2's); and one
chat completion to ``auto`` with a ``--huge-mb`` message, timed, followed by a
normal chat request that must still answer. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import httpx

TEXTS = ["hello", "How are you?", "Who wrote Hamlet?", "What time is it?", "reverse house", "add 3 5",
         "What is the capital of France?", "shift abc", "Tell me a joke", "add 12 30", "reverse lighthouse",
         "What is my name?", "Translate 'cat' to French", "cipher hello", "Summarize the plot of Dune",
         "How do I boil an egg?"]

LONG = ("I am planning a small dinner party for eight friends next Saturday and I would like some help with the "
        "menu. Two of my guests are vegetarian, one cannot eat gluten, and another one dislikes anything spicy. "
        "I have a regular oven, a stove with four burners and a small grill on the balcony, but no microwave. "
        "I would like to serve a starter, a main course and a dessert, and I can spend about five hours cooking "
        "on the day itself, plus a few hours the evening before. My budget is moderate, and I would prefer "
        "dishes that can be prepared partly in advance so that I can spend time with my guests instead of "
        "standing in the kitchen all evening. Could you suggest a menu that works for everyone at the table, "
        "with a rough timeline for the preparation, a shopping list grouped by shop, and a few ideas for drinks "
        "that go well with the food? Finally, what could I do with the leftovers on Sunday, for two people, on a quiet evening?")


async def decide(client: httpx.AsyncClient, url: str, text: str) -> float:
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/router/decide", json={"messages": [{"role": "user", "content": text}]})
    r.raise_for_status()
    return time.perf_counter() - t0


async def ping(client: httpx.AsyncClient, url: str) -> float:
    t0 = time.perf_counter()
    (await client.get(url + "/health")).raise_for_status()
    return time.perf_counter() - t0


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


async def main_async(args) -> dict:
    async with httpx.AsyncClient(timeout=120, headers={"authorization": f"Bearer {args.key}"} if args.key else None
                                 ) as client:
        await decide(client, args.url, "warm up")
        alone = [await decide(client, args.url, TEXTS[i % len(TEXTS)]) for i in range(args.concurrent)]
        rounds = []
        for _ in range(args.rounds):
            rounds += await asyncio.gather(*(decide(client, args.url, TEXTS[i % len(TEXTS)])
                                             for i in range(args.concurrent)))
        report = {"alone_p50_s": statistics.median(alone), "concurrent": args.concurrent,
                  "concurrent_p50_s": statistics.median(rounds), "concurrent_p95_s": p95(rounds)}
        report["p95_vs_alone_p50"] = report["concurrent_p95_s"] / report["alone_p50_s"]
        # The floor under those numbers on this machine: the same bursts to GET /health, which routes nothing
        # (HTTP, the client and the server's request handling alone, on the same cores).
        health_alone = [await ping(client, args.url) for _ in range(args.concurrent)]
        health = []
        for _ in range(args.rounds):
            health += await asyncio.gather(*(ping(client, args.url) for _ in range(args.concurrent)))
        report["health"] = {"alone_p50_s": statistics.median(health_alone), "concurrent_p95_s": p95(health)}
        if args.long:
            await decide(client, args.url, LONG)
            long = [await decide(client, args.url, LONG) for _ in range(args.long)]
            report["long_200_tokens"] = {"n": args.long, "p50_s": statistics.median(long), "p95_s": p95(long)}
        if args.huge_mb:
            huge = "Please reverse the following text. " + "lorem ipsum dolor sit amet " * int(
                args.huge_mb * 1e6 / 27)
            t0 = time.perf_counter()
            r = await client.post(args.url + "/v1/chat/completions", json={
                "model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": huge}]})
            report["huge"] = {"bytes": len(huge), "status": r.status_code, "seconds": time.perf_counter() - t0,
                              "body": r.text[:200]}
            t0 = time.perf_counter()
            r = await client.post(args.url + "/v1/chat/completions", json={
                "model": "auto", "max_tokens": 8, "messages": [{"role": "user", "content": "add 3 5"}]})
            report["after_huge"] = {"status": r.status_code, "seconds": time.perf_counter() - t0}
        return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True)
    p.add_argument("--key", help="API key, if the server wants one")
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3, help="bursts of --concurrent requests")
    p.add_argument("--huge-mb", type=float, default=2.0, help="0: skip the huge message")
    p.add_argument("--long", type=int, default=20, help="requests with the 200-token message (0: none)")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    print(f"time to route ({args.url}): one at a time p50 {1000 * report['alone_p50_s']:.0f} ms; "
          f"{report['concurrent']} at once p50 {1000 * report['concurrent_p50_s']:.0f} ms, "
          f"p95 {1000 * report['concurrent_p95_s']:.0f} ms ({report['p95_vs_alone_p50']:.2f}x the p50 alone)")
    h = report["health"]
    print(f"the same bursts to GET /health: one at a time p50 {1000 * h['alone_p50_s']:.1f} ms; "
          f"{report['concurrent']} at once p95 {1000 * h['concurrent_p95_s']:.1f} ms")
    if "long_200_tokens" in report:
        lg = report["long_200_tokens"]
        print(f"a 200-token message, one at a time ({lg['n']}): p50 {1000 * lg['p50_s']:.1f} ms, "
              f"p95 {1000 * lg['p95_s']:.1f} ms")
    if "huge" in report:
        h, a = report["huge"], report["after_huge"]
        print(f"a {h['bytes'] / 1e6:.1f} MB message to auto: HTTP {h['status']} in {h['seconds']:.2f} s; "
              f"a normal request right after: HTTP {a['status']} in {a['seconds']:.2f} s")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
