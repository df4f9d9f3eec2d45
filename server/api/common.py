"""What the API's handlers share: how an engine error reads, noticing a client that went away, and the frame of
a streamed response."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import AsyncIterator, Callable, Iterable

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api import errors
from server.api.output_processor import collect

SHUTTING_DOWN = "The server is shutting down; retry on another replica or later"


def engine_error(message: str) -> errors.APIError:
    """A sequence the engine ended with an error: 503 when the server is shutting down or its engine is not
    running, 504 past limits.request_timeout_s, 500 otherwise."""
    from server.engine.stream import ENGINE_UNAVAILABLE, REQUEST_TIMEOUT

    if SHUTTING_DOWN in message:
        return errors.shutting_down(SHUTTING_DOWN)
    if message.startswith(ENGINE_UNAVAILABLE):
        return errors.engine_unavailable(message)
    if message.startswith(REQUEST_TIMEOUT):
        return errors.APIError(504, message, type="server_error", code="request_timeout")
    return errors.APIError(500, message, type="server_error")


def request_timeout(limit: float) -> errors.APIError:
    from server.engine.stream import REQUEST_TIMEOUT

    return errors.APIError(504, f"{REQUEST_TIMEOUT} {limit:g} s (limits.request_timeout_s)", type="server_error",
                           code="request_timeout")


async def within(coro, limit: float):
    """``coro``'s result, or a 504 ``request_timeout`` past ``limit`` seconds (its work cancelled): for the
    steps a request takes outside the engine's stream (routing, embeddings), which its deadline does not see."""
    try:
        return await asyncio.wait_for(coro, limit)
    except asyncio.TimeoutError:
        raise request_timeout(limit) from None


async def done_unless_gone(request: Request, work: asyncio.Future) -> bool:
    """Wait for ``work``; False if the client disconnected first (a non-streaming client has no other way to
    tell us)."""
    async def disconnected() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    return work.done()


async def merged(streams: list) -> AsyncIterator[tuple[int, object]]:
    """Every stream's events as they come, tagged with the stream's index; ends when all have ended. Use it
    under ``contextlib.aclosing`` so that its readers stop with the response."""
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for ev in stream:
                await events.put((index, ev))
        finally:
            await events.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            index, ev = await events.get()
            if ev is None:
                open_streams -= 1
                continue
            yield index, ev
    finally:
        for t in tasks:
            t.cancel()


async def sse_events(streams: list, shape: Callable[[int, object], Iterable[str]],
                     usage_chunk: Callable[[], str | None], on_first_token: Callable[[float], None],
                     record: Callable[[str], None], head: Iterable[str] = ()) -> AsyncIterator[str]:
    """A streamed response's body: the ``head`` chunks, then its streams' events, ``shape(index, event)`` giving
    each one's SSE chunks; after the last event comes the engine's error as an error event, or ``usage_chunk()`` if it gives
    one, then ``[DONE]``. However it ends (the client gone included), the streams are cancelled and
    ``record(status)`` is called once with "ok", "error" or "cancelled"."""
    status, error, first = "cancelled", None, True
    try:
        for chunk in head:
            yield chunk
        async with contextlib.aclosing(merged(streams)) as events:
            async for index, ev in events:
                if ev.finish_reason == "error":
                    error = ev.error
                    continue
                if ev.token_ids and first:
                    first = False
                    on_first_token(time.perf_counter())
                for chunk in shape(index, ev):
                    yield chunk
        if error:
            status = "error"
            yield f"data: {json.dumps(engine_error(error).body())}\n\n"
        else:
            status = "ok"
            tail = usage_chunk()
            if tail:
                yield tail
        yield "data: [DONE]\n\n"
    finally:
        for s in streams:
            s.cancel()
        record(status)


class ClientGone(Exception):
    """The client disconnected before there was anything to answer."""


async def unless_gone(request: Request, coro):
    """``coro``'s result; ClientGone (its work cancelled) when the client disconnects first."""
    work = asyncio.ensure_future(coro)
    if not await done_unless_gone(request, work):
        work.cancel()
        await asyncio.gather(work, return_exceptions=True)
        raise ClientGone
    return work.result()


class Timing:
    """When a request started and when its first token came, for the metrics."""

    def __init__(self):
        self.started = time.perf_counter()
        self.first_token_at: float | None = None

    def first_token(self, at: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = at

    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


async def finished_or_gone(request: Request, work, streams: list, record: Callable[[str], None]):
    """``work`` (collecting ``streams``) to its end: its result, or None when the client went away first (the
    streams cancelled, recorded as cancelled). An engine error is recorded and raised as its API error."""
    work = asyncio.ensure_future(work)
    if not await done_unless_gone(request, work):
        for s in streams:
            s.cancel()
        await asyncio.gather(work, return_exceptions=True)
        record("cancelled")
        return None
    results = work.result()
    failed = next((r.error for r in results if r.finish_reason == "error"), None)
    if failed:
        record("error")
        raise engine_error(failed)
    record("ok")
    return results


class Handler:
    """A generating request's frame (chat and text completions): check it, route it (model "auto"), serve it;
    a client that leaves while it is routed gets a 499. Subclasses give ``body``, ``request``, ``timing``,
    ``headers()`` and the three steps."""

    async def respond(self):
        self._check()
        try:
            await self._route()
        except ClientGone:
            return Response(status_code=499)
        return await self._serve()

    async def answer(self, streams: list, record: Callable[[str], None], output):
        """The streams' answer: server-sent events from ``output.stream(streams)`` -> (head, shape, usage_chunk),
        or JSON from ``output.completion(results, streams)``; 499 when the client leaves first."""
        if self.body.stream:
            head, shape, usage_chunk = output.stream(streams)
            return StreamingResponse(sse_events(streams, shape, usage_chunk, self.timing.first_token, record,
                                                head=head), media_type="text/event-stream", headers=self.headers())
        results = await finished_or_gone(self.request, collect(streams, self.timing.first_token), streams, record)
        if results is None:  # the client went away: its sequences were cancelled
            return Response(status_code=499)
        return JSONResponse(output.completion(results, streams), headers=self.headers())
