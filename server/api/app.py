"""The FastAPI app: thin handlers that validate, call the engine and shape OpenAI responses."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from router.router import Router
from router.store import StoreError
from server.api import errors
from server.api.completions import install_completion_routes
from server.api.common import SHUTTING_DOWN, done_unless_gone, engine_error, sse_events
from server.api.constraints import compile_for, request_constraint
from server.api.router_routes import install_router_routes
from server.api.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    Usage,
    completion_id,
    now,
)
from server.api.tools import ToolPlan, could_be_call
from server.config import ServerConfig
from server.engine.sampling import SamplingParams
from server.engine.core import Engine
from server.engine.scheduler import EngineFull
from server.engine.stream import RequestStream
from server.engine.text import render_chat
from server.metrics import Metrics
from server.pipelines import (
    Pipeline,
    PipelineResult,
    StageFailed,
    get_question,
    run_pipeline,
    with_expert,
    with_system,
)

log = logging.getLogger("branchserve.api")

ADMIN_PROXIED = ("The router API without an admin key answers only clients on this machine, not requests a proxy "
                 "forwarded (this one carries a Forwarded or X-Forwarded-For header, or comes from another "
                 "address). Set router.admin_keys in the config or the BRANCHSERVE_ADMIN_KEY environment variable.")
ADMIN_OFF = ("The router API is off: this server has no admin key. Set router.admin_keys in the config or the "
             "BRANCHSERVE_ADMIN_KEY environment variable (or, with no keys at all, listen on 127.0.0.1).")


class HealthBody(BaseModel):
    status: str
    detail: str | None = None


class State:
    """What the handlers share: the engine and router once loaded, metrics, settings."""

    def __init__(self, config: ServerConfig, build_engine: Callable[[], Engine] | None,
                 build_router: Callable[[Engine], Router] | None = None, pipelines: dict[str, Pipeline] | None = None,
                 host: str = "127.0.0.1"):
        self.config = config
        self.pipelines = pipelines or {}
        self.build_engine, self.build_router = build_engine, build_router
        self.engine: Engine | None = None
        self.router: Router | None = None
        self.load_error: str | None = None
        self.draining = False  # set by drain() at shutdown
        self.api_keys = [k.encode() for k in config.resolved_api_keys()]
        self.admin_keys = [k.encode() for k in config.resolved_admin_keys()]
        # With no key of any kind, router edits are open only to this machine: the server listens on loopback.
        self.edits_open = not self.api_keys and not self.admin_keys and is_loopback(host)
        self.metrics = Metrics(self._load)
        self.created = now()

    def _load(self) -> tuple[int, int, list]:
        if not self.engine:
            return 0, 0, []
        return self.engine.running(), self.engine.waiting(), getattr(self.engine, "kv_usage", list)()

    def load(self) -> None:
        """Build, start and warm the engine, then the router. Raises; on failure nothing is left running."""
        engine = self.build_engine()
        try:
            engine.start()
            engine.wait_ready()  # every step compiled before /health says ok
            for pipeline in self.pipelines.values():
                pipeline.prepare(engine)  # stage constraints compiled: a bad one stops the start
            router = self.build_router(engine) if self.build_router is not None else None
        except BaseException:
            engine.stop()
            raise
        self.engine, self.router = engine, router
        log.info("ready: serving %s", ", ".join(engine.targets))

    def drain(self) -> None:
        """Shutdown, just before the grace period ends: answer every request still in flight (503, or an error
        event in a stream) instead of letting the server cut its connection."""
        self.draining = True
        if self.engine is not None:
            self.engine.drain(SHUTTING_DOWN)

    def load_in_background(self) -> None:
        try:
            self.load()
        except Exception as e:  # surfaced by /health and the log; the process keeps answering 503
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the models failed")


FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")


def local_client(request: Request) -> bool:
    """The request comes from this machine itself: a loopback peer address and no proxy's forwarding header."""
    peer = request.client.host if request.client is not None else ""
    return is_loopback(peer) and not any(h in request.headers for h in FORWARDING_HEADERS)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(config: ServerConfig, build_engine: Callable[[], Engine] | None = None,
              build_router: Callable[[Engine], Router] | None = None,
              pipelines: dict[str, Pipeline] | None = None, *, host: str = "127.0.0.1",
              loaded: State | None = None) -> FastAPI:
    """The app over ``loaded`` (a State whose models are loaded: `branchserve serve` loads them before the port
    opens), or over a State that loads them in the background from ``build_engine`` (GET /health says when)."""
    state = loaded or State(config, build_engine, build_router, pipelines, host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load_in_background, name="branchserve-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    docs_open = "docs" in config.open_endpoints
    app = FastAPI(title="branchserve", lifespan=lifespan, **({} if docs_open else
                                                             {"openapi_url": None, "docs_url": None, "redoc_url": None}))
    app.state.branchserve = state
    errors.install(app)
    app.add_middleware(errors.BodyLimit, max_bytes=config.limits.max_request_bytes)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    def bearer_matches(request: Request, keys: list[bytes]) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        ok = False
        for key in keys:  # every key is compared, in constant time
            ok |= hmac.compare_digest(token.strip().encode(), key)
        return scheme.lower() == "bearer" and ok

    def authorized(request: Request) -> None:
        if state.api_keys and not bearer_matches(request, state.api_keys):
            raise errors.unauthorized()

    def admin(request: Request) -> None:
        """The router API needs an admin key whenever one is set (a user key is not one). With no key of any
        kind it is open only to a client that is itself on this machine: the server listens on loopback, the
        client's own address is loopback, and no proxy forwarded the request (a reverse proxy on this host
        would otherwise hand anyone's edits over from 127.0.0.1). Otherwise it is off."""
        if state.admin_keys:
            if not bearer_matches(request, state.admin_keys):
                raise errors.unauthorized(admin=True)
        elif not state.edits_open:
            raise errors.APIError(403, ADMIN_OFF, type="permission_error", code="admin_key_required")
        elif not local_client(request):
            raise errors.APIError(403, ADMIN_PROXIED, type="permission_error", code="admin_key_required")

    def router() -> Router:
        engine()
        if state.router is None:
            raise errors.APIError(404, "This server has no router configured", code="router_not_configured")
        return state.router

    def engine() -> Engine:
        if state.engine is None:
            raise errors.not_ready()
        return state.engine

    @app.get("/health", responses={503: {"model": HealthBody,
                                         "description": "Loading, loading failed, or the engine is not running"}},
             response_model=HealthBody)
    async def health():
        if state.engine is None:
            body = {"status": "error" if state.load_error else "loading", "detail": state.load_error}
            return JSONResponse(body, status_code=503)
        problem = state.engine.problem()
        if problem is not None:  # the engine thread ended, is stuck in a step, or its steps keep failing
            return JSONResponse({"status": "error", "detail": problem}, status_code=503)
        return {"status": "ok"}

    if not docs_open:  # the same documents, behind the API key
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorized)])
        async def openapi_document():
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(authorized)])
        async def swagger():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="branchserve")

    @app.get("/metrics", response_class=Response, dependencies=[] if "metrics" in config.open_endpoints
             else [Depends(authorized)],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}})
    async def metrics():
        text = await asyncio.to_thread(state.metrics.render)  # under Ray it reads every node's export
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(authorized)], responses=errors.documented(401, 503))
    async def models() -> ModelList:
        cards = [ModelCard(id=name, created=state.created, kind=t.kind) for name, t in engine().targets.items()]
        cards += [ModelCard(id=name, created=state.created, kind="pipeline") for name in state.pipelines]
        if state.router is not None:
            cards.append(ModelCard(id="auto", created=state.created, kind="router"))
        cards += [ModelCard(id=name, created=state.created, kind="embedding") for name in state.embedders.names()]
        return ModelList(data=cards)

    install_router_routes(app, router, admin)
    install_completion_routes(app, state, authorized, engine)

    def openapi() -> dict:
        """FastAPI's schema, less the 422 it documents by default: validation errors here are 400s."""
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            if state.router is not None and state.router.targets and "NewRoute" in components:
                components["NewRoute"]["properties"]["target"]["enum"] = sorted(state.router.targets)
            if state.router is None and state.engine is None:
                return schema  # not loaded yet: the served names are not known, so do not cache
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)], response_model=None,
              responses={200: {"model": ChatCompletion, "description": "The completion, or with stream: true, "
                               "server-sent chat.completion.chunk events",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                         **errors.documented(400, 401, 404, 429, 503)})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        handler = ChatHandler(state, engine(), body, request)
        try:
            return await handler.respond()
        except errors.APIError as e:
            if e.status < 500:  # refused before generating; served names only, so labels stay bounded
                known = handler.model in state.engine.targets or handler.model in state.pipelines
                pipeline = state.pipelines.get(handler.model)
                stages = pipeline.stage_models if pipeline else ""
                state.metrics.refused(handler.model if known else "unknown", str(e.status), stages)
            raise

    return app


