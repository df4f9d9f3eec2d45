"""schemathesis against the live app on tiny models: every operation, generated and mutated inputs, and the
router API's create -> add -> delete links followed statefully. Any 5xx, or a response that breaks our own
OpenAPI schema, fails."""

import pytest
import schemathesis
from schemathesis import GenerationMode
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import positive_data_acceptance

from compression.compress import CompressOptions, compress
from compression.synthetic import build_standalone
from server.config import ServerConfig
from tests.conftest import start_server

EXAMPLES = 30


@pytest.fixture(scope="module")
def live(family, tmp_path_factory):
    import os

    root = tmp_path_factory.mktemp("fuzz")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    phi3 = build_standalone(root / "phi3", seed=4)
    (root / "ex.yaml").write_text("routes:\n  math:\n    target: math\n    exemplars:\n      - What is 2 plus 2\n"
                                  "  general:\n    target: phi3\n    exemplars:\n      - Tell me a story.\n")
    home = os.environ.get("BRANCHSERVE_HOME")
    os.environ["BRANCHSERVE_HOME"] = str(root / "home")
    config = ServerConfig.model_validate({
        "families": [{"artifact": str(root / "art")}],
        "standalone": [{"name": "phi3", "path": str(phi3)}],
        "router": {"default_route": "general", "exemplars": str(root / "ex.yaml"), "embedder": "decoder:math"},
        "pipelines": [{"name": "math-then-code", "stages": [{"model": "math", "template": "stage1/reason",
                                                             "max_tokens": 4},
                                                            {"model": "code", "template": "stage2/concise",
                                                             "max_tokens": 4}]}],
        "limits": {"max_batch": 4, "max_context": 128, "queue_size": 64},
    })
    server = start_server(config)
    yield server
    server.close()
    if home is None:
        os.environ.pop("BRANCHSERVE_HOME")
    else:
        os.environ["BRANCHSERVE_HOME"] = home


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(live.url + "/openapi.json")


# No example database and no shrinking: the server's state moves on between runs, so a replay is not the
# same test; a failure is reported as found.
FUZZ = dict(deadline=None, suppress_health_check=list(HealthCheck), database=None,
            phases=(Phase.explicit, Phase.generate))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation(api, mode):
    """Generated requests (schema-valid, then schema-violating) for each operation. Every check but
    positive_data_acceptance: a schema-valid request may still be refused for what only the server knows (a
    model's context length, the names it serves, a template's role order) with a 400."""
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=EXAMPLES, **FUZZ)
        def check(case):
            case.call_and_validate(excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to violate (no parameters, no body): GET /health
        except Exception as e:
            raise AssertionError(f"{mode.value} {operation.label}: {e}") from e


def test_router_api_statefully(api, live):
    from hypothesis.stateful import run_state_machine_as_test

    from router.store import write_atomically

    store = live.server.config.app.state.branchserve.router.store
    original = store.path.read_text()
    edits = []

    def restore():
        write_atomically(store.path, original)
        store.refresh()

    class Workflow(api.as_state_machine()):
        """Every run starts from the same routes, so the same choices meet the same answers (hypothesis
        requires it) and one run's routes do not turn the next run's creates into 409s."""

        def setup(self):
            restore()

        def teardown(self):
            edits.append(store.path.read_text() != original)
            restore()

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, additional_checks=additional_checks,
                                   excluded_checks=[positive_data_acceptance], transport_kwargs=kwargs or None)

    run_state_machine_as_test(Workflow, settings=settings(max_examples=15, stateful_step_count=6, **FUZZ))
    assert any(edits)  # routes were created and edited through the links, not only refused


def test_integers_past_64_bits_are_never_a_5xx(live):
    """Every integer field of every request body (found in our OpenAPI document, so a new one is covered too),
    set to values past 64 bits and at their edges, in an otherwise valid body: the fuzz that would have found
    `seed: 2**64` (an overflow, 500)."""
    import httpx

    spec = httpx.get(live.url + "/openapi.json").json()
    schemas = spec["components"]["schemas"]
    valid = {"/v1/chat/completions": {"model": "math", "messages": [{"role": "user", "content": "hi"}],
                                      "max_tokens": 2},
             "/v1/completions": {"model": "math", "prompt": "hi", "max_tokens": 2},
             "/v1/embeddings": {"model": "decoder:math", "input": "hi"},
             "/v1/router/decide": {"text": "hi"}}

    def integer(schema) -> bool:
        options = schema.get("anyOf", [schema])
        return any(o.get("type") == "integer" for o in options)

    sent, fives = 0, []
    for path, body in valid.items():
        schema = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        refs = [o["$ref"] for o in schema.get("anyOf", [schema]) if "$ref" in o]  # decide: a text or messages
        fields = sorted({name for ref in refs for name, s in schemas[ref.split("/")[-1]].get("properties", {}).items()
                         if integer(s)})
        if not fields:
            continue
        for name in fields:
            for value in (2**64, 2**64 - 1, 2**63, -2**63 - 1, -2**64, 10**30):
                r = httpx.post(live.url + path, json={**body, name: value}, timeout=60)
                sent += 1
                if r.status_code >= 500:
                    fives.append((path, name, value, r.status_code, r.text[:200]))
    print(f"{sent} requests with integers past 64 bits, {len(fives)} answered 5xx")
    assert sent >= 30 and fives == []
