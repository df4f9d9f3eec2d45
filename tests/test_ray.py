"""`serve --ray`: the conformance tests of the single process, run against the Ray Serve application.

One local Ray instance (started here, tiny models) serves one application: two ingress replicas and one deployment
per model, with a router and a pipeline. The tests imported below are the single process's own,
unchanged: they take this module's ``server`` and ``client``.
"""

import json
import logging
import time

import httpx
import openai
import pytest
import ray
from ray import serve

from server.config import ServerConfig
from server.ray_app import build_application, deployments, options
from tests.conftest import free_port
from tests.test_api import (  # noqa: F401  (collected here, against the Ray app)
    MESSAGES,
    test_bad_bodies_say_what_is_wrong,
    test_chat_and_stream_agree,
    test_content_parts_and_unknown_fields,
    test_eight_concurrent_streams_complete,
    test_errors,
    test_metrics_have_per_model_series,
    test_min_tokens_keeps_a_stop_string_from_ending_the_answer_early,
    test_n_choices_and_seed,
    test_stop_and_max_completion_tokens,
    test_stream_without_usage_has_no_usage_field,
)
from tests.test_api import models, series_total  # noqa: F401  (the fixture)
from tests.test_pipelines import (  # noqa: F401
    test_streaming_streams_the_final_stage,
    test_two_stages_content_reasoning_and_usage,
)
from tests.test_router import write_exemplars

APP = "branchserve-test"


class RayServer:
    def __init__(self, url: str):
        self.url = url


def ray_config(paths, exemplars) -> ServerConfig:
    return ServerConfig.model_validate({
        "families": [{"artifact": str(paths["artifact"]), "branches": {"math": "math", "code": "code",
                                                                         "chat": "chat"}}],
        "standalone": [{"name": "phi3", "path": str(paths["phi3"])}],
        "router": {"default_route": "general", "exemplars": str(exemplars)},
        "pipelines": [{"name": "reason-then-answer", "stages": [
            {"model": "phi3", "template": "stage1/reason", "max_tokens": 10},
            {"model": "math", "template": "stage2/concise", "domain": "arithmetic", "max_tokens": 6},
        ]}],
        "limits": {"max_batch": 8, "max_context": 512},
        "ray": {"ingress": {"num_replicas": 2}},  # an exemplar edit through one must reach the other
    })


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):  # noqa: F811
    home = tmp_path_factory.mktemp("ray-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("BRANCHSERVE_HOME", str(home))  # the Ray workers started below inherit it
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
             _metrics_export_port=free_port(), _system_config={"metrics_report_interval_ms": 500})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = ray_config(models, write_exemplars(home / "ex.yaml"))
        serve.run(build_application(config, "127.0.0.1"), name=APP, route_prefix="/")
        yield RayServer(f"http://127.0.0.1:{port}")
    finally:
        serve.shutdown()
        ray.shutdown()
        mp.undo()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ray_export() -> str:
    port = ray.nodes()[0]["MetricsExportPort"]
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


@pytest.fixture
def metric_total(server):
    """The conformance tests' metric reader: ``/metrics`` through the proxy, which sums every replica's series in
    Ray's export. Ray exports every 0.5 s here (10 s by default), so it waits for ``at_least``."""
    def total(name: str, at_least: float = 1.0, **labels) -> float:
        deadline = time.monotonic() + 20
        while True:
            value = series_total(httpx.get(server.url + "/metrics").text, name, labels)
            if value >= at_least or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    return total


def test_metrics_sum_every_replica_from_rays_export(server, client, metric_total):
    for _ in range(6):  # two ingress replicas: six requests reach both with probability 1 - 2/64
        client.chat.completions.create(model="code", messages=MESSAGES, max_tokens=4, temperature=0)
    assert metric_total("branchserve_requests_total", 6, model="code", status="ok") >= 6
    assert metric_total("branchserve_replica_generation_tokens_total", 24, model="code",
                        deployment="family-art") >= 24
    exported = ray_export()  # the same series in Ray's own export, per replica
    assert series_total(exported, "ray_branchserve_requests_total", {"application": APP, "model": "code"}) >= 6
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE branchserve_time_to_first_token_seconds histogram" in text
    assert 'replica="' not in text and "ray_" not in text
    buckets = [float(line.split('le="')[1].split('"')[0]) for line in text.splitlines()
               if line.startswith('branchserve_e2e_request_latency_seconds_bucket{') and 'model="code"' in line]
    assert buckets == sorted(buckets) and buckets[-1] == float("inf")