class ClientGone(Exception):
    """The client disconnected before there was anything to answer."""


class ChoiceStream:
    """One choice of a streamed chat completion: events in, OpenAI deltas out, as (delta, logprobs, finish).

    Text goes out as it comes. A forced call to a named function streams its arguments as tool-call deltas. A
    ``required`` call, and ``auto`` output that begins like a call, are held until the end and then sent as
    tool calls (or, if they were not calls after all, as text)."""

    def __init__(self, tools: ToolPlan | None, logprobs: bool):
        self.tools = tools if tools is not None and tools.mode != "none" else None
        self.logprobs = logprobs
        self.started = False  # the role went out
        self.held: list[str] | None = [] if self.tools and self.tools.mode in ("auto", "required") else None
        self.pending: list = []  # logprobs not yet sent (their text is held)
        self.call = None  # the named call streaming its arguments

    def _out(self, delta: dict, finish: str | None = None) -> tuple[dict, list | None, str | None]:
        if not self.started:
            delta = {"role": "assistant", **delta}
            self.started = True
        logprobs, self.pending = (self.pending, []) if self.logprobs else (None, [])
        return delta, logprobs, finish

    def feed(self, ev) -> list[tuple[dict, list | None, str | None]]:
        out = []
        if ev.logprobs:
            self.pending.extend(ev.logprobs)
        text = ev.text
        if self.held is not None and self.tools.mode == "auto" and text:
            self.held.append(text)
            if not could_be_call("".join(self.held), self.tools.parser):  # plain text after all
                text, self.held = "".join(self.held), None
            else:
                text = ""
        elif self.held is not None:
            self.held.append(text)
            text = ""
        if self.tools and self.tools.mode == "named":
            if text or (ev.token_ids and self.call is None):
                if self.call is None:
                    self.call = ToolPlan.make_call(self.tools.name, "")
                    out.append(self._out({"tool_calls": [{"index": 0, "id": self.call["id"], "type": "function",
                                                          "function": {"name": self.tools.name,
                                                                       "arguments": text}}]}))
                elif text:
                    out.append(self._out({"tool_calls": [{"index": 0, "function": {"arguments": text}}]}))
        elif text or (ev.token_ids and not self.started and self.held is None) or \
                (self.pending and self.held is None and self.logprobs):
            out.append(self._out({"content": text}))
        if ev.finish_reason in ("stop", "length"):
            finish = ev.finish_reason
            if self.held is not None:
                content, calls = self.tools.calls("".join(self.held))
                if calls:
                    finish = "tool_calls" if self.tools.mode == "auto" else finish
                    out.append(self._out({"tool_calls": [{"index": j, **c} for j, c in enumerate(calls)]}))
                if content:
                    out.append(self._out({"content": content}))
            out.append(self._out({}, finish))
        return out


