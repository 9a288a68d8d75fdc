"""The ASGI app: its shared state (one Redis connection pool for every request), who is calling (team tokens),
and how the farm's errors become HTTP statuses. The endpoints live in native.py, a1111.py and sse.py."""

from __future__ import annotations

import base64
import binascii
import logging
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import HTTPException, RequestValidationError
from fastapi.responses import JSONResponse, Response

from renderfarm.client import FarmClient
from renderfarm.cluster import auth
from renderfarm.cluster.redis_settings import RedisSettings
from renderfarm.errors import (
    AuthError,
    BlobStoreError,
    CorruptRecord,
    JobNotFound,
    NoFarm,
    RedisUnavailable,
    RenderfarmError,
    ResultUnavailable,
    SpecError,
    WaitTimeout,
)

log = logging.getLogger(__name__)

__all__ = ["ApiContext", "Caller", "caller", "create_app"]

MAX_REQUEST_BYTES = 64 * 2**20  # a submit of 10,000 specs is well under this


@dataclass
class ApiContext:
    """What every request shares: the farm's Redis (one connection pool) and how long an A1111 request may
    wait for its images. Nothing here changes after start-up: the app is stateless over Redis."""

    redis: str | RedisSettings
    key_prefix: str = "rf"
    a1111_timeout_s: float = 3600.0  # an A1111 txt2img answers with its images: how long it may wait for them
    base: FarmClient = field(init=False)

    def __post_init__(self) -> None:
        self.base = FarmClient(self.redis, key_prefix=self.key_prefix, token="")

    def client(self, token: str | None) -> FarmClient:
        """A FarmClient speaking for `token` on the shared connection pool (a client per request would open a
        connection per request)."""
        return self.base.for_token(token)


@dataclass(frozen=True)
class Caller:
    """Who sent a request: their client (their token's team rules apply to every call) and what they may touch."""

    client: FarmClient
    access: auth.Access

    @property
    def team(self) -> str | None:
        return self.access.team


def credentials(request: Request) -> str | None:
    """The team token of a request: `Authorization: Bearer TOKEN`, or HTTP Basic auth's password (A1111 clients
    send --api-auth that way). None when there is none; 401 for a header that cannot be read."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer" and value:
        return value
    if scheme.lower() == "basic" and value:
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _unauthorized("Authorization: Basic credentials are not base64 of 'user:token'") from None
        _, sep, password = decoded.partition(":")
        if sep and password:
            return password
    raise _unauthorized("Authorization: expected 'Bearer <team token>' (or HTTP Basic auth with the token as password)")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": 'Bearer realm="renderfarm"'})


def caller(request: Request) -> Caller:
    """The FastAPI dependency of every endpoint that touches jobs: 401 in token mode without a valid token."""
    ctx: ApiContext = request.app.state.ctx
    client = ctx.client(credentials(request))
    try:
        granted = client.access()
    except AuthError as exc:
        raise _unauthorized(str(exc)) from None
    return Caller(client.with_access(granted), granted)  # checked once: the request's calls do not read it again


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": message, **extra}, status_code=status)


def spec_errors(message: str) -> list[str]:
    """A SpecError's message as one entry per problem (the client joins them with '; ')."""
    return [part.strip() for part in message.removesuffix("; nothing was enqueued").split("; ") if part.strip()]


# The farm's errors answered with their message and nothing else, by status.
PLAIN_STATUSES: dict[type[Exception], int] = {JobNotFound: 404, AuthError: 403, ResultUnavailable: 409,
                                              RedisUnavailable: 503, WaitTimeout: 504, NoFarm: 503}


def _plain(status: int):
    def handler(_: Request, exc: Exception) -> JSONResponse:
        return _error(status, str(exc))

    return handler


