"""The HTTP API end to end, through the official openai client against a real server on loopback."""

import asyncio
import json
import re
import threading
import time

import httpx
import openai
import pytest

from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.api.app import build_app
from server.config import ServerConfig
from server.serve import build_engine
from tests.conftest import LiveServer, start_server

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def models(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4)}


def make_config(models, **overrides) -> ServerConfig:
    data = {
        "families": [{"artifact": str(models["artifact"]), "branches": {"math": "math", "code": "code",
                                                                         "chat": "chat"}}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"])}],
        "limits": {"max_batch": 8, "max_context": 256},
    }
    data.update(overrides)
    return ServerConfig.model_validate(data)


start = start_server


@pytest.fixture(scope="module")
def server(models):
    s = start(make_config(models))
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_list(client):
    cards = {m.id: m for m in client.models.list().data}
    embedders = {f"decoder:{n}" for n in ("math", "code", "chat", "phi3")} | {"minilm"}
    assert set(cards) == {"math", "code", "chat", "phi3"} | embedders
    assert cards["math"].kind == "branch" and cards["phi3"].kind == "standalone"
    assert {cards[n].kind for n in embedders} == {"embedding"}


@pytest.mark.parametrize("model", ["code", "phi3"])
def test_chat_and_stream_agree(client, model):
    raw = client.chat.completions.with_raw_response.create(model=model, messages=MESSAGES, max_tokens=12,
                                                           temperature=0)
    assert raw.headers["x-branchserve-branch"] == model and raw.headers["x-request-id"]
    done = raw.parse()
    assert done.model == model and done.object == "chat.completion"
    choice = done.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert done.usage.completion_tokens == 12
    assert done.usage.total_tokens == done.usage.prompt_tokens + 12 and done.usage.prompt_tokens > 10

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == choice.message.content
    assert len(chunks) >= 4  # about a token per chunk, not one lump


def test_stream_without_usage_has_no_usage_field(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions",
                      json={"model": "math", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all("usage" not in json.loads(line[6:]) for line in lines[:-1])


def test_stop_and_max_completion_tokens(client):
    full = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    stop = text[5:8]
    cut = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=24,
                                           max_completion_tokens=2, temperature=0)
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"


def test_min_tokens_keeps_a_stop_string_from_ending_the_answer_early(client):
    """vLLM's min_tokens, on chat and text completions, whole and streamed: a stop string the answer holds from
    its first tokens does not end it before min_tokens tokens."""
    full = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[:2]
    kw = dict(model="chat", messages=MESSAGES, max_tokens=16, temperature=0, stop=stop)
    early = client.chat.completions.create(**kw)
    assert early.choices[0].message.content == "" and early.choices[0].finish_reason == "stop"
    held = client.chat.completions.create(**kw, extra_body={"min_tokens": 6})
    assert held.usage.completion_tokens >= 6 and held.choices[0].message.content.startswith(stop)
    streamed = client.chat.completions.create(**kw, stream=True, extra_body={"min_tokens": 6})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == held.choices[0].message.content
    plain = client.completions.create(model="chat", prompt="Say something.", max_tokens=16, temperature=0)
    cstop = plain.choices[0].text[:2]
    cheld = client.completions.create(model="chat", prompt="Say something.", max_tokens=16, temperature=0,
                                      stop=cstop, extra_body={"min_tokens": 6})
    assert cheld.usage.completion_tokens >= 6 and cheld.choices[0].text.startswith(cstop)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="chat", messages=MESSAGES, extra_body={"min_tokens": -1})
    assert e.value.body["param"] == "min_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt="Hi", max_tokens=4, extra_body={"min_tokens": 5})
    assert e.value.body["param"] == "min_tokens" and "more than the 4" in e.value.body["message"]


def test_n_choices_and_seed(client):
    kw = dict(model="math", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=11, n=2)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 20


def test_content_parts_and_unknown_fields(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]}]
    a = client.chat.completions.create(model="math", messages=parts, max_tokens=5, temperature=0,
                                       user="someone", extra_body={"frobnicate": True})
    b = client.chat.completions.create(model="math", messages=[{"role": "user", "content": "Say something."}],
                                       max_tokens=5, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_errors(client, metric_total):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nobody", messages=MESSAGES)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=[{"role": "robot", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="math", messages=MESSAGES, temperature=7)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=10_000)
    assert e.value.body["code"] == "context_length_exceeded"
    assert metric_total("branchserve_requests_total", model="unknown", stages="", status="404") >= 1
    assert metric_total("branchserve_requests_total", model="math", stages="", status="400") >= 1


def test_bad_bodies_say_what_is_wrong(server, client):
    url = server.url + "/v1/chat/completions"

    def error(r, status=400):
        assert r.status_code == status, r.text
        return r.json()["error"]

    e = error(httpx.post(url, content=b'{"model": "math",\n "messages": [}', headers={"content-type": "application/json"}))
    assert e["message"].startswith("The request body is not valid JSON") and "line 2, column" in e["message"]
    assert e["param"] is None
    e = error(httpx.post(url, content=b'{"model": "math", "messages": []}'))  # no Content-Type
    assert "Content-Type must be application/json" in e["message"]
    e = error(httpx.post(url, content=b"", headers={"content-type": "application/json"}))
    assert e["message"] == "The request body is empty: send a JSON object"
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}]}]
    e = error(httpx.post(url, json={"model": "math", "messages": image}))
    assert "image content is not supported" in e["message"] and e["param"].startswith("messages.0.content")
    e = error(httpx.post(url, json={"model": "math", "messages": [{"role": "user", "content": None}]}))
    assert e["message"] == "messages.0: a user message needs content"
    # Fields that would change the answer's meaning are refused by name until they are served.
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    for extra, field in (({"logit_bias": {"5": 1}}, "logit_bias"), ({"functions": [tool["function"]]}, "functions"),
                         ({"tools": [tool]}, "tool_choice"),  # auto, and this template renders no tools
                         ({"top_logprobs": 2}, "top_logprobs"),
                         ({"tool_choice": "required"}, "tool_choice")):
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2, extra_body=extra)
        assert exc.value.body["param"] == field and field in exc.value.body["message"]
    ok = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2, extra_body={
        "logprobs": False, "tool_choice": "none", "frobnicate": 1, "ignore_eos": True})  # sampled: the random
    assert ok.choices[0].finish_reason == "length"  # model's end token had a chance of ending it (CI, stop 35)


