"""The router: decision logic, exemplar store, embedders, cache, HTTP editing API, eval and fit."""

import asyncio
import json
import threading

import httpx
import openai
import pytest
import torch
import yaml

from compression.compress import CompressOptions, compress
from compression.errors import UserError
from compression.synthetic import build_standalone
from router.decision import decide, route_scores
from router.embedders import DecoderSuffixEmbedder, SentenceTransformerEmbedder, load_decoder_path
from router.router import Router
from router.store import ExemplarStore, Route, StoreError
from server.cli import main
from server.config import ServerConfig
from tests.conftest import start_server

EXEMPLARS = {"routes": {
    "math": {"target": "math", "exemplars": ["What is 17 times 23?", "Solve for x: 3x + 7 = 22.",
                                             "Compute the sum of 48 and 95."]},
    "code": {"target": "code", "exemplars": ["Write a Python function to reverse a list.",
                                             "Why does my JavaScript loop never end?",
                                             "Fix this SQL query that returns duplicate rows."]},
    "general": {"target": "phi3", "exemplars": ["Tell me about the history of Rome.",
                                                "What should I cook for dinner tonight?"]},
}}


def write_exemplars(path, data=EXEMPLARS):
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- decision logic on fixed vectors

def test_scores_max_and_mean_top_k():
    m = torch.tensor([[1.0, 0], [0.6, 0.8], [0, 1.0], [0.8, 0.6]])
    owners = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([1.0, 0])
    assert route_scores(q, m, owners, 3, "max").tolist() == pytest.approx([1.0, 0.8, float("-inf")])
    assert route_scores(q, m, owners, 3, "mean_top_k", 2).tolist()[:2] == pytest.approx([0.8, 0.4])


def test_decide_threshold_default_and_ties():
    routes = [Route("a", "A"), Route("b", "B", threshold=0.9), Route("dflt", "D")]
    d = decide(torch.tensor([0.5, 0.7, 0.1]), routes, "dflt")
    assert (d.route, d.target, d.fallback, d.runner_up) == ("dflt", "D", True, "b")  # b won but missed 0.9
    d = decide(torch.tensor([0.5, 0.95, 0.1]), routes, "dflt")
    assert (d.route, d.score, d.runner_up, d.runner_up_score) == ("b", pytest.approx(0.95), "a", pytest.approx(0.5))
    tie = [Route("zeta", "Z"), Route("alpha", "A"), Route("dflt", "D")]
    assert decide(torch.tensor([0.7, 0.7, 0.1]), tie, "dflt").route == "alpha"
    assert decide(torch.tensor([float("-inf")] * 3), tie, "dflt").route == "dflt"


# -- the store

def test_store_round_trip_and_errors(tmp_path):
    store = ExemplarStore(write_exemplars(tmp_path / "ex.yaml"))
    ex = store.add_exemplar("math", "  What is 2 to the power 10?  ")
    assert ex.text == "What is 2 to the power 10?" and ex.id.startswith("ex-")
    with pytest.raises(StoreError):
        store.add_exemplar("math", "What is 2 to the power 10?")
    with pytest.raises(StoreError) as e:
        store.add_exemplar("nope", "x")
    assert e.value.missing
    with pytest.raises(StoreError):
        store.add_exemplar("math", "   ")
    with pytest.raises(StoreError):
        store.add_exemplar("math", "x" * 5000)
    first = store.routes["code"].exemplars[0].id
    store.remove_exemplar("code", first)
    store.add_route("poetry", "phi3", threshold=0.4, exemplars=["Write a haiku about rain."])
    again = ExemplarStore(tmp_path / "ex.yaml")
    assert [e.text for e in again.routes["math"].exemplars][-1] == "What is 2 to the power 10?"
    assert first not in [e.id for e in again.routes["code"].exemplars]
    assert again.routes["poetry"].threshold == 0.4
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ex.yaml.lock", "ex.yaml"]  # no temporary files


@pytest.mark.parametrize("text,expect", [
    ("routes:\n  math:\n    exemplars: [a]\n", ":2: route 'math' has no target"),
    ("routes:\n  math:\n    target: m\n    exemplars:\n      - a\n      - a\n", ":6: duplicate exemplar"),
    ("routes:\n  math:\n    target: m\n    colour: red\n", ":4: unknown key 'colour'"),
    ("routes:\n  math: [\n", "not valid YAML"),
    ("routes:\n  math:\n    target: m\n    threshold: high\n", ":4: threshold must be a number"),
])
def test_malformed_exemplar_file_names_file_and_line(tmp_path, text, expect):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        ExemplarStore(path)
    assert str(e.value).startswith(str(path)) and expect in str(e.value)