def test_models_list_names_every_kind(client):
    kinds = {m.id: m.kind for m in client.models.list().data}
    assert {n: kinds[n] for n in ("math", "code", "chat", "phi3", "reason-then-answer", "auto")} == {
        "math": "branch", "code": "branch", "chat": "branch", "phi3": "standalone",
        "reason-then-answer": "pipeline", "auto": "router"}


def test_auto_routes_and_an_exemplar_edit_takes_effect(server, client):
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "What is 45 times 3?"}], max_tokens=3)
    assert raw.headers["x-branchserve-route"] == "math" and raw.parse().model == "math"
    added = httpx.post(server.url + "/v1/router/routes/general/exemplars", json={"text": "What is 45 times 3?"})
    assert added.status_code == 201

    def routes() -> list[str]:  # two ingress replicas: 8 decisions reach both with probability 1 - 2/256
        return [httpx.post(server.url + "/v1/router/decide", json={"text": "What is 45 times 3?"}).json()["route"]
                for _ in range(8)]

    assert routes() == ["general"] * 8
    gone = httpx.delete(server.url + f"/v1/router/routes/general/exemplars/{added.json()['id']}")
    assert gone.status_code == 204
    assert routes() == ["math"] * 8


def replica_stats(name: str) -> dict:
    return serve.get_deployment_handle(name, app_name=APP).stats.remote().result()


def test_a_client_disconnect_frees_the_replicas_slot(server, client):
    stream = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=400, temperature=0,
                                            stream=True)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert replica_stats("family-art")["running"] == 1
    stream.close()
    deadline = time.monotonic() + 5
    while replica_stats("family-art")["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert replica_stats("family-art")["running"] == 0


def test_deployment_options_come_from_the_ray_sections(models):  # noqa: F811
    config = ServerConfig.model_validate({
        "families": [{"artifact": str(models["artifact"]), "device": "cuda",
                      "ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"]), "ray": {"num_replicas": 2}}],
        "ray": {"defaults": {"num_cpus": 2, "max_ongoing_requests": 24}},
    })
    (fam, _, _), (sa, _, _) = deployments(config)
    assert (fam, sa) == ("family-art", "standalone-phi3")
    opts = options(config, config.families[0].ray, "cuda")
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 1} and opts["max_ongoing_requests"] == 24
    opts = options(config, config.standalone[0].ray, "cpu")
    assert opts["num_replicas"] == 2 and opts["ray_actor_options"] == {"num_cpus": 2}
    assert options(config, config.ray.ingress, None)["ray_actor_options"] == {"num_cpus": 0}
    with pytest.raises(ValueError, match="not both"):
        ServerConfig.model_validate({"standalone": [{"name": "x", "path": "x", "ray": {
            "num_replicas": 2, "autoscaling": {"max_replicas": 2, "target_ongoing_requests": 1}}}]})


def test_the_kuberay_manifest_holds_a_valid_config_and_our_import_path():
    import importlib

    import yaml

    from tests.conftest import ROOT

    docs = list(yaml.safe_load_all((ROOT / "deploy/kuberay/rayservice.yaml").read_text()))
    config = ServerConfig.model_validate(yaml.safe_load(docs[0]["data"]["serve.yaml"]))
    assert [name for name, _, _ in deployments(config)] == ["family-llama3-family", "standalone-phi3"]
    assert options(config, config.families[0].ray, "cuda")["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    app = yaml.safe_load(docs[1]["spec"]["serveConfigV2"])["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_the_ingress_bounds_an_embedding_before_it_reaches_a_replica():
    from server.ray_app import RemoteEngine, RemoteRunner
    from server.engine.core import Target

    engine = RemoteEngine({}, {}, max_waiting=4)
    engine.targets["math"] = Target("math", "branch", RemoteRunner(512, 8, 300), None, frozenset())
    engine.deployment_of["math"] = "family-art"
    with pytest.raises(ValueError, match="the limit is 8448"):
        engine.embed_future("math", [1] * 9000)
    with pytest.raises(ValueError, match="nothing to embed"):
        engine.embed_future("math", [])


def test_a_constraint_is_compiled_once_by_the_ingress_and_loaded_by_the_replica(server, client):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    for stream in (False, True):
        reply = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=40, temperature=0,
                                               stream=stream, extra_body={"guided_json": schema})
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream \
            else reply.choices[0].message.content
        assert isinstance(json.loads(text)["ok"], bool)
    replica = next(name for name in serve.status().applications[APP].deployments if "family" in name.lower())
    counts = serve.get_deployment_handle(replica, APP).grammar_counts.remote().result()
    assert counts["compiled"] == 0 and counts["loaded"] >= 1, counts
