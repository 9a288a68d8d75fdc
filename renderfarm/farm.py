"""Bring a farm up and down: Redis (embedded or given), Ray (private or joined), one RenderWorker per
GPU (or per declared node on a machine without GPUs), and the scheduler actor.

    with Farm(Settings.load()) as farm:
        client = farm.client()
        ...
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from renderfarm.cluster.redis_server import EmbeddedRedis, connect, redact
from renderfarm.config import NodeDeclaration, Settings, load_nodes

log = logging.getLogger(__name__)

ACTOR_START_TIMEOUT = 180.0  # importing torch + diffusers in a fresh process on 2 busy cores


class FarmError(RuntimeError):
    pass


class Farm:
    def __init__(
        self,
        settings: Settings,
        nodes: list[NodeDeclaration] | None = None,
        *,
        ray_address: str | None = None,
        key_prefix: str = "rf",
        warm_models: list[str] | None = None,
        log_to_driver: bool = True,
    ):
        self.settings = settings
        self.declared = nodes
        self.ray_address = ray_address
        self.key_prefix = key_prefix
        self.warm_models = warm_models or []
        self.log_to_driver = log_to_driver  # False keeps workers' output off this process's stdout
        self.redis_url: str | None = None
        self.nodes: list[dict[str, Any]] = []
        self._embedded: EmbeddedRedis | None = None
        self._ray: Any = None  # cluster.ray_cluster.RayCluster once started
        self._workers: dict[str, Any] = {}
        self._scheduler: Any = None

    # --- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> Farm:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        import ray  # imported here, not at module level: `renderfarm plan` and the client need no Ray

        from renderfarm.actors.worker import RenderWorker
        from renderfarm.cluster.ray_cluster import RayCluster
        from renderfarm.scheduler.scheduler import Scheduler

        data_dir = self.settings.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.redis_url:
            connect(self.settings.redis_url).close()  # fail early, naming the URL
            self.redis_url = self.settings.redis_url
        else:
            self._embedded = EmbeddedRedis(data_dir / "redis")
            self.redis_url = self._embedded.start()
        log.info("redis: %s", redact(self.redis_url))

        if self.ray_address:
            self._ray = RayCluster.join(self.ray_address, log_to_driver=self.log_to_driver)
        else:
            self._ray = RayCluster.start_local(num_cpus=os.cpu_count() or 1, log_to_driver=self.log_to_driver)
        log.info("ray: %s", self._ray.address)

        nodes = self._node_plan()
        threads = self.settings.torch_threads or max(1, (os.cpu_count() or 1) // len(nodes))
        worker_settings = self.settings.model_copy(update={"torch_threads": threads}).model_dump(mode="json")
        remote_worker = ray.remote(RenderWorker)
        for node in nodes:
            options: dict[str, Any] = {"num_cpus": 0, "max_restarts": 0, "name": f"{self.key_prefix}-worker-{node['name']}"}
            if not node["simulated"]:
                options["num_gpus"] = 1
            self._workers[node["name"]] = remote_worker.options(**options).remote(
                node["name"], self.redis_url, worker_settings, node, self.key_prefix
            )
        try:
            ready = ray.get([w.ready.remote() for w in self._workers.values()], timeout=ACTOR_START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            raise FarmError(f"workers did not start within {ACTOR_START_TIMEOUT:.0f} s") from None
        except ray.exceptions.RayActorError as exc:
            raise FarmError(f"a worker failed to start: {exc}") from None
        self.nodes = ready
        if self.warm_models:
            ray.get(
                [w.warm.remote(m) for w in self._workers.values() for m in self.warm_models],
                timeout=ACTOR_START_TIMEOUT,
            )

        infos = {info["name"]: (self._workers[info["name"]], info) for info in ready}
        # Restarted by Ray if its process dies; it then rebuilds its view from Redis and runs again by itself.
        self._scheduler = (
            ray.remote(Scheduler)
            .options(num_cpus=0, max_concurrency=4, max_restarts=-1, name=f"{self.key_prefix}-scheduler")
            .remote(self.redis_url, self.settings.model_dump(mode="json"), infos, self.key_prefix, autostart=True)
        )
        ray.get(self._scheduler.stats.remote(), timeout=ACTOR_START_TIMEOUT)  # constructed: recovery done

    def _node_plan(self) -> list[dict[str, Any]]:
        """One worker per local GPU; without GPUs, one simulated worker per declared node."""
        from renderfarm.cluster.ray_cluster import gpu_count

        gpus = gpu_count()
        if gpus and self.declared is None:
            host = socket.gethostname().split(".")[0]
            return [{"name": f"{host}-gpu{i}", "simulated": False, "gpu_index": i} for i in range(gpus)]
        declared = self.declared if self.declared is not None else load_nodes(self.settings.nodes_file)
        return [{**decl.model_dump(), "simulated": True} for decl in declared]

    def stop(self) -> None:
        """Stop everything this farm started, in reverse order; safe to call twice."""
        import ray

        if self._scheduler is not None:
            try:
                ray.get(self._scheduler.stop.remote(), timeout=10)
                ray.get(self._scheduler.join.remote(30), timeout=40)
            except Exception as exc:  # stopping anyway
                log.warning("scheduler did not stop cleanly: %s", exc)
            self._scheduler = None
        for worker in self._workers.values():
            try:
                ray.get(worker.shutdown.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(worker, no_restart=True)
        self._workers.clear()
        if self._ray is not None:
            self._ray.stop()
            self._ray = None
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    def __enter__(self) -> Farm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

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

    def wait_idle(self, timeout: float = 30.0) -> None:
        """Block until nothing is queued or in flight (for tests and the demo)."""
        client = self.client()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = client.store.counts()
            if counts["queued"] + counts["leased"] + counts["running"] == 0:
                return
            time.sleep(0.05)
        raise TimeoutError(f"farm still busy after {timeout} s")

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
        again on the same port and data directory, from its append-only file (chaos tests); returns how long
        Redis was unreachable."""
        if self._embedded is None or self._embedded.pid is None:
            raise FarmError("this farm uses a Redis it was given: it cannot crash it")
        old = self._embedded
        port = old.port
        crashed = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        old.stop()  # reaps the dead process
        time.sleep(down_seconds)
        self._embedded = EmbeddedRedis(old.data_dir, port=port)
        self._embedded.start()
        return time.monotonic() - crashed

    def kill_worker(self, name: str) -> None:
        """Kill a worker's process abruptly (tests: the scheduler must recover its jobs)."""
        import ray

        ray.kill(self._workers[name], no_restart=True)