def test_fifty_concurrent_adds_all_persist(tmp_path):
    store = ExemplarStore(write_exemplars(tmp_path / "ex.yaml"))
    threads = [threading.Thread(target=store.add_exemplar, args=("math", f"What is {i} plus {i}?"))
               for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    texts = [e.text for e in ExemplarStore(tmp_path / "ex.yaml").routes["math"].exemplars]
    assert len(texts) == 53 and all(f"What is {i} plus {i}?" in texts for i in range(50))


def test_edits_keep_the_files_comments_and_mode(tmp_path):
    path = tmp_path / "ex.yaml"
    path.write_text("# my routes\nroutes:\n  math:   # sums\n    target: math\n    exemplars:\n"
                    "      - What is 17 times 23?   # the classic\n")
    path.chmod(0o644)
    store = ExemplarStore(path)
    store.add_exemplar("math", "What is 9 squared?")
    store.add_route("code", "code", exemplars=["Fix my SQL."])
    text = path.read_text()
    assert "# my routes" in text and "# sums" in text and "# the classic" in text
    assert (path.stat().st_mode & 0o777) == 0o644
    assert [e.text for e in ExemplarStore(path).routes["math"].exemplars] == ["What is 17 times 23?",
                                                                             "What is 9 squared?"]


def test_an_edit_from_another_process_is_seen_and_kept(tmp_path):
    """Two stores on one file stand for a server and `branchserve exemplars --file`: each sees the other's
    edits, and neither overwrites them."""
    path = write_exemplars(tmp_path / "ex.yaml")
    server, cli = ExemplarStore(path), ExemplarStore(path)
    cli.add_exemplar("math", "What is 9 squared?")
    assert server.refresh() and "What is 9 squared?" in [e.text for e in server.routes["math"].exemplars]
    cli.add_exemplar("code", "How do I undo a git commit?")
    server.add_exemplar("math", "What is 2 plus 2?")  # re-reads first: the CLI's second edit survives
    texts = [e.text for r in ExemplarStore(path).routes.values() for e in r.exemplars]
    assert {"What is 9 squared?", "How do I undo a git commit?", "What is 2 plus 2?"} <= set(texts)


def test_thresholds_are_cosines(tmp_path):
    store = ExemplarStore(write_exemplars(tmp_path / "ex.yaml"))
    for bad in (1.5, -2, float("nan")):
        with pytest.raises(StoreError):
            store.add_route("odd", "phi3", threshold=bad, exemplars=["x"])
    path = tmp_path / "bad.yaml"
    path.write_text("routes:\n  math:\n    target: m\n    threshold: 1.5\n    exemplars: [a]\n")
    with pytest.raises(UserError, match=r":4: threshold must be a number in \[-1, 1\]"):
        ExemplarStore(path)


def test_an_empty_route_never_wins_and_scores_null():
    routes = [Route("empty", "E"), Route("dflt", "D")]
    d = decide(torch.tensor([float("-inf"), 0.3]), routes, "dflt")
    assert d.route == "dflt" and d.scores == {"empty": None, "dflt": 0.3}
    d = decide(torch.tensor([float("-inf"), float("-inf")]), routes, "dflt")
    assert (d.route, d.score, d.fallback) == ("dflt", None, True)
    json.dumps(d.to_json(), allow_nan=False)  # what the API sends must be valid JSON
    assert decide(torch.tensor([1.0000001, 0.3]), [Route("a", "A"), Route("dflt", "D")], "dflt").score == 1.0


# -- embedders

@pytest.fixture(scope="module")
def minilm():
    return SentenceTransformerEmbedder()


def test_minilm_embeds_meaning(minilm):
    v = minilm.embed(["What is 12 times 11?", "Compute 7 multiplied by 8.", "Write a Python class for a stack."])
    assert v.shape == (3, 384)
    torch.testing.assert_close(v.norm(dim=1), torch.ones(3))
    assert v[0] @ v[1] > v[0] @ v[2]


@pytest.fixture(scope="module")
def tiny_models(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("router-models")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4)}


