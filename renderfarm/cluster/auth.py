"""Team tokens: which team a client speaks for, so that teams sharing a farm see and cancel only their own jobs.

What a token is
    A random secret (`rft_` + `secrets.token_urlsafe(32)`, 256 bits), shown once when it is created and never
    again. The prefix names what it is and keeps it from starting with '-', which `--token TOKEN` would take
    for a flag.
    Redis keeps only its SHA-256 digest, in one hash (`Keys.tokens`, `rf:tokens`): field = hex digest, value =
    JSON `{"team": ..., "admin": bool, "created": epoch seconds, "label": ...}`. JSON only, never pickle.
    Losing a token means revoking it and creating another; nothing can show it again.

Open farm and token mode
    With no token in Redis the farm is open, the single-user default: every client may do everything, as before
    tokens existed. Once at least one token exists the farm is in token mode:
    - a client without a valid token (`FarmClient(url, token=...)`, or RENDERFARM_TOKEN) may not read or write
      any job, nor the queue overview;
    - a team token submits for its own team only (a spec that leaves `team` out, or at its default, gets the
      token's team; one naming another team is rejected and nothing is enqueued), and reads, follows, waits
      for, cancels and asks estimates of its team's jobs only;
    - an admin token may do everything, for every team: drain nodes, act in the dashboard, manage tokens.
    The first token must be an admin token, and the last admin token cannot be revoked while other tokens
    remain: a farm in token mode always has someone who can manage it.

What this protects, honestly
    Tokens are checked by `FarmClient`, the `renderfarm` CLI and the dashboard's actions: by the farm's own
    code, in the client's process. They are not Redis ACLs. Anyone holding the Redis password can read and
    write every key directly (or delete `rf:tokens`, which returns the farm to open mode) and so bypasses them.
    The Redis password (and TLS, and keeping Redis off untrusted networks) is the trust boundary; team tokens
    keep teams that share a farm, and its Redis password, from reading or cancelling each other's work by
    accident or through the supported tools. They are not a defence against a hostile holder of the password.
    The dashboard's read-only page shows every team's jobs to whoever can open it (it listens on loopback by
    default).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from renderfarm.cluster.keys import Keys
from renderfarm.errors import AuthError

__all__ = [
    "Access",
    "AuthError",
    "TokenRecord",
    "access",
    "create_token",
    "is_admin_token",
    "list_tokens",
    "lookup",
    "require_admin",
    "revoke_token",
    "token_digest",
    "token_mode",
]

TOKEN_BYTES = 32
TOKEN_PREFIX = "rft_"
DIGEST_SHOWN = 12  # hex characters of a digest that `token list` shows; enough to name one for `revoke`
MIN_REVOKE_PREFIX = 6
MAX_LABEL = 200
TEAM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # as JobSpec.team
_HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class TokenRecord:
    """What Redis knows of one token: never the token itself."""

    digest: str
    team: str
    admin: bool
    created: float | None
    label: str

    def public(self) -> dict[str, Any]:
        """The row `renderfarm token list` shows: a digest prefix names it; the token is nowhere."""
        return {"team": self.team, "admin": self.admin, "label": self.label, "created": self.created,
                "digest": self.digest[:DIGEST_SHOWN]}


@dataclass(frozen=True)
class Access:
    """What the bearer of a token (or of none) may touch. `team` None: every team."""

    team: str | None
    admin: bool
    token_mode: bool

    def may_touch(self, team: str) -> bool:
        return self.team is None or self.team == team


OPEN = Access(team=None, admin=True, token_mode=False)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _record(digest: str, raw: bytes | str | None) -> TokenRecord | None:
    """A stored record; an unreadable one is kept visible (team '?') so that `token list` can show it."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("team"), str):
            raise ValueError("not a token record")
        created = data.get("created")
        return TokenRecord(digest=digest, team=data["team"], admin=data.get("admin") is True,
                           created=float(created) if isinstance(created, (int, float)) else None,
                           label=str(data.get("label") or ""))
    except (ValueError, TypeError):
        return TokenRecord(digest=digest, team="?", admin=False, created=None, label="(unreadable record)")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def token_mode(client: redis.Redis, keys: Keys) -> bool:
    """True once at least one token exists."""
    return bool(client.hlen(keys.tokens))


def list_tokens(client: redis.Redis, keys: Keys) -> list[TokenRecord]:
    """Every token's record, oldest first."""
    records = [_record(_text(d), raw) for d, raw in client.hgetall(keys.tokens).items()]
    return sorted((r for r in records if r is not None), key=lambda r: (r.created or 0.0, r.digest))


