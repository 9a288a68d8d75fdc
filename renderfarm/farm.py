"""Bring a farm up and down.

`Farm` (the head, `renderfarm up`): Redis (embedded, or the one the settings name), Ray (a private cluster, or
one it joins as a driver), one RenderWorker per local GPU (or per declared node on a machine without GPUs;
none with `local_workers=False`), and the scheduler actor. `WorkerNode` (`renderfarm worker`): this
machine's workers in a farm whose head runs elsewhere.

    with Farm(Settings.load()) as farm:
        client = farm.client()
        ...
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import signal
import socket
import time
from pathlib import Path
from typing import Any

from renderfarm.cluster.data_dir import DataDirClaim
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.processes import write_private
from renderfarm.cluster.redis_server import EmbeddedRedis, connect, redact
from renderfarm.cluster.store import Store
from renderfarm.config import (
    NodeDeclaration,
    Settings,
    head_published,
    load_nodes,
    with_farm_wide,
)
from renderfarm.errors import FarmError
from renderfarm.jobs import JobState

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT = 180.0  # importing torch + diffusers in a fresh process on 2 busy cores


REDIS_PASSWORD_FILE = "redis_password"
RAY_TOKEN_FILE = "ray_auth_token"


def _secret(path: Path, env: str | None = None) -> str:
    """A secret kept in `path` (mode 0600): the value of environment variable `env` when set (written to the
    file), else the file's when it exists, else a new random one."""
    given = os.environ.get(env, "") if env else ""
    if not given and path.exists():
        return path.read_text().strip()
    value = given or secrets.token_hex(32)  # hex: never starts with '-', so `--ray-token VALUE` reads it
    write_private(path, value)
    return value


def node_resource(name: str) -> str:
    """The Ray resource a machine advertises for each of its workers: the worker asks for it, so it runs there."""
    return f"renderfarm_node_{name}"


def card_labels(nodes: list[dict[str, Any]]) -> dict[str, str]:
    """Ray node labels describing this machine's cards (the first one's name, VRAM and compute capability,
    and how many workers), where known."""
    if not nodes:
        return {}
    first = nodes[0]
    labels = {"renderfarm.io/workers": str(len(nodes))}
    if first.get("gpu"):
        labels["renderfarm.io/gpu"] = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(first["gpu"])).strip("-._")[:63]
    if first.get("vram_gib"):
        labels["renderfarm.io/vram-gib"] = f"{float(first['vram_gib']):g}"
    if first.get("compute_capability"):
        labels["renderfarm.io/cc"] = str(first["compute_capability"])
    return {k: v for k, v in labels.items() if v}


def node_plan(declared: list[NodeDeclaration] | None, settings: Settings) -> list[dict[str, Any]]:
    """One worker per local GPU (with the overrides of a declared entry of its name); without GPUs, one
    simulated worker per declared node."""
    from renderfarm.cluster.gpus import gpu_count

    gpus = gpu_count()
    if gpus and not any(d.vram_gib is not None for d in declared or ()):
        host = socket.gethostname().split(".")[0]
        kept = {"reserve_gib", "forbid_models", "max_batch", "lora_dir"}  # what an entry overrides of a real GPU
        overrides = {d.name: d.model_dump(mode="json", include=kept) for d in declared or ()}
        return [{"name": f"{host}-gpu{i}", "simulated": False, "gpu_index": i, **overrides.get(f"{host}-gpu{i}", {})}
                for i in range(gpus)]
    if declared is None:
        declared = load_nodes(settings.nodes_file)
        log.warning("no GPU found on this machine: simulating the nodes of %s on the CPU (%s); pass --nodes FILE "
                    "to choose them", settings.nodes_file or "the example nodes file",
                    ", ".join(f"{d.name} {d.vram_gib:g} GiB" for d in declared if d.vram_gib is not None))
    for decl in declared:
        if decl.vram_gib is None:
            raise FarmError(f"node {decl.name}: a simulated node needs vram_gib (this machine has no GPU)")
    return [{**decl.model_dump(mode="json"), "simulated": True} for decl in declared]


