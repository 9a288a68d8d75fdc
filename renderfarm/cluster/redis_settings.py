"""How to reach the farm's Redis, as one typed object built from a URL (arq's `RedisSettings` is the model).

    settings = RedisSettings.from_url("redis://:secret@10.0.0.5:6379/0")
    store = Store(settings.client(), Keys())

The URL is checked when the object is made (a malformed one is a ConfigError naming the redacted URL), its
password never appears in `repr` or logs (`redacted`), and `client()` builds a client with the farm's
retry policy: a command that finds the connection gone retries with backoff for about 30 s, which rides out
a Redis restart (Redis keeps its data in its append-only file). The Store no longer sets that policy on a
client it is given.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import redis
from redis.backoff import ExponentialBackoff
from redis.connection import parse_url
from redis.retry import Retry

from renderfarm.cluster.redis_server import _scrub, connect, redact
from renderfarm.errors import ConfigError

__all__ = ["RETRY_ATTEMPTS", "RedisSettings"]

RETRY_ATTEMPTS = 60  # with backoff capped at 0.5 s: about 30 s of retrying a lost connection


@dataclass(frozen=True, repr=False)
class RedisSettings:
    url: str
    socket_timeout: float = 5.0  # seconds a connect or a reply may take
    retry_attempts: int = RETRY_ATTEMPTS  # 0: fail at once (a dashboard page, a health check)
    allow_open: bool = False  # tests only: a non-loopback server without a password (redis_server.connect)

    def __post_init__(self) -> None:
        if not isinstance(self.url, str) or not self.url:
            raise ConfigError("Redis URL: expected redis://[:password@]host:port/db, rediss://... or unix://...")
        try:
            parse_url(self.url)
        except ValueError as exc:
            raise ConfigError(f"invalid Redis URL {redact(self.url)}: {_scrub(str(exc), self.url)}") from None
        if self.socket_timeout <= 0:
            raise ConfigError(f"socket_timeout: must be more than 0 seconds, got {self.socket_timeout}")
        if self.retry_attempts < 0:
            raise ConfigError(f"retry_attempts: must be 0 or more, got {self.retry_attempts}")

    @classmethod
    def from_url(cls, url: str | RedisSettings, **overrides: object) -> RedisSettings:
        """Settings for `url` (or `url` itself when it already is settings), with any field overridden."""
        if isinstance(url, RedisSettings):
            return replace(url, **overrides) if overrides else url  # type: ignore[arg-type]
        return cls(url, **overrides)  # type: ignore[arg-type]

    @property
    def redacted(self) -> str:
        """The URL with its password replaced by `***`: what logs and errors show."""
        return redact(self.url)

    def __repr__(self) -> str:
        return (f"RedisSettings({self.redacted!r}, socket_timeout={self.socket_timeout}, "
                f"retry_attempts={self.retry_attempts})")

    def client(self) -> redis.Redis:
        """A connected client (PING answered; off loopback, a password required): RedisUnavailable or
        InsecureRedis otherwise."""
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.05), retries=self.retry_attempts)
        return connect(self.url, socket_timeout=self.socket_timeout, allow_open=self.allow_open, retry=retry)