def test_bounds_of_round_2_are_400s_naming_the_field(server, client):
    """Each was a 500 or a silent wrong answer before: a seed past 64 bits, a lone surrogate, an endless stop
    string, a flood of messages, constraints xgrammar would not enforce or could not compile in bounded time."""
    base = server.url

    def error(path, body):
        r = httpx.post(base + path, json=body, timeout=60)
        assert r.status_code == 400, (body, r.status_code, r.text)
        return r.json()["error"]

    chat = {"model": "math", "messages": MESSAGES, "max_tokens": 2}
    for seed in (2**64, 2**63, -2**63 - 1):
        assert error("/v1/chat/completions", {**chat, "seed": seed})["param"] == "seed"
        assert error("/v1/completions", {"model": "math", "prompt": "hi", "seed": seed})["param"] == "seed"
    for seed in (2**63 - 1, -2**63):  # the ends of the range work, n > 1 too
        ok = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2, seed=seed, n=2)
        assert len(ok.choices) == 2
    lone = '"hi \\ud800 there"'  # JSON text: the escape of a lone surrogate
    for path, body in (("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"model": "math", "prompt": "x"}),
                       ("/v1/embeddings", {"model": "decoder:math", "input": ["ok", "x"]})):
        r = httpx.post(base + path, content=json.dumps(body).replace('"x"', lone),
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode", r.text
        assert "U+D800" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] in ("messages[0].content", "prompt", "input[1]")
    assert "512 characters" in error("/v1/chat/completions", {**chat, "stop": ["x" * 513]})["message"]
    assert error("/v1/completions", {"model": "math", "prompt": "hi", "stop": "x" * 513})["param"] == "stop"
    many = [{"role": "user", "content": "hi"}] * 2049
    assert error("/v1/chat/completions", {**chat, "messages": many})["param"] == "messages"
    for field, value, words in (("guided_regex", "(.{1,999}){1,999}", "bounded repetitions"),
                                ("guided_regex", "(.{1,99}){1,99}", "inside repetitions"),
                                ("guided_json", {"type": "object", "not": {"required": ["a"]}}, "'not'"),
                                ("guided_json", {"$ref": "https://example.com/schema.json"}, "points outside"),
                                ("guided_json", json.dumps({"type": "array", "items": {}}).replace(
                                    "{}", "[" * 2600 + "]" * 2600), "nested deeper"),
                                ("guided_json", {"type": "array", "maxItems": 500,
                                                 "items": {"type": "string", "maxLength": 500}}, "repetitions")):
        e = error("/v1/chat/completions", {**chat, field: value})
        assert e["param"] == field and words in e["message"], e
    # top_p so small it rounds to 0 still keeps the most likely token
    tiny = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=3, top_p=1e-300, seed=1)
    greedy = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=3, temperature=0)
    assert tiny.choices[0].message.content == greedy.choices[0].message.content != ""