def install_error_handlers(app: FastAPI) -> None:
    """The farm's errors as HTTP statuses: a refused spec 422 (naming the job and field; nothing was enqueued),
    no such job 404, a token that may not 403, not done or expired 409, Redis or the result store down 503, a
    wait that ran out 504. Anything else is a bug: 500, logged with its traceback."""

    @app.exception_handler(SpecError)
    def _spec(_: Request, exc: SpecError) -> JSONResponse:
        return _error(422, str(exc), errors=spec_errors(str(exc)), enqueued=0)

    for error, status in PLAIN_STATUSES.items():
        app.add_exception_handler(error, _plain(status))

    @app.exception_handler(BlobStoreError)
    def _blobs(_: Request, exc: BlobStoreError) -> JSONResponse:
        return _error(503 if exc.kind in ("unreachable", "unavailable") else 502, str(exc))

    @app.exception_handler(CorruptRecord)
    def _corrupt(_: Request, exc: CorruptRecord) -> JSONResponse:
        log.error("a corrupt record: %s", exc)
        return _error(500, f"a record of the farm does not parse (the scheduler quarantines it): {exc}")

    @app.exception_handler(RenderfarmError)
    def _other(_: Request, exc: RenderfarmError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own: a body that is not JSON, a field of the wrong type, a query parameter out of range.
        errors = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            errors.append(f"{where}: {err.get('msg', 'invalid')}")
        return _error(422, "; ".join(errors) + "; nothing was enqueued", errors=errors, enqueued=0)


def documented_schema(app: FastAPI, ctx: ApiContext) -> dict[str, Any]:
    """The OpenAPI schema, with the job spec documented: the endpoints take specs as plain JSON objects (so that
    the client's own validation, the one every path shares, names each bad field), and the schema says what
    those objects hold: renderfarm.jobs.JobSpec, `model` one of this farm's catalog."""
    if app.openapi_schema:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    from renderfarm.jobs import JobSpec

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes)
    spec = JobSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(spec.pop("$defs", {}))
    names = ctx.base.catalog.names()
    if names:
        spec["properties"]["model"] = {**spec["properties"]["model"], "enum": names}
    components["JobSpec"] = spec
    ref = {"$ref": "#/components/schemas/JobSpec"}
    batch = components.get("BatchRequest", {}).get("properties", {}).get("jobs")
    if batch is not None:
        batch["items"] = ref
    one = schema["paths"].get("/v1/jobs", {}).get("post", {}).get("requestBody", {}).get("content", {})
    if "application/json" in one:
        one["application/json"]["schema"] = ref
    app.openapi_schema = schema
    return schema


def create_app(ctx: ApiContext, *, webhooks: bool = False, settings: Any = None) -> FastAPI:
    """The app over the farm of `ctx`. `webhooks`: also run a webhook dispatcher in this process (several API
    processes share the deliveries: renderfarm/webhooks), with the farm `settings` (config.Settings)."""
    from contextlib import asynccontextmanager

    from renderfarm.api import a1111, native, sse

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        dispatcher = None
        if webhooks:
            from renderfarm.webhooks import WebhookDispatcher

            dispatcher = WebhookDispatcher.for_settings(ctx.base.store, settings)
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            ctx.base.store.close()

    from renderfarm.cli import version

    app = FastAPI(
        title="renderfarm",
        version=version(),
        summary="A render farm for diffusion models: submit, follow and fetch jobs over HTTP.",
        description=(__doc__ or "") + "\n\nNative endpoints under /v1; AUTOMATIC1111's under /sdapi/v1.",
        lifespan=lifespan,
    )
    app.state.ctx = ctx
    app.openapi = lambda: documented_schema(app, ctx)
    install_error_handlers(app)
    @app.get("/metrics", tags=["operations"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def metrics(request: Request, who: Caller = Depends(caller)) -> Response:
        """The farm's metrics for Prometheus (renderfarm/metrics.py), read from Redis at each scrape. In token mode
        a scrape needs a token (Prometheus: `authorization: {credentials_file: ...}`)."""
        from renderfarm.metrics import render_metrics

        body, content_type = render_metrics(who.client.store, request.headers.get("accept"))
        return Response(body, media_type=content_type)

    app.include_router(native.router)
    app.include_router(sse.router)
    app.include_router(a1111.router)
    return app
