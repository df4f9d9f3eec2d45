"""Honest liveness: /health and waiting requests when the engine thread dies, a step hangs, or a request runs
too long."""

import asyncio
import threading
import time

import httpx
import pytest

from compression.compress import CompressOptions, compress
from server.config import ServerConfig
from tests.conftest import start_server

CHAT = {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200, "ignore_eos": True}


@pytest.fixture(scope="module")
def artifact(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return root / "art"


def serve(artifact, **limits):
    return start_server(ServerConfig.model_validate({
        "families": [{"artifact": str(artifact)}],
        "limits": {"max_batch": 2, "max_context": 256, **limits}}))


class Killed(BaseException):
    """Not an Exception: nothing in the engine catches it, and its thread ends."""


def post_in_background(url: str, body: dict) -> dict:
    out = {}

    def run():
        t0 = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        out.update(status=r.status_code, body=r.json(), seconds=time.monotonic() - t0)

    out["thread"] = threading.Thread(target=run)
    out["thread"].start()
    return out


def slow_steps(engine, seconds: float, then=None):
    runner = engine.runners[0]
    step = runner.__dict__.setdefault("original_step", runner.step)  # the real one, however often patched

    def slow():
        time.sleep(seconds)
        if then is not None:
            raise then
        step()

    runner.step = slow


def health_within(url: str, status: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        r = httpx.get(url + "/health")
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r.json()
        time.sleep(0.1)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_dead_engine_thread_turns_health_503_and_fails_waiting_requests(artifact):
    server = serve(artifact)
    try:
        engine = server.server.config.app.state.branchserve.engine
        assert httpx.get(server.url + "/health").status_code == 200
        slow_steps(engine, 0.5, then=Killed("simulated crash"))
        running = post_in_background(server.url, CHAT)
        t0 = time.monotonic()
        body = health_within(server.url, 503, 5)
        assert "engine thread ended" in body["detail"] and "simulated crash" in body["detail"]
        assert time.monotonic() - t0 < 5
        running["thread"].join(10)
        assert running["status"] == 503 and running["body"]["error"]["code"] == "engine_unavailable"
        assert running["seconds"] < 5
        late = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=10)  # refused at once
        assert late.status_code == 503 and late.json()["error"]["code"] == "engine_unavailable"
        assert sum(engine.admission._count.values()) == 0
    finally:
        server.close()


def test_a_hung_step_is_503_until_it_ends_and_a_request_past_its_time_is_504(artifact, monkeypatch):
    server = serve(artifact, step_timeout_s=1, request_timeout_s=3)
    try:
        engine = server.server.config.app.state.branchserve.engine
        slow_steps(engine, 4)  # one step takes 4 s: past step_timeout_s
        waiting = post_in_background(server.url, CHAT)
        assert "a step has run for" in health_within(server.url, 503, 5)["detail"]
        waiting["thread"].join(10)
        assert waiting["status"] == 503 and waiting["seconds"] < 4.5
        health_within(server.url, 200, 10)  # the step ended: healthy again

        slow_steps(engine, 0.2)  # steps of 0.2 s: healthy, but 200 tokens take 40 s, past request_timeout_s
        stream = httpx.post(server.url + "/v1/chat/completions", json={**CHAT, "stream": True}, timeout=20)
        assert stream.status_code == 200 and "request_timeout_s" in stream.text and stream.text.endswith(
            "data: [DONE]\n\n")
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/chat/completions", json=CHAT, timeout=20)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        assert 2.5 < time.monotonic() - t0 < 6
        deadline = time.monotonic() + 5
        while sum(engine.admission._count.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sum(engine.admission._count.values()) == 0 and not engine.runners[0].running  # the slots are free

        import server.api.embeddings as embeddings  # embeddings that take 5 s: bounded in time too

        async def slow(embedder, texts, embed=embeddings._embed):
            await asyncio.sleep(5)
            return await embed(embedder, texts)

        monkeypatch.setattr(embeddings, "_embed", slow)
        t0 = time.monotonic()
        r = httpx.post(server.url + "/v1/embeddings", json={"model": "decoder:math", "input": "add 2 and 3"},
                       timeout=20)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - t0 < 5
    finally:
        server.close()


def test_admission_holds_one_place_per_pipeline_and_gets_back_to_zero_after_faults(artifact, monkeypatch):
    """A burst of pipeline requests is admitted by the queue bound like any other (each holds one place for all
    its stages), and after failing steps, failed pipelines, cancellations and clients that go away, nothing is
    left counted."""
    import concurrent.futures

    server = start_server(ServerConfig.model_validate({
        "families": [{"artifact": str(artifact)}],
        "pipelines": [{"name": "two", "stages": [
            {"model": "math", "template": "stage1/reason", "max_tokens": 6},
            {"model": "code", "template": "stage2/concise", "domain": "arithmetic", "max_tokens": 4}]}],
        "limits": {"max_batch": 1, "max_context": 1024, "queue_size": 2}}))
    try:
        engine = server.server.config.app.state.branchserve.engine
        slow_steps(engine, 0.05)
        import server.api.input_processor as pipelines  # where a stage's prompt is rendered

        render = pipelines.render_chat  # slow rendering: every request of the burst is in before any stage runs
        monkeypatch.setattr(pipelines, "render_chat", lambda *a, **kw: time.sleep(0.5) or render(*a, **kw))
        ask = {"model": "two", "messages": [{"role": "user", "content": "What is 6 times 7?"}]}

        def post(body):
            return httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).status_code

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            statuses = list(pool.map(post, [ask] * 8))
        assert statuses.count(200) == 3 and statuses.count(429) == 5, statuses  # max_batch 1 + queue_size 2
        assert engine.admission.in_flight() == 0

        # faults: a step that raises (its rows fail, pipelines too), clients that go away mid-stream
        runner, step, calls = engine.runners[0], engine.runners[0].original_step, []

        def flaky():
            calls.append(1)
            if len(calls) % 4 == 0:
                raise RuntimeError("simulated step failure")
            step()

        runner.step = flaky
        monkeypatch.setattr(pipelines, "render_chat", render)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, ask if i % 2 else {**CHAT, "max_tokens": 8}) for i in range(6)]
            for _ in range(2):  # streams abandoned after their first chunk
                with httpx.stream("POST", server.url + "/v1/chat/completions", json={**ask, "stream": True},
                                  timeout=60) as r:
                    next(r.iter_lines())
            results = [f.result() for f in futures]
        assert set(results) <= {200, 429, 500} and 500 in results
        deadline = time.monotonic() + 10
        while engine.admission.in_flight() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.admission.in_flight() == 0
        assert not runner.running and not runner.waiting and runner.pool.used == 0
    finally:
        server.close()