def test_decoder_suffix_embedder_on_tiny_models(tiny_models):
    emb = load_decoder_path(tiny_models["phi3"])
    v = emb.embed(["What is 12 times 11?", "Write a Python class."])
    assert v.shape == (2, 64) and torch.allclose(v.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(emb.embed(["What is 12 times 11?"])[0], v[0])
    last = load_decoder_path(tiny_models["phi3"], pooling="last")
    assert last.fingerprint != emb.fingerprint and not torch.allclose(last.embed(["What is 12 times 11?"])[0], v[0])
    plain = load_decoder_path(tiny_models["phi3"], suffix=False)
    assert plain.fingerprint != emb.fingerprint
    assert not torch.allclose(plain.embed(["What is 12 times 11?"])[0], v[0])
    # A served family branch embeds through the family model's own hidden states.
    from compression.artifact import Artifact
    from server.engine.model import FamilyModel
    from server.engine.text import load_tokenizer

    art = Artifact(tiny_models["artifact"])
    model = FamilyModel.from_artifact(art)
    branch = DecoderSuffixEmbedder("math", load_tokenizer(art.branch_dir("math")),
                                   lambda ids, layer: model.hidden([ids], [0], layer)[0], layer=2)
    assert branch.embed(["hello"]).shape == (1, 64)


def test_concurrent_embeddings_are_batched_and_equal_the_single_ones(minilm):
    texts = [f"Question number {i}: what is {i} plus {i + 1}?" for i in range(16)] + ["hi"]
    calls = []
    encode = minilm.embed

    def counted(batch):
        calls.append(len(batch))
        return encode(batch)

    minilm.embed = counted
    try:
        async def burst():
            return await asyncio.gather(*(minilm.aembed_one(t) for t in texts))

        together = asyncio.run(burst())
    finally:
        del minilm.embed
    assert sum(calls) == len(texts) and len(calls) < len(texts) // 2, calls  # grouped, none lost
    for text, (vector, truncated) in zip(texts, together):
        assert not truncated
        assert torch.allclose(vector, minilm.embed_one(text)[0], atol=1e-5)


def test_a_group_error_reaches_each_request_of_the_group_and_a_cancelled_one_is_skipped():
    from router.embedders import Batcher

    groups, release = [], threading.Event()

    def fn(items):
        groups.append(list(items))
        if items == ["first"]:
            release.wait(10)  # the others queue meanwhile
        if "bad" in items:
            raise ValueError("no")
        return [x.upper() for x in items]

    batcher = Batcher(fn)

    async def main():
        first = asyncio.ensure_future(batcher.submit("first"))
        while not groups:
            await asyncio.sleep(0.005)
        gone = asyncio.ensure_future(batcher.submit("gone"))
        rest = [asyncio.ensure_future(batcher.submit(x)) for x in ("bad", "b")]
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        release.set()
        return await first, await asyncio.gather(*rest, return_exceptions=True)

    first, rest = asyncio.run(main())
    assert first == "FIRST"
    assert groups == [["first"], ["bad", "b"]]  # one group for those that waited; the cancelled one never ran
    assert all(isinstance(r, ValueError) for r in rest)


def test_cache_re_embeds_only_what_changed(tmp_path, minilm):
    store = ExemplarStore(write_exemplars(tmp_path / "ex.yaml"))
    r1 = Router(store, minilm, tmp_path / "cache", "general")
    assert r1.cache.misses == 8
    r2 = Router(ExemplarStore(tmp_path / "ex.yaml"), minilm, tmp_path / "cache", "general")
    assert r2.cache.misses == 0
    r2.store.add_exemplar("code", "How do I undo a git commit?")
    assert r2.decide_text("How do I undo a git commit?").route == "code"
    assert r2.cache.misses == 1 + 1 - 1  # the new exemplar only (the query is not cached)


def test_router_decides_and_edits_take_effect(tmp_path, minilm):
    router = Router(ExemplarStore(write_exemplars(tmp_path / "ex.yaml")), minilm, tmp_path / "cache", "general")
    assert router.decide_text("What is 45 times 3?").route == "math"
    assert router.decide_text("My Python script throws a KeyError").route == "code"
    odd = "Recommend a good sci-fi novel"
    before = router.decide_text(odd)
    router.store.add_route("books", "phi3", exemplars=["Recommend a good sci-fi novel"])
    after = router.decide_text(odd)
    assert after.route == "books" and after.score == pytest.approx(1.0, abs=1e-5) and before.route != "books"
    with pytest.raises(StoreError):
        router.remove_route("general")


# -- over HTTP

def router_config(models, exemplars, **extra) -> ServerConfig:
    return ServerConfig.model_validate({
        "families": [{"artifact": str(models["artifact"])}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"])}],
        "router": {"default_route": "general", "exemplars": str(exemplars), **extra.pop("router", {})},
        "limits": {"max_batch": 4, "max_context": 256},
        **extra,
    })


start = start_server


def test_auto_routing_and_editing_over_http(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    path = write_exemplars(tmp_path / "ex.yaml")
    server = start(router_config(tiny_models, path))
    url = server.url
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert "auto" in [m.id for m in client.models.list().data]
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "What is 45 times 3?"}], max_tokens=3)
        assert raw.headers["x-branchserve-route"] == "math" and raw.headers["x-branchserve-branch"] == "math"
        assert float(raw.headers["x-branchserve-route-score"]) > 0.3
        assert raw.parse().model == "math"
        stream = client.chat.completions.create(model="auto", stream=True, max_tokens=3,
                                                messages=[{"role": "user", "content": "Fix my Python import"}])
        assert {c.model for c in stream} == {"code"}

        routes = httpx.get(url + "/v1/router/routes").json()
        assert routes["default_route"] == "general" and len(routes["routes"]) == 3
        r = httpx.post(url + "/v1/router/routes/general/exemplars", json={"text": "What is 45 times 3?"})
        assert r.status_code == 201 and r.json()["id"].startswith("ex-")
        new_id = r.json()["id"]
        d = httpx.post(url + "/v1/router/decide", json={"text": "What is 45 times 3?"}).json()
        assert d["route"] == "general" and d["runner_up"] == "math"  # the edit counts on the next request
        d = httpx.post(url + "/v1/router/decide",
                       json={"messages": [{"role": "user", "content": "What is 45 times 3?"}]}).json()
        assert d["route"] == "general"
        assert httpx.post(url + "/v1/router/routes/general/exemplars",
                          json={"text": "What is 45 times 3?"}).status_code == 409  # duplicate
        assert httpx.post(url + "/v1/router/routes/nope/exemplars", json={"text": "x"}).status_code == 404
        assert httpx.post(url + "/v1/router/routes/math/exemplars", json={"text": ""}).status_code == 400
        assert httpx.post(url + "/v1/router/decide", json={"text": ""}).status_code == 400
        assert httpx.delete(url + "/v1/router/routes/math/exemplars/ex-nothing").status_code == 404
        created = httpx.post(url + "/v1/router/routes", json={"name": "books", "target": "phi3",
                                                              "exemplars": ["Recommend a novel"]})
        assert created.status_code == 201
        assert httpx.post(url + "/v1/router/routes", json={"name": "x", "target": "ghost"}).status_code == 404
        # A route with no exemplars never wins, and decisions stay valid JSON (they were a 500 before).
        assert httpx.post(url + "/v1/router/routes", json={"name": "empty", "target": "phi3"}).status_code == 201
        d = httpx.post(url + "/v1/router/decide", json={"text": "What is 45 times 3?"})
        assert d.status_code == 200 and d.json()["scores"]["empty"] is None and d.json()["route"] != "empty"
        # No keys, loopback: open to this machine's own clients only, not to what a local reverse proxy forwards.
        for header in ({"X-Forwarded-For": "203.0.113.7"}, {"Forwarded": "for=203.0.113.7"}):
            r = httpx.post(url + "/v1/router/routes/general/exemplars", json={"text": "proxied"}, headers=header)
            assert r.status_code == 403 and "BRANCHSERVE_ADMIN_KEY" in r.json()["error"]["message"]
            assert httpx.get(url + "/v1/router/routes", headers=header).status_code == 403
        # A full disk is a 503 that says so (it was a generic 500), and nothing changes.
        import router.store as store_module

        def full(*args):
            raise OSError(28, "No space left on device")

        with monkeypatch.context() as m:
            m.setattr(store_module, "write_atomically", full)
            r = httpx.post(url + "/v1/router/routes/general/exemplars", json={"text": "on a full disk"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable"
            assert "No space left" in r.json()["error"]["message"]
        # A path in an id names that id, not another route (the CLI once sent DELETE /v1/router/routes/books).
        for bad in ("../../books", "..", "a/b"):
            assert main(["exemplars", "--url", url, "remove", "general", bad]) == 2
        assert main(["exemplars", "--url", url, "remove", "..", "x"]) == 2
        assert "books" in [r["name"] for r in httpx.get(url + "/v1/router/routes").json()["routes"]]
        assert httpx.post(url + "/v1/router/routes", json={"name": "hot", "target": "phi3", "threshold": 1.5,
                                                           "exemplars": ["x"]}).status_code == 400
        assert httpx.delete(url + "/v1/router/routes/empty").status_code == 204
        assert httpx.delete(url + "/v1/router/routes/books").status_code == 204
        assert httpx.delete(url + "/v1/router/routes/general").status_code == 400
        math_ids = [e["id"] for e in routes["routes"][0]["exemplars"]]
        assert httpx.delete(url + f"/v1/router/routes/math/exemplars/{math_ids[0]}").status_code == 204
        decisions = httpx.get(url + "/metrics").text
        assert 'branchserve_route_decisions_total{outcome="match",route="math"}' in decisions

        # 50 concurrent adds over HTTP: every one answered 201 and every one on disk.
        async def add_many():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*(c.post(url + "/v1/router/routes/code/exemplars",
                                                     json={"text": f"Explain Python snippet number {i}"})
                                              for i in range(50)))
        assert [r.status_code for r in asyncio.run(add_many())] == [201] * 50
        on_disk = [e.text for e in ExemplarStore(path).routes["code"].exemplars]
        assert all(f"Explain Python snippet number {i}" in on_disk for i in range(50))

        # The exemplars CLI against the running server.
        assert main(["exemplars", "--url", url, "add", "general", "Plan a picnic"]) == 0
        assert main(["exemplars", "--url", url, "list"]) == 0
        assert main(["exemplars", "--url", url, "add", "nope", "x"]) == 2
    finally:
        server.close()
    # A restart keeps every edit.
    server = start(router_config(tiny_models, path))
    try:
        routes = {r["name"]: r for r in httpx.get(server.url + "/v1/router/routes").json()["routes"]}
        assert new_id in [e["id"] for e in routes["general"]["exemplars"]]
        assert math_ids[0] not in [e["id"] for e in routes["math"]["exemplars"]]
        assert "books" not in routes
    finally:
        server.close()


def test_router_edits_need_the_admin_key(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    config = router_config(tiny_models, write_exemplars(tmp_path / "ex.yaml"), api_keys=["user"],
                           router={"admin_keys": ["admin"]})
    server = start(config)
    try:
        user = {"Authorization": "Bearer user"}
        admin = {"Authorization": "Bearer admin"}
        assert httpx.get(server.url + "/v1/router/routes", headers=user).status_code == 401
        assert httpx.get(server.url + "/v1/router/routes", headers=admin).status_code == 200
        assert httpx.post(server.url + "/v1/chat/completions", headers=user, json={
            "model": "auto", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}).status_code == 200
    finally:
        server.close()


def test_admin_keys_alone_guard_the_router_api(tiny_models, tmp_path, monkeypatch):
    """admin_keys set and api_keys empty: chat is open, the router API needs the admin key."""
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    server = start(router_config(tiny_models, write_exemplars(tmp_path / "ex.yaml"), router={"admin_keys": ["admin"]}))
    try:
        new = {"name": "books", "target": "phi3", "exemplars": ["Recommend a novel."]}
        r = httpx.post(server.url + "/v1/router/routes", json=new)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.post(server.url + "/v1/router/routes", json=new,
                          headers={"Authorization": "Bearer admin"}).status_code == 201
        assert httpx.post(server.url + "/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}).status_code == 200
    finally:
        server.close()


def test_with_no_keys_the_router_api_is_off_unless_bound_to_loopback(tiny_models, tmp_path, monkeypatch):
    from server.api.app import build_app
    from server.serve import build_engine, preflight, router_factory
    from tests.conftest import LiveServer

    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    config = router_config(tiny_models, write_exemplars(tmp_path / "ex.yaml"))
    pipelines = preflight(config)
    server = LiveServer(build_app(config, lambda: build_engine(config), router_factory(config, pipelines), pipelines,
                                  host="0.0.0.0"))
    server.wait_ready()
    try:
        r = httpx.post(server.url + "/v1/router/routes/math/exemplars", json={"text": "What is 3 cubed?"})
        assert r.status_code == 403 and "BRANCHSERVE_ADMIN_KEY" in r.json()["error"]["message"]
        assert httpx.get(server.url + "/v1/router/routes").status_code == 403
        assert httpx.post(server.url + "/v1/chat/completions", json={
            "model": "auto", "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 2}).status_code == 200
    finally:
        server.close()


def test_a_store_locked_elsewhere_or_on_a_full_disk_is_unavailable_and_unchanged(tmp_path, monkeypatch):
    """The file lock waited for ever, and a full disk was a generic 500: both are now a StoreError the API
    answers with 503 store_unavailable, and the file is as it was."""
    import errno
    import subprocess
    import sys

    import router.store as store_module

    path = write_exemplars(tmp_path / "ex.yaml")
    store = ExemplarStore(path)
    before = path.read_text()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from filelock import FileLock; "
                               f"lock = FileLock({str(path.parent / ('.' + path.name + '.lock'))!r}); lock.acquire(); "
                               "print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        store._file_lock.timeout = 0.5
        with pytest.raises(StoreError, match="locked by another process") as exc:
            store.add_exemplar("math", "What is 2 cubed?")
        assert exc.value.unavailable and path.read_text() == before
    finally:
        holder.kill()
        holder.wait()

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "write_atomically", full)
    with pytest.raises(StoreError, match="No space left on device") as exc:
        store.add_exemplar("math", "What is 2 cubed?")
    assert exc.value.unavailable and path.read_text() == before
    assert "What is 2 cubed?" not in [e.text for e in store.routes["math"].exemplars]


def test_a_failed_start_leaves_no_seeded_store_behind(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"families": [{"artifact": str(tiny_models["artifact"])}],
                                      "router": {"default_route": "general"}}))
    # The shipped reference routes target models this config does not serve: exit 2 before the port opens.
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "targets 'llama-math', which is not served" in err
    assert not (tmp_path / "home" / "router").exists()  # a failed start leaves nothing behind


def test_malformed_store_at_start_exits_2(tiny_models, tmp_path, capsys):
    bad = tmp_path / "ex.yaml"
    bad.write_text("routes:\n  math:\n    target: math\n    exemplars: 7\n")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({"families": [{"artifact": str(tiny_models["artifact"])}],
                                      "router": {"default_route": "math", "exemplars": str(bad)}}))
    assert main(["serve", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}:4: exemplars must be a list") and err.count("\n") == 1


# -- eval, fit and the exemplars CLI

LABELED = [
    ("Multiply 12 by 12.", "math"), ("What is 100 divided by 4?", "math"),
    ("Write a function to sort a list in Python.", "code"), ("Why is my Rust program panicking?", "code"),
    ("Tell me about ancient Egypt.", "general"), ("asdf qwerty zxcv", "none"),
]


def test_eval_and_fit_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    ex = write_exemplars(tmp_path / "ex.yaml")
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("\n".join(json.dumps({"text": t, "route": r}) for t, r in LABELED))
    args = ["router", "eval", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 6 and 0.5 <= report["accuracy"] <= 1
    assert set(report["per_route"]) >= {"math", "code", "general"}
    assert report["latency_ms"]["p95"] >= report["latency_ms"]["p50"] > 0
    assert main(args) == 0
    assert "confusion" in capsys.readouterr().out
    fit = ["router", "fit", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*fit, "--json", "--write"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy_after"] >= result["accuracy_before"]
    stored = ExemplarStore(ex)
    assert {n: r.threshold for n, r in stored.routes.items() if n != "general"} == \
        {n: t for n, t in result["thresholds"].items() if n != "general"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["router", "eval", "--labeled", str(bad), "--exemplars", str(ex), "--default-route", "general"]) == 2
    assert f"{bad}:1:" in capsys.readouterr().err
    # every flag is used as given, or refused in one line
    for extra, words in ((["--input", "bogus"], "--input 'bogus' is not one of"),
                         (["--input", "last_user,context"], "only with --compare"),
                         (["--embedder", "minilm", "--embedder", "minilm"], "needs --compare")):
        assert main([*args, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and err.count("\n") == 1, err
    no_default = ["router", "eval", "--labeled", str(labeled), "--exemplars", str(ex)]
    assert main(no_default) == 2 and "labels texts none" in capsys.readouterr().err
    in_scope = tmp_path / "in_scope.jsonl"  # nothing labeled none: no default route needed
    in_scope.write_text("\n".join(json.dumps({"text": t, "route": r}) for t, r in LABELED if r != "none"))
    assert main(["router", "eval", "--labeled", str(in_scope), "--exemplars", str(ex), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 5


def test_fit_replaces_thresholds_the_store_already_has(tmp_path, capsys, monkeypatch):
    """Stored thresholds far too high send every math and code text to the default route; fit must look past
    them, find lower ones, and report the accuracy those give."""
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    data = yaml.safe_load(yaml.safe_dump(EXEMPLARS))
    data["routes"]["math"]["threshold"] = data["routes"]["code"]["threshold"] = 0.99
    ex = write_exemplars(tmp_path / "ex.yaml", data)
    labeled = tmp_path / "labeled.jsonl"
    labeled.write_text("\n".join(json.dumps({"text": t, "route": r}) for t, r in LABELED))
    fit = ["router", "fit", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*fit, "--json", "--write"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy_before"] <= 3 / 6 < result["accuracy_after"]
    assert all(t is None or t < 0.99 for n, t in result["thresholds"].items() if n in ("math", "code"))
    args = ["router", "eval", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*args, "--json"]) == 0  # what was written gives what fit reported
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["accuracy_after"]


def test_exemplars_cli_on_a_file(tmp_path, capsys):
    ex = write_exemplars(tmp_path / "ex.yaml")
    assert main(["exemplars", "--file", str(ex), "add", "math", "What is 9 squared?"]) == 0
    new_id = capsys.readouterr().out.strip()
    assert main(["exemplars", "--file", str(ex), "list"]) == 0
    assert new_id in capsys.readouterr().out
    assert main(["exemplars", "--file", str(ex), "remove", "math", new_id]) == 0
    assert main(["exemplars", "--file", str(ex), "remove", "math", new_id]) == 2
    assert "no exemplar" in capsys.readouterr().err


def test_a_huge_message_is_routed_on_its_bounded_end_by_an_engine_job(tiny_models, tmp_path, monkeypatch):
    """decoder:NAME embeddings are engine embed jobs over at most max_input_tokens of the text (its end): a
    2 MB message to "auto" is answered at once, the decision says it was cut, and the server keeps serving."""
    import time

    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    config = router_config(tiny_models, write_exemplars(tmp_path / "ex.yaml"),
                           router={"embedder": "decoder:math", "max_input_tokens": 64})
    server = start(config)
    try:
        engine = server.app.state.branchserve.engine
        embed_future = engine.embed_future
        threads = []

        def watched(*args, **kw):  # the job is queued to the engine thread, never run by the caller
            future = embed_future(*args, **kw)
            future.add_done_callback(lambda f: threads.append(f.result().shape))
            return future

        monkeypatch.setattr(engine, "embed_future", watched)
        huge = "Please reverse the following text. " + "lorem ipsum dolor sit amet " * 80_000  # ~2.2 MB
        t0 = time.monotonic()
        decided = httpx.post(server.url + "/v1/router/decide", json={"text": huge}, timeout=30)
        assert decided.status_code == 200 and decided.json()["truncated"] is True
        r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                       json={"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": huge}]})
        assert time.monotonic() - t0 < 10
        assert r.status_code == 400 and "context" in r.json()["error"]["message"]
        embedder = server.app.state.branchserve.router.embedder
        bound = 64 + len(embedder.head_ids) + len(embedder.tail_ids)  # the text's last 64 tokens in the template
        assert threads and all(shape[0] == bound for shape in threads)
        short = httpx.post(server.url + "/v1/router/decide", json={"text": "What is 45 times 3?"}).json()
        assert short["truncated"] is False
        ok = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                        json={"model": "auto", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert ok.status_code == 200
    finally:
        server.close()


def test_kill_9_during_100_concurrent_adds_loses_no_acknowledged_one(tiny_models, tmp_path):
    """A real server process, 100 concurrent exemplar adds, SIGKILL part-way; after a restart every add that was
    answered 201 is there. Then an add from `branchserve exemplars --file` reaches the running server."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT, free_port

    ex = write_exemplars(tmp_path / "ex.yaml")
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "families": [{"artifact": str(tiny_models["artifact"])}],
        "standalone": [{"name": "phi3", "path": str(tiny_models["phi3"])}],
        "router": {"default_route": "general", "exemplars": str(ex), "embedder": "decoder:math"},
        "limits": {"max_batch": 4, "max_context": 256}}))
    env = dict(os.environ, BRANCHSERVE_HOME=str(tmp_path / "home"), PYTHONPATH=str(ROOT))

    def serve():
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", str(config),
                                 "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(url + "/health").status_code == 200:
                    return proc, url
            except httpx.TransportError:
                time.sleep(0.1)

    proc, url = serve()
    acknowledged = []
    try:
        async def adds():
            async with httpx.AsyncClient(timeout=30) as client:
                async def add(i):
                    try:
                        r = await client.post(f"{url}/v1/router/routes/math/exemplars",
                                              json={"text": f"What is {i} times {i + 1}?"})
                    except httpx.TransportError:
                        return
                    if r.status_code == 201:
                        acknowledged.append(r.json()["id"])
                        if len(acknowledged) == 30:
                            proc.send_signal(signal.SIGKILL)

                await asyncio.gather(*(add(i) for i in range(100)))

        asyncio.run(adds())
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL and len(acknowledged) >= 30
        proc, url = serve()
        routes = {r["name"]: r for r in httpx.get(url + "/v1/router/routes").json()["routes"]}
        stored = {e["id"] for e in routes["math"]["exemplars"]}
        assert set(acknowledged) <= stored
        # The CLI edits the file the server serves; the server's next decision and listing see it.
        assert main(["exemplars", "--file", str(ex), "add", "code", "How do I undo a git commit?"]) == 0
        routes = {r["name"]: r for r in httpx.get(url + "/v1/router/routes").json()["routes"]}
        assert "How do I undo a git commit?" in [e["text"] for e in routes["code"]["exemplars"]]
        d = httpx.post(url + "/v1/router/decide", json={"text": "How do I undo a git commit?"}).json()
        assert d["route"] == "code" and d["score"] == pytest.approx(1.0, abs=1e-4)
    finally:
        proc.kill()


# -- calibration: centring, margin, conversations, the eval that shows it

def test_margin_sends_a_close_call_to_the_default_route():
    routes = [Route("a", "A"), Route("b", "B"), Route("dflt", "D")]
    close = torch.tensor([0.61, 0.60, 0.1])
    assert decide(close, routes, "dflt").route == "a"
    d = decide(close, routes, "dflt", margin=0.05)
    assert (d.route, d.fallback, d.score) == ("dflt", True, pytest.approx(0.61))
    assert decide(torch.tensor([0.9, 0.6, 0.1]), routes, "dflt", margin=0.05).route == "a"
    # the default route winning a close call is no fallback
    assert decide(torch.tensor([0.1, 0.60, 0.61]), routes, "dflt", margin=0.05).fallback is False


def test_centring_spreads_a_decoders_scores_and_follows_edits(tmp_path, tiny_models):
    """A causal LM's pooled hidden states share one direction: raw cosines all sit near 1. Centred on the
    exemplars' mean, the same texts get the same winners with scores far apart."""
    emb = load_decoder_path(tiny_models["phi3"])
    ex = write_exemplars(tmp_path / "ex.yaml")
    raw = Router(ExemplarStore(ex), emb, tmp_path / "cache", "general", center=False)
    centred = Router(ExemplarStore(ex), emb, tmp_path / "cache", "general")
    for text in ("Compute 81 divided by 9.", "Write a Python function to sort."):
        a, b = raw.decide_text(text), centred.decide_text(text)
        assert a.route == b.route
        assert min(a.scores.values()) > 0.8  # the cone
        assert max(b.scores.values()) - min(b.scores.values()) > 3 * (max(a.scores.values()) - min(a.scores.values()))
    mean = centred._current().mean.clone()
    centred.store.add_exemplar("code", "How do I exit vim?")
    assert not torch.allclose(centred._current().mean, mean)  # the mean follows the exemplars
    assert centred.scoring.endswith("/centred/max") and raw.scoring.endswith("/raw/max")


def test_a_follow_up_is_routed_with_its_conversation(tmp_path, minilm):
    ex = write_exemplars(tmp_path / "ex.yaml")
    conversation = [{"role": "user", "content": "Write a Python function to reverse a list."},
                    {"role": "assistant", "content": "def rev(xs): return xs[::-1]"},
                    {"role": "user", "content": "can you add type hints?"}]
    alone = Router(ExemplarStore(ex), minilm, tmp_path / "cache", "general", input="last_user")
    in_context = Router(ExemplarStore(ex), minilm, tmp_path / "cache", "general", input="context")
    assert alone.decide_messages(conversation).route != "code"
    assert in_context.decide_messages(conversation).route == "code"
    # a change of topic still wins over the turns before it
    switch = [*conversation[:2], {"role": "user", "content": "thanks! what should I cook for dinner tonight?"}]
    assert in_context.decide_messages(switch).route == "general"


def test_fit_writes_margin_and_what_it_fitted_keeping_the_layout(tmp_path, capsys, monkeypatch, minilm):
    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    ex = tmp_path / "ex.yaml"
    ex.write_text("# mine\nroutes:\n  math:\n    target: math\n    exemplars:\n      - What is 17 times 23?\n"
                  "      - Compute the sum of 48 and 95.\n  general:\n    target: phi3\n    exemplars:\n"
                  "      - Tell me about the history of Rome.\n")
    labeled = tmp_path / "labeled.jsonl"
    rows = [{"text": "Multiply 12 by 12.", "route": "math"}, {"text": "what is 5 plus 9", "route": "math"},
            {"text": "Who built the pyramids?", "route": "general"}, {"text": "xqzt", "route": "none"},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                          {"role": "user", "content": "how are you?"}], "route": "general"}]
    labeled.write_text("\n".join(json.dumps(r) for r in rows))
    fit = ["router", "fit", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*fit, "--json", "--write"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["fitted_for"].startswith("st-all-MiniLM-L6-v2-") and result["fitted_for"].endswith("/centred/max")
    text = ex.read_text()
    assert text.startswith("# mine\n") and f"fitted_for: {result['fitted_for']}" in text
    assert "\n      - What is 17 times 23?\n" in text  # the file's own indentation
    store = ExemplarStore(ex)
    assert store.calibration.fitted_for == result["fitted_for"] and store.calibration.margin == result["margin"]
    args = ["router", "eval", "--labeled", str(labeled), "--exemplars", str(ex), "--default-route", "general"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"] == result["accuracy_after"] and report["n_multi_turn"] == 1
    assert report["spread"]["median"] > 0
    assert main([*args, "--compare", "--embedder", "minilm"]) == 0
    table = capsys.readouterr().out
    assert table.count("minilm") == 4 and "spread p50" in table  # centred or not, last_user or context
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "assistant", "content": "x"}], "route": "math"}\n')
    assert main(["router", "eval", "--labeled", str(bad), "--exemplars", str(ex), "--default-route", "general"]) == 2
    assert f"{bad}:1: messages must" in capsys.readouterr().err


def test_a_margin_out_of_range_in_the_file_names_its_line(tmp_path):
    ex = tmp_path / "ex.yaml"
    ex.write_text("margin: 3\nroutes:\n  a:\n    target: a\n    exemplars: [x]\n")
    with pytest.raises(UserError, match=r"ex.yaml:1: margin must be a number in \[0, 2\]"):
        ExemplarStore(ex)


def test_thresholds_fitted_for_another_scoring_are_flagged(tmp_path, minilm, caplog):
    ex = tmp_path / "ex.yaml"
    ex.write_text("fitted_for: decoder-phi3-0123/centred/max\nmargin: 0.05\n"
                  + yaml.safe_dump(EXEMPLARS, sort_keys=False))
    with caplog.at_level("WARNING", logger="branchserve.router"):
        router = Router(ExemplarStore(ex), minilm, tmp_path / "cache", "general")
    assert "fitted for decoder-phi3-0123/centred/max" in caplog.text and router.scoring in caplog.text


def test_the_fitted_threshold_is_the_best_cut_point():
    """The one-pass threshold search agrees with trying every cut point (ties to the lowest)."""
    import random

    from router.evaluate import Scored, _cuts, _threshold

    rng = random.Random(0)
    for _ in range(200):
        rows = [Scored(rng.choice(["r", "dflt", "other"]), "r", round(rng.choice([0.1, 0.2, 0.3, rng.random()]), 6),
                       None, 0.0) for _ in range(rng.randint(1, 12))]
        best_t, best_right = None, sum(s.want == "r" for s in rows)
        for t in _cuts([s.score for s in rows]):
            right = sum((s.want == "dflt") if s.score < t else (s.want == "r") for s in rows)
            if right > best_right:
                best_t, best_right = t, right
        assert _threshold(rows, "r", "dflt") == (best_t, best_right)


def test_a_huge_earlier_turn_is_cut_to_context_tokens(tiny_models):
    emb = load_decoder_path(tiny_models["phi3"], max_tokens=64, context_tokens=16)
    alone, n, _ = emb.prepare("What is 12 times 11?")
    ids, n_ctx, truncated = emb.prepare("What is 12 times 11?", context="user: lorem ipsum dolor " * 200_000)
    assert len(ids) <= len(alone) + 16 + len(emb.sep_ids) and not truncated
    assert ids[-len(emb.tail_ids):] == emb.tail_ids and n_ctx == n == len(emb.tail_ids)


def test_routing_is_bounded_by_the_request_timeout(tiny_models, tmp_path, monkeypatch):
    """model "auto" decides before the engine's stream exists, so that stream's deadline does not see it: a
    decision slower than limits.request_timeout_s is a 504 request_timeout, on chat and text completions, and
    on POST /v1/router/decide."""
    import asyncio
    import time

    monkeypatch.setenv("BRANCHSERVE_HOME", str(tmp_path / "home"))
    server = start(router_config(tiny_models, write_exemplars(tmp_path / "ex.yaml"),
                                 limits={"max_batch": 4, "max_context": 256, "request_timeout_s": 1}))
    try:
        router = server.server.config.app.state.branchserve.router

        async def slow(*args, **kwargs):
            await asyncio.sleep(5)

        monkeypatch.setattr(router, "adecide_messages", slow)
        monkeypatch.setattr(router, "adecide_text", slow)
        for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                           ("/v1/completions", {"prompt": "hi"})):
            t0 = time.monotonic()
            r = httpx.post(server.url + path, json={"model": "auto", "max_tokens": 2, **body}, timeout=30)
            assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
            assert time.monotonic() - t0 < 4
        t0 = time.monotonic()  # the router API's own decision, under the same limit
        r = httpx.post(server.url + "/v1/router/decide", json={"text": "hi"}, timeout=30)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout", r.text
        assert time.monotonic() - t0 < 4
    finally:
        server.close()