def start_workers(
    nodes: list[dict[str, Any]], redis_url: str, settings: Settings, key_prefix: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One RenderWorker actor per planned node, each pinned to this machine's Ray node by its resource and
    named `<prefix>-worker-<name>` (the scheduler finds it by that name); their handles and ready() infos."""
    import ray

    from renderfarm.actors.worker import RENDER_THREADS, RenderWorker

    if not nodes:
        return {}, []
    threads = settings.torch_threads or max(1, (os.cpu_count() or 1) // len(nodes))
    worker_settings = settings.model_copy(update={"torch_threads": threads}).model_dump(mode="json")
    # `shutdown` runs in its own thread ("control"), so a stop reaches a worker in the middle of a render; the
    # other calls get two threads, so that a batch's images are written and its jobs completed while the next
    # batch renders (RenderWorker._render: one batch renders at a time).
    remote_worker = ray.remote(concurrency_groups={"control": 1})(RenderWorker)
    handles = {}
    for node in nodes:
        actor = f"{key_prefix}-worker-{node['name']}"
        options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "name": actor, "max_concurrency": RENDER_THREADS,
                                   "resources": {node_resource(node["name"]): 1}}
        if not node["simulated"]:
            options["num_gpus"] = 1
        try:
            handles[node["name"]] = remote_worker.options(**options).remote(
                node["name"], redis_url, worker_settings, {**node, "actor": actor}, key_prefix)
        except ValueError as exc:  # the name is taken: a live worker of that name is in the farm already
            raise FarmError(f"node {node['name']}: {exc}") from None
    try:
        ready = ray.get([w.ready.remote() for w in handles.values()], timeout=ACTOR_START_TIMEOUT)
    except ray.exceptions.GetTimeoutError:
        raise FarmError(f"workers did not start within {ACTOR_START_TIMEOUT:.0f} s") from None
    except ray.exceptions.RayActorError as exc:
        raise FarmError(f"a worker failed to start: {exc}") from None
    return handles, ready


def warm(workers: dict[str, Any], models: list[str]) -> None:
    """Load `models` on every worker before it takes its first job."""
    import ray

    if models:
        ray.get([w.warm.remote(m) for w in workers.values() for m in models], timeout=ACTOR_START_TIMEOUT)


SHUTDOWN_REASON = "interrupted by shutdown of node {node}"


def stop_workers(workers: dict[str, Any], redis_url: str | None = None, key_prefix: str = "rf") -> list[str]:
    """Tell each worker to stop (its record says so), kill its actor, and hand the jobs it held back to the
    queue at once (with `redis_url`): a clean stop is not a dead node, and its jobs need not wait for their
    leases to expire. Returns the ids handed back."""
    import ray

    for worker in workers.values():
        try:
            ray.get(worker.shutdown.options(concurrency_group="control").remote(), timeout=10)
        except Exception:
            pass
        ray.kill(worker, no_restart=True)
    names = set(workers)
    workers.clear()
    if not redis_url or not names:
        return []
    try:
        with connect(redis_url, socket_timeout=2.0) as client:
            return hand_back(Store(client, Keys(key_prefix)), names)
    except Exception as exc:  # Redis gone too: the leases expire and the scheduler requeues them then
        log.warning("could not hand back the jobs of %s: %s", ", ".join(sorted(names)), exc)
        return []


def hand_back(store: Store, nodes: set[str]) -> list[str]:
    """Put every job leased to or running on `nodes` back in the queue, each with why."""
    held = [*store.ids_in(JobState.LEASED, limit=100_000), *store.ids_in(JobState.RUNNING, limit=100_000)]
    back = []
    for job in store.get_many(held):
        if job is not None and job.node in nodes and store.requeue(
                job.id, SHUTDOWN_REASON.format(node=job.node), node=job.node):
            back.append(job.id)
    if back:
        log.info("handed %d job(s) back to the queue: their nodes stopped", len(back))
    return back


class _Started:
    """`start()` runs `_start()`, and `stop()` when that fails half-way; `with` does both."""

    def _start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self):
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Farm(_Started):
    def __init__(
        self,
        settings: Settings,
        nodes: list[NodeDeclaration] | None = None,
        *,
        ray_address: str | None = None,
        key_prefix: str = "rf",
        warm_models: list[str] | None = None,
        log_to_driver: bool = True,
        head: bool = False,
        advertise_ip: str | None = None,
        ray_port: int | None = None,
        local_workers: bool = True,
    ):
        """`head`: other machines join this farm (`WorkerNode`): the embedded Redis (when the settings name no
        Redis) is bound to `advertise_ip` (127.0.0.1 without one) with a password, and a private Ray cluster
        gets a token. Each is REDIS_PASSWORD / RAY_AUTH_TOKEN when set, else the one kept in the data directory
        (0600) by an earlier start, else a new random one, and is kept there, so a restarted head keeps both.
        `local_workers=False`: a head without GPUs of its own."""
        self.head = head
        self.advertise_ip = advertise_ip
        self.ray_port = ray_port
        self.local_workers = local_workers
        self.settings = settings
        self.declared = nodes
        self.ray_address = ray_address
        self.key_prefix = key_prefix
        self.warm_models = warm_models or []
        self.log_to_driver = log_to_driver  # False keeps workers' output off this process's stdout
        self.redis_url: str | None = None
        self.nodes: list[dict[str, Any]] = []
        self._embedded: EmbeddedRedis | None = None
        self._redis_password: str | None = None  # a head's, once its Redis started
        self._ray: Any = None  # cluster.ray_cluster.RayCluster once started
        self._workers: dict[str, Any] = {}
        self._scheduler: Any = None
        self._claim: DataDirClaim | None = None  # the data directory, while this farm runs on it
        self._webhooks: Any = None  # webhooks.WebhookDispatcher, with its own Redis client

    # --- lifecycle ------------------------------------------------------------------------------------

    def _start(self) -> None:
        import ray  # imported here, not at module level: importing this module (the CLI does) loads no Ray

        from renderfarm.cluster.ray_cluster import RayCluster
        from renderfarm.scheduler.scheduler import Scheduler

        data_dir = self.settings.data_dir
        self._claim = DataDirClaim(data_dir)
        cleaned = self._claim.acquire()  # one farm per data dir; stops what a killed predecessor left running
        self._start_redis()
        self._claim.record(redis_pid=self.redis_pid)
        self._start_webhooks()

        nodes = node_plan(self.declared, self.settings) if self.local_workers else []
        if cleaned and nodes:  # the killed farm's workers were stopped with it: their jobs come back now
            with connect(self.redis_url) as client:
                hand_back(Store(client, Keys(self.key_prefix)), {n["name"] for n in nodes})
        if self.ray_address:
            self._ray = RayCluster.join(self.ray_address, log_to_driver=self.log_to_driver)
        else:
            token = _secret(data_dir / RAY_TOKEN_FILE, env="RAY_AUTH_TOKEN") if self.head else None
            self._ray = RayCluster.start_local(
                num_cpus=os.cpu_count() or 1, resources={node_resource(n["name"]): 1 for n in nodes} or None,
                labels=card_labels(nodes) or None, node_ip_address=self.advertise_ip, port=self.ray_port,
                auth_token=token, log_to_driver=self.log_to_driver)
        log.info("ray: %s", self._ray.address)
        self._claim.record(ray_temp_dir=self.ray_temp_dir if not self.ray_address else None)

        self._workers, self.nodes = start_workers(nodes, self.redis_url, self.settings, self.key_prefix)
        warm(self._workers, self.warm_models)

        # Records only, no actor handles: the scheduler finds each worker by its actor's name (scheduler.py).
        infos = {info["name"]: (None, info) for info in self.nodes}
        # Restarted by Ray if its process dies; it then rebuilds its view from Redis and runs again by itself.
        # Workers that join later (`renderfarm worker`, another machine) are found through their Redis records.
        self._scheduler = (
            ray.remote(Scheduler)
            .options(num_cpus=0, max_concurrency=4, max_restarts=-1, name=f"{self.key_prefix}-scheduler")
            .remote(self.redis_url, self.settings.model_dump(mode="json"), infos, self.key_prefix, autostart=True)
        )
        ray.get(self._scheduler.stats.remote(), timeout=ACTOR_START_TIMEOUT)  # constructed: recovery done

    def _start_redis(self) -> None:
        """Check the Redis the settings name, or start the embedded one; publish the farm-wide settings there."""
        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.redis_url:
            connect(self.settings.redis_url).close()  # fail early, naming the URL
            self.redis_url = self.settings.redis_url
        else:
            self._embedded = self._embedded_redis()
            self.redis_url = self._embedded.start()
        log.info("redis: %s", redact(self.redis_url))
        with connect(self.redis_url) as client:
            Store(client, Keys(self.key_prefix)).publish_settings(head_published(self.settings))
            Store(client, Keys(self.key_prefix)).mark_farm()  # a client given the wrong database finds no marker

    def _start_webhooks(self) -> None:
        """The head delivers webhooks (renderfarm/webhooks) in daemon threads of its own process, beside any
        API process's dispatcher: never in the scheduler, never waiting on it."""
        from renderfarm.webhooks import WebhookDispatcher

        self._webhooks = WebhookDispatcher(connect(self.redis_url), Keys(self.key_prefix), self.settings).start()

    def _stop_webhooks(self) -> None:
        if self._webhooks is not None:
            self._webhooks.stop()
            self._webhooks.store.close()
            self._webhooks = None

    def _embedded_redis(self, port: int | None = None) -> EmbeddedRedis:
        """This farm's embedded redis-server, not started: `start()` and `crash_redis()` both make it here, so a
        restarted one has the same address, password and data directory. On a head other machines reach it:
        bound to `advertise_ip` (127.0.0.1 without one), with the password kept in the data directory (read
        once per farm); otherwise on loopback without a password. `port=None`: a free one."""
        data_dir = self.settings.data_dir / "redis"
        if not self.head:
            return EmbeddedRedis(data_dir, port=port)
        if self._redis_password is None:
            self._redis_password = _secret(self.settings.data_dir / REDIS_PASSWORD_FILE, env="REDIS_PASSWORD")
        return EmbeddedRedis(data_dir, port=port, host=self.advertise_ip or "127.0.0.1",
                             password=self._redis_password)

    @property
    def ray_token(self) -> str | None:
        """The Ray cluster's token (what another machine needs to join), when this farm started Ray."""
        return self._ray.auth_token if self._ray is not None and not self.ray_address else None

    def stop(self) -> None:
        """Stop everything this farm started, in reverse order; safe to call twice."""
        import ray

        self._stop_webhooks()  # first: what finishes meanwhile stays in the stream for the next dispatcher
        if self._scheduler is not None:
            try:
                ray.get(self._scheduler.stop.remote(), timeout=10)
                ray.get(self._scheduler.join.remote(30), timeout=40)
            except Exception as exc:  # stopping anyway
                log.warning("scheduler did not stop cleanly: %s", exc)
            self._scheduler = None
        stop_workers(self._workers, self.redis_url, self.key_prefix)
        if self._ray is not None:
            self._ray.stop()
            self._ray = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None
        if self._claim is not None:
            self._claim.release()
            self._claim = None


    # --- use ----------------------------------------------------------------------------------------

    def client(self):
        from renderfarm.client import FarmClient

        if self.redis_url is None:
            raise FarmError("the farm is not started")
        return FarmClient(self.redis_url, key_prefix=self.key_prefix)

    @property
    def redis_pid(self) -> int | None:
        """The embedded redis-server's PID; None when the farm uses a Redis it was given."""
        return self._embedded.pid if self._embedded else None

    @property
    def ray_address_in_use(self) -> str | None:
        return self._ray.address if self._ray else None

    @property
    def ray_temp_dir(self) -> str | None:
        """Where Ray keeps this farm's logs (private to the farm unless it joined a cluster)."""
        return str(self._ray.temp_dir) if self._ray and self._ray.temp_dir else None

    def scheduler_stats(self) -> dict[str, Any]:
        import ray

        return ray.get(self._scheduler.stats.remote(), timeout=10)

    def kill_scheduler(self) -> None:
        """Kill the scheduler's process abruptly; Ray starts a new one, which recovers from Redis (chaos tests)."""
        import ray

        ray.kill(self._scheduler, no_restart=False)

    def wait_scheduler(self, timeout: float = ACTOR_START_TIMEOUT) -> dict[str, Any]:
        """Block until the scheduler answers (after a restart); its stats."""
        import ray

        deadline = time.monotonic() + timeout
        while True:
            try:
                return ray.get(self._scheduler.stats.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def crash_redis(self, down_seconds: float = 1.0) -> float:
        """SIGKILL the embedded redis-server (no shutdown, no final fsync), wait `down_seconds`, and start it
        again as it was (same address and port, same password, same data directory) from its append-only file
        (chaos tests); returns how long Redis was unreachable."""
        if self._embedded is None or self._embedded.pid is None:
            raise FarmError("this farm uses a Redis it was given: it cannot crash it")
        old = self._embedded
        crashed = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        old.stop()  # reaps the dead process
        time.sleep(down_seconds)
        self._embedded = self._embedded_redis(port=old.port)
        self._embedded.start()
        if self._claim is not None:
            self._claim.record(redis_pid=self.redis_pid)
        return time.monotonic() - crashed


class WorkerNode(_Started):
    """This machine's workers in a farm whose head runs elsewhere (`renderfarm worker`).

    The machine joins the head's Ray cluster as a node (with the cluster's token), advertising each of its
    workers as a resource and its cards as labels, and starts one RenderWorker per local GPU (or per declared
    node on a machine without GPUs), pinned to that node. The scheduler finds them through their Redis records
    within `eta_seconds` and sends them work; nothing else restarts. Stopping (or this process dying) takes
    them out: the scheduler sees their actors gone, and their jobs go back to the queue.
    """

    def __init__(
        self,
        settings: Settings,
        address: str,
        redis_url: str,
        nodes: list[NodeDeclaration] | None = None,
        *,
        ray_token: str,
        key_prefix: str = "rf",
        log_to_driver: bool = True,
        warm_models: list[str] | None = None,
    ):
        self.warm_models = warm_models or []
        self.settings = settings
        self.address = address
        self.redis_url = redis_url
        self.declared = nodes
        self.ray_token = ray_token
        self.key_prefix = key_prefix
        self.log_to_driver = log_to_driver
        self.nodes: list[dict[str, Any]] = []
        self._ray: Any = None
        self._workers: dict[str, Any] = {}

    def _start(self) -> None:
        from renderfarm.cluster.ray_cluster import RayCluster

        # Fails early, naming the URL (and refusing an open remote Redis); the head's farm-wide settings
        # (leases, time limits, retries, heartbeats) win over this machine's own.
        with connect(self.redis_url) as client:
            published = Store(client, Keys(self.key_prefix)).published_settings()
        self.settings = with_farm_wide(self.settings, published)
        plan = node_plan(self.declared, self.settings)
        self._ray = RayCluster.join_node(
            self.address, auth_token=self.ray_token, num_cpus=os.cpu_count() or 1,
            num_gpus=sum(1 for n in plan if not n["simulated"]),
            resources={node_resource(n["name"]): 1 for n in plan}, labels=card_labels(plan) or None,
            log_to_driver=self.log_to_driver,
        )
        self._workers, self.nodes = start_workers(plan, self.redis_url, self.settings, self.key_prefix)
        warm(self._workers, self.warm_models)

    def stop(self) -> None:
        """Stop this machine's workers and take it out of the Ray cluster; safe to call twice."""
        if self._workers:
            stop_workers(self._workers, self.redis_url, self.key_prefix)
        if self._ray is not None:
            self._ray.stop()
            self._ray = None

