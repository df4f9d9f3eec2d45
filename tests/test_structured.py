"""Structured output, tools and logprobs through the official openai client against a real server.

The test models are tiny and random, so what they write is noise: a constraint is what makes it parse."""

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from compression.compress import CompressOptions, compress
from compression.synthetic import TOOLS_CHAT_TEMPLATE, build_standalone
from server.api.tools import HERMES, LLAMA3_JSON, parse_calls
from server.config import ServerConfig
from tests.conftest import start_server

MESSAGES = [{"role": "user", "content": "Describe a thing."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6}},
                  "required": ["name"], "additionalProperties": False},
    },
    "required": ["color", "ok", "count", "tags", "owner"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["utc", "cet"]}},
                                       "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def models(family, tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    compress(family, root / "art", CompressOptions(rate=0.9, progress=False))
    return {"artifact": root / "art", "phi3": build_standalone(root / "phi3", seed=4),
            "hermes": build_standalone(root / "hermes", seed=5, chat_template=TOOLS_CHAT_TEMPLATE)}


@pytest.fixture(scope="module")
def server(models):
    s = start_server(ServerConfig.model_validate({
        "families": [{"artifact": str(models["artifact"])}],
        "standalone": [{"name": "phi3", "path": str(models["phi3"])},
                       {"name": "hermes", "path": str(models["hermes"])}],
        "pipelines": [{"name": "pick", "stages": [
            {"model": "phi3", "template": "stage1/reason", "max_tokens": 8},
            {"model": "math", "template": "stage2/letter", "max_tokens": 4}]}],
        "limits": {"max_batch": 8, "max_context": 1024},
    }))
    s.models = {"math": models["phi3"]}  # any of them: they share the test tokenizer
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def schema_format(schema=SCHEMA):
    return {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}


def test_json_schema_in_a_mixed_batch_always_validates(client):
    """Rows of three branches and a standalone model in one batch, some constrained, sampled at 0.8."""
    import concurrent.futures

    def ask(i):
        model = ["math", "code", "chat", "phi3"][i % 4]
        fmt = schema_format() if i % 2 == 0 else None
        kw = {"response_format": fmt} if fmt else {}
        r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=120, temperature=0.8,
                                           seed=i, **kw)
        return fmt, r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, range(16)))
    for fmt, choice in results:
        if fmt:
            assert choice.finish_reason == "stop", choice.message.content
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_regex_choice_and_stream(client, server):
    # json_object: any object; a random model may write one longer than max_tokens, and then it is cut
    stopped = 0
    for seed in range(6):
        r = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=80, temperature=0.8,
                                           seed=seed, response_format={"type": "json_object"})
        text = r.choices[0].message.content
        assert text.startswith("{"), text
        if r.choices[0].finish_reason == "stop":
            stopped += 1
            assert isinstance(json.loads(text), dict)
    assert stopped >= 1
    r = client.chat.completions.create(model="code", messages=MESSAGES, max_tokens=20, temperature=0.8, seed=3,
                                       extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.choices[0].message.content)
    r = client.chat.completions.create(model="phi3", messages=MESSAGES, max_tokens=20, temperature=1.0, seed=1,
                                       extra_body={"guided_choice": ["yes", "no", "maybe"]})
    assert r.choices[0].message.content in ("yes", "no", "maybe")
    stream = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=120, temperature=0.8, seed=2,
                                            response_format=schema_format(), stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_bad_constraints_are_400_naming_the_problem(client):
    cases = [({"response_format": schema_format({"type": "objectx"})}, "response_format", "objectx"),
             ({"extra_body": {"guided_regex": "(abc"}}, "guided_regex", "parenthesis"),
             ({"extra_body": {"guided_choice": []}}, "guided_choice", ""),
             ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "guided_regex",
              "one constraint")]
    for kw, param, words in cases:
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=4, **kw)
        assert exc.value.body["param"].startswith(param) and words in exc.value.body["message"], exc.value.body


