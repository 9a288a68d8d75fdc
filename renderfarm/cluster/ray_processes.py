"""The `ray start` processes of a private Ray cluster on this machine: launch one (a head, or a node joining
a head) in the cluster's own temp dir, wait until it is up, and find and end every process it started.

This module never imports `ray` (it runs Ray's CLI in a child process). It is shaped by stale addresses
(seen with Ray 2.60): a killed cluster leaves `<temp>/ray_current_cluster`, and a bare `ray.init()` may try
to reach that dead address (or whatever `RAY_ADDRESS` says). So every private cluster gets its own short temp
dir (`/tmp/rfray-XXXXXXXX`, short because Ray's unix socket paths must stay under ~107 characters), its
processes are started with an explicit `--temp-dir` and explicit ports, and `RAY_ADDRESS` is removed from
their environment; the driver (`RayCluster`) then always calls `ray.init(address=<host:port>)` with the exact
address the head wrote. With an explicit address Ray never consults `RAY_ADDRESS` nor `ray_current_cluster`
(ray/_private/services.py: canonicalize_bootstrap_address only looks them up for `None`/"auto").
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from renderfarm.cluster.processes import (
    all_pids,
    free_port,
    is_alive,
    process_stat,
    read_proc,
    signal_all,
    tail_lines,
    write_private,
)
from renderfarm.cluster.ray_auth import AUTH_ENV, daemon_env

# Ray's longest unix socket path under the temp dir is
# "<temp>/session_2026-01-01_00-00-00_000000_<pid>/sockets/plasma_store" (~64 chars
# past the temp dir) and must stay under 107.
MAX_TEMP_DIR_CHARS = 40
_TEMP_PREFIX = "rfray-"
_TOKEN_FILE = "auth_token"
HEAD_LOG = "ray-start.log"
NODE_LOG = "ray-node.log"
_ADDRESS_FILE = "ray_current_cluster"
# Every process of a private cluster inherits this variable (value: its temp dir), so
# terminate() finds them even when they renamed themselves (ray::IDLE, ray::RuntimeEnvAgent).
_MARKER_ENV = "RENDERFARM_RAY_TEMP_DIR"
_PARENT_ENV = "RENDERFARM_RAY_PARENT_PID"

# `ray start ... --block`, plus a watchdog: if the process that started it dies
# without calling stop() (SIGKILL, OOM), `ray start` gets SIGTERM, and Ray's own
# handler in `--block` mode tears its daemons down. (PR_SET_PDEATHSIG is not used: it
# fires when the *thread* that forked exits, which would kill a head started from a
# short-lived worker thread.)
_RAY_START_WRAPPER = """\
import os, signal, sys, threading, time
parent = int(os.environ.pop("RENDERFARM_RAY_PARENT_PID"))
def _watch():
    while os.getppid() == parent:
        time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=_watch, daemon=True).start()
from ray.scripts.scripts import main
sys.argv[0] = "ray"
sys.exit(main())
"""


# -- the temp dir ---------------------------------------------------------------------------------------------


def new_temp_dir() -> Path:
    """A fresh `/tmp/rfray-XXXXXXXX` (the caller deletes it)."""
    return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir="/tmp"))


def claim_temp_dir(temp_dir: Path) -> Path:
    """Make a given temp dir ready for a new head: short enough for Ray's sockets, created, used by no
    running cluster, and without a previous run's address file (which would be read as ours)."""
    temp_dir = Path(temp_dir).absolute()
    if len(str(temp_dir)) > MAX_TEMP_DIR_CHARS:
        raise ValueError(
            f"Ray temp dir {str(temp_dir)!r} is {len(str(temp_dir))} characters; "
            f"Ray's unix sockets need it at most {MAX_TEMP_DIR_CHARS} (try /tmp/rf-NAME)"
        )
    temp_dir.mkdir(parents=True, exist_ok=True)
    running = cluster_pids(temp_dir, set())
    if running:
        raise RuntimeError(
            f"Ray temp dir {str(temp_dir)!r} is in use by running processes "
            f"{sorted(running)}: stop that cluster or pick another dir"
        )
    (temp_dir / _ADDRESS_FILE).unlink(missing_ok=True)
    return temp_dir


def token_path(temp_dir: Path) -> Path:
    """Where the cluster's `ray start` processes read its token (`RAY_AUTH_TOKEN_PATH`)."""
    return temp_dir / _TOKEN_FILE


def write_token(temp_dir: Path, token: str) -> Path:
    """Write the cluster's token to `token_path(temp_dir)` (0600); that path."""
    path = token_path(temp_dir)
    write_private(path, token)
    return path


# -- launching ------------------------------------------------------------------------------------------------


def node_args(
    num_cpus: int | None,
    num_gpus: int | None,
    resources: dict[str, float] | None,
    labels: dict[str, str] | None,
    object_store_memory: int | None,
    node_ip_address: str | None,
) -> list[str]:
    """`ray start` options shared by a head and a joining node: explicit free ports,
    so two clusters on one machine never fight over Ray's default ports."""
    args = [
        "--node-manager-port", str(free_port("")),
        "--object-manager-port", str(free_port("")),
        "--runtime-env-agent-port", str(free_port("")),
        "--dashboard-agent-listen-port", str(free_port("")),
        "--dashboard-agent-grpc-port", str(free_port("")),
        "--metrics-export-port", str(free_port("")),
    ]  # fmt: skip
    if num_cpus is not None:
        args += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        args += ["--num-gpus", str(num_gpus)]
    if resources:
        args += ["--resources", json.dumps(resources)]
    if labels:
        args += ["--labels", ",".join(f"{k}={v}" for k, v in labels.items())]
    if object_store_memory is not None:
        args += ["--object-store-memory", str(object_store_memory)]
    if node_ip_address is not None:
        args += ["--node-ip-address", node_ip_address]
    return args