def test_a_chat_without_max_tokens_stops_at_the_default(models):
    """It generated until the context was full (2014 tokens, 4.5 minutes on the demo)."""
    server = start(make_config(models, limits={"max_batch": 2, "max_context": 256, "default_max_tokens": 5}))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="math", messages=MESSAGES, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 5 and reply.choices[0].finish_reason == "length"
        longer = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=7,
                                                extra_body={"ignore_eos": True})
        assert longer.usage.completion_tokens == 7  # asking for more still works
    finally:
        server.close()


def test_a_body_over_the_limit_is_413(server):
    url = server.url + "/v1/chat/completions"
    big = b'{"model": "math", "messages": [{"role": "user", "content": "' + b"x" * (9 * 1024 * 1024) + b'"}]}'
    r = httpx.post(url, content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 1 << 20):
            yield big[i:i + (1 << 20)]

    r = httpx.post(url, content=chunks(), headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def series_total(text: str, name: str, labels: dict) -> float:
    """The sum of ``name``'s samples in Prometheus ``text`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        key, value = line.rsplit(" ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', key.partition("{")[2]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture
def metric_total(server):
    """(metric name, at_least, **labels) -> the summed value in /metrics; the Ray tests read Ray's export instead,
    which lags, so they wait for ``at_least``."""
    def total(name: str, at_least: float = 1.0, **labels) -> float:
        return series_total(httpx.get(server.url + "/metrics").text, name, labels)

    return total


def test_eight_concurrent_streams_complete(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)

        async def one(i):
            model = ["math", "code", "chat", "phi3"][i % 4]
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16,
                                                          temperature=0, stream=True)
            reasons = [c.choices[0].finish_reason async for c in stream if c.choices and c.choices[0].finish_reason]
            return reasons

        return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(main()) == [["length"]] * 8


def metric(server, name: str) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith(name):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_have_per_model_series(client, metric_total):
    client.chat.completions.create(model="phi3", messages=MESSAGES, max_tokens=3, temperature=0)
    assert metric_total("branchserve_requests_total", model="phi3", stages="", status="ok") >= 1
    assert metric_total("branchserve_generation_tokens_total", 3, model="phi3") >= 3
    assert metric_total("branchserve_time_to_first_token_seconds_count", model="phi3") >= 1


def test_metrics_report_the_engines_load(server):
    assert "branchserve_requests_running" in metric(server, "branchserve_requests_running")


def test_closed_stream_frees_its_slot(models):
    server = start(make_config(models, limits={"max_batch": 1, "max_context": 4096}))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=4000, temperature=0,
                                                stream=True)
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()
        t0 = time.monotonic()
        done = client.chat.completions.create(model="code", messages=MESSAGES, max_tokens=4, temperature=0)
        assert done.choices[0].finish_reason == "length"
        assert time.monotonic() - t0 < 10
        generated = metric(server, "branchserve_generation_tokens_total")
        assert generated['branchserve_generation_tokens_total{model="math"}'] < 1000
        cancelled = metric(server, "branchserve_requests_total")
        assert cancelled['branchserve_requests_total{model="math",stages="",status="cancelled"}'] == 1
    finally:
        server.close()


def test_auth(models, monkeypatch):
    monkeypatch.setenv("BRANCHSERVE_API_KEY", "env-key")
    server = start(make_config(models, api_keys=["config-key"]))
    try:
        for key in ("config-key", "env-key"):
            ok = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
            assert ok.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        for path in ("/metrics", "/openapi.json", "/docs"):  # open by default (open_endpoints)
            assert httpx.get(server.url + path).status_code == 200
    finally:
        server.close()
    server = start(make_config(models, api_keys=["config-key"], open_endpoints=[]))
    try:
        key = {"Authorization": "Bearer config-key"}
        for path in ("/metrics", "/openapi.json", "/docs"):
            assert httpx.get(server.url + path).status_code == 401
            assert httpx.get(server.url + path, headers=key).status_code == 200
        assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json", headers=key).json()["paths"]
        assert httpx.get(server.url + "/health").status_code == 200
    finally:
        server.close()


def test_a_burst_of_max_batch_plus_queue_size_is_admitted_whole_then_429(models):
    server = start(make_config(models, limits={"max_batch": 2, "max_context": 256, "queue_size": 3}))
    gate = threading.Event()
    runner = server.server.config.app.state.branchserve.engine.targets["math"].runner
    step = runner.step
    runner.step = lambda: (gate.wait(30), step())  # hold the engine: nothing finishes meanwhile
    try:
        body = {"model": "math", "messages": MESSAGES, "max_tokens": 2}
        results = []
        burst = [threading.Thread(target=lambda: results.append(
            httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60))) for _ in range(5)]
        for t in burst:
            t.start()
        deadline = time.monotonic() + 10
        while metric(server, "branchserve_requests_waiting")["branchserve_requests_waiting"] < 3:
            assert time.monotonic() < deadline and not results, [r.text for r in results]
            time.sleep(0.02)
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 429 and r.headers["retry-after"]
        assert r.json()["error"]["type"] == "rate_limit_error"
        gate.set()
        for t in burst:
            t.join(timeout=60)
        assert [x.status_code for x in results] == [200] * 5
    finally:
        gate.set()
        server.close()


def test_health_is_503_while_loading(models):
    gate = threading.Event()
    config = make_config(models)

    def slow_engine():
        gate.wait(30)
        return build_engine(config)

    server = LiveServer(build_app(config, slow_engine))
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                r = httpx.get(server.url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "math", "messages": MESSAGES})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        gate.set()
        server.wait_ready()
    finally:
        gate.set()
        server.close()


def test_error_mid_stream_is_an_error_event_then_done(models):
    server = start(make_config(models))
    runner = server.server.config.app.state.branchserve.engine.targets["code"].runner
    forward, calls = runner._forward, []

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fell over")
        return forward(*args)

    runner._forward = failing
    try:
        body = {"model": "code", "messages": MESSAGES, "max_tokens": 20, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["type"] == "server_error" and "device fell over" in error["message"]
        assert "Traceback" not in error["message"]
        # The engine survives: the next request is served.
        ok = httpx.post(server.url + "/v1/chat/completions", json=dict(body, stream=False, max_tokens=3), timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert metric(server, "branchserve_requests_total")['branchserve_requests_total{model="code",stages="",status="error"}'] == 1
    finally:
        server.close()


def test_cors_origins(models):
    server = start(make_config(models, cors_origins=["http://app.example"]))
    try:
        r = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
        assert r.headers["access-control-allow-origin"] == "http://app.example"
        r = httpx.options(server.url + "/v1/chat/completions", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in r.headers
    finally:
        server.close()
