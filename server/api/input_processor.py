"""Input processing: a validated request (a chat completion, a text completion, a pipeline's stage) becomes
what the engine runs: prompt tokens and ``SamplingParams`` per sequence.

Every step a request takes before the engine is here, once: the chat template and tokenization (in a worker
thread, off the event loop), tools rendered or told, the context-length check, the request's constraint
checked and compiled (server/api/constraints.py, the bounded compile pool), and the mapping from the request's
fields to ``SamplingParams``. Handlers call it; none of them tokenizes or builds sampling parameters. A new
sampling parameter is a field in server/api/protocol/base.py (``SamplingFields``) and a line in ``sampling``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from server.api import errors
from server.api.constraints import compile_for, request_constraint
from server.api.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.api.tools import ToolPlan
from server.engine.core import EngineBase, Target
from server.engine.sampling import SamplingParams
from server.engine.scheduler import EngineFull, Reservation
from server.engine.stream import RequestStream
from server.engine.text import render_chat
from server.pipelines import Pipeline, with_expert, with_system


@dataclass
class EngineRequest:
    """One sequence for the engine: its prompt's index in the request, its tokens, how to sample."""

    index: int
    prompt: list[int]
    params: SamplingParams
    request_id: str


@dataclass
class Prepared:
    """A request made ready for the engine: the model that answers, its sequences (n per prompt), the tool
    plan a chat answer is parsed with, and for text completions with ``echo`` each prompt's text."""

    model: str
    target: Target
    prompts: list[list[int]]
    requests: list[EngineRequest] = field(default_factory=list)
    tools: ToolPlan | None = None
    param: str | None = None  # the field an engine's refusal of a prompt names

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


