"""`renderfarm token`: team tokens (who may read and cancel which team's jobs): create, list, revoke.
Redis keeps only each token's SHA-256 digest (cluster/auth.py)."""

from __future__ import annotations

import argparse
import sys
import time

from renderfarm.cli.common import emit, resolve_url, team_token


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser,
             with_redis: argparse.ArgumentParser) -> None:
    token = sub.add_parser("token", help="team tokens: who may read and cancel which team's jobs")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    create = token_sub.add_parser("create", parents=[common, with_redis], help="make a token (printed once)")
    create.add_argument("team", metavar="TEAM", help="the team the token submits for and sees")
    create.add_argument("--admin", action="store_true", help="may do everything, for every team")
    create.add_argument("--label", default="", help="a note: who or what holds it")
    create.set_defaults(func=cmd_token_create)
    listing = token_sub.add_parser("list", parents=[common, with_redis], help="tokens (never the tokens themselves)")
    listing.set_defaults(func=cmd_token_list)
    revoke = token_sub.add_parser("revoke", parents=[common, with_redis], help="revoke a token by its digest")
    revoke.add_argument("digest", metavar="DIGEST_PREFIX", help="the digest `token list` shows (6+ hex characters)")
    revoke.set_defaults(func=cmd_token_revoke)


def _token_admin(args: argparse.Namespace, action: str):
    """A Redis client and keys for managing tokens; in token mode only an admin token may (cluster/auth.py)."""
    from renderfarm.cluster import auth
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    client, keys = connect(resolve_url(args)), Keys()
    try:
        if auth.token_mode(client, keys):
            auth.require_admin(client, keys, team_token(args), action)
    except BaseException:
        client.close()
        raise
    return client, keys


def cmd_token_create(args: argparse.Namespace) -> int:
    """Print a new team token once: Redis keeps only its SHA-256 digest."""
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "creating a token")
    try:
        token, record = auth.create_token(client, keys, args.team, admin=args.admin, label=args.label or "")
    finally:
        client.close()
    if not args.json:
        kind = "admin token" if record.admin else "token"
        print(f"{kind} for team {record.team} (digest {record.public()['digest']}): shown only now; give it to "
              "its holder as RENDERFARM_TOKEN", file=sys.stderr)
    emit(args, {"ok": True, "token": token, **record.public()}, token)
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "listing tokens")
    try:
        rows = [record.public() for record in auth.list_tokens(client, keys)]
    finally:
        client.close()
    lines = [f"{r['digest']}  {r['team']:<16} {'admin' if r['admin'] else 'team ':<5}  "
             f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(r['created'])) if r['created'] else '?':<16}  "
             f"{r['label']}" for r in rows]
    human = "\n".join(lines) or "no tokens: the farm is open (every client may read and cancel every job)"
    emit(args, {"ok": True, "token_mode": bool(rows), "tokens": rows}, human)
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from renderfarm.cluster import auth

    client, keys = _token_admin(args, "revoking a token")
    try:
        record = auth.revoke_token(client, keys, args.digest)
        still = auth.token_mode(client, keys)
    finally:
        client.close()
    human = f"revoked {record.public()['digest']} (team {record.team})"
    if not still:
        human += "; no tokens left: the farm is open again"
    emit(args, {"ok": True, "revoked": record.public(), "token_mode": still}, human)
    return 0
