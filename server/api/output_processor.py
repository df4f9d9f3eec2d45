"""Output processing: a request's engine events (already text: server/engine/stream.py detokenizes them and
cuts stop strings) become OpenAI's answers. One place for each shape: a chat completion and its chunks (tool
calls parsed, held or streamed; logprobs; finish reasons; usage), a text completion and its chunks (echo, the
legacy logprobs shape), a pipeline's answer and its chunks (stage 1 as reasoning_content), and the frame of
every stream (server/api/common.py ``sse_events``)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from server.api.protocol import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceLogprobs, ChunkChoice, Completion,
    CompletionChoice, CompletionLogprobs, CompletionRequest, Delta, PipelineChoice, PipelineCompletion,
    PipelineMessage, PipelineUsage, ResponseMessage, StageUsage, Usage,
)
from server.api.tools import ToolPlan, could_be_call
from server.engine.stream import RequestStream


@dataclass
class Collected:
    """One sequence's whole answer."""

    text: str
    finish_reason: str | None
    error: str | None
    logprobs: list = field(default_factory=list)


async def collect(streams: list[RequestStream], on_first_token) -> list[Collected]:
    """Every stream read to its end; ``on_first_token(t)`` when the first token arrives."""
    async def one(stream: RequestStream) -> Collected:
        text, entries, error = [], [], None
        async for ev in stream:
            if ev.token_ids:
                on_first_token(time.perf_counter())
            text.append(ev.text)
            entries.extend(ev.logprobs or [])
            error = ev.error or error
        return Collected("".join(text), stream.finish_reason, error, entries)

    return list(await asyncio.gather(*(one(s) for s in streams)))


def usage(prompt_tokens: int, streams: list[RequestStream]) -> Usage:
    completion = sum(s.completion_tokens for s in streams)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def chat_chunk(answer, choices: list[ChunkChoice], usage: Usage | None, include_usage: bool) -> str:
    """A chat.completion.chunk event for ``answer`` (its id, created and model): deltas carry only what they
    set; ``usage`` is there (null until the last) only when the request asked for it."""
    data = ChatCompletionChunk(id=answer.id, created=answer.created, model=answer.model, choices=choices,
                               usage=usage).model_dump()
    if not include_usage:
        data.pop("usage")
    for c in data["choices"]:
        c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
    return sse(data)


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


