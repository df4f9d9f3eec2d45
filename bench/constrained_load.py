"""Plain chat clients' latency with and without clients that send expensive constraints.

Serves MODEL_DIR as a standalone model on loopback, then runs ``--plain`` clients that loop on a short chat for
``--seconds``, twice: alone, and beside ``--constrained`` clients that loop on the most expensive constraints the
server still accepts (measured: a regex ``x{1,9999}`` of the widest class, ``.``, costs about 1.2 s to compile and
7 ms a token to mask on SmolLM2's tokenizer), each one new (a fresh literal prefix: no cache hit). Prints each
run's plain p50/p95 latency, the constrained clients' statuses, /health at the end, the p95 ratio, and JSON.

    python bench/constrained_load.py MODEL_DIR [--plain 8] [--constrained 8] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import ServerConfig  # noqa: E402
from tests.conftest import start_server  # noqa: E402


def loop(url: str, body_for, until: float, out: list, statuses: list, hammer: bool = False) -> None:
    """Post ``body_for(i)`` until ``until``; after a 429, wait its Retry-After (as the openai client does) unless
    ``hammer``."""
    i = 0
    with httpx.Client(timeout=300) as client:
        while time.monotonic() < until:
            t0 = time.monotonic()
            r = client.post(url + "/v1/chat/completions", json=body_for(i))
            statuses.append(r.status_code)
            if r.status_code == 200:
                out.append(time.monotonic() - t0)
            elif r.status_code == 429 and not hammer:
                time.sleep(min(float(r.headers.get("retry-after", "1")), max(until - time.monotonic(), 0)))
            i += 1


def run(url: str, plain: int, constrained: int, seconds: float, hammer: bool = False) -> dict:
    until = time.monotonic() + seconds
    latencies, plain_status, hard_status, threads = [], [], [], []
    chat = {"model": "m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 16,
            "temperature": 0}
    for c in range(plain):
        threads.append(threading.Thread(target=loop, args=(url, lambda i: chat, until, latencies, plain_status)))
    for c in range(constrained):
        def hard(i, c=c):
            return {**chat, "max_tokens": 16, "guided_regex": f"c{c}n{i}" + ".{1,9999}"}
        threads.append(threading.Thread(target=loop, args=(url, hard, until, [], hard_status, hammer)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {"plain_requests": len(latencies), "p50": round(statistics.median(latencies), 3),
            "p95": round(q[18], 3), "plain_statuses": sorted(set(plain_status)),
            "constrained_statuses": {s: hard_status.count(s) for s in sorted(set(hard_status))}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--plain", type=int, default=8)
    ap.add_argument("--constrained", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--hammer", action="store_true", help="constrained clients retry a 429 at once, ignoring "
                    "Retry-After")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["BRANCHSERVE_HOME"] = tmp
        server = start_server(ServerConfig.model_validate({
            "standalone": [{"name": "m", "path": args.model}],
            "limits": {"max_batch": 16, "max_context": 1024}}))
        try:
            httpx.post(server.url + "/v1/chat/completions", timeout=300, json={  # warm the grammar tables
                "model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "guided_regex": "a+"})
            alone = run(server.url, args.plain, 0, args.seconds)
            beside = run(server.url, args.plain, args.constrained, args.seconds, args.hammer)
            health = httpx.get(server.url + "/health").status_code
        finally:
            server.close()
    ratio = beside["p95"] / alone["p95"]
    print(f"{'run':<34} {'plain requests':>14} {'p50 s':>7} {'p95 s':>7}  constrained statuses")
    print(f"{'8 plain alone':<34} {alone['plain_requests']:>14} {alone['p50']:>7} {alone['p95']:>7}  -")
    print(f"{f'8 plain + {args.constrained} constrained':<34} {beside['plain_requests']:>14} {beside['p50']:>7} "
          f"{beside['p95']:>7}  {beside['constrained_statuses']}")
    print(f"plain p95 beside the constrained clients / alone: {ratio:.2f}x; /health after: {health}")
    print(json.dumps({"alone": alone, "beside": beside, "p95_ratio": round(ratio, 3), "health": health,
                      "args": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