def test_logprobs_are_the_sampled_distribution(client):
    r = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=5)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    # the tokens' bytes are the text (less a last character left incomplete when max_tokens cut it)
    decoded = b"".join(bytes(t.bytes) for t in content).decode(errors="replace")
    assert decoded.removesuffix("\ufffd") == r.choices[0].message.content.removesuffix("\ufffd")
    for t in content:
        assert len(t.top_logprobs) == 5
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)
        assert sum(2.718281828 ** x.logprob for x in t.top_logprobs) <= 1 + 1e-5
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
    # Streaming carries the same logprobs, token by token.
    stream = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=8, temperature=0,
                                            logprobs=True, top_logprobs=5, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [(t.token, round(t.logprob, 4)) for t in content]
    # Under a constraint, the logprobs are after the mask: only allowed tokens have mass.
    r = client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"guided_choice": ["x", "y"]})
    first = r.choices[0].logprobs.content[0]
    assert {t.token for t in first.top_logprobs[:2]} == {"x", "y"}
    assert sum(2.718281828 ** t.logprob for t in first.top_logprobs[:2]) == pytest.approx(1, abs=1e-4)
    assert first.top_logprobs[2].logprob == -9999.0


def test_named_tool_call_arguments_always_validate(client):
    for seed in range(4):
        r = client.chat.completions.create(model="math", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=60,
                                           temperature=0.8, seed=seed,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
        call = r.choices[0].message.tool_calls[0]
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
        assert r.choices[0].message.content is None
    # required: one of the tools, whichever the model picks, with its own arguments
    r = client.chat.completions.create(model="phi3", messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                                       temperature=0.8, seed=9, tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_streamed_tool_call_deltas_assemble_into_the_call(client):
    stream = client.chat.completions.create(
        model="code", messages=MESSAGES, tools=[WEATHER], max_tokens=60, temperature=0.8, seed=1, stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    chunks = [c for c in stream if c.choices]
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id and deltas[0].function.name == "get_weather" and len(deltas) > 2  # arguments stream
    assert all(d.index == 0 and d.id is None for d in deltas[1:])
    jsonschema.validate(json.loads("".join(d.function.arguments or "" for d in deltas)),
                        WEATHER["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_auto_renders_tools_in_the_template_and_needs_a_template_that_can(client, server):
    plain = client.chat.completions.create(model="hermes", messages=MESSAGES, max_tokens=2, temperature=0)
    tooled = client.chat.completions.create(model="hermes", messages=MESSAGES, max_tokens=2, temperature=0,
                                            tools=[WEATHER])
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens + len(json.dumps(WEATHER["function"]))
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="phi3", messages=MESSAGES, max_tokens=2, tools=[WEATHER])
    assert exc.value.body["param"] == "tool_choice" and "does not render tools" in exc.value.body["message"]
    # A conversation that carries an earlier call and its result renders through the template.
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 C"}]
    r = client.chat.completions.create(model="hermes", messages=history, max_tokens=2, tools=[WEATHER])
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "hermes", "max_tokens": 2, "messages": [
        {"role": "tool", "content": "x"}]})
    assert r.status_code == 400 and "tool_call_id" in r.json()["error"]["message"]


def test_tool_call_parsers():
    names = {"get_weather", "get_time"}
    content, calls = parse_calls('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
                                 '\n</tool_call>\n<tool_call>{"name": "get_time", "arguments": {"zone": "utc"}}'
                                 '</tool_call>', HERMES, names)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Oslo"}), ("get_time", {"zone": "utc"})]
    content, calls = parse_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "cet"}}', LLAMA3_JSON,
                                 names)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"zone": "cet"}
    for text, parser in (('{"name": "unknown", "arguments": {}}', LLAMA3_JSON), ("plain answer", HERMES),
                         ('{"answer": 4}', LLAMA3_JSON)):
        assert parse_calls(text, parser, names) == (text, [])


def test_a_pipeline_stage_constraint_and_the_requests_own(client, server):
    """stage2/letter declares a choice constraint: the pipeline's answer is always one letter; a request's own
    response_format replaces it on the last stage."""
    for seed in range(3):
        r = client.chat.completions.create(model="pick", messages=MESSAGES, seed=seed, temperature=0)
        assert r.choices[0].message.content in list("ABCDE")
    r = client.chat.completions.create(model="pick", messages=MESSAGES, max_tokens=120,
                                       response_format=schema_format())
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="pick", messages=MESSAGES, tools=[WEATHER], tool_choice="required")
    assert exc.value.body["param"] == "tools"


