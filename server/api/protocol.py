"""OpenAI chat-completions request and response models (the subset branchserve serves)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api import errors

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


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs 'json_schema'")
        return self


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


def lone_surrogate(value) -> tuple[str, str] | None:
    """(where, which code point) of the first string in a parsed JSON body that holds a lone surrogate (JSON
    allows writing one as an escape, "\\ud800"; it is not Unicode, and no tokenizer takes it)."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return path or "body", f"U+{ord(v[e.start]):04X}"
        elif isinstance(v, dict):
            stack.extend((item, f"{path}.{key}" if path else str(key)) for key, item in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(v))))
    return None


class RequestBody(BaseModel):
    """A request body: its text must be Unicode. A lone surrogate is a 400 naming where it is (FastAPI lets the
    APIError through validation to its handler)."""

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data):
        bad = lone_surrogate(data)
        if bad is not None:
            where, code = bad
            raise errors.bad_request(f"{where} holds a lone surrogate ({code}): the text is not valid Unicode",
                                     param=where, code="invalid_unicode")
        return data


class GuidedFields(RequestBody):
    """vLLM's extras for constrained decoding, accepted in the request body; at most one constraint per request
    (these or response_format or a forced tool call)."""

    guided_json: dict | str | None = None
    guided_regex: str | None = Field(None, max_length=8192)
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: str | None = Field(None, max_length=64_000)


SEED_MIN, SEED_END = -2**63, 2**63  # a seed is a signed 64-bit integer
MAX_MESSAGES = 2048  # messages in one chat request, checked before anything is rendered or tokenized
MAX_STOP = 4  # stop sequences per request (OpenAI's limit)
MAX_STOP_CHARS = 512  # characters in one stop sequence: text that may begin one is held back from the stream


def check_stop(v):
    """A stop string or list: at most MAX_STOP of them, each at most MAX_STOP_CHARS characters."""
    stops = [v] if isinstance(v, str) else (v or [])
    if len(stops) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop sequences")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop sequence may hold at most {MAX_STOP_CHARS} characters")
    return v


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


class ChatCompletionRequest(GuidedFields):
    # Unknown fields are accepted and ignored (the handler logs their names); known ones must have their type
    # (no "5" for 5, no false for 0).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    response_format: ResponseFormat | None = None
    user: str | None = None
    include_reasoning: bool = False  # branchserve: stream a pipeline's stage-1 text as reasoning_content deltas
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    ignore_eos: bool = False  # vLLM's: the model's end of turn does not end the answer (benchmark clients)
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

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return check_stop(v)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())

    def unserved_field(self) -> str | None:
        """The first field this request uses that would change the answer and is not served yet."""
        extra = self.model_extra or {}
        for name, used in UNSERVED.items():
            if name in extra and used(extra[name]):
                return name
        return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: None = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None  # {index, id?, type?, function: {name?, arguments}}


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "branchserve"
    # branchserve's own field: what serves this name (an embedding model answers /v1/embeddings only)
    kind: Literal["branch", "standalone", "pipeline", "router", "embedding"]


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
