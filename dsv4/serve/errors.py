"""Errors in OpenAI's format: whatever went wrong, the client gets its status and
{"error": {"message", "type", "param", "code"}} (protocol.ErrorResponse), never a traceback or FastAPI's own body.

    APIError                 raised by the routes: a status and the error's fields (400 bad request, 401 key, 503 ...)
    RequestValidationError   a body that breaks the schema: 400 naming the first offending field (`messages.0.role`)
    HTTPException            Starlette's own (404 unknown path, 405 wrong method): its status, its text
    anything else            500 "internal error", logged with its traceback
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv4.serve import protocol as api

log = logging.getLogger("dsv4.serve")
ERRORS = {400: {"model": api.ErrorResponse}, 401: {"model": api.ErrorResponse}}  # documented in /openapi.json
SCALAR_TAGS = ("str", "int", "float", "bool")  # the member tags pydantic puts in the location of a union's error


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.detail = status, api.ErrorDetail(message=message, type=type, param=param, code=code)


def error_response(status: int, detail: api.ErrorDetail) -> JSONResponse:
    return JSONResponse(api.ErrorResponse(error=detail).model_dump(), status_code=status)


def validation_detail(err: dict) -> api.ErrorDetail:
    """pydantic's first complaint about a body -> an error naming the field, or saying the body is no JSON object."""
    where = []
    for part in err.get("loc", ())[1:]:  # after "body"; a union's member tag ("str", "list[str]") ends the path
        if isinstance(part, str) and (part in SCALAR_TAGS or "[" in part or "-" in part):
            break
        where.append(str(part))
    if err.get("type") == "json_invalid" or not where:
        message = "the request body must be a JSON object (malformed JSON, or not an object)"
    else:
        message = f"{'.'.join(where)}: {err.get('msg')}"
    return api.ErrorDetail(message=message, type="invalid_request_error", param=".".join(where) or None,
                           code=err.get("type"))


async def api_error(request: Request, e: APIError) -> JSONResponse:
    return error_response(e.status, e.detail)


async def invalid_body(request: Request, e: RequestValidationError) -> JSONResponse:
    return error_response(400, validation_detail(e.errors()[0]))


async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return error_response(e.status_code, api.ErrorDetail(message=str(e.detail), type="invalid_request_error"))


async def internal_error(request: Request, e: Exception) -> JSONResponse:
    log.exception("unhandled error")
    return error_response(500, api.ErrorDetail(message="internal error", type="server_error"))


def add_error_handlers(app: FastAPI):
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
