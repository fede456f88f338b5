"""RFC 9457 problem documents carrying the contract's error `code` (contract §3)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetwire.broker.base import BrokerUnavailableError
from fleetwire.domain.errors import ErrorCode, FleetwireError
from fleetwire.presence.base import PresenceUnavailableError
from fleetwire.store.base import StoreUnavailableError

STATUS = {
    ErrorCode.INVALID_JSON: 400,
    ErrorCode.INVALID_MESSAGE: 422,
    ErrorCode.UNKNOWN_TYPE: 400,
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.DEVICE_OFFLINE: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.TOO_LARGE: 413,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.INTERNAL: 500,
}
_BY_HTTP = {
    400: ErrorCode.INVALID_JSON,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.INVALID_MESSAGE,
    413: ErrorCode.TOO_LARGE,
}


def problem(
    code: ErrorCode, message: str, details: list[dict[str, Any]] | None = None, status: int | None = None
) -> JSONResponse:
    status = status or STATUS[code]
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": code.value.replace("_", " "),
        "status": status,
        "detail": message,
        "code": code.value,
    }
    if details:
        body["errors"] = details
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "5"
    return JSONResponse(body, status, headers=headers, media_type="application/problem+json")


def install(app: FastAPI) -> None:
    @app.exception_handler(FleetwireError)
    async def _fleetwire(_: Request, exc: FleetwireError) -> JSONResponse:
        return problem(exc.code, exc.message, exc.details)

    @app.exception_handler(StoreUnavailableError)
    @app.exception_handler(BrokerUnavailableError)
    @app.exception_handler(PresenceUnavailableError)
    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        return problem(ErrorCode.UNAVAILABLE, "a backing service is unavailable; retry later")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {"loc": [p for p in e.get("loc", ()) if p != "body"], "msg": str(e.get("msg", ""))}
            for e in exc.errors()
        ]
        if any(e.get("type") == "json_invalid" for e in exc.errors()):
            return problem(ErrorCode.INVALID_JSON, "request body is not valid JSON", details)
        return problem(ErrorCode.INVALID_MESSAGE, "request validation failed", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _BY_HTTP.get(exc.status_code, ErrorCode.INVALID_MESSAGE)
        return problem(code, str(exc.detail), status=exc.status_code)
