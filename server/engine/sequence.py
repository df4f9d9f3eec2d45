"""A sequence as the engine holds it, and the events it sends its request's stream."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.sampling import SamplingParams


@dataclass
class Event:
    """What a request's consumer receives: new text and tokens, and at the end a finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # per token in token_ids when the request asked for logprobs: (logprob, [(id, logprob) of the most likely])
    logprobs: list | None = None


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    branch: int = 0  # row's branch index (family runner)
    stop_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    matcher: object | None = None  # structured.Matcher when decoding is constrained
    pending: object | None = None  # runner.Parked: its logits, waiting for its grammar mask
    blocks: list[int] = field(default_factory=list)  # the block table: the KV blocks this sequence holds
    computed: int = 0  # tokens whose keys and values are in the cache
    output: list[int] = field(default_factory=list)
    finished: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n-1 of prompt + output, without joining the two."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start:start + n]
        if start >= p:
            return self.output[start - p:start - p + n]
        return self.prompt[start:] + self.output[:start + n - p]
