"""Start a private Ray cluster or join an existing one; list its nodes and GPUs.

This module imports no actor code and no torch: it only owns the Ray runtime.

Two traps shape it (see shared/NOTES.md):

* Stale addresses. A killed cluster leaves `<temp>/ray_current_cluster`, and a bare
  `ray.init()` may try to reach that dead address (or whatever `RAY_ADDRESS` says).
  So every private cluster gets its own short temp dir (`/tmp/rfray-XXXXXXXX`, short
  because Ray's unix socket paths must stay under ~107 characters), its head is started
  with explicit `--temp-dir` and explicit ports, the driver always calls
  `ray.init(address=<host:port>)` with that exact address, and `RAY_ADDRESS` is removed
  from the head's environment. With an explicit address Ray never consults
  `RAY_ADDRESS` nor `ray_current_cluster` (ray/_private/services.py:
  canonicalize_bootstrap_address only looks them up for `None`/"auto").

* Token authentication (Ray 2.60). What each process does is decided per process:
  `ray start --head` turns token auth on when `RAY_AUTH_MODE` is unset *and* a token
  exists (~/.ray/auth_token, `RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`); a plain local
  `ray.init()` turns it on and writes ~/.ray/auth_token; but a driver or `ray start
  --address` with an explicit address never turns it on by itself. So whether a
  second process can talk to the head depends on files in the home directory:
  InvalidAuthToken, or a driver that hangs ~20 s. We therefore never leave
  `RAY_AUTH_MODE` unset. We chose token mode with a fresh random token per private
  cluster (rather than `RAY_AUTH_MODE=disabled`): the GCS listens on every interface
  (Ray rewrites 127.0.0.1 to the node's IP), so "disabled" would let anyone on the
  network run code on the farm. The token is written to `<temp_dir>/auth_token`
  (mode 0600); the head and all its daemons get `RAY_AUTH_MODE=token` +
  `RAY_AUTH_TOKEN_PATH`, and our driver gets `RAY_AUTH_MODE=token` + `RAY_AUTH_TOKEN`
  (process environment, restored on `stop()`). `start_local` neither reads nor writes
  ~/.ray. Another process or machine joins with `RayCluster.join(address,
  auth_token=...)`, or by exporting `cluster.join_env()` before `ray start --address`;
  `add_node()` does the latter for extra nodes on this machine.
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

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

__all__ = ["RayCluster", "RayNode", "gpu_count"]

# Ray's longest unix socket path under the temp dir is
# "<temp>/session_2026-01-01_00-00-00_000000_<pid>/sockets/plasma_store" (~64 chars
# past the temp dir) and must stay under 107.
_MAX_TEMP_DIR_CHARS = 40
_TEMP_PREFIX = "rfray-"
_TOKEN_FILE = "auth_token"
_HEAD_LOG = "ray-start.log"
_ADDRESS_FILE = "ray_current_cluster"
# Every process of a private cluster inherits this variable (value: its temp dir), so
# stop() finds them even when they renamed themselves (ray::IDLE, ray::RuntimeEnvAgent).
_MARKER_ENV = "RENDERFARM_RAY_TEMP_DIR"
_PARENT_ENV = "RENDERFARM_RAY_PARENT_PID"
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

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


@dataclass(frozen=True)
class RayNode:
    """One Ray node as the GCS reports it."""

    node_id: str
    ip: str
    alive: bool
    num_cpus: float
    num_gpus: float
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


class RayCluster:
    """This process's connection to a Ray cluster, and the head it started (if any).

    Use `RayCluster.start_local(...)` for a private cluster owned by this process, or
    `RayCluster.join(address)` to attach as a driver to a running one. Ray allows one
    driver per process: stop one RayCluster before starting or joining another.
    """

    def __init__(
        self,
        address: str,
        *,
        temp_dir: Path | None = None,
        auth_token: str | None = None,
        head_process: subprocess.Popen[bytes] | None = None,
        owns_temp_dir: bool = False,
    ) -> None:
        # Use start_local() / join(); this constructor does not connect.
        self.address = address
        self.temp_dir = temp_dir
        self.auth_token = auth_token
        self._head = head_process
        self._owns_temp_dir = owns_temp_dir
        self._saved_env: dict[str, str | None] | None = None
        self._connected = False
        self._stopped = False
        self._extra_nodes: list[subprocess.Popen[bytes]] = []
        atexit.register(self.stop)

    # -- ways in ------------------------------------------------------------------
    @classmethod
    def start_local(
        cls,
        temp_dir: Path | None = None,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
        *,
        labels: dict[str, str] | None = None,
        object_store_memory: int | None = None,
        node_ip_address: str | None = None,
        auth_token: str | None = None,
        namespace: str = "renderfarm",
        log_to_driver: bool = True,
        timeout: float = 60.0,
        port: int | None = None,
    ) -> RayCluster:
        """Start a private Ray head (`ray start --head --block`) and connect as its driver.

        `temp_dir` defaults to a fresh `/tmp/rfray-XXXXXXXX` that `stop()` deletes; a
        given one is kept (Ray's logs live there). `num_gpus=None` lets Ray detect
        GPUs. `auth_token=None` generates a random token for this cluster.
        """
        _ensure_not_connected()
        owns_temp_dir = temp_dir is None
        if temp_dir is None:
            temp_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir="/tmp"))
        else:
            temp_dir = Path(temp_dir).absolute()
            if len(str(temp_dir)) > _MAX_TEMP_DIR_CHARS:
                raise ValueError(
                    f"Ray temp dir {str(temp_dir)!r} is {len(str(temp_dir))} characters; "
                    f"Ray's unix sockets need it at most {_MAX_TEMP_DIR_CHARS} (try /tmp/rf-NAME)"
                )
            temp_dir.mkdir(parents=True, exist_ok=True)
            running = _cluster_pids(temp_dir, set())
            if running:
                raise RuntimeError(
                    f"Ray temp dir {str(temp_dir)!r} is in use by running processes "
                    f"{sorted(running)}: stop that cluster or pick another dir"
                )
            # A previous run's address file would otherwise be read as ours (stale address).
            (temp_dir / _ADDRESS_FILE).unlink(missing_ok=True)
        token = auth_token or secrets.token_hex(32)
        token_path = temp_dir / _TOKEN_FILE
        write_private(token_path, token)

        args = [
            "--head",
            "--port", str(port or free_port("")),
            "--dashboard-port", str(free_port("")),
            "--include-dashboard", "false",
            "--disable-usage-stats",
            *_node_args(num_cpus, num_gpus, resources, labels, object_store_memory, node_ip_address),
        ]  # fmt: skip
        head = _launch_ray_start(args, temp_dir, token_path, _HEAD_LOG)
        cluster = cls(
            "",
            temp_dir=temp_dir,
            auth_token=token,
            head_process=head,
            owns_temp_dir=owns_temp_dir,
        )
        try:
            cluster.address = _wait_for_head(head, temp_dir, timeout)
            cluster._connect(namespace=namespace, log_to_driver=log_to_driver, timeout=timeout)
        except BaseException:
            cluster._owns_temp_dir = False  # keep the logs of a failed start
            cluster.stop()
            raise
        return cluster

    @classmethod
    def join(
        cls,
        address: str,
        *,
        auth_token: str | None = None,
        namespace: str = "renderfarm",
        log_to_driver: bool = True,
        timeout: float = 30.0,
    ) -> RayCluster:
        """Connect this process as a driver to the cluster at `address` (host:port).

        Starts nothing; `stop()` only disconnects. With `auth_token` the driver uses
        token auth with that token. Without it, an explicit `RAY_AUTH_MODE` in the
        environment is respected; otherwise token auth is used when a token can be
        found (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, ~/.ray/auth_token), exactly the
        rule `ray start --head` applies, and it is disabled when none can.
        """
        _ensure_not_connected()
        if "://" in address:
            raise ValueError(f"expected host:port for a Ray GCS, got {address!r}")
        cluster = cls(address, auth_token=auth_token)
        try:
            cluster._connect(namespace=namespace, log_to_driver=log_to_driver, timeout=timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def join_node(
        cls,
        address: str,
        *,
        auth_token: str,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
        namespace: str = "renderfarm",
        log_to_driver: bool = True,
        timeout: float = 60.0,
    ) -> RayCluster:
        """Join this machine to the cluster at `address` as a Ray node (`ray start --address`, with the
        cluster's `auth_token`, in a private temp dir), then connect this process as a driver.

        `resources` and `labels` advertise what the node offers (renderfarm pins each worker to its node by
        a resource named after it). `stop()` disconnects and ends the node: its actors die with it.
        """
        _ensure_not_connected()
        if "://" in address or ":" not in address:
            raise ValueError(f"expected HOST:PORT of the Ray head, got {address!r}")
        if not auth_token:
            raise ValueError("the Ray cluster's token is needed to join it (RAY_AUTH_TOKEN)")
        host, _, port = address.rpartition(":")
        _wait_for_port(host, int(port), timeout)
        temp_dir = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir="/tmp"))
        token_path = temp_dir / _TOKEN_FILE
        write_private(token_path, auth_token)
        args = ["--address", address, *_node_args(num_cpus, num_gpus, resources, labels, None, None)]
        process = _launch_ray_start(args, temp_dir, token_path, "ray-node.log")
        # The node process is the cluster's "head" as far as stopping goes: this machine's Ray processes.
        cluster = cls(address, temp_dir=temp_dir, auth_token=auth_token, head_process=process, owns_temp_dir=True)
        try:
            deadline = time.monotonic() + timeout
            log = temp_dir / "ray-node.log"
            while b"Ray runtime started" not in (log.read_bytes() if log.exists() else b""):
                if process.poll() is not None:
                    raise RuntimeError(f"`ray start --address {address}` exited with {process.returncode}: "
                                       f"{_tail(log)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"this machine did not join the Ray cluster at {address} within {timeout:g}s")
                time.sleep(0.2)
            cluster._connect(namespace=namespace, log_to_driver=log_to_driver, timeout=timeout)
            wanted = set(resources or ())
            while wanted and not any(n.alive and wanted <= set(n.resources) for n in cluster.nodes()):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"this machine's Ray node did not register with {address}: {_tail(log)}")
                time.sleep(0.2)
        except BaseException:
            cluster._owns_temp_dir = False  # keep the logs of a failed join
            cluster.stop()
            raise
        return cluster

    # -- driver connection --------------------------------------------------------
    def _connect(self, *, namespace: str, log_to_driver: bool, timeout: float) -> None:
        host, _, port = self.address.rpartition(":")
        _wait_for_port(host, int(port), timeout)
        self._saved_env = {name: os.environ.get(name) for name in _AUTH_ENV}
        for name, value in _driver_auth_env(self.auth_token).items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reload_ray_auth()
        try:
            # Explicit address: never RAY_ADDRESS, never a stale ray_current_cluster.
            ray.init(address=self.address, namespace=namespace, log_to_driver=log_to_driver)
        except ConnectionError as exc:
            if ray.is_initialized():
                ray.shutdown()
            mode = os.environ.get("RAY_AUTH_MODE", "unset")
            raise ConnectionError(
                f"could not connect to the Ray cluster at {self.address} (RAY_AUTH_MODE={mode}): "
                f"{exc}. If Ray logged InvalidAuthToken, the cluster uses another token: "
                "pass auth_token= (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)"
            ) from exc
        self._connected = True

    def join_env(self) -> dict[str, str]:
        """Environment another process needs to join this cluster: a driver
        (`ray.init()` or `RayCluster.join`) or a node (`ray start --address`).
        It carries the token: hand it only to processes you trust."""
        env = {"RAY_ADDRESS": self.address}
        if self.auth_token is not None:
            env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.auth_token})
        else:  # joined without an explicit token: pass on what our driver used
            env["RAY_AUTH_MODE"] = os.environ.get("RAY_AUTH_MODE") or "disabled"
            for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
                if os.environ.get(name):
                    env[name] = os.environ[name]
        return env

    def add_node(
        self,
        num_cpus: int | None = None,
        num_gpus: int | None = None,
        resources: dict[str, float] | None = None,
        *,
        labels: dict[str, str] | None = None,
        object_store_memory: int | None = None,
        timeout: float = 60.0,
    ) -> RayNode:
        """Start one more Ray node on this machine (`ray start --address`), joined to
        this private cluster with its token; `stop()` ends it with the rest.

        Useful to stand in for a multi-GPU-node farm on one machine (give each node
        its own `resources`/`labels`). Returns the new node once it is alive.
        """
        if self._head is None or self.temp_dir is None or self.auth_token is None:
            raise RuntimeError("add_node() needs a cluster made by start_local()")
        if not self.is_connected:
            raise RuntimeError(f"not connected to the Ray cluster at {self.address}")
        known = {node.node_id for node in self.nodes()}
        args = [
            "--address", self.address,
            *_node_args(num_cpus, num_gpus, resources, labels, object_store_memory, None),
        ]  # fmt: skip
        log_name = f"ray-node-{len(self._extra_nodes) + 1}.log"
        process = _launch_ray_start(args, self.temp_dir, self.temp_dir / _TOKEN_FILE, log_name)
        self._extra_nodes.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = self.temp_dir / log_name
                raise RuntimeError(
                    f"`ray start --address {self.address}` exited with {process.returncode}: "
                    f"{_tail(log)} (log: {log})"
                )
            for node in self.nodes():
                if node.alive and node.node_id not in known:
                    return node
            time.sleep(0.2)
        raise TimeoutError(f"new Ray node did not join {self.address} within {timeout:g}s")

    # -- queries --------------------------------------------------------------------
    @property
    def head_pid(self) -> int | None:
        """PID of the `ray start --head --block` process this cluster started, if any."""
        return self._head.pid if self._head is not None else None

    @property
    def is_connected(self) -> bool:
        return self._connected and ray.is_initialized()

    def nodes(self) -> list[RayNode]:
        """Every node the GCS knows, dead ones included (`alive=False`)."""
        if not self.is_connected:
            raise RuntimeError(f"not connected to the Ray cluster at {self.address}")
        return [_to_node(raw) for raw in ray.nodes()]

    def processes(self) -> list[int]:
        """PIDs of the processes this cluster started on this machine (empty for join)."""
        if self.temp_dir is None or self._head is None:
            return []
        return sorted(_cluster_pids(self.temp_dir, self._own_pids()))

    def _own_pids(self) -> set[int]:
        return {p.pid for p in (self._head, *self._extra_nodes) if p is not None}

    # -- shutdown -------------------------------------------------------------------
    def stop(self, timeout: float = 1.0) -> None:
        """Disconnect the driver, then end every process this cluster started.

        SIGTERM to all of them at once, SIGKILL for whatever is left after `timeout`
        seconds: some Ray daemons take 2-3 s over SIGTERM, and none holds state we
        keep (Redis is the system of record). Idempotent; also runs at exit.
        """
        if self._stopped:
            return
        self._stopped = True
        atexit.unregister(self.stop)
        try:
            if self._connected:
                self._connected = False
                ray.shutdown()
        finally:
            self._restore_env()
            if self._head is not None and self.temp_dir is not None:
                _terminate(self.temp_dir, [self._head, *self._extra_nodes], timeout)
            if self._owns_temp_dir and self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _restore_env(self) -> None:
        if self._saved_env is None:
            return
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env = None
        _reload_ray_auth()

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = f"private, temp_dir={str(self.temp_dir)!r}" if self._head else "joined"
        state = "stopped" if self._stopped else "connected" if self._connected else "idle"
        return f"RayCluster({self.address!r}, {kind}, {state})"


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process, without importing torch.

    Honors CUDA_VISIBLE_DEVICES. Asks NVML through the copy Ray ships (what Ray
    itself uses to count GPUs), then `nvidia-smi -L`; 0 when neither finds any.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return 0
    count = _nvml_gpu_count()
    if count is None:
        count = _nvidia_smi_gpu_count()
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


# -- helpers --------------------------------------------------------------------------


def _ensure_not_connected() -> None:
    if ray.is_initialized():
        raise RuntimeError(
            "this process is already a Ray driver; Ray allows one cluster per process: "
            "stop() the other RayCluster (or call ray.shutdown()) first"
        )


def _node_args(
    num_cpus: int | None,
    num_gpus: int | None,
    resources: dict[str, float] | None,
    labels: dict[str, str] | None,
    object_store_memory: int | None,
    node_ip_address: str | None,
) -> list[str]:
    """`ray start` options shared by the head and added nodes: explicit free ports,
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


def _launch_ray_start(
    args: list[str], temp_dir: Path, token_path: Path, log_name: str
) -> subprocess.Popen[bytes]:
    """`ray start <args> --block --temp-dir <temp_dir>` in token mode, logging to temp_dir."""
    env = dict(os.environ)
    for name in ("RAY_ADDRESS", *_AUTH_ENV):
        env.pop(name, None)
    env.update(
        {
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_path),
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


def _driver_auth_env(auth_token: str | None) -> dict[str, str | None]:
    """The RAY_AUTH_* variables our driver runs with (None = unset)."""
    if auth_token is not None:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token, "RAY_AUTH_TOKEN_PATH": None}
    if os.environ.get("RAY_AUTH_MODE"):
        return {}
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    has_token = loader.has_token(ignore_auth_mode=True)
    return {"RAY_AUTH_MODE": "token" if has_token else "disabled"}


def _reload_ray_auth() -> None:
    """Make Ray's C++ side re-read RAY_AUTH_* (it caches the mode and the token)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _wait_for_head(head: subprocess.Popen[bytes], temp_dir: Path, timeout: float) -> str:
    """Wait until `ray start` has written the GCS address (it does so once all is up)."""
    address_file = temp_dir / _ADDRESS_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(
                f"`ray start --head` exited with {head.returncode}: "
                f"{_tail(temp_dir / _HEAD_LOG)} (log: {temp_dir / _HEAD_LOG})"
            )
        try:
            address = address_file.read_text().strip()
        except FileNotFoundError:
            address = ""
        if address:
            return address
        time.sleep(0.05)
    raise TimeoutError(
        f"Ray head not up after {timeout:g}s: {_tail(temp_dir / _HEAD_LOG)} "
        f"(log: {temp_dir / _HEAD_LOG})"
    )


def _wait_for_port(host: str, port: int, timeout: float) -> None:
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


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return tail_lines(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


def _to_node(raw: Mapping[str, Any]) -> RayNode:
    resources = {str(k): float(v) for k, v in (raw.get("Resources") or {}).items()}
    return RayNode(
        node_id=str(raw.get("NodeID", "")),
        ip=str(raw.get("NodeManagerAddress", "")),
        alive=bool(raw.get("Alive", raw.get("alive", False))),
        num_cpus=resources.get("CPU", 0.0),
        num_gpus=resources.get("GPU", 0.0),
        resources=resources,
        labels={str(k): str(v) for k, v in (raw.get("Labels") or {}).items()},
    )


# -- finding and ending the processes of a private cluster ---------------------------


def _cluster_pids(temp_dir: Path, own_pids: set[int]) -> set[int]:
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


def _terminate(temp_dir: Path, children: list[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM every process of the cluster at once, SIGKILL the rest after `grace`."""
    own = {child.pid for child in children}
    pids = _cluster_pids(temp_dir, own)
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
        leftovers = {pid for pid in pids if is_alive(pid)} | _cluster_pids(temp_dir, own)
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


# -- GPUs -------------------------------------------------------------------------------


def _nvml_gpu_count() -> int | None:
    try:
        from ray._private.thirdparty import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: ask nvidia-smi
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _nvidia_smi_gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
