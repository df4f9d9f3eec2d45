"""Two-stage pipelines end to end: stage 1 reasons, stage 2 formats."""

import json
import time

import httpx
import openai
import pytest
import yaml

from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.cli import main
from server.config import ServerConfig
from server.pipelines import load_template
from tests.conftest import start_server

QUESTION = [{"role": "user", "content": "What is 6 times 7?"}]


@pytest.fixture(scope="module")
def models(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4)}


def config_for(models, stage1_tokens=10, max_context=512, **extra) -> ServerConfig:
    return ServerConfig.model_validate({
        "families": [{"artifact": str(models["artifact"])}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"])}],
        "pipelines": [{"name": "reason-then-answer", "stages": [
            {"model": "phi3", "template": "stage1/reason", "max_tokens": stage1_tokens},
            {"model": "math", "template": "stage2/concise", "domain": "arithmetic", "max_tokens": 6},
        ]}],
        "limits": {"max_batch": 4, "max_context": max_context},
        **extra,
    })


start = start_server


@pytest.fixture(scope="module")
def server(models):
    s = start(config_for(models))
    yield s
    s.close()


def render(ref, **variables):
    allowed = {"messages", "question", "domain", "draft"}
    return load_template(ref, allowed, "test").render(messages=QUESTION, question=QUESTION[0]["content"],
                                                      **variables).strip()


def test_two_stages_content_reasoning_and_usage(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "reason-then-answer", "messages": QUESTION},
                   timeout=60)
    assert r.status_code == 200
    assert r.headers["x-branchserve-pipeline"] == "reason-then-answer" and r.headers["x-branchserve-branch"] == "math"
    body = r.json()
    message, usage = body["choices"][0]["message"], body["usage"]
    assert body["model"] == "math"

    # Each stage, asked directly with the prompt the pipeline builds, gives exactly the same text.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    stage1 = client.chat.completions.create(
        model="phi3", messages=[{"role": "user", "content": render("stage1/reason", domain=None)}],
        max_tokens=10, temperature=0)
    assert message["reasoning_content"] == stage1.choices[0].message.content
    stage2 = client.chat.completions.create(model="math", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "You are a highly knowledgeable, efficient arithmetic AI expert."},
        {"role": "user", "content": render("stage2/concise", domain="arithmetic", draft=message["reasoning_content"])},
    ])
    assert message["content"] == stage2.choices[0].message.content

    assert [s["model"] for s in usage["stages"]] == ["phi3", "math"]
    assert usage["prompt_tokens"] == stage1.usage.prompt_tokens + stage2.usage.prompt_tokens
    assert usage["completion_tokens"] == stage1.usage.completion_tokens + stage2.usage.completion_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Stage 1 ran out of tokens; stage 2 still ran on what it had, and each finish reason is the true one.
    assert usage["stages"][0]["finish_reason"] == "length"
    assert body["choices"][0]["finish_reason"] == usage["stages"][1]["finish_reason"]


def test_streaming_streams_the_final_stage(server):
    done = httpx.post(server.url + "/v1/chat/completions", json={"model": "reason-then-answer", "messages": QUESTION},
                      timeout=60).json()["choices"][0]["message"]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    chunks = list(client.chat.completions.create(model="reason-then-answer", messages=QUESTION, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done["content"]
    assert chunks[-1].usage.completion_tokens > 0 and chunks[-1].choices == []

    body = {"model": "reason-then-answer", "messages": QUESTION, "stream": True, "include_reasoning": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0]["role"] == "assistant" and "reasoning_content" in deltas[0]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == done["reasoning_content"]
    assert "".join(d.get("content", "") for d in deltas) == done["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"][0]["finish_reason"]] == \
        [e["choices"][0]["finish_reason"] for e in events][-1:]


def test_models_list_names_pipelines(server):
    cards = {m["id"]: m["kind"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert cards["reason-then-answer"] == "pipeline" and cards["phi3"] == "standalone"


def test_auto_route_to_a_pipeline(models, tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    ex = tmp_path / "ex.yaml"
    ex.write_text(yaml.safe_dump({"routes": {
        "math": {"target": "reason-then-answer", "exemplars": ["What is 12 times 12?", "Compute 9 plus 10."]},
        "chat": {"target": "phi3", "exemplars": ["Tell me a story about a dragon."]}}}))
    server = start(config_for(models, router={"default_route": "chat", "exemplars": str(ex)},
                              route_domains={"chat": "storytelling"}))
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"model": "auto", "messages": QUESTION}, timeout=60)
        assert r.status_code == 200
        assert r.headers["x-branchserve-route"] == "math"
        assert r.headers["x-branchserve-pipeline"] == "reason-then-answer"
        assert "reasoning_content" in r.json()["choices"][0]["message"]
        story = [{"role": "user", "content": "Tell me a story about a knight."}]
        routed = httpx.post(server.url + "/v1/chat/completions", json={"model": "auto", "messages": story,
                                                                        "max_tokens": 5, "temperature": 0}).json()
        expert = [{"role": "system", "content": "You are a highly knowledgeable, efficient storytelling AI expert."},
                  *story]
        direct = httpx.post(server.url + "/v1/chat/completions", json={"model": "phi3", "messages": expert,
                                                                        "max_tokens": 5, "temperature": 0}).json()
        assert routed["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    finally:
        server.close()


def test_disconnect_during_stage_one_cancels_it(models):
    server = start(config_for(models, stage1_tokens=3000, max_context=4096))
    try:
        body = {"model": "reason-then-answer", "messages": QUESTION, "stream": True, "include_reasoning": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        engine = server.server.config.app.state.branchserve.engine
        deadline = time.monotonic() + 10
        while engine.running() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running() == 0
        assert engine.targets["phi3"].runner.peak_batch >= 1
        assert engine.targets["math"].runner.peak_batch == 0  # stage 2 never started
        text = httpx.get(server.url + "/metrics").text
        # counted once, under the pipeline's name, with its stages as a label
        assert ('branchserve_requests_total{model="reason-then-answer",stages="phi3,math",status="cancelled"} 1.0'
                in text)
        assert 'model="math"' not in text and 'model="phi3"' not in text
    finally:
        server.close()


@pytest.mark.parametrize("stage,expect", [
    ({"model": "phi3", "template": "stage2/concise"}, "unknown variable(s) draft"),
    ({"model": "phi3", "template": "stage1/missing"}, "template not found"),
    ({"model": "ghost", "template": "stage1/reason"}, "model 'ghost' is not served"),
])
def test_template_and_stage_errors_stop_the_start(models, tmp_path, capsys, stage, expect):
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "families": [{"artifact": str(models["artifact"])}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"])}],
        "pipelines": [{"name": "p", "stages": [stage]}]}))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pipeline 'p' stage 1") and expect in err and err.count("\n") == 1


def test_template_syntax_error_names_the_line(models, tmp_path, capsys):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ question }}\n{% if %}\n")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "standalone": [{"name": "phi3", "path": str(models["phi3"])}],
        "pipelines": [{"name": "p", "stages": [{"model": "phi3", "template": "bad.jinja"}]}]}))
    assert main(["serve", "--config", str(config)]) == 2
    assert f"{bad}:2:" in capsys.readouterr().err
