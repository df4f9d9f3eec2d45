"""Structured output against a running server (the demo): does every answer validate, and what does the
constraint cost?

    python bench/structured.py --url http://127.0.0.1:8000 [--model smollm2] [--pipeline add-sentence]
                               [--requests 50] [--tools 20] [--rounds 2] [--json out.json]

1. ``--requests`` chat completions with a JSON schema (nested object, array, enums, required fields) at
   temperature 0.8, 8 at a time: each answer is parsed and validated with the ``jsonschema`` package.
2. The same count through ``--pipeline`` with a schema on its last stage.
3. ``--tools`` requests whose ``tool_choice`` names a function: the arguments must validate.
4. Overhead: 16 concurrent requests of 64 tokens each, unconstrained vs under a schema (a long string field, so
   every token is masked and none ends early), alternating A B A B for ``--rounds``; output tok/s and the ratio.

Prints a table and JSON; ``--json`` writes the JSON too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import jsonschema
import openai

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 60},
        "category": {"enum": ["food", "travel", "science", "sport", "music"]},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "author": {"type": "object",
                   "properties": {"name": {"type": "string", "maxLength": 40}, "verified": {"type": "boolean"}},
                   "required": ["name", "verified"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
    },
    "required": ["title", "category", "rating", "author", "tags"],
    "additionalProperties": False,
}
TOPICS = ["a pancake recipe", "a trip to Lisbon", "the boiling point of water", "a tennis final", "a jazz record",
          "a ramen shop", "a hike in the Alps", "black holes", "a marathon", "a piano sonata"]
ASKS = ["Write a short review of {t} as a record.", "Describe {t} for our catalogue.", "Summarise {t} as data.",
        "Give me a catalogue entry about {t}.", "Rate {t}."]
PIPELINE_SCHEMA = {
    "type": "object",
    "properties": {"result": {"type": "integer", "minimum": -100000, "maximum": 100000},
                   "sentence": {"type": "string", "maxLength": 120}},
    "required": ["result", "sentence"], "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The forecast for a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
CITIES = ["Oslo", "Lima", "Kyoto", "Accra", "Perth", "Quebec", "Tbilisi", "Hanoi", "Bergen", "Cusco"]
LONG = {"type": "object", "properties": {"story": {"type": "string", "minLength": 2000}}, "required": ["story"]}


def fmt(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "record", "schema": schema, "strict": True}}


async def gather_limited(coros, limit: int):
    sem = asyncio.Semaphore(limit)

    async def run(c):
        async with sem:
            return await c

    return await asyncio.gather(*(run(c) for c in coros))


async def validity(client, model: str, n: int, schema: dict, prompt, max_tokens: int) -> dict:
    async def one(i):
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt(i)}], temperature=0.8, seed=i,
            max_tokens=max_tokens, response_format=fmt(schema))
        text = r.choices[0].message.content
        try:
            jsonschema.validate(json.loads(text), schema)
            return True, None
        except (ValueError, jsonschema.ValidationError) as e:
            return False, f"{r.choices[0].finish_reason}: {str(e).splitlines()[0][:80]}: {text[:80]!r}"

    results = await gather_limited([one(i) for i in range(n)], 8)
    return {"valid": sum(ok for ok, _ in results), "of": n, "failures": [f for ok, f in results if not ok][:5]}


async def tools(client, model: str, n: int) -> dict:
    async def one(i):
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"What will the weather be in {CITIES[i % 10]}?"}],
            tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
            temperature=0.8, seed=i, max_tokens=80)
        calls = r.choices[0].message.tool_calls or []
        try:
            jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])
            return calls[0].function.name == "get_weather", calls[0].function.arguments
        except (IndexError, ValueError, jsonschema.ValidationError) as e:
            return False, str(e)[:80]

    results = await gather_limited([one(i) for i in range(n)], 8)
    return {"valid": sum(ok for ok, _ in results), "of": n, "examples": [a for ok, a in results if ok][:3]}


async def burst(client, model: str, constrained: bool) -> tuple[int, float]:
    async def one(i):
        kw = {"response_format": fmt(LONG)} if constrained else {}
        r = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"Tell a long story about {TOPICS[i % 10]}."}],
            temperature=0.8, seed=i, max_tokens=64, **kw)
        return r.usage.completion_tokens

    t0 = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(16)))
    return sum(tokens), time.perf_counter() - t0


async def main_async(args) -> dict:
    client = openai.AsyncOpenAI(base_url=args.url + "/v1", api_key=args.api_key, max_retries=0, timeout=600)
    out: dict = {"model": args.model}
    out["schema"] = await validity(client, args.model, args.requests, SCHEMA,
                                   lambda i: ASKS[i % len(ASKS)].format(t=TOPICS[i % len(TOPICS)]), 200)
    if args.pipeline:
        out["pipeline"] = await validity(client, args.pipeline, args.requests, PIPELINE_SCHEMA,
                                         lambda i: f"add {i * 7 % 90 + 3} {i * 13 % 70 + 5}", 120)
    out["tools"] = await tools(client, args.model, args.tools)
    await burst(client, args.model, False)  # warm
    rounds = {"plain": [], "schema": []}
    for _ in range(args.rounds):
        for name in ("plain", "schema"):
            tokens, seconds = await burst(client, args.model, name == "schema")
            rounds[name].append({"tokens": tokens, "seconds": round(seconds, 3),
                                 "tok_s": round(tokens / seconds, 2)})
    plain = statistics.median(r["tok_s"] for r in rounds["plain"])
    schema = statistics.median(r["tok_s"] for r in rounds["schema"])
    out["overhead"] = {"rounds": rounds, "plain_tok_s": plain, "schema_tok_s": schema,
                       "ratio": round(schema / plain, 3)}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api-key", default="unused")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--pipeline", default="add-sentence")
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--tools", type=int, default=20)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()
    try:
        out = asyncio.run(main_async(args))
    except openai.APIConnectionError:
        print(f"error: no server at {args.url}", file=sys.stderr)
        return 2
    o = out["overhead"]
    rows = [("JSON schema, temperature 0.8", f"{out['schema']['valid']}/{out['schema']['of']} valid")]
    if "pipeline" in out:
        rows.append((f"pipeline {args.pipeline}, schema on its last stage",
                     f"{out['pipeline']['valid']}/{out['pipeline']['of']} valid"))
    rows += [("tool_choice naming a function", f"{out['tools']['valid']}/{out['tools']['of']} arguments valid"),
             ("16 concurrent x 64 tokens, plain", f"{o['plain_tok_s']:.1f} tok/s"),
             ("16 concurrent x 64 tokens, schema", f"{o['schema_tok_s']:.1f} tok/s"),
             ("schema / plain", f"{o['ratio']:.3f}x")]
    width = max(len(r[0]) for r in rows)
    print(f"| {'check'.ljust(width)} | result |\n|{'-' * (width + 2)}|---|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    for key in ("schema", "pipeline"):
        for f in out.get(key, {}).get("failures", []):
            print(f"{key} failure: {f}")
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
