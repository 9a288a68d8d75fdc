"""Webhook targets: which URLs the farm may POST a finished job's signed JSON body to (renderfarm/webhooks).

Syntax is judged at submit (`webhook_problem`); a host that is, as written, loopback or private is refused unless
the farm allows those (`webhook_private_problem`); names are resolved only at delivery, which checks every address
they resolve to (`address_problem`, in renderfarm/webhooks/sender.py). Like jobs.py, this imports nothing of
the farm but errors.py.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Any, Protocol
from urllib.parse import urlsplit

from renderfarm.errors import shown

MAX_WEBHOOK_CHARS = 2048
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def webhook_problem(url: str) -> str | None:
    """Why `url` cannot be a webhook target, or None. Syntax only: an http:// or https:// URL with a host, no
    credentials in it (the farm signs each delivery instead), at most MAX_WEBHOOK_CHARS ASCII characters, no
    whitespace or control characters. Whether the host may be a private address is `webhook_private_problem`."""
    if not url:
        return "is empty: give an http:// or https:// URL"
    if len(url) > MAX_WEBHOOK_CHARS:
        return f"is {len(url)} characters long; at most {MAX_WEBHOOK_CHARS}"
    if not url.isascii():
        return "must be ASCII (an international host name in its xn-- form, a path percent-encoded)"
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        return "contains whitespace or a control character"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return f"{shown(url)} is not a valid URL ({exc})"
    if parts.scheme.lower() not in ("http", "https"):
        scheme = f"scheme {shown(parts.scheme)}" if parts.scheme else "no scheme"
        return f"{shown(url)} has {scheme}: the farm delivers to http:// or https:// URLs only"
    if "@" in parts.netloc:
        return "must not carry credentials (user:password@): the farm signs each delivery instead"
    host = parts.hostname
    if not host:
        return f"{shown(url)} has no host"
    if literal_address(host) is None and not _is_host_name(host):
        return f"host {shown(host)} is neither a host name nor an IP address"
    if port == 0:
        return "port 0 is not a port one can deliver to"
    return None


def _is_host_name(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)


def literal_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address `host` spells, or None for a name. The old IPv4 forms that resolvers still read
    (`127.1`, `0x7f.1`, `2130706433`) count as the address they stand for."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if re.fullmatch(r"(0[xX][0-9a-fA-F]*|[0-9]+)(\.(0[xX][0-9a-fA-F]*|[0-9]+)){0,3}", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why the farm must not deliver to `address` without `webhook_allow_private` (loopback, private,
    link-local, multicast, reserved, unspecified, or any other range that is not public), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    for kind in ("unspecified", "loopback", "link_local", "multicast", "reserved", "private"):
        if getattr(address, f"is_{kind}"):
            return f"{address} is a {kind.replace('_', '-')} address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def webhook_private_problem(url: str) -> str | None:
    """Why `url`'s host is, as written, a loopback, private or otherwise non-public target (`localhost`, a
    literal address in such a range), or None. Names are resolved only at delivery (renderfarm/webhooks),
    which checks every address they resolve to."""
    host = (urlsplit(url).hostname or "").removesuffix(".")
    if host == "localhost" or host.endswith(".localhost"):
        why = f"{host} is a loopback name"
    else:
        address = literal_address(host)
        why = address_problem(address) if address is not None else None
    if why is None:
        return None
    return f"{why}: this farm delivers webhooks to loopback and private addresses only with webhook_allow_private"


class WebhookRules(Protocol):
    """What JobSpec needs to know of the farm's webhook policy (the client reads the head's published setting)."""

    def allow_private_webhooks(self) -> bool: ...


def webhook_refusal(url: Any, rules: WebhookRules | None) -> str | None:
    """Why `url` cannot be a webhook (a job's or a batch's) on a farm with `rules`, or None. Without `rules` (a
    stored record read back) the syntax only: the private-address rule was judged at submit."""
    if not isinstance(url, str):
        return f"expected a URL string, got {type(url).__name__}"
    if problem := webhook_problem(url):
        return problem
    return None if rules is None or rules.allow_private_webhooks() else webhook_private_problem(url)