class ChatHandler:
    """One chat completion: validate, submit n sequences, answer as JSON or as SSE."""

    def __init__(self, state: State, engine: Engine, body: ChatCompletionRequest, request: Request):
        self.state, self.engine, self.body, self.request = state, engine, body, request
        self.model = body.model  # the served name that answers: for "auto", the router's choice
        self.decision = None
        self.pipeline: Pipeline | None = None
        self.domain: str | None = None  # the routed route's domain-expert prompt, if it has one
        self.tools: ToolPlan | None = None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.id = completion_id()
        self.created = now()

    def _messages(self) -> list[dict]:
        return [m.template_dict() for m in self.body.messages]

    def _model_messages(self) -> list[dict]:
        return with_expert(self._messages(), self.domain)

    async def _route(self) -> None:
        """model "auto": the router picks the target; the decision is logged, counted and returned in headers."""
        router = self.state.router
        if self.body.model != "auto" or router is None:
            return
        work = asyncio.ensure_future(router.adecide_messages(self._messages()))
        if not await self._done_unless_gone(work):  # the client went away: its embed job is cancelled
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise ClientGone
        try:
            self.decision = work.result()
        except StoreError as e:
            raise errors.bad_request(str(e), param="messages") from None
        d = self.decision
        self.model = d.target
        self.domain = self.state.config.route_domains.get(d.route)
        self.state.metrics.routed(d.route, "fallback" if d.fallback else "match")
        score = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        log.info("request %s: route %s -> %s (score %s; runner-up %s %s)%s", self.request_id, d.route, d.target,
                 score(d.score), d.runner_up, score(d.runner_up_score), " [default route]" if d.fallback else "")

    async def _prompt(self) -> list[int]:
        """Input processing: the chat template and tokenization, in a worker thread, off the event loop."""
        target = self.engine.targets.get(self.model)
        if target is None:
            raise errors.model_not_found(self.body.model)
        try:
            self.tools = ToolPlan.of(self.body.tools, self.body.tool_choice, target.tokenizer)
        except ValueError as e:
            raise errors.bad_request(str(e), param="tool_choice") from None
        messages = self._model_messages()
        hint = self.tools.hint()
        if hint:
            messages = with_system(messages, hint)
        try:
            return await asyncio.to_thread(render_chat, target.tokenizer, messages, self.tools.template_tools())
        except Exception as e:  # the template itself rejects these messages (roles, order)
            raise errors.bad_request(f"messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                     param="messages") from None

    def _constraint(self):
        return request_constraint(self.body, self.tools)

    async def _grammar(self, model: str, constraint, param: str | None):
        return await compile_for(self.engine, model, constraint, param)

    def _params(self, prompt_len: int, grammar=None) -> list[SamplingParams]:
        body = self.body
        context = self.engine.targets[self.model].runner.max_seq
        max_new = body.max_new_tokens()
        if max_new is None:  # limits.default_max_tokens, or what the context has left when that is less
            max_new = min(self.state.config.limits.default_max_tokens, context - prompt_len)
        if prompt_len + max_new > context or max_new < 1:
            raise errors.bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + max(max_new, 1)} tokens ({prompt_len} in the messages, {max(max_new, 1)} in the "
                f"completion). Please reduce the length of the messages or completion.",
                param="messages", code="context_length_exceeded")
        defaults = self.engine.targets[self.model].defaults or {}
        base = dict(max_tokens=max_new, stop=body.stop_list(),
                    temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
                    top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
                    logprobs=(body.top_logprobs or 0) if body.logprobs else None, grammar=grammar,
                    ignore_eos=body.ignore_eos)
        return [SamplingParams(seed=None if body.seed is None else body.seed + i, **base) for i in range(body.n)]

    async def _submit(self) -> list[RequestStream]:
        if self.body.unknown_fields():
            log.info("request %s: ignoring unknown fields %s", self.request_id, ", ".join(self.body.unknown_fields()))
        prompt = await self._prompt()
        constraint, param = self._constraint()
        params = self._params(len(prompt), await self._grammar(self.model, constraint, param))
        streams = []
        try:
            for i, p in enumerate(params):
                streams.append(self.engine.submit(self.model, prompt, p, f"{self.request_id}-{i}"))
        except EngineFull as e:
            for s in streams:
                s.cancel()
            raise errors.queue_full(str(e)) from None
        except ValueError as e:
            for s in streams:
                s.cancel()
            raise errors.bad_request(str(e)) from None
        self.prompt_tokens = len(prompt)
        return streams

    def _headers(self) -> dict:
        headers = {"x-request-id": self.request_id, "x-branchserve-branch": self.model}
        if self.pipeline is not None:
            headers["x-branchserve-pipeline"] = self.pipeline.name
            headers["x-branchserve-branch"] = self.pipeline.final_model
        if self.decision is not None:
            headers["x-branchserve-route"] = self.decision.route
            if self.decision.score is not None:
                headers["x-branchserve-route-score"] = f"{self.decision.score:.4f}"
        return headers

    def _record(self, status: str, completion_tokens: int, stages: str = "") -> None:
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        self.state.metrics.observe(self.model, status, self.prompt_tokens, completion_tokens, ttft,
                                   time.perf_counter() - self.started, stages)

    async def respond(self):
        if self.state.draining:
            raise errors.shutting_down(SHUTTING_DOWN)
        unserved = self.body.unserved_field()
        if unserved is not None:
            raise errors.bad_request(f"'{unserved}' is not supported by this server yet; send the request without "
                                     f"it", param=unserved, code="unsupported_parameter")
        wrong = self.body.inconsistency()
        if wrong is not None:
            raise errors.bad_request(wrong[0], param=wrong[1])
        try:
            await self._route()
        except ClientGone:
            return Response(status_code=499)
        self.pipeline = self.state.pipelines.get(self.model)
        if self.pipeline is not None:
            return await self._respond_pipeline()
        streams = await self._submit()
        if self.body.stream:
            return StreamingResponse(self._sse(streams), media_type="text/event-stream", headers=self._headers())
        return await self._complete(streams)

    async def _done_unless_gone(self, work: asyncio.Future) -> bool:
        return await done_unless_gone(self.request, work)

    async def _complete(self, streams: list[RequestStream]):
        logprobs: dict[int, list] = {}

        async def collect(index: int, stream: RequestStream) -> tuple[str, str | None, str | None]:
            text, error = [], None
            async for ev in stream:
                if ev.token_ids and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                text.append(ev.text)
                if ev.logprobs is not None:
                    logprobs.setdefault(index, []).extend(ev.logprobs)
                error = ev.error or error
            return "".join(text), stream.finish_reason, error

        work = asyncio.ensure_future(asyncio.gather(*(collect(i, s) for i, s in enumerate(streams))))
        if not await self._done_unless_gone(work):  # the client went away: free the slots
            for s in streams:
                s.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self._record("cancelled", sum(s.completion_tokens for s in streams))
            return Response(status_code=499)
        results = work.result()
        completion_tokens = sum(s.completion_tokens for s in streams)
        failed = next((err for _, reason, err in results if reason == "error"), None)
        if failed:
            self._record("error", completion_tokens)
            raise engine_error(failed)
        self._record("ok", completion_tokens)
        choices = []
        for i, (text, reason, _) in enumerate(results):
            content, calls = self.tools.calls(text) if self.tools else (text, [])
            if calls and self.tools.mode == "auto":
                reason = "tool_calls"
            choices.append(Choice(index=i, message=ResponseMessage(content=content, tool_calls=calls or None),
                                  finish_reason=reason,
                                  logprobs=ChoiceLogprobs(content=logprobs.get(i, [])) if self.body.logprobs else None))
        response = ChatCompletion(
            id=self.id, created=self.created, model=self.model, choices=choices,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion_tokens,
                        total_tokens=self.prompt_tokens + completion_tokens),
        )
        return JSONResponse(response.model_dump(), headers=self._headers())

    def _chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices,
                                    usage=usage)
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        data = chunk.model_dump(exclude_none=False)
        if not include_usage:
            data.pop("usage")
        for c in data["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        return f"data: {json.dumps(data)}\n\n"

    async def _sse(self, streams: list[RequestStream]):
        shapers = [ChoiceStream(self.tools, self.body.logprobs) for _ in streams]

        def shape(index: int, ev):
            for delta, logprobs, finish in shapers[index].feed(ev):
                yield self._chunk([ChunkChoice(index=index, delta=Delta(**delta), finish_reason=finish,
                                               logprobs=None if logprobs is None
                                               else ChoiceLogprobs(content=logprobs))])

        def usage_chunk() -> str | None:
            if not (self.body.stream_options and self.body.stream_options.include_usage):
                return None
            completion = sum(s.completion_tokens for s in streams)
            return self._chunk([], Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                                         total_tokens=self.prompt_tokens + completion))

        async for chunk in sse_events(streams, shape, usage_chunk, lambda at: setattr(self, "first_token_at", at),
                                      lambda status: self._record(status, sum(s.completion_tokens
                                                                              for s in streams))):
            yield chunk

    # -- pipelines: stage 1 reasons, the final stage answers
    def _pipeline_usage(self, result: PipelineResult) -> dict:
        prompt = sum(st.prompt_tokens for st in result.stages)
        completion = sum(st.completion_tokens for st in result.stages)
        stages = [{"model": st.model, "prompt_tokens": st.prompt_tokens, "completion_tokens": st.completion_tokens,
                   "finish_reason": st.finish_reason} for st in result.stages]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "stages": stages}

    async def _start_pipeline(self, on_event=None) -> asyncio.Task:
        if self.body.n != 1:
            raise errors.bad_request("n must be 1 for a pipeline", param="n")
        for name in ("tools", "logprobs"):
            if getattr(self.body, name):
                raise errors.bad_request(f"{name} are not served for a pipeline; ask one of its models directly",
                                         param=name)
        constraint, param = self._constraint()
        grammar = await self._grammar(self.pipeline.final_model, constraint, param)
        try:  # admitted here, whole, one place for all stages: a 429 now, never an error event mid-stream
            reservation = self.engine.reserve(self.pipeline.stages[0].config.model)
        except EngineFull as e:
            raise errors.queue_full(str(e)) from None
        try:
            messages = self._messages()
            coro = run_pipeline(self.engine, self.pipeline, messages, get_question(messages),
                                self.body.max_new_tokens(), self.body.seed, on_event, grammar, reservation)
            task = asyncio.ensure_future(coro)
        except BaseException:
            reservation.release()
            raise
        task.add_done_callback(lambda _: reservation.release())  # however it ends, cancelled before it ran too
        return task

    def _record_pipeline(self, status: str, result: PipelineResult | None) -> None:
        """Once per pipeline request, under the pipeline's name, with its stages' models as a label."""
        self.model = self.pipeline.name
        self.prompt_tokens = sum(st.prompt_tokens for st in result.stages) if result else 0
        self._record(status, sum(st.completion_tokens for st in result.stages) if result else 0,
                     self.pipeline.stage_models)

    async def _pipeline_result(self, task: asyncio.Task) -> PipelineResult:
        try:
            return await task
        except EngineFull as e:
            raise errors.queue_full(str(e)) from None
        except ValueError as e:
            raise errors.bad_request(str(e), code="context_length_exceeded") from None
        except StageFailed as e:
            raise engine_error(str(e)) from None

    async def _respond_pipeline(self):
        if self.body.stream:
            queue: asyncio.Queue = asyncio.Queue()
            task = await self._start_pipeline(lambda i, ev: queue.put_nowait((i, ev)))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            return StreamingResponse(self._pipeline_sse(task, queue), media_type="text/event-stream",
                                     headers=self._headers())

        def on_event(i, ev):
            if ev.token_ids and i == len(self.pipeline.stages) - 1 and self.first_token_at is None:
                self.first_token_at = time.perf_counter()

        task = await self._start_pipeline(on_event)
        if not await self._done_unless_gone(task):  # the client went away: cancel whichever stage runs
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            self._record_pipeline("cancelled", None)
            return Response(status_code=499)
        try:
            result = await self._pipeline_result(task)
        except errors.APIError:
            self._record_pipeline("error", None)
            raise
        self._record_pipeline("ok", result)
        message = {"role": "assistant", "content": result.content}
        if result.reasoning is not None:
            message["reasoning_content"] = result.reasoning
        body = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.pipeline.final_model,
                "choices": [{"index": 0, "message": message, "finish_reason": result.stages[-1].finish_reason,
                             "logprobs": None}],
                "usage": self._pipeline_usage(result)}
        return JSONResponse(body, headers=self._headers())

    async def _pipeline_sse(self, task: asyncio.Task, queue: asyncio.Queue):
        last = len(self.pipeline.stages) - 1
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        role_sent = False
        status, result = "cancelled", None

        def chunk(delta: dict, finish_reason=None, choices=True, usage=None) -> str:
            data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.pipeline.final_model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
                    if choices else []}
            if include_usage:
                data["usage"] = usage
            return f"data: {json.dumps(data)}\n\n"

        try:
            while True:
                item = await queue.get()
                if item is None:
                    break
                i, ev = item
                if i < last and not self.body.include_reasoning:
                    continue
                key = "content" if i == last else "reasoning_content"
                if ev.token_ids and not role_sent:
                    role_sent = True
                    if self.first_token_at is None and i == last:
                        self.first_token_at = time.perf_counter()
                    yield chunk({"role": "assistant", key: ev.text})
                elif ev.text:
                    yield chunk({key: ev.text})
                if i == last and ev.finish_reason in ("stop", "length"):
                    yield chunk({}, ev.finish_reason)
            try:
                result = await self._pipeline_result(task)
            except errors.APIError as e:
                status = "error"
                yield f"data: {json.dumps(e.body())}\n\n"
            else:
                status = "ok"
                if include_usage:
                    yield chunk({}, choices=False, usage=self._pipeline_usage(result))
            yield "data: [DONE]\n\n"
        finally:  # also when the client disconnects: cancel whichever stage runs
            task.cancel()
            self._record_pipeline(status, result)
