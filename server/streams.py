"""Plumbing between the engine's per-request streams and HTTP: start several at once, merge them, stop the
work the moment a client goes away, and write server-sent events."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.outputs import RequestOutput
from server.async_engine import RequestStream

T = TypeVar("T")
Stream = RequestStream


async def start_all(streams: list[Stream]) -> list[RequestOutput]:
    """Wait for each stream's first output, so that a request the engine refuses (too long, queue full)
    fails before any response is sent; if one fails, or the caller is cancelled, every stream is stopped and
    closed (aborting its request)."""
    firsts = [asyncio.ensure_future(anext(s)) for s in streams]
    try:
        return list(await asyncio.gather(*firsts))
    except BaseException:
        for first in firsts:
            first.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        await close_all(streams)
        raise


async def close_all(streams: list[Stream]) -> None:
    for stream in streams:
        with contextlib.suppress(Exception):
            await stream.aclose()


async def last(first: RequestOutput, stream: Stream) -> RequestOutput:
    """A stream's final output."""
    output = first
    while not output.finished:
        output = await anext(stream)
    return output


async def merged(firsts: list[RequestOutput], streams: list[Stream]) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """Every output of several started streams as (stream index, output), in arrival order."""
    if len(streams) == 1:  # the common case needs no tasks: one hop less per token
        output = firsts[0]
        yield 0, output
        while not output.finished:
            output = await anext(streams[0])
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, first: RequestOutput, stream: Stream) -> None:
        try:
            await queue.put((index, first))
            if not first.finished:
                async for output in stream:
                    await queue.put((index, output))
            await queue.put((index, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(zip(firsts, streams))]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await close_all(streams)


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its requests have been aborted."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Run work, cancelling it (and so aborting its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected() from None
        raise


def sse(data: str) -> str:
    return f"data: {data}\n\n"


class EventStreamResponse(StreamingResponse):
    """Server-sent events that notice a client's disconnect at once, not at the next write, and always run
    `on_close` at the end (closing the engine streams, which aborts unfinished requests), even when the
    client left before the first event."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache"})
        self._events = content
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream() -> None:
                    with contextlib.suppress(OSError):
                        await self.stream_response(send)
                    group.cancel_scope.cancel()

                group.start_soon(stream)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            await self._events.aclose()  # type: ignore[attr-defined]
            await self._on_close()
