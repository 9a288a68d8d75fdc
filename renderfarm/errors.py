"""Every error a user of renderfarm is meant to read, in one place (rq's `exceptions.py` is the model).

Each derives from `RenderfarmError`, which the CLI prints as one line (`renderfarm CMD: error: ...`)
and the API will turn into a 4xx; anything else that escapes is a bug and keeps its traceback. Each also
keeps the builtin base it had before (`ValueError`, `OSError`, ...), so callers that catch those still do.

Errors that never reach a user (a lease another node still holds, a render interrupted by a cancel)
stay beside the code that raises and handles them.
"""

from __future__ import annotations

__all__ = [
    "AuthError", "BlobStoreError", "CliError", "ConfigError", "CorruptRecord", "DoesNotFit", "FarmError", "InsecureRedis",
    "JobNotFound", "ModelSourceError", "NoFarm", "RedisUnavailable", "RenderfarmError", "ResultUnavailable", "SpecError",
    "SpecFileError", "UnknownModelError", "UnsupportedFamily",
    "UsageError", "WaitTimeout", "shown",
]


def shown(value: str, limit: int = 40) -> str:
    """`value` quoted and cut short, with non-printable characters (newlines, RTL marks) escaped."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


class RenderfarmError(Exception):
    """A user-facing error: its message names what is wrong (the field, the file, the URL) and why."""


class UsageError(RenderfarmError):
    """A command line argparse cannot read (unknown flag, extra argument, missing value)."""


class CliError(RenderfarmError):
    """A command cannot do what was asked (no farm found, an unreadable file named on the command line)."""


class ConfigError(RenderfarmError, ValueError):
    """A settings or nodes file is unreadable or invalid; the message names the file and field."""


class SpecError(RenderfarmError, ValueError):
    """A job spec was refused at submit; the message names the job and the field. Nothing was enqueued."""


class SpecFileError(SpecError):
    """A job spec file could not be read, or one of its specs was refused. The message starts with the path."""


class ResultUnavailable(RenderfarmError, ValueError):
    """A job's images cannot be had: it is not done, or its result expired."""


class UnknownModelError(RenderfarmError, ValueError):
    """A model name the catalog does not know; the message lists the ones it does."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(known)}")


class AuthError(RenderfarmError, PermissionError):
    """The farm is in token mode and this token may not do this (or there is no valid token)."""


class FarmError(RenderfarmError, RuntimeError):
    """A farm could not start or run (its Redis, its Ray, its nodes)."""


class NoFarm(RenderfarmError, LookupError):
    """No farm has started on the Redis database a command was given (no farm marker there): most often a
    wrong database number in the URL. The message names the URL and, when it can, the database that holds one."""


class RedisUnavailable(RenderfarmError, RuntimeError):
    """Redis could not be reached (or refused us) at `url`. The message names the URL with any password
    replaced by `***`; `redact` and `scrub` do that (they live in cluster/redis_server.py, which raises this)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"Redis unavailable at {url}: {reason}")


class InsecureRedis(RedisUnavailable):
    """Refused: a Redis that is not on loopback lets in clients that bring no password.

    Anyone who reaches such a server can read every prompt and image and change every job, so the farm
    does not use it. The message names the redacted URL and how to protect the server.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(url, reason)
        self.args = (f"refusing the Redis at {url}: {reason}",)


class JobNotFound(RenderfarmError, KeyError):
    """No job with this id (never submitted, or its record expired)."""

    def __str__(self) -> str:
        return f"no such job: {self.args[0]}"


class CorruptRecord(RenderfarmError, ValueError):
    """A record in Redis that does not parse: named, never guessed at."""


class WaitTimeout(RenderfarmError, TimeoutError):
    """Waiting for jobs took longer than the caller allowed; the jobs themselves go on."""


class ModelSourceError(RenderfarmError, OSError):
    """A model's weights are absent or unreadable on a node: the job's fault, never the node's."""


class UnsupportedFamily(RenderfarmError, ValueError):
    """No worker renders this model's family (the catalog may list a family for planning only): the job's
    fault, never the node's."""


class BlobStoreError(RenderfarmError, OSError):
    """The blob store (cluster/blobs: a directory or an S3-compatible bucket) refused or failed an operation.

    `kind` says which: "unwritable" (permission denied, read-only), "full" (no space, quota), "missing"
    (no such blob: deleted, or expired by retention), "unreachable" (the store does not answer), "denied"
    (a read refused: permissions, credentials), "invalid" (a bad key or URL), "unavailable" (a backend's
    library is not installed). The message names the URL or key; the original exception stays chained."""

    KINDS = ("unwritable", "full", "missing", "unreachable", "denied", "invalid", "unavailable")

    def __init__(self, message: str, kind: str) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"BlobStoreError kind {kind!r} is not one of {', '.join(self.KINDS)}")
        super().__init__(message)
        self.kind = kind

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple:  # Ray carries a worker's exceptions to the caller by pickle
        return (type(self), (str(self), self.kind))


class DoesNotFit(RenderfarmError, RuntimeError):
    """No profile of the ladder fits this job on this node (VRAM or host memory)."""