def lookup(client: redis.Redis, keys: Keys, token: str | None) -> TokenRecord | None:
    """The record of `token`, or None when it is not (or no longer) a token of this farm."""
    if not token:
        return None
    digest = token_digest(token)
    record = _record(digest, client.hget(keys.tokens, digest))
    return None if record is None or record.team == "?" else record


def access(client: redis.Redis, keys: Keys, token: str | None) -> Access:
    """What `token` may touch: everything on an open farm; its team (or everything, for an admin) in token
    mode. Raises AuthError in token mode when the token is missing or not valid. One round trip."""
    with client.pipeline(transaction=False) as pipe:
        pipe.hlen(keys.tokens)
        pipe.hget(keys.tokens, token_digest(token) if token else "-")
        count, raw = pipe.execute()
    if not count:
        return OPEN
    if not token:
        raise AuthError(
            "this farm requires a team token: FarmClient(url, token=...), or for the CLI --token or the "
            "RENDERFARM_TOKEN environment variable (an admin creates one: `renderfarm token create TEAM`)"
        )
    record = _record(token_digest(token), raw)
    if record is None or record.team == "?":
        raise AuthError("the team token is not valid on this farm (revoked, mistyped, or another farm's)")
    return Access(team=None if record.admin else record.team, admin=record.admin, token_mode=True)


def require_admin(client: redis.Redis, keys: Keys, token: str | None, action: str) -> Access:
    """Nothing to check on an open farm; in token mode, `action` needs an admin token."""
    try:
        granted = access(client, keys, token)
    except AuthError as exc:
        raise AuthError(f"{action} needs an admin token; {exc}") from None
    if not granted.admin:
        raise AuthError(f"{action} needs an admin token; this token is for team {granted.team!r}")
    return granted


def is_admin_token(client: redis.Redis, keys: Keys, token: str | None) -> bool:
    """True when `token` is an admin token of this farm (the dashboard accepts one for its actions)."""
    record = lookup(client, keys, token)
    return record is not None and record.admin


def create_token(
    client: redis.Redis, keys: Keys, team: str, *, admin: bool = False, label: str = "", now: float | None = None
) -> tuple[str, TokenRecord]:
    """Make a token for `team`; returns (the token, shown once; its record). The caller checks who may create
    one (`require_admin`); this refuses a first token that is not an admin token."""
    if not isinstance(team, str) or not TEAM_PATTERN.fullmatch(team):
        raise ValueError(f"team {team!r} must be 1..64 letters, digits, '_', '.' or '-', starting with a letter "
                         "or digit (as a job's team)")
    label = label or ""
    if len(label) > MAX_LABEL or not label.isprintable():
        raise ValueError(f"label must be printable and at most {MAX_LABEL} characters")
    if not admin and not token_mode(client, keys):
        raise AuthError("the first token must be an admin token (--admin): once a token exists, only an admin "
                        "token can create, list or revoke tokens")
    token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
    record = TokenRecord(digest=token_digest(token), team=team, admin=admin,
                         created=round(time.time() if now is None else now, 3), label=label)
    value = json.dumps({"team": team, "admin": admin, "created": record.created, "label": label})
    if not client.hsetnx(keys.tokens, record.digest, value):  # 256 random bits: never, but never overwrite
        raise RuntimeError("token digest collision; try again")
    return token, record


def revoke_token(client: redis.Redis, keys: Keys, digest_prefix: str) -> TokenRecord:
    """Delete the one token whose digest starts with `digest_prefix` (as `token list` shows it). Refuses an
    ambiguous or unknown prefix, and the last admin token while other tokens remain."""
    prefix = (digest_prefix or "").strip().lower()
    if len(prefix) < MIN_REVOKE_PREFIX or not _HEX.fullmatch(prefix):
        raise ValueError(f"give at least {MIN_REVOKE_PREFIX} hex characters of the digest `token list` shows, "
                         f"got {digest_prefix!r}")
    with client.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(keys.tokens)
                records = [_record(_text(d), raw) for d, raw in pipe.hgetall(keys.tokens).items()]
                matches = [r for r in records if r is not None and r.digest.startswith(prefix)]
                if not matches:
                    raise ValueError(f"no token's digest starts with {prefix!r} (see `renderfarm token list`)")
                if len(matches) > 1:
                    raise ValueError(f"{len(matches)} tokens' digests start with {prefix!r}: give more characters")
                target = matches[0]
                admins = [r for r in records if r is not None and r.admin]
                if target.admin and len(admins) == 1 and len(records) > 1:
                    raise AuthError("that is the last admin token and other tokens remain: create another admin "
                                    "token first, or revoke the others")
                pipe.multi()
                pipe.hdel(keys.tokens, target.digest)
                pipe.execute()
                return target
            except redis.WatchError:
                continue