class ChatOutput:
    """One chat completion's answer: as JSON, or as chunks (``ChoiceStream`` per choice)."""

    def __init__(self, id: str, created: int, model: str, body: ChatCompletionRequest, tools: ToolPlan | None,
                 prompt_tokens: int):
        self.id, self.created, self.model, self.body = id, created, model, body
        self.tools, self.prompt_tokens = tools, prompt_tokens
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def completion(self, results: list[Collected], streams: list[RequestStream]) -> dict:
        choices = []
        for i, r in enumerate(results):
            content, calls = self.tools.calls(r.text) if self.tools else (r.text, [])
            reason = "tool_calls" if calls and self.tools.mode == "auto" else r.finish_reason
            choices.append(Choice(index=i, message=ResponseMessage(content=content, tool_calls=calls or None),
                                  finish_reason=reason,
                                  logprobs=ChoiceLogprobs(content=r.logprobs) if self.body.logprobs else None))
        return ChatCompletion(id=self.id, created=self.created, model=self.model, choices=choices,
                              usage=usage(self.prompt_tokens, streams)).model_dump()

    def chunk(self, choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        return chat_chunk(self, choices, usage, self.include_usage)

    def stream(self, streams: list[RequestStream]):
        """(head, shape, usage_chunk) for ``sse_events``: no head, each event's chunks, and the usage chunk when
        asked for."""
        shapers = [ChoiceStream(self.tools, self.body.logprobs) for _ in streams]

        def shape(index: int, ev):
            for delta, logprobs, finish in shapers[index].feed(ev):
                yield self.chunk([ChunkChoice(index=index, delta=Delta(**delta), finish_reason=finish,
                                              logprobs=None if logprobs is None else ChoiceLogprobs(content=logprobs))])

        def usage_chunk() -> str | None:
            return self.chunk([], usage(self.prompt_tokens, streams)) if self.include_usage else None

        return [], shape, usage_chunk


class CompletionOutput:
    """One text completion's answer: choice k is prompt ``prompt_of[k]``'s, after its ``echo`` when asked."""

    def __init__(self, id: str, created: int, model: str, body: CompletionRequest, prompt_tokens: int,
                 echo: list[str], prompt_of: list[int]):
        self.id, self.created, self.model, self.body = id, created, model, body
        self.prompt_tokens, self.echo, self.prompt_of = prompt_tokens, echo, prompt_of

    @staticmethod
    def legacy(entries: list[dict], offset: int) -> CompletionLogprobs:
        """logprobs.content entries -> the legacy shape, text offsets counted from ``offset``."""
        out = CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for e in entries:
            out.tokens.append(e["token"])
            out.token_logprobs.append(e["logprob"])
            out.top_logprobs.append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
            out.text_offset.append(offset)
            offset += len(bytes(e["bytes"]).decode(errors="replace"))
        return out

    def _answer(self, choices: list[CompletionChoice], usage: Usage | None = None) -> dict:
        return Completion(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage).body()

    def completion(self, results: list[Collected], streams: list[RequestStream]) -> dict:
        choices = []
        for k, r in enumerate(results):
            echo = self.echo[self.prompt_of[k]]
            choices.append(CompletionChoice(index=k, text=echo + r.text, finish_reason=r.finish_reason,
                                            logprobs=self.legacy(r.logprobs, len(echo))
                                            if self.body.logprobs is not None else None))
        return self._answer(choices, usage(self.prompt_tokens, streams))

    def chunk(self, index: int, text: str, finish: str | None = None, logprobs: CompletionLogprobs | None = None):
        return sse(self._answer([CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=logprobs)]))

    def stream(self, streams: list[RequestStream]):
        """(head, shape, usage_chunk) for ``sse_events``: the echoes first, then each event's chunks."""
        offsets = [len(self.echo[i]) for i in self.prompt_of]
        head = [self.chunk(k, self.echo[i]) for k, i in enumerate(self.prompt_of) if self.echo[i]]

        def shape(k: int, ev):
            logprobs = None
            if self.body.logprobs is not None and ev.logprobs:
                logprobs = self.legacy(ev.logprobs, offsets[k])
                offsets[k] += sum(len(bytes(e["bytes"]).decode(errors="replace")) for e in ev.logprobs)
            if ev.text or logprobs:
                yield self.chunk(k, ev.text, logprobs=logprobs)
            if ev.finish_reason in ("stop", "length"):
                yield self.chunk(k, "", ev.finish_reason)

        def usage_chunk() -> str | None:
            if not (self.body.stream_options and self.body.stream_options.include_usage):
                return None
            return sse(self._answer([], usage(self.prompt_tokens, streams)))

        return head, shape, usage_chunk


class PipelineOutput:
    """A pipeline's answer: the last stage's text as content, stage 1's as reasoning_content; usage per stage."""

    def __init__(self, id: str, created: int, model: str, body: ChatCompletionRequest, stages: int):
        self.id, self.created, self.model, self.body, self.last = id, created, model, body, stages - 1
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.role_sent = False

    @staticmethod
    def usage(result) -> PipelineUsage:
        prompt = sum(st.prompt_tokens for st in result.stages)
        completion = sum(st.completion_tokens for st in result.stages)
        return PipelineUsage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                             stages=[StageUsage(model=st.model, prompt_tokens=st.prompt_tokens,
                                                completion_tokens=st.completion_tokens, finish_reason=st.finish_reason)
                                     for st in result.stages])

    def completion(self, result) -> dict:
        message = PipelineMessage(content=result.content, reasoning_content=result.reasoning)
        return PipelineCompletion(id=self.id, created=self.created, model=self.model, usage=self.usage(result),
                                  choices=[PipelineChoice(message=message,
                                                          finish_reason=result.stages[-1].finish_reason)]).body()

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: PipelineUsage | None = None) -> str:
        choices = [] if usage is not None else [ChunkChoice(index=0, delta=Delta(**delta), finish_reason=finish_reason)]
        return chat_chunk(self, choices, usage, self.include_usage)

    def feed(self, stage: int, ev) -> list[str]:
        """One stage's event as chunks: the last stage's text as content, earlier stages' as reasoning_content
        when the request asked to include it."""
        if stage < self.last and not self.body.include_reasoning:
            return []
        key = "content" if stage == self.last else "reasoning_content"
        out = []
        if ev.token_ids and not self.role_sent:
            self.role_sent = True
            out.append(self.chunk({"role": "assistant", key: ev.text}))
        elif ev.text:
            out.append(self.chunk({key: ev.text}))
        if stage == self.last and ev.finish_reason in ("stop", "length"):
            out.append(self.chunk({}, ev.finish_reason))
        return out
