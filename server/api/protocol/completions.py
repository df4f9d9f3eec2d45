"""Text completions (the legacy endpoint) and embeddings: requests and answers."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from server.api.protocol.base import Answer, AnswerChoice, RequestBody, SamplingFields, Usage
from server.engine.sampling import MAX_LOGPROBS


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    suffix: str | None = None
    echo: bool = False
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for this endpoint
    best_of: int | None = Field(None, ge=1, le=16)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprobs_asked(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [p]
        return list(p)


class CompletionLogprobs(BaseModel):
    """The legacy logprobs shape: per token its text, logprob, the most likely alternatives, and where it begins
    in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(AnswerChoice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Completion(Answer):
    """A text completion, or one streamed chunk of it (the same object; the last of a stream may carry only
    usage)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None

    def body(self) -> dict:
        data = self.model_dump()
        if data["usage"] is None:
            del data["usage"]
        return data


class EmbeddingRequest(RequestBody):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # base64 of little-endian float32 with encoding_format base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
