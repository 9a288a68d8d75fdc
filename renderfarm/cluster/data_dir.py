"""One farm per data directory, and nothing left running by a farm that was killed.

A farm holds an exclusive lock (`flock`) on `<data_dir>/farm.lock` while it runs and writes what it started
into `<data_dir>/owner.json` (its pid, its redis-server's pid, its Ray temp dir). The kernel drops the lock
when the process dies, however it dies, so:

- a second farm on the same directory while the first runs is refused, naming the first one's pid (two
  redis-servers on one append-only file would each replay and overwrite the other's jobs);
- a farm that finds the lock free but an `owner.json` behind it knows its predecessor died without
  stopping (SIGKILL, the OOM killer): it stops the redis-server that was left running on this directory
  (SIGTERM, so Redis flushes its append-only file first) and the Ray processes of the old temp dir, before
  it starts its own. Only a redis-server still working in this directory, and processes of that Ray temp dir, are touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from renderfarm.cluster.processes import is_alive, signal_all, write_private
from renderfarm.errors import FarmError

log = logging.getLogger(__name__)

LOCK_FILE = "farm.lock"
OWNER_FILE = "owner.json"
REDIS_GRACE_S = 10.0  # a left-over redis-server gets this long to flush its AOF before SIGKILL


class DataDirClaim:
    def __init__(self, data_dir: Path):
        self.data_dir = Path(data_dir)
        self._fd: int | None = None
        self._record: dict[str, Any] = {}

    @property
    def owner_file(self) -> Path:
        return self.data_dir / OWNER_FILE

    def acquire(self) -> list[str]:
        """Claim the directory; returns what was cleaned up after a dead predecessor (one line each).
        Raises FarmError when a live farm holds it."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self._read().get("pid", "?")
            raise FarmError(f"another farm (pid {pid}) runs on {self.data_dir}: stop it first, or give this one "
                            "another --data-dir") from None
        self._fd = fd
        cleaned = self._clean_up(self._read())
        self._record = {"pid": os.getpid(), "started": time.time()}
        self._write()
        return cleaned

    def record(self, **info: Any) -> None:
        """Add what this farm started (redis_pid, ray_temp_dir) to its owner record."""
        self._record.update({k: v for k, v in info.items() if v is not None})
        self._write()

    def release(self) -> None:
        """A clean stop: nothing is left running, so no record; then the lock goes."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.owner_file.unlink()
        os.close(self._fd)  # drops the flock
        self._fd = None

    def _read(self) -> dict[str, Any]:
        try:
            value = json.loads(self.owner_file.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return value if isinstance(value, dict) else {}

    def _write(self) -> None:
        write_private(self.owner_file, json.dumps(self._record))

    @staticmethod
    def _works_in(pid: int, directory: Path) -> bool:
        """Whether process `pid` runs in `directory` (redis-server rewrites its command line, not its cwd)."""
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == directory.resolve()
        except OSError:
            return False

    def _clean_up(self, left: dict[str, Any]) -> list[str]:
        """Stop what a dead predecessor left running on this directory."""
        done = []
        redis_pid = left.get("redis_pid")
        if isinstance(redis_pid, int) and is_alive(redis_pid) and self._works_in(redis_pid, self.data_dir / "redis"):
            signal_all({redis_pid}, signal.SIGTERM)  # redis-server treats SIGTERM as SHUTDOWN: AOF flushed
            deadline = time.monotonic() + REDIS_GRACE_S
            while is_alive(redis_pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if is_alive(redis_pid):
                signal_all({redis_pid}, signal.SIGKILL)
            done.append(f"stopped the redis-server (pid {redis_pid}) a killed farm left on {self.data_dir}")
        temp_dir = left.get("ray_temp_dir")
        if isinstance(temp_dir, str) and temp_dir.startswith("/tmp/rfray-"):
            from renderfarm.cluster.ray_processes import cluster_pids, terminate

            pids = cluster_pids(Path(temp_dir), set())
            if pids:
                terminate(Path(temp_dir), [], grace=2.0)  # as RayCluster.stop ends its own cluster
                done.append(f"stopped {len(pids)} Ray process(es) of a killed farm ({temp_dir})")
            shutil.rmtree(temp_dir, ignore_errors=True)
        for line in done:
            log.warning("%s", line)
        return done
