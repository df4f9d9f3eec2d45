"""POST /v1/completions (the legacy text endpoint): request -> route (model "auto") -> input processor -> engine
-> output processor -> response.

Completions take a prompt as text, a list of texts, token ids or a list of those; each prompt gets ``n``
choices (index = prompt * n + choice). No chat template is applied. ``echo`` puts the prompt before the text;
``suffix`` (insertion) is not served (400). ``logprobs`` (0-20) gives the legacy shape: tokens,
token_logprobs, top_logprobs, text_offset.
"""

from __future__ import annotations

import uuid

from fastapi import Depends, FastAPI, Request

from server.api import errors
from server.api.common import SHUTTING_DOWN, Handler, Timing, unless_gone, within
from server.api.output_processor import CompletionOutput
from server.api.protocol import Completion, CompletionRequest, now

MAX_PROMPTS = 64  # prompts x n per request


class CompletionHandler(Handler):
    def __init__(self, state, body: CompletionRequest, request: Request):
        self.state, self.body, self.request = state, body, request
        self.model = body.model
        self.decision = None
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = now()
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.timing = Timing()

    def _check(self) -> None:
        body = self.body
        if self.state.stopping:
            raise errors.shutting_down(SHUTTING_DOWN)
        if body.suffix:
            raise errors.bad_request("suffix (inserting text) is not served; send the prompt alone", param="suffix",
                                     code="unsupported_parameter")
        if body.best_of is not None and body.best_of != body.n:
            raise errors.bad_request("best_of other than n is not served", param="best_of",
                                     code="unsupported_parameter")
        if body.echo and body.logprobs is not None:
            raise errors.bad_request("echo with logprobs (the prompt's own logprobs) is not served", param="echo",
                                     code="unsupported_parameter")
        if len(body.prompts()) * body.n > MAX_PROMPTS:
            raise errors.bad_request(f"at most {MAX_PROMPTS} prompts times n per request", param="prompt")
        if body.model in self.state.pipelines:
            raise errors.bad_request("a pipeline answers chat completions only: use /v1/chat/completions",
                                     param="model")

    async def _route(self) -> None:
        if self.body.model != "auto" or self.state.router is None:
            return
        prompts = self.body.prompts()
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise errors.bad_request("model auto routes one text prompt per request", param="prompt")
        self.decision = await unless_gone(self.request, within(self.state.router.adecide_text(prompts[0]),
                                                               self.state.config.limits.request_timeout_s))
        self.model = self.decision.target
        if self.model in self.state.pipelines:
            raise errors.bad_request(f"model auto chose the pipeline {self.model!r}, which answers chat completions "
                                     f"only", param="model")

    def headers(self) -> dict:
        headers = {"x-request-id": self.request_id, "x-branchserve-branch": self.model}
        if self.decision is not None:
            headers["x-branchserve-route"] = self.decision.route
        return headers

    async def _serve(self):
        prepared = await self.state.inputs.completion(self.body, self.model, self.request_id)
        streams = self.state.inputs.submit(prepared)
        tokenizer = prepared.target.tokenizer
        echo = [tokenizer.decode(ids, skip_special_tokens=True) if self.body.echo else "" for ids in prepared.prompts]
        output = CompletionOutput(self.id, self.created, self.model, self.body, prepared.prompt_tokens, echo,
                                  [r.index for r in prepared.requests])

        def record(status: str) -> None:
            self.state.metrics.observe(self.model, status, prepared.prompt_tokens,
                                       sum(s.completion_tokens for s in streams), self.timing.ttft(),
                                       self.timing.elapsed())

        return await self.answer(streams, record, output)


def install_completion_routes(app: FastAPI, state, authorized, engine) -> None:
    @app.post("/v1/completions", dependencies=[Depends(authorized)], response_model=None,
              responses={200: {"model": Completion, "description": "A text_completion, or with stream: true, "
                               "server-sent events", "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                         **errors.documented(400, 401, 404, 429, 503)})
    async def completions(body: CompletionRequest, request: Request):
        engine()
        return await CompletionHandler(state, body, request).respond()
