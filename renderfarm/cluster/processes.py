"""Small process and socket utilities for the servers a farm starts (redis-server, Ray's daemons):
free ports, reading /proc, signalling a set of processes, the tail of a log. Linux /proc only."""

from __future__ import annotations

import os
import signal
import socket
from collections import deque
from collections.abc import Iterator
from pathlib import Path

_RECENT_PORTS: deque[int] = deque(maxlen=512)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that was free a moment ago ("" for every interface), and not one this process
    handed out recently: the kernel may offer a just-closed port again, and a `ray start` given the same
    port for two of its components refuses to start."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _RECENT_PORTS:
            _RECENT_PORTS.append(port)
            return port
    raise OSError(f"no free port on {host or 'any interface'} that was not handed out already")


def write_private(path: Path, text: str) -> None:
    """Write `text` (a password, a token, a URL holding one) to `path`, readable by this user only (0600)
    from before the first byte is written."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


def tail_lines(text: str, lines: int = 5) -> str:
    """The last `lines` lines of a log, on one line, for an error message."""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def all_pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit():
            yield int(name)


def read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as fh:
            return fh.read()
    except OSError:  # gone, or not ours to read
        return b""


def process_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None if it is gone."""
    raw = read_proc(pid, "stat")
    if not raw:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    return fields[0].decode(), int(fields[1])


def is_alive(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat[0] != "Z"


def signal_all(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