def head_args(port: int | None) -> list[str]:
    """`ray start` options of a head: its GCS port (free one when None), no dashboard, no usage stats."""
    return [
        "--head",
        "--port", str(port or free_port("")),
        "--dashboard-port", str(free_port("")),
        "--include-dashboard", "false",
        "--disable-usage-stats",
    ]  # fmt: skip


def launch_ray_start(args: list[str], temp_dir: Path, token_path: Path, log_name: str) -> subprocess.Popen[bytes]:
    """`ray start <args> --block --temp-dir <temp_dir>` in token mode, logging to temp_dir."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", *AUTH_ENV):
        env.pop(name, None)
    env.update(
        {
            **daemon_env(token_path),
            # SIGTERM on `ray start --block` would otherwise "drain" for up to 30 s.
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            _MARKER_ENV: str(temp_dir),
            _PARENT_ENV: str(os.getpid()),
        }
    )
    command = [sys.executable, "-c", _RAY_START_WRAPPER, "start", "--block", "--temp-dir", str(temp_dir)]
    with open(temp_dir / log_name, "ab") as log:
        return subprocess.Popen(
            [*command, *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=temp_dir,
            start_new_session=True,  # a Ctrl-C in the terminal reaches us, not Ray
        )


# -- waiting --------------------------------------------------------------------------------------------------


def wait_for_head(head: subprocess.Popen[bytes], temp_dir: Path, timeout: float) -> str:
    """Wait until `ray start --head` has written the GCS address (it does so once all is up); the address."""
    address_file = temp_dir / _ADDRESS_FILE
    log = temp_dir / HEAD_LOG
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}: {tail(log)} (log: {log})")
        try:
            address = address_file.read_text().strip()
        except FileNotFoundError:
            address = ""
        if address:
            return address
        time.sleep(0.05)
    raise TimeoutError(f"Ray head not up after {timeout:g}s: {tail(log)} (log: {log})")


def wait_for_node(process: subprocess.Popen[bytes], log: Path, address: str, timeout: float, *, since: float) -> None:
    """Wait until `ray start --address <address>` logs that its runtime started, at most `timeout` seconds
    from `since` (a `time.monotonic()`)."""
    deadline = since + timeout
    while b"Ray runtime started" not in (log.read_bytes() if log.exists() else b""):
        if process.poll() is not None:
            raise RuntimeError(f"`ray start --address {address}` exited with {process.returncode}: {tail(log)}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"this machine did not join the Ray cluster at {address} within {timeout:g}s")
        time.sleep(0.2)


def wait_for_port(host: str, port: int, timeout: float) -> None:
    """Fail in seconds, not minutes, when nothing listens at the GCS address."""
    deadline = time.monotonic() + min(timeout, 10.0)
    while True:
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise ConnectionError(f"no Ray cluster answers at {host}:{port}: {exc}") from None
            time.sleep(0.1)


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log, on one line, for an error message ("" when it cannot be read)."""
    try:
        return tail_lines(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


# -- finding and ending the processes of a private cluster ----------------------------------------------------


def cluster_pids(temp_dir: Path, own_pids: set[int]) -> set[int]:
    """Live processes of the cluster: our `ray start` processes, anything whose command line names the
    temp dir or whose environment carries our marker, and all their descendants."""
    needle = str(temp_dir).encode()
    marker = f"{_MARKER_ENV}={temp_dir}".encode()
    me = os.getpid()
    parents: dict[int, int] = {}
    found: set[int] = set()
    for pid in all_pids():
        stat = process_stat(pid)
        if stat is None or stat[0] == "Z":
            continue
        parents[pid] = stat[1]
        if pid == me:
            continue
        if pid in own_pids or needle in read_proc(pid, "cmdline"):
            found.add(pid)
        elif marker in read_proc(pid, "environ").split(b"\0"):
            found.add(pid)
    changed = True
    while changed:  # close over descendants (ray::IDLE workers rename themselves)
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found and pid != me:
                found.add(pid)
                changed = True
    return found


def terminate(temp_dir: Path, children: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process of the cluster at once, SIGKILL the rest after `grace`."""
    own = {child.pid for child in children}
    pids = cluster_pids(temp_dir, own)
    signal_all(pids, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        for child in children:
            child.poll()  # reap our own children so they do not linger as zombies
        pids = {pid for pid in pids if is_alive(pid)}
        if not pids:
            break
        time.sleep(0.05)
    # Also catch anything spawned while we were waiting (a worker restarted mid-stop).
    for _ in range(5):
        leftovers = {pid for pid in pids if is_alive(pid)} | cluster_pids(temp_dir, own)
        if not leftovers:
            break
        signal_all(leftovers, signal.SIGKILL)
        pids = leftovers
        time.sleep(0.05)
    for child in children:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
            pass
