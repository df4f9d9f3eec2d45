"""OpenAI chat-completions request and response models (the subset branchserve serves)."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

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
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text", "json_object", "json_schema"]


# Fields that change what an answer means. Until they are served, a request that uses one is refused (400)
# rather than answered as if it had not asked. Any other unknown field is logged and ignored.
UNSERVED = {
    "tools": lambda v: bool(v),
    "functions": lambda v: bool(v),
    "tool_choice": lambda v: v not in (None, "none", "auto"),
    "function_call": lambda v: v not in (None, "none", "auto"),
    "logprobs": lambda v: bool(v),
    "top_logprobs": lambda v: bool(v),
    "logit_bias": lambda v: bool(v),
    "prediction": lambda v: bool(v),
    "modalities": lambda v: v not in (None, ["text"]),
    "audio": lambda v: v is not None,
}


class ChatCompletionRequest(BaseModel):
    # Unknown fields are accepted and ignored (the handler logs their names); known ones must have their type
    # (no "5" for 5, no false for 0).
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    response_format: ResponseFormat | None = None
    user: str | None = None
    include_reasoning: bool = False  # branchserve: stream a pipeline's stage-1 text as reasoning_content deltas

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

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
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format"
        return None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int
    message: ResponseMessage
    finish_reason: str | None
    logprobs: None = None


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


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


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
    kind: Literal["branch", "standalone", "pipeline", "router"]  # branchserve's own field: what serves this name


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
