"""Bad inputs against a real server: each one's status and message, and how many were 5xx.

Builds a tiny family (3 branches) and a tiny standalone model, serves them with a router (decoder embeddings)
and a pipeline on a loopback port, sends every input below over HTTP, and prints a table and one JSON line.
The inputs are the ones a new user's tries found (issue 31) and more of the same kinds.

    python bench/bad_inputs.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from compression.compress import CompressOptions, compress  # noqa: E402
from compression.synthetic import build_family, build_standalone  # noqa: E402
from server.config import ServerConfig  # noqa: E402
from tests.conftest import start_server  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]
LONE = '"hi \\ud800 there"'  # JSON text of a lone surrogate


def chat(**kw):
    return ("POST", "/v1/chat/completions", {"model": "math", "messages": MSG, "max_tokens": 2, **kw})


def raw(path: str, body: dict, marker: str = '"X"'):
    """A body whose "X" string is replaced by a lone surrogate's escape."""
    return ("RAW", path, json.dumps(body).replace(marker, LONE))


CASES = [
    ("lone surrogate in a chat message", raw("/v1/chat/completions", {"model": "math", "messages": [
        {"role": "user", "content": "X"}]})),
    ("lone surrogate, model auto", raw("/v1/chat/completions", {"model": "auto", "messages": [
        {"role": "user", "content": "X"}]})),
    ("lone surrogate in a text completion", raw("/v1/completions", {"model": "math", "prompt": "X"})),
    ("lone surrogate in embeddings", raw("/v1/embeddings", {"model": "decoder:math", "input": "X"})),
    ("lone surrogate in /v1/router/decide", raw("/v1/router/decide", {"text": "X"})),
    ("seed 2^64", chat(seed=2**64)),
    ("seed -2^63 - 1", chat(seed=-2**63 - 1)),
    ("seed 2^64 - 1 with n 2", chat(seed=2**64 - 1, n=2)),
    ("seed 2^63 on a text completion", ("POST", "/v1/completions", {"model": "math", "prompt": "hi", "seed": 2**63})),
    ("guided_json string nested 2600 deep", chat(guided_json=json.dumps({"type": "array", "items": {}}).replace(
        "{}", "[" * 2600 + "]" * 2600))),
    ("guided_json object nested 880 deep", chat(guided_json=json.loads(
        '{"type": "array", "items": ' * 880 + '{"type": "string"}' + "}" * 880))),
    ("guided_regex (.{1,999}){1,999}", chat(guided_regex="(.{1,999}){1,999}")),
    ("schema with not", chat(guided_json={"type": "object", "not": {"required": ["a"]}})),
    ("schema with an outside $ref", chat(guided_json={"$ref": "https://example.com/s.json"})),
    ("schema with if/then", chat(guided_json={"type": "object", "if": {"required": ["a"]}, "then": {}})),
    ("array of 500 strings of 500", chat(guided_json={"type": "array", "maxItems": 500,
                                                      "items": {"type": "string", "maxLength": 500}})),
    ("schema that is a list", chat(guided_json=[1, 2])),
    ("regex that does not parse", chat(guided_regex="(")),
    ("grammar that does not parse", chat(guided_grammar="root ::= ")),
    ("two constraints", chat(guided_regex="a+", guided_choice=["a"])),
    ("stop string of 600 characters", chat(stop="x" * 600)),
    ("5 stop strings", chat(stop=["a", "b", "c", "d", "e"])),
    ("2049 messages", ("POST", "/v1/chat/completions", {"model": "math", "messages": MSG * 2049})),
    ("top_p 1e-300 (answered: keeps the top token)", chat(top_p=1e-300)),
    ("top_p 0", chat(top_p=0)),
    ("temperature 3", chat(temperature=3)),
    ("max_tokens 0", chat(max_tokens=0)),
    ("max_tokens past the context", chat(max_tokens=100000)),
    ("n 17", chat(n=17)),
    ("unknown model", chat(model="nope")),
    ("image content", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])),
    ("logit_bias", chat(logit_bias={"5": 1})),
    ("tool_choice without tools", chat(tool_choice="required")),
    ("messages empty", chat(messages=[])),
    ("role unknown", chat(messages=[{"role": "wizard", "content": "hi"}])),
    ("model is a number", chat(model=5)),
    ("body is a list", ("POST", "/v1/chat/completions", [1, 2])),
    ("malformed JSON", ("RAW", "/v1/chat/completions", '{"model": "math", "messages": [}')),
    ("JSON nested 100000 deep", ("RAW", "/v1/chat/completions", "[" * 100000 + "]" * 100000)),
    ("empty body", ("RAW", "/v1/chat/completions", "")),
    ("completions: suffix", ("POST", "/v1/completions", {"model": "math", "prompt": "hi", "suffix": "x"})),
    ("completions: token ids past the vocabulary", ("POST", "/v1/completions", {"model": "math", "prompt": [10**9]})),
    ("completions: 65 prompts", ("POST", "/v1/completions", {"model": "math", "prompt": ["a"] * 65})),
    ("embeddings: 257 inputs", ("POST", "/v1/embeddings", {"model": "decoder:math", "input": ["a"] * 257})),
    ("embeddings: dimensions", ("POST", "/v1/embeddings", {"model": "decoder:math", "input": "a", "dimensions": 3})),
    ("embeddings: unknown embedder", ("POST", "/v1/embeddings", {"model": "decoder:nope", "input": "a"})),
    ("router: add an empty exemplar", ("POST", "/v1/router/routes/math/exemplars", {"text": ""})),
    ("router: delete ../../general", ("DELETE", "/v1/router/routes/math/exemplars/..%2F..%2Fgeneral", None)),
    ("router: route name with a slash", ("POST", "/v1/router/routes", {"name": "a/b", "target": "math"})),
    ("router: route to an unknown model", ("POST", "/v1/router/routes", {"name": "x", "target": "ghost"})),
    ("router: remove the default route", ("DELETE", "/v1/router/routes/general", None)),
    ("pipeline with n 2", ("POST", "/v1/chat/completions", {"model": "two", "messages": MSG, "n": 2})),
    ("pipeline with logprobs", ("POST", "/v1/chat/completions", {"model": "two", "messages": MSG, "logprobs": True})),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["BRANCHSERVE_HOME"] = str(root / "home")
        members = build_family(root / "members", ["math", "code", "chat"], seed=1)
        compress(members, root / "art", CompressOptions(rate=0.9, progress=False))
        build_standalone(root / "phi3", seed=4)
        (root / "ex.yaml").write_text(yaml.safe_dump({"routes": {
            "math": {"target": "math", "exemplars": ["What is 2 plus 2?"]},
            "general": {"target": "phi3", "exemplars": ["Tell me a story."]}}}))
        server = start_server(ServerConfig.model_validate({
            "families": [{"artifact": str(root / "art")}],
            "standalone": [{"name": "phi3", "path": str(root / "phi3")}],
            "router": {"default_route": "general", "exemplars": str(root / "ex.yaml"), "embedder": "decoder:math"},
            "pipelines": [{"name": "two", "stages": [
                {"model": "phi3", "template": "stage1/reason", "max_tokens": 4},
                {"model": "math", "template": "stage2/concise", "domain": "arithmetic", "max_tokens": 3}]}],
            "limits": {"max_batch": 4, "max_context": 512}}))
        rows = []
        try:
            for what, (method, path, body) in CASES:
                t0 = time.monotonic()
                if method == "RAW":
                    r = httpx.post(server.url + path, content=body.encode(), timeout=120,
                                   headers={"content-type": "application/json"})
                else:
                    r = httpx.request(method, server.url + path, json=body, timeout=120)
                try:
                    message = r.json()["error"]["message"] if r.status_code >= 400 else "(answered)"
                except (ValueError, KeyError, TypeError):
                    message = r.text[:120]
                rows.append({"input": what, "endpoint": f"{method if method != 'RAW' else 'POST'} {path}",
                             "status": r.status_code, "message": message[:160],
                             "seconds": round(time.monotonic() - t0, 2)})
            healthy = httpx.get(server.url + "/health").status_code
        finally:
            server.close()
    print(f"{'#':>2}  {'status':>6}  {'input':<44}  message")
    for i, r in enumerate(rows, 1):
        print(f"{i:>2}  {r['status']:>6}  {r['input']:<44}  {r['message'][:110]}")
    fives = sum(r["status"] >= 500 for r in rows)
    print(f"{len(rows)} inputs, {fives} answered 5xx, /health afterwards {healthy}")
    out = {"inputs": rows, "n": len(rows), "5xx": fives, "health_after": healthy}
    print(json.dumps(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 1 if fives else 0


if __name__ == "__main__":
    sys.exit(main())
