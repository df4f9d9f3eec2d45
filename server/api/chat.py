"""POST /v1/chat/completions: request -> route (model "auto") -> input processor -> engine -> output processor
-> response. A pipeline's name goes to server/api/pipeline.py."""

from __future__ import annotations

import logging
import uuid

from fastapi import Depends, FastAPI, Request

from router.store import StoreError
from server.api import errors
from server.api.common import SHUTTING_DOWN, Handler, Timing, unless_gone, within
from server.api.output_processor import ChatOutput
from server.api.pipeline import respond_pipeline
from server.api.protocol import ChatCompletion, ChatCompletionRequest, completion_id, now
from server.engine.core import Engine
from server.pipelines import with_expert

log = logging.getLogger("branchserve.api")


class ChatHandler(Handler):
    """One chat completion: validate, route, prepare, submit n sequences, answer as JSON or as SSE."""

    def __init__(self, state, engine: Engine, body: ChatCompletionRequest, request: Request):
        self.state, self.engine, self.body, self.request = state, engine, body, request
        self.model = body.model  # the served name that answers: for "auto", the router's choice
        self.decision = None
        self.pipeline = None
        self.domain: str | None = None  # the routed route's domain-expert prompt, if it has one
        self.timing = Timing()
        self.prompt_tokens = 0
        self._messages: list[dict] | None = None
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.id = completion_id()
        self.created = now()

    def messages(self) -> list[dict]:
        """The request's messages as chat templates take them (built once: routing and rendering both read
        them)."""
        if self._messages is None:
            self._messages = [m.template_dict() for m in self.body.messages]
        return self._messages

    def _check(self) -> None:
        if self.state.stopping:
            raise errors.shutting_down(SHUTTING_DOWN)
        unserved = self.body.unserved_field()
        if unserved is not None:
            raise errors.bad_request(f"'{unserved}' is not supported by this server yet; send the request without "
                                     f"it", param=unserved, code="unsupported_parameter")
        wrong = self.body.inconsistency()
        if wrong is not None:
            raise errors.bad_request(wrong[0], param=wrong[1])
        if self.body.unknown_fields():
            log.info("request %s: ignoring unknown fields %s", self.request_id, ", ".join(self.body.unknown_fields()))

    async def _route(self) -> None:
        """model "auto": the router picks the target; the decision is logged, counted and returned in headers."""
        router = self.state.router
        if self.body.model != "auto" or router is None:
            return
        try:  # the client going away cancels its embed job
            self.decision = d = await unless_gone(self.request, within(router.adecide_messages(self.messages()),
                                                                       self.state.config.limits.request_timeout_s))
        except StoreError as e:
            raise errors.bad_request(str(e), param="messages") from None
        self.model = d.target
        self.domain = self.state.config.route_domains.get(d.route)
        self.state.metrics.routed(d.route, "fallback" if d.fallback else "match")
        score = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        log.info("request %s: route %s -> %s (score %s; runner-up %s %s)%s", self.request_id, d.route, d.target,
                 score(d.score), d.runner_up, score(d.runner_up_score), " [default route]" if d.fallback else "")

    def headers(self) -> dict:
        headers = {"x-request-id": self.request_id, "x-branchserve-branch": self.model}
        if self.pipeline is not None:
            headers["x-branchserve-pipeline"] = self.pipeline.name
            headers["x-branchserve-branch"] = self.pipeline.final_model
        if self.decision is not None:
            headers["x-branchserve-route"] = self.decision.route
            if self.decision.score is not None:
                headers["x-branchserve-route-score"] = f"{self.decision.score:.4f}"
        return headers

    def record(self, status: str, completion_tokens: int, stages: str = "") -> None:
        self.state.metrics.observe(self.model, status, self.prompt_tokens, completion_tokens, self.timing.ttft(),
                                   self.timing.elapsed(), stages)

    async def _serve(self):
        self.pipeline = self.state.pipelines.get(self.model)
        if self.pipeline is not None:
            return await respond_pipeline(self)
        prepared = await self.state.inputs.chat(self.body, self.model, with_expert(self.messages(), self.domain),
                                                self.request_id)
        streams = self.state.inputs.submit(prepared)
        self.prompt_tokens = prepared.prompt_tokens
        output = ChatOutput(self.id, self.created, self.model, self.body, prepared.tools, prepared.prompt_tokens)
        return await self.answer(streams, lambda status: self.record(status, sum(s.completion_tokens
                                                                                 for s in streams)), output)


def install_chat_routes(app: FastAPI, state, authorized, engine) -> None:
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
