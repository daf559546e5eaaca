"""The HTTP API: routes, errors, lifecycle, and `run` for ``insertrec serve``.

Request bodies are parsed here with ``model_validate_json`` straight from the
bytes (FastAPI's own body handling decodes to Python first and validates
the response too, which costs more than this service's whole budget); the
same Pydantic models still describe every body in ``/openapi.json``.
Responses of the decision routes are the JSON stored in the decision log,
sent as bytes, so a retry gets exactly the same answer.

Errors: bad input is 422 ``{"error": {"field", "reason"}}``, a body over the
limit 413, a missing or unknown key 401, a key without the role 403, an
unknown order in an outcome 404, an ``order_id`` decided before for another
customer or body 409. An unreachable decision log is not an error: the
order is answered from the rules and spooled (`insertrec.serving.spool`); only
a worker that can neither log nor spool a decision answers 503 (a decision
that cannot be made durable is not given). Anything else is a bug: 500 with
a generic message, the details only in the server's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from insertrec.errors import InsertrecError
from insertrec.registry import AliasWatcher, resolve_model
from insertrec.serving import payloads as p
from insertrec.serving.auth import AuthError, KeyRing
from insertrec.serving.decisionlog import DecisionLog, LogUnavailable, OrderConflict, UnknownOrder
from insertrec.serving.hotswap import ModelHolder
from insertrec.serving.logs import uvicorn_log_config
from insertrec.serving.metrics import FLUSH_SECONDS, MULTIPROC_ENV, Metrics, Stopwatch
from insertrec.serving.middleware import (
    BodyLimit,
    Failure,
    Headers,
    Lane,
    Receive,
    RequestMetrics,
    Scope,
    Send,
    error_body,
    header,
)
from insertrec.serving.service import DecisionService
from insertrec.serving.settings import Settings, SettingsError
from insertrec.serving.spool import Spool, default_directory

__all__ = ["BadInput", "app_from_env", "create_app", "run"]

_log = logging.getLogger("insertrec.serving")
_JSON = "application/json"
_REPLAYED: Headers = [(b"idempotent-replayed", b"true")]
_REPLAY_EVERY_S = 0.5   # how soon a worker retries the log, and adopts a dead worker's spool
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": p.ErrorOut, "description": text} for code, text in (
        (401, "missing or unknown API key"), (403, "the key lacks the role"),
        (413, "body too large"), (422, "invalid input: the field and the reason"),
        (503, "neither the decision log nor the spool can be written; retry"))}


class BadInput(InsertrecError):
    """A request body refused; carries the field and the reason."""

    def __init__(self, detail: p.ErrorDetail):
        self.detail = detail
        super().__init__(f"{detail.field}: {detail.reason}" if detail.field else detail.reason)


def _parse(model: type[BaseModel] | TypeAdapter, body: bytes, tagged: bool = False) -> Any:
    try:
        if isinstance(model, TypeAdapter):
            return model.validate_json(body)
        return model.model_validate_json(body)
    except ValidationError as err:
        raise BadInput(p.first_error(err, tagged=tagged)) from None


class _LaneRoute(APIRoute):
    """The declaration of a route served by a `Lane`: its OpenAPI entry is a route's like any
    other, and its ASGI app is the lane itself (`_Service` hands the lane its requests before
    the middleware and the router)."""

    def __init__(self, path: str, endpoint: Any, **kwargs: Any):
        super().__init__(path, endpoint, **kwargs)
        self.app = endpoint


class _Service(FastAPI):
    """The FastAPI app, with the decision routes' lanes served first (see `insertrec.serving.middleware`)."""

    lanes: dict[str, Lane]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            lane = self.lanes.get(scope["path"])
            if lane is not None:
                await lane(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


def _body_doc(schema_name: str) -> dict[str, Any]:
    """OpenAPI request body for a route that parses its bytes itself."""
    return {"requestBody": {"required": True, "content": {_JSON: {
        "schema": {"$ref": f"#/components/schemas/{schema_name}"}}}},
        "security": [{"bearer": []}]}


def create_app(settings: Settings) -> FastAPI:
    """The service for one worker process (the decision log and the model load at startup)."""
    keys = KeyRing(settings.keys, insecure=settings.insecure_dev and not settings.keys)
    metrics = Metrics()
    log = DecisionLog(settings.db_url, settings.db_synchronous, settings.db_deadline_ms)
    holder = ModelHolder(settings.model, settings.catalog, on_swap=lambda loaded: _on_swap(log, metrics, loaded))
    spool = Spool(settings.spool_dir or default_directory(settings.db_url))
    service = DecisionService(holder, log, metrics, spool)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        log.create()
        log.start_checkpoints()
        holder.load(log.generation())
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
            loop.add_signal_handler(signal.SIGHUP, lambda: _request_reload(log, holder))
        follower = asyncio.create_task(_follow_reloads(log, holder, settings.reload_poll_seconds))
        replayer = asyncio.create_task(_replay_spool(service))
        flusher = asyncio.create_task(_flush_metrics(metrics))
        watcher = _watch_alias(settings, holder)
        try:
            yield
        finally:
            follower.cancel()
            replayer.cancel()
            flusher.cancel()
            if watcher is not None:
                watcher.stop()
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGHUP)
            log.close()
            spool.close()
            metrics.close()

    app = _Service(title="insertrec", version="1", lifespan=lifespan,
                   description="Per-order decisions on packaging, insert and coupon.")

    async def recommend(scope: Scope, body: bytes) -> tuple[bytes, Headers]:
        watch = Stopwatch(metrics)
        keys.check(header(scope, b"authorization"), "decide")
        order = _parse(p.OrderIn, body)
        watch.lap("validation")
        text, replayed = await service.decide(order, watch)
        return text.encode(), _REPLAYED if replayed else []

    async def recommend_batch(scope: Scope, body: bytes) -> tuple[bytes, Headers]:
        keys.check(header(scope, b"authorization"), "decide")
        try:
            items = p.parse_batch(body)
        except ValidationError as err:
            raise BadInput(p.first_error(err)) from None
        parts = await _decide_batch(service, metrics, items)
        return b'{"results":[' + b",".join(parts) + b"]}", []

    app.lanes = {path: Lane(path, limit, metrics, handle, _failure) for path, limit, handle in (
        ("/v1/recommendations", settings.max_body_bytes, recommend),
        ("/v1/recommendations:batch", settings.max_batch_body_bytes, recommend_batch))}
    lanes = APIRouter(route_class=_LaneRoute)
    lanes.add_api_route("/v1/recommendations", app.lanes["/v1/recommendations"], methods=["POST"],
                        name="recommend", openapi_extra=_body_doc("OrderIn"), tags=["decide"],
                        responses={200: {"model": p.DecisionOut, "description": "the box for this order"},
                                   **_ERRORS, 409: {"model": p.ErrorOut, "description": "the order_id was decided "
                                                    "before for another customer or body"}})
    lanes.add_api_route("/v1/recommendations:batch", app.lanes["/v1/recommendations:batch"], methods=["POST"],
                        name="recommend_batch", openapi_extra=_body_doc("BatchIn"), tags=["decide"],
                        responses={200: {"model": p.BatchOut, "description": "one result per order, in order"},
                                   **_ERRORS})
    app.include_router(lanes)

    @app.post("/v1/outcomes", openapi_extra=_body_doc("OutcomeIn"), tags=["feedback"],
              responses={200: {"model": p.OutcomeOut}, 404: {"model": p.ErrorOut,
                                                             "description": "no decision for this order"},
                         **_ERRORS})
    async def outcomes(request: Request) -> Response:
        keys.check(request.headers.get("authorization"), "feedback")
        outcome = _parse(p.OUTCOME, await request.body(), tagged=True)
        return Response(service.record_outcome(outcome).model_dump_json(), media_type=_JSON)

    @app.get("/v1/segments", response_model=p.SegmentsOut, tags=["decide"],
             responses={401: _ERRORS[401], 403: _ERRORS[403]}, openapi_extra={"security": [{"bearer": []}]})
    async def segments(request: Request) -> p.SegmentsOut:
        keys.check(request.headers.get("authorization"), "decide")
        loaded = _current(holder)
        return p.SegmentsOut(model_version=loaded.version, segments=[
            p.SegmentOut(segment=name, customers=n) for name, n in sorted(loaded.segment_sizes.items())])

    @app.post("/v1/admin/reload", status_code=202, response_model=p.ReloadOut, tags=["admin"],
              responses={401: _ERRORS[401], 403: _ERRORS[403], 503: _ERRORS[503]},
              openapi_extra={"security": [{"bearer": []}]})
    async def reload(request: Request) -> p.ReloadOut:
        keys.check(request.headers.get("authorization"), "admin")
        return p.ReloadOut(status="reloading", generation=_request_reload(log, holder))

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz", response_model=p.ReadyOut, tags=["ops"],
             responses={503: {"model": p.ReadyOut, "description": "cannot make decisions durable"}})
    async def readyz(request: Request) -> Response:
        """Degraded (answering from the rules, or from the previous model; a decision log that cannot
        be reached, or decisions spooled and not yet in it) is still ready, 200: a warehouse is
        better served by the rules than by no answer. Not ready, 503, is a worker that cannot answer
        at all: neither the log nor the spool can be written, or it is still starting. The reasons
        name files and error types only for an admin key: anyone can ask this route."""
        admin = _is_admin(keys, request.headers.get("authorization"))
        loaded = holder.current
        reasons = []
        try:
            log.ping()
            down = service.log_down   # this worker spools until it has replayed what it spooled
        except LogUnavailable as exc:
            unusable = spool.usable()
            if unusable is not None:
                out = p.ReadyOut(status="unavailable", model_version=loaded.version if loaded else None,
                                 reason=f"{exc}; {unusable}" if admin else
                                 "neither the decision log nor the spool can be written")
                return Response(out.model_dump_json(), status_code=503, media_type=_JSON)
            down = str(exc)
        if down is not None:
            reasons.append(down if admin else "the decision log cannot be reached; answering from the "
                                              "catalog's rules and spooling decisions")
        if loaded is None:
            out = p.ReadyOut(status="unavailable", model_version=None, reason="starting")
            return Response(out.model_dump_json(), status_code=503, media_type=_JSON)
        if len(spool):
            reasons.append(f"{len(spool)} spooled decisions not yet in the decision log")
        if loaded.reason is not None:
            reasons.append(loaded.reason if admin else "the model could not be loaded; answering from the "
                                                       "catalog's rules (the reason: with an admin key)")
        out = p.ReadyOut(status="degraded" if reasons else "ready", model_version=loaded.version,
                         reason="; ".join(reasons) or None)
        return Response(out.model_dump_json(), media_type=_JSON)

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {metrics.content_type: {"schema": {"type": "string"}}}}})
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    _install_errors(app)
    _install_openapi(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    app.state.service = service
    return app


async def _decide_batch(service: DecisionService, metrics: Metrics, items: list[Any]) -> list[bytes]:
    """Every order of a batch, in order. A customer's orders are decided one after another (each
    knowing the one before); different customers' at once, so they share commits."""
    by_customer: dict[Any, list[int]] = {}
    for i, item in enumerate(items):
        customer = item.get("customer_id") if isinstance(item, dict) else None
        by_customer.setdefault(customer if isinstance(customer, str) else ("invalid", i), []).append(i)
    parts: list[bytes] = [b""] * len(items)

    async def one_customer(indices: list[int]) -> None:
        for i in indices:
            parts[i] = await _batch_item(service, metrics, i, items[i])

    await asyncio.gather(*(one_customer(indices) for indices in by_customer.values()))
    return parts


async def _batch_item(service: DecisionService, metrics: Metrics, index: int, item: Any) -> bytes:
    """One order of a batch as its JSON result: a failure stays within its own entry."""
    order_id = item.get("order_id") if isinstance(item, dict) and isinstance(item.get("order_id"), str) else None
    try:
        watch = Stopwatch(metrics)
        order = p.OrderIn.model_validate_json(json.dumps(item))  # the JSON rules, as for one order
        watch.lap("validation")
        text, _ = await service.decide(order, watch)
        return b'{"index":%d,"order_id":%s,"status":200,"decision":%s}' % (
            index, json.dumps(order.order_id).encode(), text.encode())
    except ValidationError as err:
        status, detail = 422, p.first_error(err, prefix=("orders", index))
    except LogUnavailable as exc:
        status, detail = 503, p.ErrorDetail(field=None, reason=str(exc))
    except OrderConflict as exc:
        status, detail = 409, p.ErrorDetail(field="order_id", reason=str(exc))
    except InsertrecError as exc:
        status, detail = 422, p.ErrorDetail(field=None, reason=str(exc))
    out = p.BatchItemOut(index=index, order_id=order_id, status=status, error=detail)
    return out.model_dump_json().encode()


def _is_admin(keys: KeyRing, authorization: str | None) -> bool:
    try:
        keys.check(authorization, "admin")
        return True
    except AuthError:
        return False


def _current(holder: ModelHolder) -> Any:
    if holder.current is None:
        raise LogUnavailable("the service is still starting")
    return holder.current


def _reload(holder: ModelHolder, generation: int) -> None:
    """Start loading the model again (the alias moved); requests go on with the current one."""
    holder.reload_in_background(generation)


def _on_swap(log: DecisionLog, metrics: Metrics, loaded: Any) -> None:
    log.sync_inventory(loaded.fallback.catalog)
    metrics.model_loads.labels("degraded" if loaded.reason else "ok").inc()
    metrics.degraded.set(1 if loaded.reason else 0)


def _watch_alias(settings: Settings, holder: ModelHolder) -> AliasWatcher | None:
    """For ``models:/NAME@ALIAS``: each worker polls the alias and reloads itself when it moves.

    MLflow is only touched in the watcher's thread; a reload resolves the
    alias afresh and swaps the engine in without failing a request in flight.
    """
    if settings.model is None or not settings.model.startswith("models:/") or "@" not in settings.model:
        return None
    current = holder.current
    return AliasWatcher(settings.model, settings.alias_poll_seconds,
                        lambda _: _reload(holder, current.generation if current else 0),
                        current=resolve_model(settings.model)).start()


def _request_reload(log: DecisionLog, holder: ModelHolder) -> int:
    """Ask every worker (through the log) to reload; this one starts now."""
    generation = log.bump_generation()
    holder.reload_in_background(generation)
    _log.info("reload requested", extra={"event": "reload_requested", "generation": generation})
    return generation


async def _follow_reloads(log: DecisionLog, holder: ModelHolder, every: float) -> None:
    """Reload when another worker was asked to: the log holds the generation all should serve."""
    while True:
        await asyncio.sleep(every)
        try:
            generation = log.generation()
        except LogUnavailable:
            continue
        current = holder.current
        if current is not None and generation > current.generation:
            thread = holder.reload_in_background(generation)
            await asyncio.to_thread(thread.join)


async def _flush_metrics(metrics: Metrics) -> None:
    """Histograms tallied in this worker reach the other workers' scrapes (`insertrec.serving.metrics`)."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        metrics.flush()


async def _replay_spool(service: DecisionService) -> None:
    """Adopt dead workers' spools and replay spooled decisions whenever the log answers."""
    while True:
        await asyncio.sleep(_REPLAY_EVERY_S)
        try:
            await service.replay_spool()
        except Exception as exc:  # a bug here must not end the loop: decisions would stay spooled
            _log.error("spool replay failed", extra={"event": "spool_replay_failed",
                                                     "error_type": type(exc).__name__}, exc_info=exc)


def _failure(exc: Exception) -> Failure:
    """The status, field, reason and headers a failed request is answered with, on every route.
    Anything unforeseen is a bug: 500 with a generic reason, the details only in the server's log."""
    if isinstance(exc, BadInput):
        return 422, exc.detail.field, exc.detail.reason, []
    if isinstance(exc, AuthError):
        return exc.status, "Authorization", str(exc), [(b"www-authenticate", b"Bearer")] if exc.status == 401 else []
    if isinstance(exc, UnknownOrder | OrderConflict):
        return 404 if isinstance(exc, UnknownOrder) else 409, "order_id", str(exc), []
    if isinstance(exc, LogUnavailable):
        _log.error("decision log and spool unavailable", extra={"event": "log_unavailable", "reason": str(exc)})
        return 503, None, "decisions cannot be recorded right now; retry shortly", [(b"retry-after", b"1")]
    if isinstance(exc, InsertrecError):
        return 422, None, str(exc), []
    _log.error("unexpected error", extra={"event": "internal_error", "error_type": type(exc).__name__}, exc_info=exc)
    return 500, None, "internal error", []


def _install_errors(app: FastAPI) -> None:
    def error(status: int, reason: str, field: str | None = None,
              headers: dict[str, str] | None = None) -> Response:
        return Response(error_body(field, reason), status_code=status, headers=headers, media_type=_JSON)

    async def failed(_: Request, exc: Exception) -> Response:
        status, field, reason, headers = _failure(exc)
        return error(status, reason, field, {k.decode(): v.decode() for k, v in headers})

    app.add_exception_handler(InsertrecError, failed)
    app.add_exception_handler(Exception, failed)

    @app.exception_handler(RequestValidationError)
    async def validation(_: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path", "header")]
        return error(422, str(first.get("msg")), ".".join(loc) or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))


def _install_openapi(app: FastAPI) -> None:
    """Add the bodies the routes parse themselves, and the bearer scheme, to the schema."""
    bodies: dict[str, TypeAdapter[Any]] = {"OrderIn": TypeAdapter(p.OrderIn), "BatchIn": TypeAdapter(p.BatchIn),
                                           "OutcomeIn": p.OUTCOME}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            components = schema.setdefault("components", {})
            found = components.setdefault("schemas", {})
            for name, adapter in bodies.items():
                body = adapter.json_schema(ref_template="#/components/schemas/{model}")
                found.update(body.pop("$defs", {}))
                found[name] = body
            components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """The factory each uvicorn worker calls: settings come back from the environment `run` set."""
    return create_app(Settings.load())


def run(model: str | None = None, host: str | None = None, port: int | None = None, workers: int | None = None,
        insecure_dev: bool = False, config: str | None = None) -> None:
    """``insertrec serve``: check the settings and start uvicorn with ``workers`` processes.

    Arguments left None come from the environment, then the config file. Refuses
    to start without API keys unless ``insecure_dev``, and without anything to
    answer with (no loadable model and no catalog to fall back on).
    """
    import uvicorn

    settings = Settings.load(config, model=model, host=host, port=port, workers=workers,
                             insecure_dev=insecure_dev)
    if not settings.keys and not settings.insecure_dev:
        raise SettingsError("refusing to start without API keys: set INSERTREC_API_KEYS or "
                            "INSERTREC_API_KEYS_FILE (or pass --insecure-dev on a development machine)")
    log = DecisionLog(settings.db_url, settings.db_synchronous, settings.db_deadline_ms)
    try:  # fail here, with the reason, not in every worker; and set up the log before they start
        log.create()
        ModelHolder(settings.model, settings.catalog,
                    on_swap=lambda loaded: log.sync_inventory(loaded.fallback.catalog)).load()
    finally:
        log.close()
    os.environ.update(settings.to_environ())
    if settings.workers > 1 and not os.environ.get(MULTIPROC_ENV):
        directory = Path(settings.metrics_dir or tempfile.mkdtemp(prefix="insertrec-metrics-"))
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        os.environ[MULTIPROC_ENV] = str(directory)
    uvicorn.run("insertrec.serving.app:app_from_env", factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, access_log=False, log_config=uvicorn_log_config(settings.log_level),
                timeout_graceful_shutdown=10, server_header=False)
