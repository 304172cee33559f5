"""Every failure as OpenAI's error body, `{"error": {"message", "type", "param", "code"}}`, with its status."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from engine.sampling_params import InvalidRequestError
from server.async_engine import EngineDeadError, QueueFullError
from server.chat_template import ChatTemplateError
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


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=error.status, headers=headers)


def error_body(error: APIError) -> bytes:
    """The same body as bytes, for middleware that answers before the app runs."""
    detail = ErrorDetail(message=error.message, type=error.type, param=error.param, code=error.code)
    return json.dumps(ErrorResponse(error=detail).model_dump()).encode()


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


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type names to the location; the field is the first part.
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param)
    if param == "prompt" and len(loc) > 1:  # every member of the prompt union refused it
        return APIError(400, "prompt must be a string, a list of strings, token ids or lists of token ids", param=param)
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(part for part in loc if not any(c in part for c in "[]()")) or "body"
    return APIError(400, f"{where}: {message}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Map validation, engine and HTTP errors to OpenAI error bodies."""

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(ChatTemplateError)
    async def template(_: Request, exc: ChatTemplateError) -> JSONResponse:
        return error_response(APIError(400, str(exc), param="messages"))

    @app.exception_handler(QueueFullError)
    async def queue_full(_: Request, exc: QueueFullError) -> JSONResponse:
        error = APIError(503, str(exc), type="server_error", code="queue_full")
        return error_response(error, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(APIError(503, str(exc), type="server_error", code="engine_dead"))

    @app.exception_handler(InvalidRequestError)
    async def rejected(_: Request, exc: InvalidRequestError) -> JSONResponse:
        # The engine refuses requests it can never run, naming the field and the numbers.
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(ClientDisconnected)
    async def gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request": nobody reads it; metrics count it

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        code = "request_too_large" if exc.status_code == 413 else None
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind, code=code))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {exc!r}", type="server_error"))
