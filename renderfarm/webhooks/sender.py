"""One attempt to POST a delivery: the target checked, resolved once, and connected to by the address checked.

Without `webhook_allow_private` a target is refused when its host, as written, is `localhost` or a non-public
address, and when ANY address its name resolves to is loopback, private, link-local, multicast, reserved,
unspecified or otherwise not public (so one public and one private record is refused too). The connection then
goes to an address from that same resolution, never to a second lookup: a name that answers a public address to
the check and a private one to the connection (DNS rebinding) cannot slip through. TLS still verifies the
certificate against the host name. No proxy from the environment is used and redirects are not followed (a 3xx
is a failed attempt): either would send the delivery somewhere that was never checked.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from renderfarm.webhook_urls import address_problem, webhook_private_problem, webhook_problem

__all__ = ["Attempt", "post", "redact_url"]

MAX_RESPONSE_BYTES = 64 * 1024  # what is read of a receiver's answer (its body is not used)
PRIVATE_HINT = "set webhook_allow_private to deliver to such addresses"


@dataclass(frozen=True)
class Attempt:
    """How one POST went: the HTTP status when one came back, why it failed (None when delivered), and whether
    the target was refused outright (`refused`: a retry would be refused again)."""

    status: int | None
    error: str | None
    refused: bool = False
    seconds: float = 0.0

    @property
    def delivered(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def redact_url(url: str) -> str:
    """`url` as records and logs show it: no query string or fragment (they often carry a receiver's token)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(not a URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}" + ("?..." if parts.query else "")


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to one already-checked socket address, whatever its host name resolves to now."""

    def __init__(self, host: str, port: int, sockaddr: tuple, family: int, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._sockaddr, self._family = sockaddr, family

    def connect(self) -> None:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._sockaddr)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _PinnedHTTPS(_PinnedHTTP):
    _context = ssl.create_default_context()

    def connect(self) -> None:
        super().connect()
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)


def _addresses(host: str, port: int) -> list[tuple[int, tuple]]:
    """(family, socket address) of every address `host` resolves to, in the resolver's order, each once."""
    seen, out = set(), []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family not in (socket.AF_INET, socket.AF_INET6) or sockaddr[0] in seen:
            continue
        seen.add(sockaddr[0])
        out.append((family, sockaddr))
    return out


def post(url: str, body: bytes, headers: dict[str, str], *, timeout_s: float, allow_private: bool) -> Attempt:
    """POST `body` to `url` once; never raises for anything the network or the receiver does."""
    started = time.monotonic()

    def done(status: int | None, error: str | None, refused: bool = False) -> Attempt:
        return Attempt(status, error, refused, round(time.monotonic() - started, 3))

    if problem := webhook_problem(url):
        return done(None, f"refused: the URL {problem}", refused=True)
    if not allow_private and (why := webhook_private_problem(url)):
        return done(None, f"refused: {why}", refused=True)
    parts = urlsplit(url)
    https = parts.scheme.lower() == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if https else 80)
    try:
        addresses = _addresses(host, port)
    except (OSError, UnicodeError) as exc:
        return done(None, f"cannot resolve {host}: {getattr(exc, 'strerror', None) or exc}")
    if not addresses:
        return done(None, f"{host} resolves to no IPv4 or IPv6 address")
    if not allow_private:
        for _, sockaddr in addresses:
            why = address_problem(ipaddress.ip_address(str(sockaddr[0]).split("%")[0]))
            if why:
                return done(None, f"refused: {host} resolves to {why}; {PRIVATE_HINT}", refused=True)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection_class = _PinnedHTTPS if https else _PinnedHTTP
    error = "no address could be reached"
    for family, sockaddr in addresses:
        conn = connection_class(host, port, sockaddr, family, timeout_s)
        try:
            try:
                conn.connect()
            except OSError as exc:  # this address does not answer: the next one may (nothing was sent yet)
                error = f"cannot connect to {sockaddr[0]} port {port}: {exc.strerror or exc}"
                continue
            try:
                conn.request("POST", target, body=body, headers={**headers, "Content-Length": str(len(body))})
                response = conn.getresponse()
                response.read(MAX_RESPONSE_BYTES)
            except (OSError, http.client.HTTPException) as exc:  # sent, or partly: not tried again elsewhere
                kind = "timed out" if isinstance(exc, (TimeoutError, socket.timeout)) else str(exc) or type(exc).__name__
                return done(None, f"{sockaddr[0]} port {port}: {kind}")
            status = response.status
            if 200 <= status < 300:
                return done(status, None)
            return done(status, f"HTTP {status} {response.reason}".strip())
        finally:
            conn.close()
    return done(None, error)
