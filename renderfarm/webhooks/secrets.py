"""Per-team webhook signing secrets.

A secret is `whsec_` + `secrets.token_urlsafe(32)` (256 random bits). Redis keeps it **in clear** in one hash
(`Keys.webhook_secrets`, `rf:webhook:secrets`: field = team, value = JSON `{"secret", "created", "previous",
"previous_until"}`): the farm must sign with it, so unlike a team token it cannot be kept as a digest. Whoever
holds the Redis password can read every team's secret, and so forge deliveries; the Redis password is the trust
boundary (docs/security.md).

A team that has none gets one the first time the farm signs a delivery for it (or an admin asks for it with
`renderfarm webhooks secret --team T`), so webhooks work before anyone thinks of secrets; the receiver's
owner asks an admin for it. Rotating (`--rotate`) makes a new one and keeps the old one for ROTATION_GRACE_S:
meanwhile each delivery carries both signatures (signing.py), so receivers can switch without losing any.
"""

from __future__ import annotations

import json
import secrets as random_secrets
import time
from dataclasses import dataclass
from typing import Any

import redis

from renderfarm.cluster.auth import TEAM_PATTERN
from renderfarm.cluster.keys import Keys

__all__ = ["ROTATION_GRACE_S", "TeamSecret", "rotate_secret", "team_secret"]

SECRET_PREFIX = "whsec_"
ROTATION_GRACE_S = 24 * 3600


@dataclass(frozen=True)
class TeamSecret:
    team: str
    secret: str
    created: float
    previous: str | None = None
    previous_until: float | None = None

    def signing(self, now: float | None = None) -> list[str]:
        """The secrets a delivery is signed with now: the current one, and the previous one during its grace."""
        now = time.time() if now is None else now
        if self.previous and self.previous_until is not None and now < self.previous_until:
            return [self.secret, self.previous]
        return [self.secret]

    def public(self) -> dict[str, Any]:
        return {"team": self.team, "secret": self.secret, "created": self.created,
                "previous_until": self.previous_until if self.previous else None}

    def to_json(self) -> str:
        return json.dumps({"secret": self.secret, "created": self.created, "previous": self.previous,
                           "previous_until": self.previous_until})


def _check_team(team: str) -> None:
    if not isinstance(team, str) or not TEAM_PATTERN.fullmatch(team):
        raise ValueError(f"team {team!r} must be 1..64 letters, digits, '_', '.' or '-', starting with a letter "
                         "or digit (as a job's team)")


def _parse(team: str, raw: bytes | str | None) -> TeamSecret | None:
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict) or not isinstance(data.get("secret"), str) or not data["secret"]:
            return None
        until = data.get("previous_until")
        return TeamSecret(team=team, secret=data["secret"], created=float(data.get("created") or 0.0),
                          previous=data.get("previous") if isinstance(data.get("previous"), str) else None,
                          previous_until=float(until) if isinstance(until, (int, float)) else None)
    except (ValueError, TypeError):
        return None


def _new_secret() -> str:
    return SECRET_PREFIX + random_secrets.token_urlsafe(32)


def team_secret(client: redis.Redis, keys: Keys, team: str, *, create: bool = True) -> TeamSecret | None:
    """`team`'s signing secret; with `create` (the default), a new one when it has none (or an unreadable one),
    written only if no other process wrote one first, so every process signs with the same. None when it has
    none and `create` is False."""
    _check_team(team)
    found = _parse(team, client.hget(keys.webhook_secrets, team))
    if found is not None or not create:
        return found
    fresh = TeamSecret(team=team, secret=_new_secret(), created=round(time.time(), 3))
    if client.hsetnx(keys.webhook_secrets, team, fresh.to_json()):
        return fresh
    found = _parse(team, client.hget(keys.webhook_secrets, team))
    if found is None:  # an unreadable record stands in the way: replace it
        client.hset(keys.webhook_secrets, team, fresh.to_json())
        return fresh
    return found


def rotate_secret(client: redis.Redis, keys: Keys, team: str, grace_s: float = ROTATION_GRACE_S) -> TeamSecret:
    """A new secret for `team`; the one it replaces still signs (beside the new one) for `grace_s` seconds."""
    _check_team(team)
    old = _parse(team, client.hget(keys.webhook_secrets, team))
    now = round(time.time(), 3)
    fresh = TeamSecret(team=team, secret=_new_secret(), created=now,
                       previous=old.secret if old is not None and grace_s > 0 else None,
                       previous_until=now + grace_s if old is not None and grace_s > 0 else None)
    client.hset(keys.webhook_secrets, team, fresh.to_json())
    return fresh
