"""RayCluster against a real private Ray (`ray start --head`), started and stopped here.

Ray allows one driver per process, so these tests run clusters one after another:
the class-scoped cluster is stopped before the tests after the class start theirs.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from renderfarm.cluster.ray_cluster import RayCluster, RayNode

pytestmark = pytest.mark.integration

SMALL_STORE = 80 * 1024 * 1024  # bytes of object store per node: the tests move only ints


def _pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line or environment contains `text`."""
    needle = text.encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat_line = fh.read()
            if stat_line[stat_line.rfind(b")") + 2 :].split()[0] == b"Z":
                continue
            with open(f"/proc/{name}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{name}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:
            continue
        if needle in cmdline or needle in environ:
            found.append(int(name))
    return found


def _assert_nothing_left(temp_dir: Path) -> None:
    deadline = time.monotonic() + 2.0  # stop() already waited; allow /proc to settle
    while _pids_mentioning(str(temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _pids_mentioning(str(temp_dir)) == []


@ray.remote(num_cpus=1)
def _add_one(x: int) -> int:
    return x + 1


@pytest.fixture(scope="class")
def cluster() -> Iterator[RayCluster]:
    """One private cluster shared by the tests of TestPrivateCluster, stopped after them."""
    cluster = RayCluster.start_local(
        num_cpus=2,
        resources={"vram_gb": 8},
        labels={"rf/card": "test-card"},
        object_store_memory=SMALL_STORE,
        log_to_driver=False,
    )
    temp_dir = cluster.temp_dir
    try:
        yield cluster
    finally:
        cluster.stop()
        assert temp_dir is not None
        _assert_nothing_left(temp_dir)
        assert not temp_dir.exists()  # a temp dir we made is removed


class TestPrivateCluster:
    def test_runs_a_remote_task(self, cluster: RayCluster) -> None:
        assert ray.get(_add_one.remote(41), timeout=60) == 42

    def test_nodes_show_one_alive_node_with_the_requested_resources(self, cluster: RayCluster) -> None:
        nodes = cluster.nodes()
        assert len(nodes) == 1
        node = nodes[0]
        assert isinstance(node, RayNode)
        assert node.alive
        assert node.num_cpus == 2
        assert node.num_gpus == 0
        assert node.resources["vram_gb"] == 8
        assert node.labels["rf/card"] == "test-card"
        assert node.ip == cluster.address.rsplit(":", 1)[0]
        assert len(node.node_id) == 56

    def test_address_temp_dir_and_token(self, cluster: RayCluster) -> None:
        host, port = cluster.address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2):
            pass
        assert cluster.temp_dir is not None
        assert cluster.temp_dir.name.startswith("rfray-")
        assert len(str(cluster.temp_dir)) <= 40
        token_file = cluster.temp_dir / "auth_token"
        assert token_file.read_text() == cluster.auth_token
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert os.environ["RAY_AUTH_MODE"] == "token"  # our driver, while connected
        assert cluster.processes()  # the head and its daemons
        assert cluster.head_pid in cluster.processes()

    def test_one_driver_per_process(self, cluster: RayCluster) -> None:
        with pytest.raises(RuntimeError, match="one cluster per process"):
            RayCluster.start_local(num_cpus=1)
        with pytest.raises(RuntimeError, match="one cluster per process"):
            RayCluster.join(cluster.address)

    def test_another_process_joins_with_the_token(self, cluster: RayCluster) -> None:
        script = (
            "import sys, ray\n"
            "from renderfarm.cluster.ray_cluster import RayCluster\n"
            "c = RayCluster.join(sys.argv[1], auth_token=sys.argv[2])\n"
            "print(len(c.nodes()), ray.get(ray.remote(lambda: 7 * 6).remote(), timeout=60))\n"
            "c.stop()\n"
        )
        # A clean environment: the token must come from the argument, not from ours.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        assert cluster.auth_token is not None
        out = subprocess.run(
            [sys.executable, "-c", script, cluster.address, cluster.auth_token],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split() == ["1", "42"]

    def test_add_node_joins_with_the_same_token(self, cluster: RayCluster) -> None:
        node = cluster.add_node(
            num_cpus=1, resources={"vram_gb": 24}, labels={"rf/card": "big"},
            object_store_memory=SMALL_STORE,
        )  # fmt: skip
        assert node.alive and node.resources["vram_gb"] == 24 and node.labels["rf/card"] == "big"
        assert len([n for n in cluster.nodes() if n.alive]) == 2

        @ray.remote(num_cpus=1, resources={"vram_gb": 20})
        def where() -> str:
            return ray.get_runtime_context().get_node_id()

        assert ray.get(where.remote(), timeout=60) == node.node_id


def test_two_private_clusters_one_after_another(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Neither a stale RAY_ADDRESS nor the first cluster's ray_current_cluster file
    # (left in the reused temp dir) may lead the second cluster's driver astray.
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    auth_before = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    addresses = []
    for _ in range(2):
        cluster = RayCluster.start_local(
            temp_dir=short_tmp, num_cpus=1, object_store_memory=SMALL_STORE, log_to_driver=False
        )
        try:
            addresses.append(cluster.address)
            assert ray.get(_add_one.remote(1), timeout=60) == 2
            assert [n.alive for n in cluster.nodes()] == [True]
        finally:
            cluster.stop()
        cluster.stop()  # idempotent
        assert not ray.is_initialized()
        _assert_nothing_left(short_tmp)
        assert short_tmp.exists()  # a temp dir we were given is kept
        assert {k: os.environ.get(k) for k in auth_before} == auth_before
    assert addresses[0] != addresses[1]


def test_join_a_closed_port_fails_fast() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}"):
        RayCluster.join(f"127.0.0.1:{port}", timeout=1.0)
    assert time.monotonic() - started < 10
    assert not ray.is_initialized()


def test_temp_dir_must_be_short(tmp_path: Path) -> None:
    long_dir = tmp_path / ("x" * 60)
    with pytest.raises(ValueError, match="unix sockets"):
        RayCluster.start_local(temp_dir=long_dir)


def test_join_env_carries_address_and_token() -> None:
    cluster = RayCluster("10.0.0.5:6379", auth_token="t0ken")  # not connected: no Ray needed
    try:
        assert cluster.join_env() == {
            "RAY_ADDRESS": "10.0.0.5:6379",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": "t0ken",
        }
    finally:
        cluster.stop()


def test_module_imports_no_torch_and_no_actor_code() -> None:
    script = (
        "import sys\n"
        "import renderfarm.cluster.ray_cluster\n"
        "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'renderfarm.actors'))]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_launching_ray_processes_and_counting_gpus_import_no_ray() -> None:
    script = (
        "import sys\n"
        "import renderfarm.cluster.ray_processes, renderfarm.cluster.gpus\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"

