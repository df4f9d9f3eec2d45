"""Chat completions: the request, the answer, its streamed chunks, and a pipeline's answer."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, field_validator, model_validator

from server.api.protocol.base import MAX_MESSAGES, Answer, AnswerChoice, ChoiceLogprobs, SamplingFields, Usage

UNSUPPORTED_PARTS = {"image_url": "image", "input_image": "image", "input_audio": "audio", "file": "file",
                     "video_url": "video"}


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type in UNSUPPORTED_PARTS:
            raise ValueError(f"{UNSUPPORTED_PARTS[self.type]} content is not supported: send text parts only")
        if self.type != "text":
            raise ValueError(f"unknown content part type {self.type!r}: send text parts")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers

    @field_validator("content", mode="before")
    @classmethod
    def _parts_first(cls, v):  # say what is wrong with a part, not that a list is not a string
        if isinstance(v, list):
            for part in v:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind in UNSUPPORTED_PARTS:
                    raise ValueError(f"{UNSUPPORTED_PARTS[kind]} content is not supported: send text parts only")
        return v

    @model_validator(mode="after")
    def _content_needed(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def template_dict(self) -> dict:
        """The message as chat templates take it (developer becomes system; tool-call arguments as objects)."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


def _arguments(text: str):
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: NamedFunction


# Fields that change what an answer means. Until they are served, a request that uses one is refused (400)
# rather than answered as if it had not asked. Any other unknown field is logged and ignored.
UNSERVED = {
    "functions": lambda v: bool(v),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "logit_bias": lambda v: bool(v),
    "prediction": lambda v: bool(v),
    "modalities": lambda v: v not in (None, ["text"]),
    "audio": lambda v: v is not None,
}


class ChatCompletionRequest(SamplingFields):
    # Unknown fields are accepted and ignored (the handler logs their names); known ones must have their type
    # (no "5" for 5, no false for 0).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    include_reasoning: bool = False  # branchserve: stream a pipeline's stage-1 text as reasoning_content deltas
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def inconsistency(self) -> tuple[str, str] | None:
        """(what is wrong, the field) when fields contradict each other."""
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs needs logprobs: true", "top_logprobs"
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            return "tool_choice needs tools", "tool_choice"
        if isinstance(self.tool_choice, NamedToolChoice):
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                return (f"tool_choice names function {self.tool_choice.function.name!r}, which is not among the "
                        f"tools"), "tool_choice"
        if self.tools and len({t.function.name for t in self.tools}) != len(self.tools):
            return "two tools have the same name", "tools"
        return None

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprobs_asked(self) -> int | None:
        """None: no logprobs; k: the sampled token's and the k most likely."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unserved_field(self) -> str | None:
        """The first field this request uses that would change the answer and is not served yet."""
        extra = self.model_extra or {}
        for name, used in UNSERVED.items():
            if name in extra and used(extra[name]):
                return name
        return None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None  # a pipeline's stage-1 text, with include_reasoning
    tool_calls: list[dict] | None = None  # {index, id?, type?, function: {name?, arguments}}


class ChunkChoice(AnswerChoice):
    delta: Delta
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(Answer):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice]
    usage: SerializeAsAny[Usage] | None = None  # a pipeline's carries its stages


class StageUsage(BaseModel):
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


class PipelineUsage(Usage):
    """A pipeline's usage: its stages' tokens summed, and each stage's own."""

    stages: list[StageUsage]


class PipelineMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    reasoning_content: str | None = None  # stage 1's text, when there is more than one stage


class PipelineChoice(BaseModel):
    index: int = 0
    message: PipelineMessage
    finish_reason: str | None
    logprobs: None = None


class PipelineCompletion(Answer):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[PipelineChoice]
    usage: PipelineUsage

    def body(self) -> dict:
        data = self.model_dump()
        for choice in data["choices"]:
            if choice["message"]["reasoning_content"] is None:
                del choice["message"]["reasoning_content"]
        return data
