"""A request's stream of events, on the caller's event loop: the engine's tokens detokenized, stop strings cut
exactly, logprob entries spelled out (the engine side of output processing, as vLLM v1's output processor does
it in the front-end process), and an error event instead of a wait for ever when the engine stops answering or
the request runs past its time."""

from __future__ import annotations

import asyncio
import threading
import time

from server.engine.sequence import Event, Sequence
from server.engine.text import IncrementalText, token_bytes

ENGINE_UNAVAILABLE = "The engine is not running"  # error events and EngineUnavailable start with it
REQUEST_TIMEOUT = "The request ran longer than"
LIVENESS_POLL_S = 1.0  # how often a waiting request checks that the engine still answers


class RequestStream:
    """One request's events, detokenized here (the output side), with stop strings cut exactly."""

    def __init__(self, seq: Sequence, events: asyncio.Queue, wake: threading.Event, tokenizer,
                 problem=lambda: None, timeout_s: float | None = None):
        """``problem()``: why the engine cannot answer, or None; ``timeout_s``: how long the request may run. A
        stream whose engine stops answering, or that runs past its time, ends with an error event (and frees
        its sequence) instead of waiting for ever."""
        self.seq, self._events, self._wake = seq, events, wake
        self._text = IncrementalText(tokenizer, seq.params.stop, seq.params.min_tokens)
        self.finish_reason: str | None = None
        self._problem = problem
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self._timeout_s = timeout_s
        self.prompt_tokens = len(seq.prompt)
        self.completion_tokens = 0  # tokens delivered: a stop string ends the count where it cut

    @property
    def id(self) -> str:
        return self.seq.id

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finish_reason is not None:
            raise StopAsyncIteration
        while True:
            event = self._overdue() or (self._events.get_nowait() if not self._events.empty() else await self._next())
            if event.finish_reason is None:
                self.completion_tokens += len(event.token_ids)
                text, stopped, logprobs = "", False, [] if event.logprobs is not None else None
                for j, tok in enumerate(event.token_ids):
                    if tok in self.seq.stop_ids or tok in self.seq.params.stop_token_ids:
                        continue
                    delta, stopped = self._text.add(tok)
                    text += delta
                    if logprobs is not None:
                        logprobs.append(self._logprob(tok, *event.logprobs[j]))
                    if stopped:
                        break
                if stopped:  # the engine may be a step ahead: end here and free its blocks
                    self.finish_reason = "stop"
                    self.cancel()
                    return Event(text, event.token_ids, "stop", self.prompt_tokens, self.completion_tokens,
                                 logprobs=logprobs)
                return Event(text, event.token_ids, logprobs=logprobs)
            self.finish_reason = event.finish_reason
            tail = self._text.flush() if event.finish_reason in ("stop", "length") else ""
            return Event(tail, [], event.finish_reason, self.prompt_tokens, self.completion_tokens, event.error)

    def _overdue(self) -> Event | None:
        """The error event that ends a request past its time (its sequence cancelled), or None."""
        if self._deadline is None or time.monotonic() <= self._deadline:
            return None
        return self._end(f"{REQUEST_TIMEOUT} {self._timeout_s:g} s (limits.request_timeout_s)")

    def _end(self, error: str) -> Event:
        self.cancel()
        return Event("", [], "error", len(self.seq.prompt), len(self.seq.output), error=error)

    async def _next(self) -> Event:
        """The next event; every second without one, whether the engine still answers and the request is still
        within its time (if not: the sequence is cancelled, and an error event ends the stream)."""
        while True:
            try:
                return await asyncio.wait_for(self._events.get(), timeout=LIVENESS_POLL_S)
            except asyncio.TimeoutError:
                problem = self._problem()
                if problem is not None:
                    return self._end(problem)
                overdue = self._overdue()
                if overdue is not None:
                    return overdue

    def _logprob(self, tok: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        """One token's entry in OpenAI's logprobs.content: its text ("bytes:\\xe2" for part of a character) and
        its raw bytes."""
        def entry(t: int, lp: float) -> dict:
            raw = token_bytes(self._text.tokenizer, t)
            try:
                text = raw.decode()
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            return {"token": text, "logprob": lp, "bytes": list(raw)}

        return {**entry(tok, logprob), "top_logprobs": [entry(t, lp) for t, lp in top]}

    def cancel(self) -> None:
        self.seq.cancelled.set()
        self._wake.set()

    async def raw(self):
        """The engine's events as they come, each step's in one list, not detokenized (a Ray replica forwards them
        to the ingress, which detokenizes). A consumer that stops early cancels the sequence."""
        try:
            while True:
                batch = [await self._events.get()]
                while not self._events.empty():
                    batch.append(self._events.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    self.finish_reason = batch[-1].finish_reason
                    return
        finally:
            if self.finish_reason is None:
                self.cancel()


def deliver(batch: list) -> None:
    """(queue, event, sequence) triples onto their queues, on the queues' event loop."""
    for events, event, _ in batch:
        events.put_nowait(event)
