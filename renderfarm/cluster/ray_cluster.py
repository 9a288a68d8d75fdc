"""This process's handle on a Ray cluster: start a private one (`RayCluster.start_local`), join one as a
driver (`join`) or as a node (`join_node`), add nodes on this machine (`add_node`), list its nodes, and stop
what was started. Ray allows one driver per process, so one RayCluster is connected at a time.

This module imports no actor code and no torch: it only owns the Ray runtime. Its two traps live in their own
modules: the `ray start` processes, their private temp dir and explicit addresses in `ray_processes`
(stale addresses), and the RAY_AUTH_* variables of every process in `ray_auth` (token authentication).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from renderfarm.cluster import ray_auth
from renderfarm.cluster.ray_processes import (
    HEAD_LOG,
    NODE_LOG,
    claim_temp_dir,
    cluster_pids,
    head_args,
    launch_ray_start,
    new_temp_dir,
    node_args,
    tail,
    terminate,
    token_path,
    wait_for_head,
    wait_for_node,
    wait_for_port,
    write_token,
)

__all__ = ["RayCluster", "RayNode"]

# The one Ray namespace of every driver of a farm: the scheduler (started by the head's driver) finds the
# workers of `renderfarm worker` drivers by actor name, and Ray looks names up within a namespace only.
NAMESPACE = "renderfarm"


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

    Use `RayCluster.start_local(...)` for a private cluster owned by this process,
    `RayCluster.join(address)` to attach as a driver to a running one, or
    `RayCluster.join_node(address, auth_token=...)` to add this machine to one as a node and
    attach as a driver. Ray allows one driver per process: stop one RayCluster before
    starting or joining another.
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
        # Use start_local() / join() / join_node(); this constructor does not connect.
        self.address = address
        self.temp_dir = temp_dir
        self.auth_token = auth_token
        self._head = head_process
        self._owns_temp_dir = owns_temp_dir
        self._driver_auth = ray_auth.DriverAuth(auth_token)
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
        temp_dir = new_temp_dir() if temp_dir is None else claim_temp_dir(temp_dir)
        token = auth_token or ray_auth.new_token()
        token_file = write_token(temp_dir, token)
        args = [
            *head_args(port),
            *node_args(num_cpus, num_gpus, resources, labels, object_store_memory, node_ip_address),
        ]
        head = launch_ray_start(args, temp_dir, token_file, HEAD_LOG)
        cluster = cls(
            "",
            temp_dir=temp_dir,
            auth_token=token,
            head_process=head,
            owns_temp_dir=owns_temp_dir,
        )
        try:
            cluster.address = wait_for_head(head, temp_dir, timeout)
            cluster._connect(log_to_driver=log_to_driver, timeout=timeout)
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
        log_to_driver: bool = True,
        timeout: float = 30.0,
    ) -> RayCluster:
        """Connect this process as a driver to the cluster at `address` (host:port).

        Starts nothing; `stop()` only disconnects. With `auth_token` the driver uses
        token auth with that token. Without it, an explicit `RAY_AUTH_MODE` in the
        environment is respected; otherwise token auth is used when a token can be
        found (`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH`, ~/.ray/auth_token), exactly the
        rule `ray start --head` applies, and it is disabled when none can
        (`ray_auth.driver_env`).
        """
        _ensure_not_connected()
        if "://" in address:
            raise ValueError(f"expected host:port for a Ray GCS, got {address!r}")
        cluster = cls(address, auth_token=auth_token)
        try:
            cluster._connect(log_to_driver=log_to_driver, timeout=timeout)
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
        wait_for_port(host, int(port), timeout)
        temp_dir = new_temp_dir()
        token_file = write_token(temp_dir, auth_token)
        args = ["--address", address, *node_args(num_cpus, num_gpus, resources, labels, None, None)]
        process = launch_ray_start(args, temp_dir, token_file, NODE_LOG)
        # The node process is the cluster's "head" as far as stopping goes: this machine's Ray processes.
        cluster = cls(address, temp_dir=temp_dir, auth_token=auth_token, head_process=process, owns_temp_dir=True)
        try:
            started = time.monotonic()
            log = temp_dir / NODE_LOG
            wait_for_node(process, log, address, timeout, since=started)
            cluster._connect(log_to_driver=log_to_driver, timeout=timeout)
            wanted = set(resources or ())
            while wanted and not any(n.alive and wanted <= set(n.resources) for n in cluster.nodes()):
                if process.poll() is not None or time.monotonic() > started + timeout:
                    raise RuntimeError(f"this machine's Ray node did not register with {address}: {tail(log)}")
                time.sleep(0.2)
        except BaseException:
            cluster._owns_temp_dir = False  # keep the logs of a failed join
            cluster.stop()
            raise
        return cluster

    # -- driver connection --------------------------------------------------------
    def _connect(self, *, log_to_driver: bool, timeout: float) -> None:
        host, _, port = self.address.rpartition(":")
        wait_for_port(host, int(port), timeout)
        self._driver_auth.apply()
        try:
            # Explicit address: never RAY_ADDRESS, never a stale ray_current_cluster.
            # Ray's own INFO lines ("Connecting to existing Ray cluster ...") are not the farm's news.
            ray.init(address=self.address, namespace=NAMESPACE, log_to_driver=log_to_driver,
                     logging_level=logging.WARNING)
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
        return ray_auth.join_env(self.address, self.auth_token)

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
            *node_args(num_cpus, num_gpus, resources, labels, object_store_memory, None),
        ]  # fmt: skip
        log_name = f"ray-node-{len(self._extra_nodes) + 1}.log"
        process = launch_ray_start(args, self.temp_dir, token_path(self.temp_dir), log_name)
        self._extra_nodes.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = self.temp_dir / log_name
                raise RuntimeError(
                    f"`ray start --address {self.address}` exited with {process.returncode}: "
                    f"{tail(log)} (log: {log})"
                )
            for node in self.nodes():
                if node.alive and node.node_id not in known:
                    return node
            time.sleep(0.2)
        raise TimeoutError(f"new Ray node did not join {self.address} within {timeout:g}s")

    # -- queries --------------------------------------------------------------------
    @property
    def head_pid(self) -> int | None:
        """PID of the `ray start --block` process this cluster started, if any: the head's
        (`start_local`), or this machine's node's (`join_node`)."""
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
        """PIDs of the processes this cluster started on this machine (empty after `join`)."""
        if self.temp_dir is None or self._head is None:
            return []
        return sorted(cluster_pids(self.temp_dir, self._own_pids()))

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
            self._driver_auth.restore()
            if self._head is not None and self.temp_dir is not None:
                terminate(self.temp_dir, [self._head, *self._extra_nodes], timeout)
            if self._owns_temp_dir and self.temp_dir is not None:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        kind = f"private, temp_dir={str(self.temp_dir)!r}" if self._head else "joined"
        state = "stopped" if self._stopped else "connected" if self._connected else "idle"
        return f"RayCluster({self.address!r}, {kind}, {state})"


def _ensure_not_connected() -> None:
    if ray.is_initialized():
        raise RuntimeError(
            "this process is already a Ray driver; Ray allows one cluster per process: "
            "stop() the other RayCluster (or call ray.shutdown()) first"
        )


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
