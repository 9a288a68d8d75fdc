"""Blobs in a directory: the embedded farm's <data_dir>/results, or a studio NAS path every node mounts.

A write is atomic: the bytes go to a temp file in the blob's own directory, are fsynced, and `os.replace`
puts the file in place (then the directory is fsynced), so a reader sees the whole old blob or the whole new
one, never a torn one, and a writer killed mid-way leaves only a temp file (`.tmp-*`) that `sweep` removes.
The directory (and each key's subdirectories) is created on first write.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from renderfarm.cluster.blobs import BlobStore, BlobStoreError, validate_key

TMP_PREFIX = ".tmp-"
FILE_MODE = 0o644
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_REFUSED = {errno.EACCES, errno.EPERM, errno.EROFS}
_GONE = {errno.ESTALE, errno.EIO, errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ETIMEDOUT,
         errno.ENODEV, errno.ENXIO}


def path_of(url: str) -> Path:
    """The absolute path a file URL (file:///abs/path) or a plain absolute path names; BlobStoreError
    ("invalid") for anything else, or a path with '.' or '..' segments (no URL this module writes has any)."""
    if url.startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise BlobStoreError(f"file URL {url!r}: must be file:///abs/path (no host, query or fragment)", "invalid")
        raw = unquote(parts.path)
    else:
        raw = url
    if not raw.startswith("/") or "\0" in raw:
        raise BlobStoreError(f"file URL {url!r}: does not name an absolute path", "invalid")
    if any(seg in (".", "..") for seg in raw.split("/")):
        raise BlobStoreError(f"file URL {url!r}: '.' and '..' segments are not allowed", "invalid")
    return Path(raw)


def _error(exc: OSError, doing: str, where: str) -> BlobStoreError:
    """A BlobStoreError for `exc`, raised while `doing` ("write", "read", "delete", "sweep") at `where`."""
    reason = exc.strerror or str(exc)
    code = exc.errno
    writing = doing in ("write", "delete", "sweep")
    if code in _FULL:
        return BlobStoreError(f"blob store full: cannot {doing} {where}: {reason}", "full")
    if code in _REFUSED:
        kind = "unwritable" if writing else "denied"
        return BlobStoreError(f"blob store {'unwritable' if writing else 'unreadable'}: cannot {doing} {where}: "
                              f"{reason}", kind)
    if code == errno.ENOENT and doing == "read":
        return BlobStoreError(f"blob missing (deleted, or expired by retention): {where}", "missing")
    if code in (errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return BlobStoreError(f"cannot {doing} {where}: {reason} (a key clashes with an existing file or "
                              "directory)", "invalid")
    if code in _GONE:
        return BlobStoreError(f"blob store unreachable: cannot {doing} {where}: {reason}", "unreachable")
    return BlobStoreError(f"blob store cannot {doing} {where}: {reason}", "unwritable" if writing else "unreachable")


class LocalBlobStore(BlobStore):
    scheme = "file"

    def __init__(self, root: Path, options: dict[str, Any]):
        super().__init__(root.as_uri(), options)
        self.root = root

    @classmethod
    def open(cls, url: str, options: dict[str, Any]) -> LocalBlobStore:
        return cls(path_of(url.rstrip("/") or "/"), options)

    @classmethod
    def home_of(cls, url: str) -> str:
        return path_of(url).parent.as_uri()

    def url_of(self, key: str) -> str:
        return (self.root / validate_key(key)).as_uri()

    def _fdopen(self, fd: int) -> IO[bytes]:
        """The file object a blob's bytes are written through (tests swap in one that fails)."""
        return os.fdopen(fd, "wb")

    def put(self, key: str, data: bytes) -> str:
        path = self.root / validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise BlobStoreError(f"blob {key!r}: data must be bytes, got {type(data).__name__}", "invalid")
        try:
            for attempt in range(3):  # a sweep may remove an emptied directory between mkdir and mkstemp
                path.parent.mkdir(parents=True, exist_ok=True)
                try:
                    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=TMP_PREFIX)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
            try:
                os.fchmod(fd, FILE_MODE)
                with self._fdopen(fd) as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            _fsync_dir(path.parent)
        except OSError as exc:
            raise _error(exc, "write", str(path)) from exc
        return path.as_uri()

    def _owns(self, url: str) -> bool:
        return path_of(url).is_relative_to(self.root)

    def _get(self, url: str) -> bytes:
        path = path_of(url)
        try:
            return path.read_bytes()
        except OSError as exc:
            raise _error(exc, "read", str(path)) from exc

    def _delete(self, url: str) -> None:
        path = path_of(url)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise _error(exc, "delete", str(path)) from exc

    def _exists(self, url: str) -> bool:
        path = path_of(url)
        try:
            return path.is_file()
        except OSError as exc:  # is_file swallows ENOENT and ENOTDIR; anything else is the store's trouble
            raise _error(exc, "read", str(path)) from exc

    def sweep(self, older_than_s: float) -> int:
        """Delete blobs (and writers' left-over temp files) last written more than `older_than_s` seconds ago,
        and the directories that leaves empty (never the root); how many blobs went."""
        if not older_than_s >= 0:
            raise BlobStoreError(f"sweep older_than_s={older_than_s!r}: must be a number >= 0", "invalid")
        cutoff = time.time() - older_than_s
        deleted = 0
        dirs: list[Path] = []
        stack = [self.root]
        try:
            while stack:
                directory = stack.pop()
                try:
                    entries = list(os.scandir(directory))
                except FileNotFoundError:  # not written yet, or removed meanwhile
                    continue
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        dirs.append(Path(entry.path))
                        continue
                    try:
                        if entry.stat(follow_symlinks=False).st_mtime >= cutoff:
                            continue
                        os.unlink(entry.path)
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    deleted += not entry.name.startswith(TMP_PREFIX)
            for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):  # deepest first
                with contextlib.suppress(OSError):  # not empty (a blob kept, or one just written): kept
                    directory.rmdir()
        except OSError as exc:
            raise _error(exc, "sweep", str(self.root)) from exc
        return deleted


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (ext4, xfs); a file system that cannot fsync a directory is left at that."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
