"""The ASGI app of ``batchpool serve``: SPEC section 4's requests, onto a Service.

Every answer is JSON, errors included (``{"error": "..."}``: 400, 404, 405, 409, 413, 429, 500,
503); nothing a client sends can stop the server. A ``POST /jobs`` that waits sends its status
line and ``Location`` header as soon as the job is accepted (and recorded, with a journal), and
its body once the result is in: a client that gives up waiting still knows where to look.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from .service import Draining, Full, Live, Refused, Service

JSON = "application/json"
RETRY_AFTER = "1"  # seconds: jobs of a full queue finish all the time; try again soon


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


class Awaited(Response):
    """200 and ``Location`` now, the result as the body once the job is final."""

    def __init__(self, service: Service, live: Live) -> None:
        self.service = service
        self.live = live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        location = f"/jobs/{self.live.id}".encode()
        headers = [(b"content-type", JSON.encode()), (b"location", location)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        final = await self.service.wait(self.live)
        await send({"type": "http.response.body", "body": final.body()})


class Refusing:
    """The front of the app: a ``POST /jobs`` that must be refused (a full queue: 429; a drain:
    503) is answered here, before Starlette builds a request, reads a body or routes anything.
    At 4x the server's capacity most requests are refused: each costs the app ~6 us of CPU
    here against 22-26 us through Starlette (called in-process on the 2-core VM), next to
    ~60 us that uvicorn spends on any request."""

    def __init__(self, app: Starlette, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] == "/jobs":
            try:
                self.service.admissible()
            except Refused as exc:
                await error(*_refusal(exc))(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _refusal(exc: Refused) -> tuple[int, str, dict[str, str]]:
    """A full queue: 429; a drain: 503 (the server is ending: nothing to come back to); a pool
    or journal that cannot take the job: 503, worth trying again soon."""
    if isinstance(exc, Draining):
        return 503, str(exc), {}
    return 429 if isinstance(exc, Full) else 503, str(exc), {"Retry-After": RETRY_AFTER}


def build_app(service: Service, registry: CollectorRegistry, max_body: int) -> Refusing:
    """The app; ``max_body``: bytes a job's payload may take."""

    async def post_job(request: Request) -> Response:
        wait, priority = _options(request.query_params)
        try:
            payload = _decode(await _body(request, max_body))
            live = await service.submit(payload, priority)
        except Refused as exc:
            return error(*_refusal(exc))
        if wait:
            return Awaited(service, live)
        return JSONResponse({"id": live.id}, 202, headers={"Location": f"/jobs/{live.id}"})

    async def get_job(request: Request) -> Response:
        id = _id(request)
        found = service.lookup(id)
        if found is None:
            return error(404, f"no job {id}")
        if isinstance(found, str):
            return JSONResponse({"id": id, "state": found}, 202)
        return Response(found.body(), 200, media_type=JSON)

    async def delete_job(request: Request) -> Response:
        id = _id(request)
        outcome = service.cancel(id)
        if outcome is None:
            return error(404, f"no job {id}")
        if isinstance(outcome, str):
            why = "has a result" if outcome == "final" else f"is {outcome}"
            body = {"error": f"job {id} {why}: only a job not started can be cancelled"}
            return JSONResponse({**body, "id": id, "state": outcome}, 409)
        final = await service.wait(outcome)
        return Response(final.body(), 200, media_type=JSON)

    async def healthz(request: Request) -> Response:
        health = service.health()
        if service.draining:
            return JSONResponse({**health, "error": "the server is shutting down"}, 503)
        return JSONResponse(health)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes = [
        Route("/jobs", _guarded(post_job), methods=["POST"]),
        Route("/jobs/{id}", _guarded(get_job), methods=["GET"]),
        Route("/jobs/{id}", _guarded(delete_job), methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )
    return Refusing(app, service)


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Bad input as its JSON error."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except BadRequest as exc:
            return error(exc.status, str(exc))

    return guarded


def _options(query: Any) -> tuple[bool, int | None]:
    """``?wait=0|1`` and ``?priority=N`` (None: the task's own)."""
    wait = query.get("wait", "1")
    if wait not in ("0", "1", "false", "true"):
        raise BadRequest(400, f"wait must be 0 or 1, not {wait!r}")
    text = query.get("priority")
    try:
        priority = None if text is None else int(text)
    except ValueError:
        raise BadRequest(400, f"priority must be an integer, not {text!r}") from None
    return wait in ("1", "true"), priority


async def _body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to pass ``limit`` bytes."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise BadRequest(413, f"the body is {int(length)} bytes, over the limit of {limit}")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _decode(body: bytes) -> Any:
    if not body.strip():
        raise BadRequest(400, "the body must be the job's payload, as JSON (it is empty)")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise BadRequest(400, f"the body is not valid JSON: {exc}") from None


def _id(request: Request) -> int:
    text = request.path_params["id"]
    if not text.isdigit() or len(text) > 18:
        raise BadRequest(404, f"no job {text}")
    return int(text)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"not found: {request.url.path}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error(exc.status_code, message, dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return error(500, f"internal error: {type(exc).__name__}: {exc}")
