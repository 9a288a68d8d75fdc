"""Stop and restart are boring: one farm per data directory, nothing doubled after a SIGKILL, and a clean
stop hands its jobs back at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from renderfarm.cluster.data_dir import DataDirClaim
from renderfarm.cluster.processes import is_alive
from renderfarm.cluster.redis_server import EmbeddedRedis, connect
from renderfarm.errors import FarmError
from tests.helpers import run_cli, wait_until

pytestmark = pytest.mark.integration


def _up(tmp_path: Path, data_dir: Path) -> subprocess.Popen[str]:
    """`renderfarm up` on one simulated node, in a child process; its stdout carries the JSON line."""
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes:\n  - {name: solo, vram_gib: 12, compute_capability: '8.9'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RENDERFARM_REDIS_URL", None)
    return subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "up", "--json", "--data-dir", str(data_dir),
                             "--nodes", str(nodes)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env)  # stderr unread: a full pipe would block the farm


def _submit_until_one_renders(redis_url: str, steps: int, count: int) -> list[str]:
    proc = run_cli("submit", "a slow harbour", "--size", "128x128", "--steps", str(steps), "--count", str(count),
                   "--no-wait", "--json", "--redis", redis_url)
    ids = json.loads(proc.stdout)["jobs"]
    with connect(redis_url) as client:
        wait_until(lambda: any(client.hget(f"rf:job:{i}", "state") == b"running" for i in ids), 120,
                   "a job to start rendering")
    return ids


def test_a_second_farm_on_the_same_data_dir_is_refused(tmp_path):
    first = DataDirClaim(tmp_path)
    first.acquire()
    try:
        with pytest.raises(FarmError, match=rf"another farm \(pid {os.getpid()}\) runs on {tmp_path}"):
            DataDirClaim(tmp_path).acquire()
    finally:
        first.release()
    second = DataDirClaim(tmp_path)
    assert second.acquire() == []  # released cleanly: nothing to clean up
    second.release()


KILLED_OWNER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from renderfarm.cluster.data_dir import DataDirClaim
    from renderfarm.cluster.redis_server import EmbeddedRedis, connect
    data_dir = Path(sys.argv[1])
    claim = DataDirClaim(data_dir)
    claim.acquire()
    server = EmbeddedRedis(data_dir / "redis")
    url = server.start()
    claim.record(redis_pid=server.pid)
    connect(url).set("rf:job:kept", "written before the owner died")
    print(server.pid, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would: no atexit, no stop
""")


def test_a_killed_farms_redis_is_stopped_before_a_new_one_starts_never_doubled(tmp_path):
    proc = subprocess.run([sys.executable, "-c", KILLED_OWNER, str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    orphan = int(proc.stdout.split()[0])
    try:
        assert is_alive(orphan), "redis-server runs in its own session: it outlives its owner"
        claim = DataDirClaim(tmp_path)
        cleaned = claim.acquire()
        assert cleaned and f"pid {orphan}" in cleaned[0]
        assert not is_alive(orphan), "the orphan is stopped, so two servers never share one append-only file"
        with EmbeddedRedis(tmp_path / "redis") as server:  # the new farm's own, on the same data
            assert connect(server.url).get("rf:job:kept") == b"written before the owner died"
        claim.release()
        assert not (tmp_path / "owner.json").exists()
    finally:
        if is_alive(orphan):
            os.kill(orphan, signal.SIGKILL)


def test_up_killed_with_sigkill_comes_back_and_its_jobs_finish(tmp_path):
    """SIGKILL of `up` mid-render, then `up` again on the same data directory: the old redis-server and Ray
    are stopped (not doubled), the jobs the killed farm held come back at once, and every job finishes."""
    data_dir = tmp_path / "farm"
    first = _up(tmp_path, data_dir)
    second = None
    try:
        info = json.loads(first.stdout.readline())
        ids = _submit_until_one_renders(info["redis_url"], steps=60, count=3)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
        assert is_alive(info["redis_pid"]), "the killed farm's redis-server is left running"
        second = _up(tmp_path, data_dir)
        line = second.stdout.readline()
        assert line, f"the second up exited with {second.poll()}"
        again = json.loads(line)
        assert not is_alive(info["redis_pid"]) and again["redis_pid"] != info["redis_pid"]
        proc = run_cli("status", *ids, "--json", "--redis", again["redis_url"])
        rows = json.loads(proc.stdout)["jobs"]
        assert all(r["state"] in ("queued", "leased", "running", "done") for r in rows), rows
        with connect(again["redis_url"]) as client:
            wait_until(lambda: all(client.hget(f"rf:job:{i}", "state") == b"done" for i in ids), 240,
                       "every job to finish after the restart")
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
    assert not Path(data_dir / "owner.json").exists()


def test_a_clean_stop_hands_its_jobs_back_at_once(tmp_path):
    """Ctrl-C of `up` while it renders: the jobs its nodes held are queued again, saying why, before it exits
    (not left for their leases to expire, with a message that blames a dead node)."""
    data_dir = tmp_path / "farm"
    up = _up(tmp_path, data_dir)
    try:
        info = json.loads(up.stdout.readline())
        ids = _submit_until_one_renders(info["redis_url"], steps=80, count=2)
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=90)
    assert up.returncode == 0
    with EmbeddedRedis(data_dir / "redis") as server:  # read what the stopped farm left in its AOF
        client = connect(server.url)
        states = {i: client.hget(f"rf:job:{i}", "state") for i in ids}
        assert set(states.values()) <= {b"queued", b"done"} and b"queued" in states.values(), states
        for job_id, state in states.items():
            if state == b"queued":
                assert b"interrupted by shutdown of node solo" in client.hget(f"rf:job:{job_id}", "error")
