"""What every request and answer shares: Unicode-checked bodies, the sampling fields of chat and text
completions, constrained-decoding extras, usage and logprobs."""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.api import errors


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


class SamplingFields(GuidedFields):
    """The fields chat and text completions share: how to sample, when to stop, how to answer. A sampling
    parameter added here is served by both once the input processor (server/api/input_processor.py) maps it."""

    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    ignore_eos: bool = False  # vLLM's: the model's end of turn does not end the answer (benchmark clients)
    min_tokens: int = Field(0, ge=0)  # vLLM's: no end of turn, stop token or stop string before this many tokens
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        return check_stop(v)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unknown_fields(self) -> list[str]:
        return sorted((self.model_extra or {}).keys())


class Answer(BaseModel):
    """What every answer object begins with."""

    id: str
    created: int
    model: str


class AnswerChoice(BaseModel):
    """What every choice of an answer carries besides its content."""

    index: int
    finish_reason: str | None = None


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


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
