"""What several test modules share: running the `renderfarm` command in a child process, reading its --json."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_cli(*args: str, cwd=None, token: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python -m renderfarm.cli ARGS` in a child process, offline, with no farm URL or team token inherited
    from the environment (a test passes --redis and `token` itself)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RENDERFARM_REDIS_URL", None)
    env.pop("RENDERFARM_TOKEN", None)
    if token:
        env["RENDERFARM_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "renderfarm.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
        timeout=timeout,
    )


def one_json(proc: subprocess.CompletedProcess[str]) -> dict:
    """The one JSON object a --json command prints on stdout (anything else there fails the test)."""
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"--json must print exactly one line, got: {proc.stdout!r} / {proc.stderr[-2000:]}"
    return json.loads(lines[0])


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what` after `timeout` s:
    a test waits for the event it needs, never for a fixed time that is too short on a busy machine."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(interval)


def rayless_scheduler(redis_url: str, settings: dict, **kwargs):
    """A real Scheduler on a real Redis with one 8 GiB worker that no round ever calls (its slots are full),
    so no Ray is needed; a test may drain the worker instead, or change its slots."""
    from renderfarm.scheduler.scheduler import Scheduler

    sched = Scheduler(redis_url, settings,
                      workers={"n1": (None, {"vram_gib": 8, "card": None, "state": "idle", "loaded": []})}, **kwargs)
    sched.workers["n1"].inflight = sched.settings.worker_queue_depth
    return sched


def put_pngs(root, job_id: str, pngs) -> list[str]:
    """What a worker does with a finished job's images: into a directory result store (cluster/blobs) under
    `root`; their URLs, which `Store.complete` records."""
    from renderfarm.cluster.blobs import open_blob_store, result_keys

    blobs = open_blob_store(str(root))
    return [blobs.put(key, png) for key, png in zip(result_keys(job_id, len(pngs)), pngs)]


def pngs_of(store, job_id: str) -> list[bytes]:
    """A done job's images, read back through the URLs on its record ([] when it has none)."""
    from renderfarm.cluster.blobs import read_blob

    return [read_blob(url) for url in store.result_blobs(job_id) or []]


def legacy_result(store, job_id: str, pngs, ttl: int = 3600) -> None:
    """Make a done job's record look as completion wrote it before results moved to the blob store: the PNGs in
    a Redis hash beside it (with a TTL), no `blobs` field."""
    key = store.keys.result(job_id)
    store.redis.hdel(store.keys.job(job_id), "blobs")
    if pngs:
        store.redis.hset(key, mapping={str(i): png for i, png in enumerate(pngs)})
        store.redis.expire(key, ttl)
    store.redis.hset(store.keys.job(job_id), "images", len(pngs))


class ApiServer:
    """The real HTTP API (renderfarm/api on uvicorn) on a free loopback port, in a thread of this process:
    `with ApiServer(redis_url) as api: httpx.get(api.url + "/v1/health")`. Stops its server on exit."""

    def __init__(self, redis_url: str, **context):
        self.redis_url, self.context = redis_url, context

    def __enter__(self) -> "ApiServer":
        import socket
        import threading

        import uvicorn

        from renderfarm.api import ApiContext, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        webhooks = self.context.pop("webhooks", False)
        settings = self.context.pop("settings", None)
        self.ctx = ApiContext(self.redis_url, **self.context)
        app = create_app(self.ctx, webhooks=webhooks, settings=settings)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                                    access_log=False, lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="api-under-test", daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{port}"
        wait_until(lambda: self.server.started, 30, "the API to start")
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