def test_a_bad_stage_constraint_stops_the_start(models):
    from server.pipelines import load_pipelines
    from compression.errors import UserError

    config = ServerConfig.model_validate({
        "families": [{"artifact": str(models["artifact"])}],
        "pipelines": [{"name": "p", "stages": [{"model": "math", "template": "stage1/reason", "regex": "(x"}]}]})
    pipelines = load_pipelines(config.pipelines, {"math", "code", "chat"})
    from server.serve import build_engine

    engine = build_engine(config)
    with pytest.raises(UserError, match="pipeline 'p' stage 1: the regex cannot be compiled"):
        pipelines["p"].prepare(engine)


def test_text_completions(client, server):
    r = client.completions.create(model="math", prompt="The sky is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # a prompt as token ids reads the same as its text (the test tokenizer: one token per byte, no BOS added)
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(server.models["math"])("The sky is")["input_ids"]
    again = client.completions.create(model="math", prompt=ids, max_tokens=5, temperature=0)
    assert again.choices[0].text == r.choices[0].text and again.usage.prompt_tokens == r.usage.prompt_tokens
    many = client.completions.create(model="phi3", prompt=["a", "b c"], n=2, max_tokens=3, temperature=0.8, seed=1,
                                     echo=True, stop=["\n"])
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert many.choices[0].text.startswith("a") and many.choices[2].text.startswith("b c")
    r = client.completions.create(model="code", prompt="x", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(max(top.values()) == pytest.approx(chosen) for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))
    r = client.completions.create(model="code", prompt="x", max_tokens=10, extra_body={"guided_choice": ["up", "down"]})
    assert r.choices[0].text in ("up", "down")
    stream = client.completions.create(model="math", prompt="The sky is", max_tokens=5, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == client.completions.create(
        model="math", prompt="The sky is", max_tokens=5, temperature=0).choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    for kw, param in (({"suffix": "end"}, "suffix"), ({"prompt": [[999999]]}, "prompt"),
                      ({"model": "pick"}, "model"), ({"echo": True, "logprobs": 1}, "echo")):
        args = {"model": "math", "prompt": "x", "max_tokens": 2, **kw}
        with pytest.raises(openai.BadRequestError) as exc:
            client.completions.create(**args)
        assert exc.value.body["param"] == param, exc.value.body


def test_embeddings(client, server):
    import math

    r = client.embeddings.create(model="decoder:math", input=["hello there", "solve 2+2"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens == len("hello there") + len("solve 2+2")
    a, b = (d.embedding for d in r.data)
    assert math.isclose(sum(x * x for x in a), 1, rel_tol=1e-4) and a != b
    one = client.embeddings.create(model="decoder:math", input="hello there")
    assert one.data[0].embedding == pytest.approx(a, abs=1e-5)  # batched or alone, the same vector
    m = client.embeddings.create(model="minilm", input="hello there")  # base64 under the hood in the client
    assert len(m.data[0].embedding) == 384
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="decoder:math", input="x" * 600)
    assert "reads at most 512" in exc.value.body["message"]


class Verdict(pydantic.BaseModel):
    verdict: Literal["yes", "no", "unsure"]
    score: int = pydantic.Field(ge=0, le=9)
    confident: bool


def test_langchain_with_structured_output_parses(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="math", base_url=server.url + "/v1", api_key="unused", temperature=0.8, max_tokens=80,
                     max_retries=0)
    for seed in range(3):
        out = llm.bind(seed=seed).with_structured_output(Verdict).invoke("Is the sky blue?")
        assert isinstance(out, Verdict)
    # LangChain's tool-calling path: bind_tools + a forced function, parsed into tool_calls
    weather = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert weather.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(weather.tool_calls[0]["args"], WEATHER["function"]["parameters"])


def test_litellm_openai_provider_parses(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch of its price list: offline here
    import litellm

    r = litellm.completion(model="openai/code", api_base=server.url + "/v1", api_key="unused", messages=MESSAGES,
                           response_format=Verdict, temperature=0.8, max_tokens=80, seed=2)
    assert isinstance(Verdict.model_validate_json(r.choices[0].message.content), Verdict)
    r = litellm.completion(model="openai/code", api_base=server.url + "/v1", api_key="unused", messages=MESSAGES,
                           tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                           max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_the_mask_holds_on_logits_in_any_layout(models):
    """The CPU GEMM hands back a decode step's logits transposed for a few rows; each row is still masked."""
    import torch
    from transformers import AutoTokenizer

    from server.engine.structured import Constraint, Grammars, apply_masks, fill_masks

    tok = AutoTokenizer.from_pretrained(models["phi3"])
    grammars = Grammars(tok, len(tok), [tok.eos_token_id])
    compiled = grammars.compile(Constraint.choice(["yes", "no"]))
    matchers = [grammars.matcher(compiled), None, grammars.matcher(compiled)]
    logits = torch.randn(len(tok), 3).t()  # (3, V), column-major
    masked = apply_masks(logits, fill_masks(matchers, len(tok)))  # every constrained row filled in one call
    allowed = {tok.convert_tokens_to_ids(c) for c in ("y", "n")}
    for row in (0, 2):
        assert {i for i in range(len(tok)) if masked[row, i] > float("-inf")} == allowed
    assert bool((masked[1] > float("-inf")).all())


def test_client_controlled_sizes_are_bounded(client, server):
    """A constraint, a prompt list and an embedding batch each have a limit, answered with a 400 naming it."""
    huge = {"type": "object", "properties": {f"field_{i:05d}": {"type": "string"} for i in range(3000)}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="math", messages=MESSAGES, max_tokens=2, response_format=schema_format(huge))
    assert exc.value.body["param"] == "response_format" and "the limit is 64000" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model="math", prompt=["x"] * 33, n=2, max_tokens=1)
    assert exc.value.body["param"] == "prompt" and "at most 64" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.embeddings.create(model="decoder:math", input=["x"] * 257)
    assert exc.value.body["param"] == "input" and "at most 256" in exc.value.body["message"]
    with pytest.raises(openai.NotFoundError):  # a path on the server's disk is not an embedder name
        client.embeddings.create(model=f"decoder:{server.models['math']}", input="x")


def test_the_compile_pool_merges_bounds_and_times_out():
    """Constraints compile in threads of their own: identical ones asked at once compile once, more than the
    queue holds is CompilerBusy (429), and one that takes too long is a ConstraintError (400) now and at once
    when asked again."""
    import asyncio
    import threading
    import time

    from server.engine.structured import CompilePool, CompilerBusy, Constraint, ConstraintError

    pool = CompilePool(workers=2, queue=2, timeout_s=0.5)
    calls, release = [], threading.Event()

    def slow(value):
        def work():
            calls.append(value)
            release.wait(5)
            return value
        return work

    async def scenario():
        a, b, c = Constraint.regex("a+"), Constraint.regex("b+"), Constraint.regex("c+")
        first = asyncio.ensure_future(pool.run("m", a, slow("a")))
        same = asyncio.ensure_future(pool.run("m", a, slow("a again")))
        other = asyncio.ensure_future(pool.run("m", b, slow("b")))
        await asyncio.sleep(0.1)
        with pytest.raises(CompilerBusy):
            pool.submit("m", c, slow("c"))  # a and b fill the queue of 2
        release.set()
        assert await first == "a" and await same == "a" and await other == "b"
        assert sorted(calls) == ["a", "b"]  # the identical one waited on the first compilation
        release.clear()

        def busy():  # compiling is CPU time: 0.5 s of it is too long here
            start = time.thread_time()
            while time.thread_time() - start < 5 and not release.is_set():
                pass
            return "c"

        t0 = time.monotonic()
        with pytest.raises(ConstraintError, match="took longer than 0.5 s"):
            await pool.run("m", c, busy)
        assert time.monotonic() - t0 < 2.5
        with pytest.raises(ConstraintError, match="took longer"):  # refused at once from now on
            pool.submit("m", c, slow("c again"))
        release.set()

    asyncio.run(scenario())


def test_a_compile_slowed_by_load_is_not_too_slow():
    """The limit counts the compile thread's CPU time: a compilation that takes long in wall time without using
    the CPU (a busy machine, its low priority) is answered, not refused as too slow."""
    import asyncio
    import time

    from server.engine.structured import CompilePool, Constraint

    pool = CompilePool(workers=1, queue=4, timeout_s=0.2)
    assert asyncio.run(pool.run("m", Constraint.regex("a+"), lambda: time.sleep(0.6) or "a")) == "a"


def test_a_constraint_waiting_for_a_compile_thread_is_busy_not_slow():
    """The time limit is for compiling: one still waiting for a thread when it runs out is a 429 (try again),
    and is not marked too slow."""
    import asyncio
    import threading

    from server.engine.structured import CompilePool, CompilerBusy, Constraint

    pool = CompilePool(workers=1, queue=4, timeout_s=0.3)
    release = threading.Event()

    async def scenario():
        a, b = Constraint.regex("a+"), Constraint.regex("b+")
        first = asyncio.wrap_future(pool.submit("m", a, lambda: release.wait(5) and "a"))  # holds the thread
        await asyncio.sleep(0.05)
        with pytest.raises(CompilerBusy, match="waited"):
            await pool.run("m", b, lambda: "b")  # the only thread is busy with a
        release.set()
        assert await first == "a"
        assert await pool.run("m", b, lambda: "b") == "b"  # not refused as too slow

    asyncio.run(scenario())


def test_a_compile_that_started_late_gets_its_full_time():
    """One that waited its turn, then compiles within the limit counted from its start, is answered (waiting twice
    on the same compilation used to end in a CancelledError, a 500)."""
    import asyncio
    import threading
    import time

    from server.engine.structured import CompilePool, Constraint

    pool = CompilePool(workers=1, queue=4, timeout_s=0.4)
    release = threading.Event()

    async def scenario():
        blocker = asyncio.wrap_future(pool.submit("m", Constraint.regex("a+"), lambda: release.wait(5)))
        late = asyncio.ensure_future(pool.run("m", Constraint.regex("b+"), lambda: time.sleep(0.3) or "b"))
        await asyncio.sleep(0.2)
        release.set()  # b starts at about 0.2 s and takes 0.3 s: past 0.4 s from its request, within 0.4 s of its start
        assert await late == "b"
        await blocker

    asyncio.run(scenario())


def test_a_slow_mask_fill_holds_back_only_its_own_rows(models, monkeypatch):
    """A step whose grammar masks are not filled when its forward ends samples the unconstrained rows at once
    and parks the constrained ones until their masks are: with fills of 0.3 s a token, the plain row's 12 tokens
    do not wait for them, and both rows' greedy tokens are those they give alone."""
    import asyncio
    import time

    import server.engine.runner as runner_module
    from server.engine.core import Engine
    from server.engine.sampling import SamplingParams
    from server.engine.structured import Constraint

    engine = Engine()
    engine.add_family(models["artifact"], max_batch=4, max_seq=256)
    engine.start()
    engine.wait_ready()
    try:
        tok = engine.tokenizer("math")
        prompt = tok("Name a colour.")["input_ids"]
        grammar = engine.compile_now("math", Constraint.regex("(red|green|blue|yellow){1,3}"))

        async def run(model, params):
            stream = engine.submit(model, prompt, params)
            tokens, finished = [], None
            async for ev in stream:
                tokens += ev.token_ids
                if ev.finish_reason:
                    finished = time.monotonic()
            return tokens, finished

        def both():
            async def go():
                return await asyncio.gather(run("code", SamplingParams(temperature=0, max_tokens=12,
                                                                       ignore_eos=True)),
                                            run("math", SamplingParams(temperature=0, max_tokens=12, grammar=grammar)))
            t0 = time.monotonic()
            (plain, plain_end), (held, held_end) = asyncio.run(go())
            return plain, plain_end - t0, held, held_end - t0

        alone_plain, _, alone_held, _ = both()
        fill = runner_module.fill_masks
        monkeypatch.setattr(runner_module, "fill_masks", lambda *a: time.sleep(0.3) or fill(*a))
        plain, plain_s, held, held_s = both()
        assert plain == alone_plain and held == alone_held
        assert len(held) >= 2 and held_s >= 0.3 * len(held)  # the constrained row went at the fills' pace...
        assert plain_s < held_s and plain_s < 0.3 * len(plain)  # ...the plain one did not wait for them
        assert engine.runners[0].parked == []
    finally:
        engine.stop()
