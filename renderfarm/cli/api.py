"""`renderfarm api`: the farm over HTTP (renderfarm/api): native /v1 endpoints, AUTOMATIC1111's /sdapi/v1,
Server-Sent Events, /metrics, OpenAPI docs at /docs. Stateless over the farm's Redis: run several behind a load
balancer. Off loopback it starts only on a farm in token mode (`renderfarm token create`)."""

from __future__ import annotations

import argparse
import logging

from renderfarm.cli.common import emit, resolve_url, settings_from
from renderfarm.errors import CliError

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    api = sub.add_parser("api", parents=[common, with_redis], help="serve the farm over HTTP (FastAPI on uvicorn)")
    api.add_argument("--host", default="127.0.0.1", help="interface to listen on (default loopback; any other "
                     "needs the farm in token mode)")
    api.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    api.add_argument("--a1111-timeout", type=float, default=3600.0, metavar="S",
                     help="how long an A1111 txt2img request waits for its images before its jobs are cancelled")
    api.add_argument("--no-webhooks", action="store_true",
                     help="do not deliver webhooks from this process (the farm head delivers them too)")
    api.set_defaults(func=cmd_api)


class InsecureApi(CliError):
    """Refused: an API reachable beyond loopback on a farm without team tokens would let anyone who reaches its
    port read every prompt and image and cancel every job."""


def check_binding(host: str, redis_client, keys) -> None:
    """InsecureApi unless `host` is loopback or the farm is in token mode (as a Redis off loopback must have a
    password: cluster/redis_server.py)."""
    from renderfarm.cluster import auth
    from renderfarm.cluster.redis_server import is_loopback_host

    if is_loopback_host(host) or auth.token_mode(redis_client, keys):
        return
    raise InsecureApi(
        f"refusing to listen on {host}: it is not loopback and this farm has no team tokens, so anyone who reaches "
        "the port could read every prompt and image and cancel every job. Create an admin token first "
        "(`renderfarm token create ADMIN --admin`), then team tokens for the clients; or listen on 127.0.0.1 "
        "behind a proxy that authenticates")


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from renderfarm.api import ApiContext, create_app
    from renderfarm.cluster.redis_server import redact

    if not 0 <= args.port <= 65535:
        raise CliError(f"--port {args.port}: expected 0..65535")
    if not args.a1111_timeout > 0:
        raise CliError(f"--a1111-timeout {args.a1111_timeout}: expected a positive number of seconds")
    url = resolve_url(args)
    ctx = ApiContext(url, a1111_timeout_s=args.a1111_timeout)
    check_binding(args.host, ctx.base.store.redis, ctx.base.store.keys)
    app = create_app(ctx, webhooks=not args.no_webhooks, settings=settings_from(args))
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    log.info("API for %s on http://%s:%d (docs: /docs; Ctrl-C stops it)", redact(url), args.host, args.port)
    if args.json:
        emit(args, {"ok": True, "url": f"http://{args.host}:{args.port}", "redis": redact(url)})
    server.run()
    return 0
