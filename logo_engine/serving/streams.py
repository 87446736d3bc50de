"""Server-sent event streams of chat and text completions, built from a row's events.

A stream starts with one chunk per row carrying the selection (``logo`` field), then text deltas
as the batcher delivers them (tool-call markup held back when tools are offered), the tool calls
in OpenAI form, a chunk with the finish reason, the usage chunk when
``stream_options.include_usage`` is set, and ``data: [DONE]``. A failure mid-stream is sent as an
``{"error": ...}`` event (the status line is already gone) before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from pydantic import BaseModel

from logo_engine.chat import StreamFilter
from logo_engine.serving import openai_api as oa
from logo_engine.serving.batcher import Delta, Event, Failed, Finished, Job
from logo_engine.serving.metrics import Metrics
from logo_engine.serving.protocol import (
    ChatCompletionChunk,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    LogoResult,
    ToolCallDelta,
    new_id,
    now,
)
from logo_engine.types import Generation, Selection, Usage

logger = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"


def total_usage(generations: Sequence[Generation]) -> Usage:
    """The usage of several rows together."""
    if len(generations) == 1:
        return generations[0].usage
    return Usage(
        prompt_tokens=sum(g.usage.prompt_tokens for g in generations),
        completion_tokens=sum(g.usage.completion_tokens for g in generations),
    )


def dump(response: BaseModel) -> dict[str, Any]:
    """A response as JSON: unset optional fields left out, but the selection always whole."""
    data = response.model_dump(mode="json", exclude_none=True)
    logo = getattr(response, "logo", None)
    if isinstance(logo, LogoResult):
        data["logo"] = {"selection": logo.selection.model_dump(mode="json")}
        if logo.selections is not None:
            data["logo"]["selections"] = [s.model_dump(mode="json") for s in logo.selections]
        if logo.text is not None:
            data["logo"]["text"] = logo.text
            data["logo"]["content"] = logo.content
        if logo.invalid_tool_calls is not None:
            data["logo"]["invalid_tool_calls"] = [
                c.model_dump(mode="json") for c in logo.invalid_tool_calls
            ]
    return data


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event."""
    data = dump(payload) if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def error_sse(exc: BaseException) -> str:
    """A failure in the middle of a stream, as an OpenAI error event."""
    _, kind, code = oa.error_info(exc)
    logger.error("stream failed: %r", exc, exc_info=exc)
    return sse({"error": {"message": str(exc), "type": kind, "code": code}})


async def chat_stream(
    job: Job,  # its Selected event already taken
    selection: Selection,
    model: str,
    hold_tool_calls: bool,
    include_usage: bool,
    metrics: Metrics,
    start: float,
) -> AsyncIterator[str]:
    """The SSE stream of one chat completion (see module docstring)."""
    rid, created = new_id("chatcmpl"), now()

    def chunk(delta: ChunkDelta, finish: str | None = None, **extra: Any) -> str:
        data = dump(
            ChatCompletionChunk(
                id=rid,
                created=created,
                model=model,
                choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)],  # type: ignore[arg-type]
                **extra,
            )
        )
        if include_usage and "usage" not in data:
            data["usage"] = None  # OpenAI: null on every chunk but the last
        return sse(data)

    try:
        yield chunk(ChunkDelta(role="assistant", content=""), logo=LogoResult(selection=selection))
        text = StreamFilter(hold_tool_calls)
        first = True
        async for event in job.stream():
            if isinstance(event, Delta):
                if first:
                    metrics.first_token.observe(time.perf_counter() - start)
                    first = False
                delta = text.push(event.text)
                if delta:
                    yield chunk(ChunkDelta(content=delta))
            elif isinstance(event, Finished):
                generation = event.generation
                rest = text.final_delta(generation.content)
                if rest:
                    yield chunk(ChunkDelta(content=rest))
                if generation.tool_calls:
                    calls = [
                        ToolCallDelta(index=i, id=c.id, function=c.function)
                        for i, c in enumerate(oa.tool_calls_out(generation.tool_calls))
                    ]
                    yield chunk(ChunkDelta(tool_calls=calls))
                extra = oa.logo_result(generation)  # raw text, broken calls: when there are any
                has_extra = extra.text is not None or extra.invalid_tool_calls is not None
                yield chunk(
                    ChunkDelta(), oa.finish_reason(generation), logo=extra if has_extra else None
                )
                if include_usage:
                    usage = ChatCompletionChunk(
                        id=rid,
                        created=created,
                        model=model,
                        choices=[],
                        usage=oa.usage_out(generation.usage),
                    )
                    yield sse(usage)
            elif isinstance(event, Failed):
                yield error_sse(event.error)
        yield DONE
    finally:
        job.cancel()


async def completion_stream(
    jobs: Sequence[Job],
    selections: Sequence[Selection],
    model: str,
    include_usage: bool,
    metrics: Metrics,
    start: float,
) -> AsyncIterator[str]:
    """The SSE stream of a text completion with one choice per prompt."""
    rid, created = new_id("cmpl"), now()

    def chunk(index: int, text: str, finish: str | None = None, **extra: Any) -> str:
        data = dump(
            Completion(
                id=rid,
                created=created,
                model=model,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish)],  # type: ignore[arg-type]
                **extra,
            )
        )
        if include_usage and "usage" not in data:
            data["usage"] = None
        return sse(data)

    try:
        for i, selection in enumerate(selections):
            yield chunk(i, "", logo=LogoResult(selection=selection))
        generations: list[Generation] = []
        first = True
        async for i, event in merged(jobs):
            if isinstance(event, Delta):
                if first:
                    metrics.first_token.observe(time.perf_counter() - start)
                    first = False
                yield chunk(i, event.text)
            elif isinstance(event, Finished):
                generations.append(event.generation)
                yield chunk(i, "", event.generation.finish_reason)
            elif isinstance(event, Failed):
                yield error_sse(event.error)
        if include_usage and generations:
            yield sse(
                Completion(
                    id=rid,
                    created=created,
                    model=model,
                    choices=[],
                    usage=oa.usage_out(total_usage(generations)),
                )
            )
        yield DONE
    finally:
        for job in jobs:
            job.cancel()


async def merged(jobs: Sequence[Job]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several rows as they come, tagged with the row index."""
    streams = {i: job.stream().__aiter__() for i, job in enumerate(jobs)}
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in streams.items()}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    event = task.result()
                except StopAsyncIteration:
                    continue
                yield i, event
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
    finally:
        for task in pending:
            task.cancel()