class InputProcessor:
    def __init__(self, engine: EngineBase, default_max_tokens: int):
        self.engine = engine
        self.default_max_tokens = default_max_tokens  # limits.default_max_tokens: a chat that sets none

    def target(self, model: str, asked: str) -> Target:
        target = self.engine.targets.get(model)
        if target is None:
            raise errors.model_not_found(asked)
        return target

    # -- the requests
    async def chat(self, body: ChatCompletionRequest, model: str, messages: list[dict], request_id: str
                   ) -> Prepared:
        """``messages``: the request's, as templates take them, with any route's expert prompt already in."""
        target = self.target(model, body.model)
        try:
            tools = ToolPlan.of(body.tools, body.tool_choice, target.tokenizer)
        except ValueError as e:
            raise errors.bad_request(str(e), param="tool_choice") from None
        hint = tools.hint()
        if hint:
            messages = with_system(messages, hint)
        prompt = await self.render(target, messages, tools.template_tools())
        grammar = await self.grammar(model, body, tools)
        max_new = self.budget(target, len(prompt), body.max_new_tokens(), self.default_max_tokens, "messages")
        prepared = Prepared(model, target, [prompt], tools=tools)
        prepared.requests = [EngineRequest(0, prompt, self.sampling(body, target, max_new, grammar, i),
                                           f"{request_id}-{i}") for i in range(body.n)]
        return prepared

    async def completion(self, body: CompletionRequest, model: str, request_id: str) -> Prepared:
        target = self.target(model, body.model)
        prompts = await asyncio.to_thread(self._tokens, body, target)
        grammar = await self.grammar(model, body)
        prepared = Prepared(model, target, prompts, param="prompt")
        for i, ids in enumerate(prompts):
            max_new = self.budget(target, len(ids), body.max_tokens, target.runner.max_seq, "prompt")
            prepared.requests += [EngineRequest(i, ids, self.sampling(body, target, max_new, grammar, i * body.n + j),
                                                f"{request_id}-{i}-{j}") for j in range(body.n)]
        return prepared

    async def stage(self, pipeline: Pipeline, index: int, messages: list[dict], question: str, draft: str | None,
                    final_max_tokens: int | None, seed: int | None, final_grammar=None
                    ) -> tuple[list[int], SamplingParams]:
        """A pipeline's stage ``index``: its template rendered (the request's messages, question and the previous
        stage's ``draft``), the model's chat template, and its sampling from the stage's config; the request's
        ``max_tokens`` and constraint apply to the last stage. Raises ValueError when its prompt fills the
        context."""
        stage, last = pipeline.stages[index], index == len(pipeline.stages) - 1
        sc = stage.config
        variables = {"messages": messages, "question": question, "domain": sc.domain}
        if index > 0:
            variables["draft"] = draft
        user = stage.template.render(**variables).strip()
        history = list(messages[:-1]) if messages and messages[-1]["role"] == "user" else list(messages)
        stage_messages = with_expert([*history, {"role": "user", "content": user}], sc.domain)
        target = self.engine.targets[sc.model]
        prompt = await asyncio.to_thread(render_chat, target.tokenizer, stage_messages)
        context = target.runner.max_seq
        max_tokens = min(final_max_tokens if last and final_max_tokens else sc.max_tokens, context - len(prompt))
        if max_tokens < 1:
            raise ValueError(f"stage {index + 1} of pipeline {pipeline.name!r}: its prompt ({len(prompt)} tokens) "
                             f"fills {sc.model}'s context of {context}")
        grammar = final_grammar if last and final_grammar is not None else stage.grammar
        return prompt, SamplingParams(max_tokens=max_tokens, temperature=sc.temperature, top_p=sc.top_p, stop=sc.stop,
                                      seed=None if seed is None else seed + index, grammar=grammar)

    # -- the steps
    async def render(self, target: Target, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The model's chat template and tokenization, in a worker thread; a template that refuses these
        messages (roles, order) is a 400."""
        try:
            return await asyncio.to_thread(render_chat, target.tokenizer, messages, tools)
        except Exception as e:
            raise errors.bad_request(f"messages: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
                                     param="messages") from None

    @staticmethod
    def _tokens(body: CompletionRequest, target: Target) -> list[list[int]]:
        out, vocab = [], target.runner.vocab_size
        for p in body.prompts():
            if isinstance(p, str):
                ids = target.tokenizer(p, add_special_tokens=True)["input_ids"]
            else:
                if any(not 0 <= t < vocab for t in p):
                    raise errors.bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
                ids = list(p)
            if not ids:
                raise errors.bad_request("a prompt is empty", param="prompt")
            out.append(ids)
        return out

    async def grammar(self, model: str, body, tools: ToolPlan | None = None):
        """The request's one constraint (response_format, guided_*, a forced tool call), compiled for ``model``;
        None without one."""
        constraint, param = request_constraint(body, tools)
        return await compile_for(self.engine, model, constraint, param)

    @staticmethod
    def budget(target: Target, prompt_len: int, asked: int | None, default: int, where: str) -> int:
        """New tokens for a prompt of ``prompt_len``: ``asked``, else ``default`` or what the context has left
        when that is less; a 400 when the prompt and what was asked do not fit the context."""
        context = target.runner.max_seq
        max_new = asked if asked is not None else min(default, context - prompt_len)
        if prompt_len + max_new > context or max_new < 1:
            want = max(max_new, 1)
            raise errors.bad_request(
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{prompt_len + want} tokens ({prompt_len} in the {where}, {want} in the completion). Please reduce "
                f"the length of the {where} or completion.", param=where, code="context_length_exceeded")
        return max_new

    @staticmethod
    def sampling(body: SamplingFields, target: Target, max_tokens: int, grammar, seed_offset: int) -> SamplingParams:
        """The request's fields as the engine's ``SamplingParams``; the model's defaults fill what it leaves out.
        ``seed_offset``: the sequence's place in the request (each of ``n`` gets its own seed)."""
        defaults = target.defaults or {}
        if body.min_tokens > max_tokens:
            raise errors.bad_request(f"min_tokens ({body.min_tokens}) is more than the {max_tokens} new tokens this "
                                     f"request may have", param="min_tokens")
        return SamplingParams(
            max_tokens=max_tokens, stop=body.stop_list(), grammar=grammar, ignore_eos=body.ignore_eos,
            temperature=defaults.get("temperature", 1.0) if body.temperature is None else body.temperature,
            top_p=defaults.get("top_p", 1.0) if body.top_p is None else body.top_p,
            seed=None if body.seed is None else body.seed + seed_offset, logprobs=body.logprobs_asked(),
            min_tokens=body.min_tokens)

    # -- to the engine
    def submit(self, prepared: Prepared) -> list[RequestStream]:
        """Every sequence of the request, or none: a refusal cancels those already queued (429 for a full
        queue, 400 for what the engine rejects)."""
        streams = []
        try:
            for r in prepared.requests:
                streams.append(self.engine.submit(prepared.model, r.prompt, r.params, r.request_id))
        except EngineFull as e:
            for s in streams:
                s.cancel()
            raise errors.queue_full(str(e)) from None
        except ValueError as e:
            for s in streams:
                s.cancel()
            raise errors.bad_request(str(e), param=prepared.param) from None
        return streams

    def reserve(self, model: str) -> Reservation:
        """One queue place for a whole request (a pipeline's stages): a 429 now, never an error mid-stream."""
        try:
            return self.engine.reserve(model)
        except EngineFull as e:
            raise errors.queue_full(str(e)) from None
