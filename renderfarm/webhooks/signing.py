"""Signing a webhook delivery, and `verify` for whoever receives one.

Every POST carries:

    Content-Type: application/json
    X-Renderfarm-Event: job.done | job.failed | job.cancelled | batch.finished
    X-Renderfarm-Delivery: <delivery id>        the same on every retry of one delivery: dedupe on it
    X-Renderfarm-Timestamp: <unix seconds>      when this attempt was signed
    X-Renderfarm-Signature: v1=<hex>[, v1=<hex>]

where each hex is HMAC-SHA256(secret, f"{timestamp}.".encode() + body) over the exact body bytes. Two
signatures appear for a while after the team's secret was rotated (the new one, then the old one), so a receiver
still holding the old secret keeps accepting deliveries until it is updated. A receiver recomputes the HMAC with
its secret, compares in constant time, and refuses a timestamp too far from its clock (a replayed delivery).
This module needs nothing but the standard library, so a receiver may copy `verify` as it is.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DELIVERY_HEADER", "EVENT_HEADER", "SIGNATURE_HEADER", "SignatureError", "TIMESTAMP_HEADER", "sign",
    "signed_headers", "verify",
]

TIMESTAMP_HEADER = "X-Renderfarm-Timestamp"
SIGNATURE_HEADER = "X-Renderfarm-Signature"
DELIVERY_HEADER = "X-Renderfarm-Delivery"
EVENT_HEADER = "X-Renderfarm-Event"
SCHEME = "v1"


class SignatureError(ValueError):
    """A delivery that does not verify: its reason says which check failed."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of `f"{timestamp}.".encode() + body` under `secret`."""
    return hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()


def signed_headers(secrets: Iterable[str], body: bytes, *, delivery: str, event: str,
                   timestamp: int | None = None) -> dict[str, str]:
    """The headers of one attempt: a signature per secret (the current one first), all over one timestamp."""
    stamp = int(time.time()) if timestamp is None else int(timestamp)
    signatures = ", ".join(f"{SCHEME}={sign(secret, stamp, body)}" for secret in secrets)
    if not signatures:
        raise ValueError("a delivery needs at least one secret to be signed with")
    return {
        "Content-Type": "application/json",
        "User-Agent": "renderfarm-webhooks/1",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery,
        TIMESTAMP_HEADER: str(stamp),
        SIGNATURE_HEADER: signatures,
    }


def _header(headers: Any, name: str) -> str | None:
    """`name` from a dict, a Mapping or an email.message-like object (http.server, Flask, Starlette), any case."""
    getter = getattr(headers, "get", None)
    if getter is not None:
        value = getter(name)
        if value is not None:
            return str(value)
    items = headers.items() if isinstance(headers, Mapping) or hasattr(headers, "items") else ()
    for key, value in items:
        if str(key).lower() == name.lower():
            return str(value)
    return None


def verify(secret: str, headers: Any, body: bytes, tolerance_s: float = 300, now: float | None = None) -> None:
    """Check a received delivery: its signature over `body` (the raw bytes, before any JSON parsing) under
    `secret`, and its timestamp within `tolerance_s` seconds of `now` (this machine's clock). Returns None when
    it verifies; raises SignatureError saying why not (missing header, stale or future timestamp, no signature
    matches)."""
    stamp_text = _header(headers, TIMESTAMP_HEADER)
    given = _header(headers, SIGNATURE_HEADER)
    if not stamp_text or not given:
        raise SignatureError(f"missing {TIMESTAMP_HEADER if not stamp_text else SIGNATURE_HEADER} header")
    try:
        stamp = int(stamp_text)
    except ValueError:
        raise SignatureError(f"{TIMESTAMP_HEADER} {stamp_text[:40]!r} is not a whole number of seconds") from None
    age = (time.time() if now is None else now) - stamp
    if abs(age) > tolerance_s:
        raise SignatureError(f"timestamp is {age:+.0f} s from now; more than {tolerance_s:g} s: a replay, or a "
                             "clock out of step")
    if isinstance(body, str):
        body = body.encode()
    expected = sign(secret, stamp, bytes(body))
    for part in given.split(","):
        scheme, _, value = part.strip().partition("=")
        if scheme == SCHEME and hmac.compare_digest(value.strip(), expected):
            return None
    raise SignatureError("no signature matches: wrong secret, or the body was changed")
