"""Every API error is built here, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("branchserve.api")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """Every 4xx and 5xx body."""

    error: ErrorDetail


WHY = {400: "The request is invalid (the message says what and where)", 401: "A missing or wrong key",
       403: "Not allowed with this server's settings", 404: "No such model, route or exemplar",
       409: "It exists already", 413: "The request body is too large", 429: "The queue is full: retry after Retry-After seconds",
       503: "The models are still loading, the server is shutting down, or its engine is not running",
       504: "The request ran longer than limits.request_timeout_s"}


def documented(*statuses: int) -> dict:
    """OpenAPI ``responses`` for these error statuses, all in OpenAI's error shape."""
    return {status: {"model": ErrorBody, "description": WHY[status]} for status in statuses}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")


def unauthorized(admin: bool = False) -> APIError:
    what = "admin key" if admin else "API key"
    return APIError(401, f"Missing or invalid {what}", type="authentication_error", code="invalid_api_key")


def queue_full(message: str) -> APIError:
    return APIError(429, message, type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})


def shutting_down(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="shutting_down", headers={"Retry-After": "5"})


def engine_unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="engine_unavailable", headers={"Retry-After": "5"})


def not_ready() -> APIError:
    return APIError(503, "The server is still loading its models", type="server_error", code="loading")


async def validation_error(request: Request, exc: RequestValidationError) -> APIError:
    """A request FastAPI could not read, said the way a client can act on: what is wrong, and where."""
    first = exc.errors()[0]
    kind, loc = first.get("type"), list(first.get("loc", ()))
    if kind == "json_invalid":
        body = await request.body()
        pos = loc[-1] if loc and isinstance(loc[-1], int) else 0
        line = body.count(b"\n", 0, pos) + 1
        column = pos - (body.rfind(b"\n", 0, pos) + 1) + 1
        why = (first.get("ctx") or {}).get("error", "invalid JSON")
        return bad_request(f"The request body is not valid JSON: {why} at line {line}, column {column}")
    if loc == ["body"]:
        content_type = request.headers.get("content-type", "")
        if not (await request.body()).strip():
            return bad_request("The request body is empty: send a JSON object")
        if "json" not in content_type.lower():
            return bad_request(f"Content-Type must be application/json (got {content_type or 'none'})")
        return bad_request("The request body must be a JSON object")
    param = ".".join(str(p) for p in loc if p != "body") or None
    message = first.get("msg", "invalid request").removeprefix("Value error, ")
    return bad_request(f"{param}: {message}" if param else message, param=param)


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, by its Content-Length or, without one, as
    soon as that many bytes have arrived; nothing larger is ever held in memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _refusal(self) -> JSONResponse:
        return APIError(413, f"The request body is larger than {self.max_bytes} bytes",
                        code="request_too_large").response()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refusal()(scope, receive, send)
        seen = 0
        started = refused = False

        async def counted_receive():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not started:
                    refused = True  # answer now; whatever the app makes of the exception below is dropped
                    await self._refusal()(scope, receive, send)
                    raise _TooLarge
            return message

        async def tracked_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, tracked_send)
        except _TooLarge:
            pass


class _TooLarge(Exception):
    pass


def install(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return (await validation_error(request, exc)).response()

    from server.engine.core import EngineUnavailable

    @app.exception_handler(EngineUnavailable)
    async def _unavailable(request: Request, exc: EngineUnavailable):
        return engine_unavailable(str(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # every method this path answers, not only those of the first route matched
            methods = set()
            for route in request.app.router.routes:
                regex, route_methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
                if regex is not None and route_methods and regex.match(request.url.path):
                    methods |= route_methods
            headers["Allow"] = ", ".join(sorted(methods))
        return APIError(exc.status_code, str(exc.detail), type=kind, headers=headers).response()

    @app.exception_handler(Exception)
    async def _fault(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return APIError(500, "Internal server error", type="server_error").response()
