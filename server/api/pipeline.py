"""A chat completion whose model is a pipeline: one queue place for all its stages, each stage prepared by the
input processor and run by the engine (server/pipelines.py ``run_pipeline``), the answer shaped by the output
processor (``PipelineOutput``)."""

from __future__ import annotations

import asyncio
import json
import time

from fastapi.responses import JSONResponse, Response, StreamingResponse

from server.api import errors
from server.api.common import done_unless_gone, engine_error
from server.api.output_processor import PipelineOutput
from server.engine.scheduler import EngineFull
from server.pipelines import PipelineResult, StageFailed, get_question, run_pipeline


async def respond_pipeline(chat):
    """``chat``: the ChatHandler whose model is a pipeline."""
    pipeline = chat.pipeline
    output = PipelineOutput(chat.id, chat.created, pipeline.final_model, chat.body, len(pipeline.stages))
    if chat.body.stream:
        queue: asyncio.Queue = asyncio.Queue()
        task = await _start(chat, lambda i, ev: queue.put_nowait((i, ev)))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        return StreamingResponse(_sse(chat, output, task, queue), media_type="text/event-stream",
                                 headers=chat.headers())
    last = len(pipeline.stages) - 1

    def on_event(i, ev):
        if ev.token_ids and i == last:
            chat.timing.first_token(time.perf_counter())

    task = await _start(chat, on_event)
    if not await done_unless_gone(chat.request, task):  # the client went away: cancel whichever stage runs
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        _record(chat, "cancelled", None)
        return Response(status_code=499)
    try:
        result = await _result(task)
    except errors.APIError:
        _record(chat, "error", None)
        raise
    _record(chat, "ok", result)
    return JSONResponse(output.completion(result), headers=chat.headers())


async def _start(chat, on_event=None) -> asyncio.Task:
    body, pipeline = chat.body, chat.pipeline
    if body.n != 1:
        raise errors.bad_request("n must be 1 for a pipeline", param="n")
    for name in ("tools", "logprobs"):
        if getattr(body, name):
            raise errors.bad_request(f"{name} are not served for a pipeline; ask one of its models directly",
                                     param=name)
    inputs = chat.state.inputs
    grammar = await inputs.grammar(pipeline.final_model, body)
    reservation = inputs.reserve(pipeline.stages[0].config.model)  # admitted here, once, for all stages
    try:
        messages = chat.messages()
        coro = run_pipeline(chat.engine, inputs, pipeline, messages, get_question(messages), body.max_new_tokens(),
                            body.seed, on_event, grammar, reservation)
        task = asyncio.ensure_future(coro)
    except BaseException:
        reservation.release()
        raise
    task.add_done_callback(lambda _: reservation.release())  # however it ends, cancelled before it ran too
    return task


def _record(chat, status: str, result: PipelineResult | None) -> None:
    """Once per pipeline request, under the pipeline's name, with its stages' models as a label."""
    chat.model = chat.pipeline.name
    chat.prompt_tokens = sum(st.prompt_tokens for st in result.stages) if result else 0
    chat.record(status, sum(st.completion_tokens for st in result.stages) if result else 0,
                chat.pipeline.stage_models)


async def _result(task: asyncio.Task) -> PipelineResult:
    try:
        return await task
    except EngineFull as e:
        raise errors.queue_full(str(e)) from None
    except ValueError as e:
        raise errors.bad_request(str(e), code="context_length_exceeded") from None
    except StageFailed as e:
        raise engine_error(str(e)) from None


async def _sse(chat, output: PipelineOutput, task: asyncio.Task, queue: asyncio.Queue):
    status, result = "cancelled", None
    try:
        while True:
            item = await queue.get()
            if item is None:
                break
            i, ev = item
            if ev.token_ids and i == output.last:
                chat.timing.first_token(time.perf_counter())
            for chunk in output.feed(i, ev):
                yield chunk
        try:
            result = await _result(task)
        except errors.APIError as e:
            status = "error"
            yield f"data: {json.dumps(e.body())}\n\n"
        else:
            status = "ok"
            if output.include_usage:
                yield output.chunk({}, usage=output.usage(result))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects: cancel whichever stage runs
        task.cancel()
        _record(chat, status, result)
