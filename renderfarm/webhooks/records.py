"""Reading delivery records: what `renderfarm webhooks deliveries` and the HTTP API show."""

from __future__ import annotations

from typing import Any

from renderfarm.cluster.store import Store

__all__ = ["DELIVERY_STATES", "deliveries", "public"]

DELIVERY_STATES = ("pending", "delivered", "failed")
PUBLIC_FIELDS = ("id", "kind", "job", "batch", "team", "event", "url", "state", "attempts", "last_status",
                 "last_error", "created", "updated", "next_at", "finished")


def public(record: dict[str, Any]) -> dict[str, Any]:
    """A delivery as shown: its URL without query string (`url`), never the full target nor the body."""
    return {name: record.get(name) for name in PUBLIC_FIELDS}


def deliveries(store: Store, job: str | None = None, state: str | None = None, limit: int = 50, *,
               batch: str | None = None, team: str | None = None) -> list[dict[str, Any]]:
    """The newest deliveries (at most `limit`) matching every filter given: a job's (`job`), a batch's own
    delivery (`batch`), a team's (`team`: what a team token may see), in one state (pending, delivered, failed).
    Each is `public(record)`. Raises ValueError for an unknown state or a limit below 1."""
    if state is not None and state not in DELIVERY_STATES:
        raise ValueError(f"state {state!r}: expected one of {', '.join(DELIVERY_STATES)}")
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    out = []
    for record in store.recent_deliveries():
        if ((job is None or record.get("job") == job) and (state is None or record.get("state") == state)
                and (batch is None or (record.get("kind") == "batch" and record.get("batch") == batch))
                and (team is None or record.get("team") == team)):
            out.append(public(record))
            if len(out) >= limit:
                break
    return out
