"""`renderfarm webhooks`: a team's signing secret (show, rotate) and the deliveries the farm made
(renderfarm/webhooks; docs/webhooks.md)."""

from __future__ import annotations

import argparse
import sys
import time

from renderfarm.cli.common import emit, resolve_url, team_token
from renderfarm.errors import CliError


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    hooks = sub.add_parser("webhooks", help="webhook signing secrets and deliveries")
    hooks_sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    secret = hooks_sub.add_parser("secret", parents=[common, with_redis],
                                  help="show a team's signing secret (made when it has none), or --rotate it")
    secret.add_argument("--team", required=True, help="the team whose deliveries it signs")
    secret.add_argument("--rotate", action="store_true",
                        help="make a new secret; the old one still signs beside it for 24 hours")
    secret.set_defaults(func=cmd_webhooks_secret)
    listing = hooks_sub.add_parser("deliveries", parents=[common, with_redis], help="webhook deliveries, newest first")
    listing.add_argument("--job", metavar="ID", help="the deliveries of one job")
    listing.add_argument("--batch", metavar="ID", help="the delivery of one batch's webhook")
    listing.add_argument("--state", choices=("pending", "delivered", "failed"))
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=cmd_webhooks_deliveries)


def _open(args: argparse.Namespace):
    """A Redis client and keys for the farm the flags name, and what the token may see (cluster/auth.py)."""
    from renderfarm.cluster import auth
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    client, keys = connect(resolve_url(args)), Keys()
    try:
        granted = auth.access(client, keys, team_token(args))
    except BaseException:
        client.close()
        raise
    return client, keys, granted


def cmd_webhooks_secret(args: argparse.Namespace) -> int:
    """Print a team's signing secret: kept in clear in Redis (the farm signs with it), so an admin's to see."""
    from renderfarm.errors import AuthError
    from renderfarm.webhooks.secrets import rotate_secret, team_secret

    client, keys, granted = _open(args)
    try:
        if not granted.admin:
            raise AuthError(f"a team's webhook secret needs an admin token; this token is for team {granted.team!r}")
        try:
            secret = (rotate_secret(client, keys, args.team) if args.rotate
                      else team_secret(client, keys, args.team, create=True))
        except ValueError as exc:
            raise CliError(f"--team: {exc}") from None
    finally:
        client.close()
    row = secret.public()
    if not args.json:
        note = ""
        if args.rotate and row["previous_until"]:
            until = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["previous_until"]))
            note = f" (rotated: the previous secret signs beside it until {until})"
        print(f"webhook signing secret of team {secret.team}{note}: give it to the owners of its receivers, and "
              "keep it out of logs", file=sys.stderr)
    emit(args, {"ok": True, "rotated": bool(args.rotate), **row}, secret.secret)
    return 0


def cmd_webhooks_deliveries(args: argparse.Namespace) -> int:
    from renderfarm.cluster.store import Store
    from renderfarm.webhooks.records import deliveries

    if args.limit < 1:
        raise CliError(f"--limit {args.limit}: must be at least 1")
    client, keys, granted = _open(args)
    try:
        rows = deliveries(Store(client, keys), job=args.job, state=args.state, limit=args.limit, batch=args.batch,
                          team=granted.team)
    finally:
        client.close()
    lines = []
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created"])) if r.get("created") else "?"
        outcome = r.get("last_error") or (f"HTTP {r['last_status']}" if r.get("last_status") else "")
        lines.append(f"{when}  {r['state']:<9} {r['event']:<15} {r.get('job') or r.get('batch') or '':<20} "
                     f"{r['attempts']:>2} attempt(s)  {r['url']}  {outcome}".rstrip())
    emit(args, {"ok": True, "deliveries": rows}, "\n".join(lines) or "no webhook deliveries")
    return 0
