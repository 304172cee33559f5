"""The OpenAPI document's parts that FastAPI cannot infer: request bodies parsed by the request workers rather
than by FastAPI, every error status, and the server-sent events of streamed responses.

Streams are declared as OpenAPI 3.2 does for `text/event-stream` before `itemSchema`: `schema` describes one
event, `{"data": ...}`, whose data is `[DONE]` or a JSON chunk (or an error) given by `contentSchema`. A
schema-aware fuzzer (schemathesis) then checks every streamed chunk, not just the first byte.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
)

REF = "#/components/schemas/{model}"
Responses = dict[int | str, dict[str, Any]]


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


AUTH_ERRORS: Responses = {
    400: _error("A Host header the server does not allow (--allowed-hosts)"),
    401: _error("Missing or wrong API key (when the server has one)"),
}
ADMIN_ERRORS: Responses = {
    **AUTH_ERRORS,
    400: _error(
        "A Host header the server does not allow, malformed JSON, a setting out of range (the message names the "
        "field), or one that cannot change on a running server"
    ),
}
GENERATION_ERRORS: Responses = {
    **AUTH_ERRORS,
    400: _error(
        "Invalid parameters, malformed JSON, text that is not valid Unicode, a prompt too long for the context, "
        "or a request over a per-request limit (the message names the field or the flag)"
    ),
    404: _error("Unknown model name"),
    408: _error("The body did not arrive within the body read timeout"),
    413: _error("Body larger than the server accepts"),
    415: _error("Content-Type other than application/json"),
    500: _error("A request worker died while preparing the request"),
    503: _error("Waiting queue full (retry after Retry-After seconds), server shutting down, or engine stopped"),
}


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads `model` as its JSON body."""
    schema = {"$ref": REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def generation_responses(chunk: type[BaseModel]) -> Responses:
    """The 200 response's second media type: a stream of events whose data are `chunk`s, an error, then [DONE]."""
    payload = {"anyOf": [{"$ref": REF.format(model=chunk.__name__)}, {"$ref": REF.format(model="ErrorResponse")}]}
    event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "const": "[DONE]"},
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": payload},
                ]
            }
        },
    }
    return {
        200: {
            "content": {"text/event-stream": {"schema": event}},
            "description": "JSON, or server-sent events (`data: {chunk}` per event, then `data: [DONE]`) when "
            "stream is true; a stream the server has to stop ends with an error event before [DONE]",
        }
    }


def install_openapi(app: FastAPI) -> None:
    """Generate the document once, adding the schemas that the routes' extras refer to."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes, openapi_version="3.1.0"
            )
            models = [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation")]
            models += [(m, "serialization") for m in (CompletionResponse, ChatCompletionChunk, ErrorResponse)]
            _, extra = models_json_schema(models, ref_template=REF)  # type: ignore[arg-type]
            known = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, definition in extra.get("$defs", {}).items():
                known.setdefault(name, definition)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
