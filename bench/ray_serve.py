"""`branchserve serve --ray` under load, a replica killed, a client gone, and its overhead against one process.

    python bench/ray_serve.py [--clients 32] [--seconds 30] [--json out.json]

Tiny synthetic models (a 3-branch family, rate 0.9) on the CPU, so what is measured is the serving layer. Each phase
runs the real CLI, `branchserve serve --config FILE [--ray]`, in a child process; this script joins its local Ray
instance as a second driver to read the replicas' stats and Ray's Prometheus metrics.

1. The family with 2 replicas (1 CPU each) under ``--clients`` streaming clients for ``--seconds``: outcomes, and
   requests per replica from Ray's metrics.
2. The same load again; one replica's process is killed (SIGKILL) a third of the way in: what the streams on it got,
   when the last failed request started, and when the replica was back.
3. A client disconnect mid-stream: how long until the replicas' running count is back to 0, against the time of
   one decode step.
4. Overhead at concurrency 1: the single process and the Ray app (one replica, 2 CPUs), both up, requests
   alternating between them: TTFT and tokens/s, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vs_vllm import branchserve_server, free_port, stop, wait_healthy  # noqa: E402

APP = "branchserve"
FAMILY = "family-art"
MODELS = ["math", "code", "chat"]
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


async def stream_once(client: httpx.AsyncClient, url: str, model: str, max_tokens: int) -> dict:
    """One streamed chat completion -> outcome (ok, error event, http NNN, dropped, hang), TTFT, tokens, times."""
    body = {"model": model, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.time()
    first, tokens, outcome = None, 0, "dropped"
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return {"outcome": f"http {r.status_code}", "start": t0, "end": time.time()}
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    outcome = "ok" if outcome == "dropped" else outcome
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    outcome = "error event"
                    continue
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content") and first is None:
                    first = time.time() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.TimeoutException:
        outcome = "hang"
    except httpx.TransportError:
        outcome = "dropped"
    return {"outcome": outcome, "start": t0, "end": time.time(), "ttft": first, "tokens": tokens}


async def alternate(urls: dict[str, str], rounds: int, max_tokens: int) -> dict:
    """Concurrency 1, the servers in turn: TTFT and tokens/s of each."""
    out = {name: [] for name in urls}
    async with httpx.AsyncClient(timeout=120) as client:
        for name, url in urls.items():  # warm-up
            await stream_once(client, url, "math", 4)
        for _ in range(rounds):
            for name, url in urls.items():
                out[name].append(await stream_once(client, url, "math", max_tokens))
    report = {}
    for name, runs in out.items():
        assert all(r["outcome"] == "ok" for r in runs), [r["outcome"] for r in runs]
        report[name] = {"ttft_p50_ms": 1000 * statistics.median(r["ttft"] for r in runs),
                        "tok_s": sum(r["tokens"] for r in runs) / sum(r["end"] - r["start"] for r in runs)}
    return report


async def load(url: str, clients: int, seconds: float, during=None) -> list[dict]:
    """``clients`` streaming clients in a loop for ``seconds``; ``during(t0)`` runs alongside."""
    results: list[dict] = []
    t0 = time.time()

    async def client_loop(i: int) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
            n = 0
            while time.time() - t0 < seconds:
                results.append(await stream_once(client, url, MODELS[(i + n) % 3], 32))
                n += 1

    tasks = [client_loop(i) for i in range(clients)]
    if during is not None:
        tasks.append(during(t0))
    await asyncio.gather(*tasks)
    return results


def outcomes(results: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in results:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    return counts


def ray_metrics() -> str:
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def per_replica(text: str, metric: str) -> dict[str, float]:
    """``metric``'s value per replica of the family deployment, summed over its other tags."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{") and f'deployment="{FAMILY}"' in line:
            replica = re.search(r'replica="([^"]+)"', line).group(1)
            out[replica] = out.get(replica, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def stats() -> dict:
    """One replica's stats (whichever Ray routes the call to)."""
    from ray import serve

    return serve.get_deployment_handle(FAMILY, app_name=APP).stats.remote().result()


def running_everywhere(replicas: int) -> int:
    """Sequences running on all ``replicas`` replicas: stats calls until each has answered once."""
    seen: dict[str, int] = {}
    for _ in range(200):
        s = stats()
        seen[s["replica"]] = s["running"]
        if len(seen) == replicas:
            break
    return sum(seen.values())


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None or FAMILY not in status.deployments:
        return 0
    return status.deployments[FAMILY].replica_states.get("RUNNING", 0)


def connect() -> None:
    import logging

    import ray

    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)


