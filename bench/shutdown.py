"""SIGTERM under load: how many requests a shutting-down server leaves without an answer.

    python bench/shutdown.py [--config FILE | --demo] [--clients 64] [--before 15] [--runs 3] [--json out.json]

Each run starts `branchserve serve` as its own process, waits for /health, runs ``--clients`` clients looping on
chat completions (bench/load.py's mix: half streamed, every served model and ``auto`` in turn, Retry-After
honoured), sends SIGTERM after ``--before`` seconds, and lets the clients go on until the process has exited.
Every request is classed by what its client saw:

- answered: a 200 (a stream ending in [DONE]), a 4xx/5xx with a body, or a stream that ended in an error event;
- refused: the connection could not be opened (the server no longer listens; nothing was sent);
- cut: a request sent and never answered (the connection closed under it, or a stream ended without [DONE]).

The target is 0 cut in every run. Prints a table per run, the server's exit status and time after the signal,
whether its log holds a traceback, and JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import TEXTS, one  # noqa: E402
from tests.conftest import free_port  # noqa: E402


def kind(outcome: str) -> str:
    if outcome.startswith("transport error (ConnectError"):
        return "refused"
    if outcome.startswith("transport error") or outcome == "stream cut before [DONE]":
        return "cut"
    return "answered"


async def clients(url: str, n: int, proc: subprocess.Popen, signal_at: float) -> tuple[Counter, Counter]:
    """(outcomes before the signal, outcomes after it, by when the request started)."""
    before, after = Counter(), Counter()
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        models = ["auto"] + [m["id"] for m in (await client.get(url + "/v1/models")).json()["data"]
                             if m["id"] != "auto" and m.get("kind") != "embedding"]

        async def worker(k: int) -> None:
            i = k
            while True:
                started = time.monotonic()
                outcome, retry, _ = await one(client, url, models[i % len(models)], TEXTS[i % len(TEXTS)],
                                              stream=i % 2 == 0)
                (before if started < signal_at else after)[outcome] += 1
                if kind(outcome) == "refused" and proc.poll() is not None:
                    return
                if kind(outcome) == "refused" or outcome.startswith("503"):
                    await asyncio.sleep(0.2)
                elif retry is not None:
                    await asyncio.sleep(retry)
                i += 1

        await asyncio.gather(*(worker(k) for k in range(n)))
    return before, after


def run_once(args, config_args: list[str], log_dir: Path, run: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = log_dir / f"server-{run}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", *config_args, "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + args.start_timeout
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (see {log})")
            time.sleep(0.5)
        signal_at = time.monotonic() + args.before
        stopped: dict = {}

        async def main():
            async def stop_later():
                await asyncio.sleep(args.before)
                proc.send_signal(signal.SIGTERM)
                while proc.poll() is None:
                    await asyncio.sleep(0.1)
                stopped["after_s"] = time.monotonic() - signal_at

            stopper = asyncio.create_task(stop_later())
            counts = await clients(url, args.clients, proc, signal_at)
            await stopper
            return counts

        before, after = asyncio.run(main())
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    kinds = Counter()
    for outcome, count in (before + after).items():
        kinds[kind(outcome)] += count
    return {"run": run, "exit_status": proc.returncode, "exit_after_signal_s": round(stopped.get("after_s", -1), 1),
            "before_signal": dict(before), "after_signal": dict(after), "answered": kinds["answered"],
            "refused": kinds["refused"], "cut": kinds["cut"], "traceback_in_log": "Traceback" in text,
            "log": str(log)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", help="a serve config (default: the demo)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--before", type=float, default=15, help="seconds of load before SIGTERM")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    config_args = ["--config", args.config] if args.config else ["--demo"]
    log_dir = Path(tempfile.mkdtemp(prefix="branchserve-shutdown-"))
    runs = [run_once(args, config_args, log_dir, r) for r in range(1, args.runs + 1)]
    print(f"SIGTERM after {args.before:g} s of {args.clients} clients ({' '.join(config_args)})")
    print(f"{'run':>3} {'exit':>5} {'exit after signal':>18} {'answered':>9} {'refused':>8} {'cut':>4} {'traceback':>10}")
    for r in runs:
        print(f"{r['run']:>3} {r['exit_status']:>5} {r['exit_after_signal_s']:>16} s {r['answered']:>9} "
              f"{r['refused']:>8} {r['cut']:>4} {str(r['traceback_in_log']):>10}")
        for outcome, n in sorted(r["after_signal"].items()):
            print(f"      after the signal: {outcome[:80]:<80} {n:>5}")
    report = {"clients": args.clients, "before_s": args.before, "runs": runs}
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 1 if any(r["cut"] or r["traceback_in_log"] or r["exit_status"] != 0 for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
