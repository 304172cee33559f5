"""Every failure as OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with its status.

Bodies are written with ASCII escapes, so that they can always be encoded, whatever text a message quotes.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from engine.sampling_params import InvalidRequestError
from server.async_engine import EngineDeadError, QueueFullError
from server.preprocess import Refused, validation_message
from server.protocol import ErrorDetail, ErrorResponse
from server.streams import ClientDisconnected

logger = logging.getLogger(__name__)
RETRY_AFTER_S = 1


class APIError(Exception):
    """An error to answer with: HTTP status plus OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def error_body(error: APIError) -> bytes:
    """OpenAI's error body as bytes (ASCII: always encodable)."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return json.dumps(ErrorResponse(error=detail).model_dump(), ensure_ascii=True).encode()


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(error), status_code=error.status, headers=headers, media_type="application/json")


async def ending_with_error_event(events: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
    """A response's server-sent events; if the server has to stop the stream (shutdown past its grace, a dead
    engine), it ends with an error event and `data: [DONE]` instead of a broken connection."""
    async with contextlib.aclosing(events) as inner:
        try:
            async for event in inner:
                yield event
        except (QueueFullError, EngineDeadError) as exc:
            yield f"data: {error_body(APIError(503, str(exc), type='server_error')).decode()}\n\n"
            yield "data: [DONE]\n\n"


def install_error_handlers(app: FastAPI) -> None:
    """Map validation, engine and HTTP errors to OpenAI error bodies."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(list(exc.errors()))
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused) -> Response:
        e = exc.error
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.code == "queue_full" else None
        return error_response(APIError(e.status, e.message, e.type, e.param, e.code), headers)

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> Response:
        error = APIError(503, str(exc), type="server_error", code="queue_full")
        return error_response(error, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> Response:
        return error_response(APIError(503, str(exc), type="server_error", code="engine_dead"))

    @app.exception_handler(InvalidRequestError)
    async def rejected(_: Request, exc: InvalidRequestError) -> Response:
        # The engine refuses requests it can never run, naming the field and the numbers.
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(ClientDisconnected)
    async def gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it; metrics count it

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = {408: "request_timeout", 413: "request_too_large"}.get(exc.status_code)
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind, code=code), exc.headers)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> Response:
        logger.exception("unexpected error")
        return error_response(
            APIError(500, f"internal error ({type(exc).__name__}); see the server log", type="server_error")
        )
