"""The service's ASGI layer: request size limits, request metrics, and the decision routes' lanes.

Plain ASGI rather than Starlette's ``BaseHTTPMiddleware``, which costs tens
of microseconds per request, a sizeable share of this service's budget.
The decision routes go further (`Lane`): the application hands them their
request before its middleware and router, and a lane limits the body,
reads it, calls its handler, maps a failure to the API's error answer and
counts the request, all in one layer. FastAPI's stack of middleware,
routing, exception handling and ``Response`` cost as much CPU per decision
as the service's own work on it outside the model (bench/asgi_cost.py).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from insertrec.serving.metrics import Metrics

__all__ = ["BodyLimit", "BodyTooLarge", "Failure", "Headers", "Lane", "Receive", "RequestMetrics", "Scope", "Send",
           "error_body", "header", "read_body", "send_error"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]
#: what an exception is answered with: status, field, reason, extra headers
Failure = tuple[int, str | None, str, Headers]


class BodyTooLarge(Exception):
    """A request body over its route's limit (413)."""

    def __init__(self, limit: int):
        self.limit = limit
        super().__init__(f"request body larger than {limit} bytes")


def error_body(field: str | None, reason: str) -> bytes:
    """The API's error shape, ``{"error": {"field", "reason"}}``."""
    return orjson.dumps({"error": {"field": field, "reason": reason}})


async def send_error(send: Send, status: int, reason: str, field: str | None = None,
                     headers: Headers | None = None) -> None:
    """A complete JSON error response in the API's error shape."""
    await _respond(send, status, error_body(field, reason), headers or [])


async def _respond(send: Send, status: int, body: bytes, headers: Headers) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    """A request header's value (``name`` lower-case), as Starlette decodes it (latin-1)."""
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _declared_length(scope: Scope, limit: int) -> bool:
    """Whether the request declares a Content-Length; raises BodyTooLarge if it is over ``limit``
    (or not a number)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit() or int(value) > limit:
                raise BodyTooLarge(limit)
            return True
    return False


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None if the client went away; BodyTooLarge past ``limit``,
    declared or (chunked) as it arrives, without reading more than the limit."""
    _declared_length(scope, limit)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        chunks.append(chunk)
        if not message.get("more_body"):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class BodyLimit:
    """413 for a body over ``limit``, before the application reads it (the lanes limit their own).

    A body without Content-Length (chunked) is read here up to the limit and
    handed on, so no route ever sees more.
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            if _declared_length(scope, self.limit):
                await self.app(scope, receive, send)
                return
            body = await read_body(scope, receive, self.limit)
        except BodyTooLarge as exc:
            await _too_large(send, exc)
            return
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


async def _too_large(send: Send, exc: BodyTooLarge) -> None:
    await send_error(send, 413, str(exc), headers=[(b"connection", b"close")])


class RequestMetrics:
    """Counts every request by route template and status, and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")  # a template: bounded label values
            self.metrics.observe_request(route, status, time.perf_counter() - start)


class Lane:
    """A POST route as one plain ASGI layer: the body read within ``limit``, ``handle(scope, body)``
    returning the response JSON and extra headers, any exception answered as ``failure(exc)``
    says, the request counted and timed under ``path`` (as `RequestMetrics` would).

    FastAPI describes the route in ``/openapi.json`` from the route's declaration; it takes
    nothing from this callable's signature (there is none to take).
    """

    __signature__ = inspect.Signature()

    def __init__(self, path: str, limit: int, metrics: Metrics,
                 handle: Callable[[Scope, bytes], Awaitable[tuple[bytes, Headers]]],
                 failure: Callable[[Exception], Failure]):
        self.path, self.limit, self.metrics, self.handle, self.failure = path, limit, metrics, handle, failure
        self.__doc__ = None   # else FastAPI publishes this class's docstring as the route's description

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = time.perf_counter()
        try:
            body = await read_body(scope, receive, self.limit)
            if body is None:   # the client went away before sending its order: nothing to answer
                return
            answer, headers = await self.handle(scope, body)
            status = 200
        except BodyTooLarge as exc:
            status, answer, headers = 413, error_body(None, str(exc)), [(b"connection", b"close")]
        except Exception as exc:
            status, field, reason, headers = self.failure(exc)
            answer = error_body(field, reason)
        await _respond(send, status, answer, headers)
        self.metrics.observe_request(self.path, status, time.perf_counter() - start)