def config(artifact: Path, replicas: int, cpus: float) -> dict:
    return {"families": [{"artifact": str(artifact), "ray": {"num_replicas": replicas, "num_cpus": cpus}}],
            "limits": {"max_batch": 16, "max_context": 512}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30)
    p.add_argument("--rounds", type=int, default=20, help="requests per server in the overhead phase")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    from compression.compress import CompressOptions, compress
    from compression.synthetic import build_family

    report: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                    "clients": args.clients, "seconds": args.seconds}
    with tempfile.TemporaryDirectory(prefix="branchserve-ray-bench-") as tmp:
        home = Path(tmp)
        compress(build_family(home / "members", MODELS, seed=1), home / "art", CompressOptions(rate=0.9,
                                                                                              progress=False))
        artifact = home / "art"
        logs = open(home / "servers.log", "w")

        def start(cfg: dict, ray_app: bool):
            port = free_port()
            proc = branchserve_server(cfg, port, home, *(["--ray"] if ray_app else []), log=logs)
            url = f"http://127.0.0.1:{port}"
            t0 = time.monotonic()
            wait_healthy(url, proc, timeout=600)
            return proc, url, time.monotonic() - t0

        # 1-3: two replicas, one CPU each: load, a replica killed, a client gone.
        ray_proc, ray_url, ready = start(config(artifact, 2, 1), True)
        try:
            connect()  # once: Serve's handles in this process stay bound to the first cluster they met
            report["ray_ready_s"] = ready
            before = per_replica(ray_metrics(), "ray_serve_deployment_request_counter_total")
            say(f"{args.clients} clients for {args.seconds:.0f} s on 2 replicas")
            results = asyncio.run(load(ray_url, args.clients, args.seconds))
            time.sleep(12)  # Ray exports metrics every few seconds
            after = per_replica(ray_metrics(), "ray_serve_deployment_request_counter_total")
            spread = {r: after[r] - before.get(r, 0.0) for r in after}
            report["load"] = {"requests": len(results), "outcomes": outcomes(results),
                              "requests_per_replica": spread}
            say("the same load; one replica killed")
            report["kill"] = kill_one(ray_url, args.clients, args.seconds)
            say("a client gone mid-stream")
            report["disconnect"] = asyncio.run(client_gone(ray_url))
        finally:
            stop(ray_proc)

        # 4: one replica with 2 CPUs against the single process, both up, requests alternating.
        single, single_url, _ = start(config(artifact, 1, 2), False)
        ray_proc, ray_url, _ = start(config(artifact, 1, 2), True)
        try:
            say("overhead at concurrency 1")
            report["overhead"] = asyncio.run(alternate({"single process": single_url, "ray": ray_url}, args.rounds,
                                                       64))
        finally:
            stop(single)
            stop(ray_proc)
        logs.close()
    summarize(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


async def client_gone(url: str) -> dict:
    """Read 3 chunks of a long stream, close it, and time the replica's running count back to 0."""
    step = 0.0
    async with httpx.AsyncClient(timeout=60) as client:
        timed = await stream_once(client, url, "math", 64)
        step = (timed["end"] - timed["start"] - timed["ttft"]) / max(1, timed["tokens"] - 1)
        body = {"model": "math", "messages": MESSAGES, "max_tokens": 400, "temperature": 0, "stream": True}
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 3:
                        break
            running_before, poll_ms = 0, 0.0
            for _ in range(100):  # until the replicas report it running
                polled = time.time()
                running_before = await asyncio.to_thread(running_everywhere, 2)
                poll_ms = 1000 * (time.time() - polled)  # what one look at both replicas costs
                if running_before:
                    break
        closed = time.time()
    freed = None
    while time.time() - closed < 10:
        if await asyncio.to_thread(running_everywhere, 2) == 0:
            freed = time.time() - closed
            break
        await asyncio.sleep(0.005)
    return {"running_before_close": running_before, "freed_after_ms": None if freed is None else 1000 * freed,
            "decode_step_ms": 1000 * step, "one_poll_ms": poll_ms}


def kill_one(url: str, clients: int, seconds: float) -> dict:
    killed: dict = {}

    async def killer(t0: float) -> None:
        await asyncio.sleep(seconds / 3)
        victim = await asyncio.to_thread(stats)
        os.kill(victim["pid"], signal.SIGKILL)
        killed.update(at=time.time(), pid=victim["pid"], replica=victim["replica"])
        while await asyncio.to_thread(running_replicas) >= 2:
            await asyncio.sleep(0.2)
        while await asyncio.to_thread(running_replicas) < 2:
            await asyncio.sleep(0.5)
        killed["back_after_s"] = time.time() - killed["at"]

    results = asyncio.run(load(url, clients, seconds, killer))
    failed = [r for r in results if r["outcome"] != "ok"]
    in_flight = [r for r in results if r["start"] <= killed["at"] <= r["end"]]
    late = [r["start"] - killed["at"] for r in failed if r["start"] > killed["at"]]
    return {"requests": len(results), "outcomes": outcomes(results),
            "in_flight_at_kill": outcomes(in_flight),
            "last_failed_start_after_kill_s": max(late) if late else None,
            "replica_back_after_s": killed.get("back_after_s")}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def summarize(report: dict) -> None:
    from compression.report import text_table

    o = report["overhead"]
    s, r = o["single process"], o["ray"]
    print(text_table(["server", "TTFT p50 ms", "tok/s"], [
        ["single process", f"{s['ttft_p50_ms']:.1f}", f"{s['tok_s']:.1f}"],
        ["ray (1 replica)", f"{r['ttft_p50_ms']:.1f}", f"{r['tok_s']:.1f}"],
        ["ray / single", f"{r['ttft_p50_ms'] / s['ttft_p50_ms']:.2f}x", f"{r['tok_s'] / s['tok_s']:.2f}x"]]))
    d = report["disconnect"]
    print(f"\nclient gone mid-stream: running {d['running_before_close']} -> 0 after "
          f"{d['freed_after_ms'] if d['freed_after_ms'] is None else round(d['freed_after_ms'], 1)} ms "
          f"(one decode step: {d['decode_step_ms']:.1f} ms; one look at both replicas' stats: {d['one_poll_ms']:.1f} ms)")
    load_, kill = report["load"], report["kill"]
    print(f"\n{report['clients']} clients, {report['seconds']:.0f} s, 2 replicas: {load_['requests']} requests, "
          f"outcomes {load_['outcomes']}, per replica {load_['requests_per_replica']}")
    print(f"one replica killed: outcomes {kill['outcomes']}; in flight at the kill {kill['in_flight_at_kill']}; "
          f"last failed request started {kill['last_failed_start_after_kill_s']} s after the kill; "
          f"replica back after {kill['replica_back_after_s']} s")


if __name__ == "__main__":
    sys.exit(main())
