"""The farm's embedded Redis against a real redis-server (no Ray): a head's server keeps its address, password
and data through `crash_redis`, and the farm closes the connections it opens for one call."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from renderfarm import farm as farm_module
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.processes import is_alive
from renderfarm.cluster.redis_server import EmbeddedRedis, connect
from renderfarm.cluster.store import Store
from renderfarm.config import Settings, head_published
from renderfarm.farm import REDIS_PASSWORD_FILE, Farm, WorkerNode

pytestmark = pytest.mark.integration


def _off_loopback_ip() -> str:
    """This machine's address on its default route (no packet is sent); skip when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("10.255.255.255", 9))
        except OSError:
            pytest.skip("this machine has no address off loopback")
        ip = sock.getsockname()[0]
    if ip.startswith("127."):
        pytest.skip("this machine has no address off loopback")
    return ip


@pytest.fixture(params=["127.0.0.2", "off-loopback"])
def advertise_ip(request: pytest.FixtureRequest) -> str:
    # 127.0.0.2: not the 127.0.0.1 a server started without its host binds. Off loopback: what `up --head`
    # does, where connect() also insists that the server refuses clients without the password.
    return _off_loopback_ip() if request.param == "off-loopback" else request.param


@pytest.fixture
def head_farm(tmp_path: Path, advertise_ip: str, monkeypatch: pytest.MonkeyPatch):
    """A head farm's Redis, started by the farm itself (`up --head`'s path), without Ray or workers."""
    monkeypatch.delenv("REDIS_PASSWORD", raising=False)  # the farm generates one and keeps it in its data dir
    farm = Farm(Settings(data_dir=tmp_path / "farm"), head=True, advertise_ip=advertise_ip)
    try:
        farm._start_redis()
        yield farm
    finally:
        pids = {farm.redis_pid}
        farm.stop()
        assert not any(pid and is_alive(pid) for pid in pids), "redis-server left running"


def test_crash_redis_restarts_a_head_redis_with_its_host_password_and_data(head_farm: Farm, advertise_ip: str):
    url = head_farm.redis_url
    assert url is not None
    password = (head_farm.settings.data_dir / REDIS_PASSWORD_FILE).read_text()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    first_pid = head_farm.redis_pid

    head_farm.crash_redis(down_seconds=0.1)

    assert head_farm.redis_pid not in (None, first_pid)
    with redis.Redis(host=advertise_ip, port=port, password=password, socket_timeout=2) as authed:
        assert authed.ping()  # AUTH with the farm's password, on the same address and port
        assert Store(authed, Keys("rf")).published_settings() == head_published(head_farm.settings), "same data dir"
    # No retries: redis-py retries an AuthenticationError (a ConnectionError) with backoff by default.
    anonymous = redis.Redis(host=advertise_ip, port=port, socket_timeout=2, retry=Retry(NoBackoff(), 0))
    with anonymous, pytest.raises(redis.AuthenticationError):
        anonymous.dbsize()
    with connect(url) as client:  # the URL every process of the farm holds still works
        assert client.ping()


def test_a_farm_started_without_head_restarts_on_loopback_without_password(tmp_path: Path):
    farm = Farm(Settings(data_dir=tmp_path / "farm"))
    try:
        farm._start_redis()
        url = farm.redis_url
        assert url is not None and "@" not in url
        farm.crash_redis(down_seconds=0.1)
        with connect(url) as client:
            assert client.ping()
            assert Store(client, Keys("rf")).published_settings() == head_published(farm.settings)
    finally:
        farm.stop()


class _Stop(Exception):
    pass


@pytest.fixture
def kept_clients(monkeypatch: pytest.MonkeyPatch) -> list[redis.Redis]:
    """Every client farm.py opens, kept alive here: only an explicit close() ends its connection then (CPython
    also closes a client when its last reference goes, which would hide a missing close())."""
    opened: list[redis.Redis] = []

    def connect_and_keep(url: str, **kwargs) -> redis.Redis:
        client = connect(url, **kwargs)
        opened.append(client)
        return client

    monkeypatch.setattr(farm_module, "connect", connect_and_keep)
    return opened


def test_the_farm_closes_the_connections_it_opens_for_one_call(
    tmp_path: Path, kept_clients: list[redis.Redis], monkeypatch: pytest.MonkeyPatch
):
    def stop_after_settings(*_: object) -> None:
        raise _Stop  # WorkerNode.start has read the published settings: stop before Ray

    monkeypatch.setattr(farm_module, "node_plan", stop_after_settings)
    with EmbeddedRedis(tmp_path / "redis") as server, connect(server.url) as probe:
        before = len(probe.client_list())
        settings = Settings(data_dir=tmp_path / "farm", redis_url=server.url)
        farm = Farm(settings)
        for _ in range(3):
            farm._start_redis()  # checks the given Redis, publishes the farm-wide settings
        for _ in range(3):
            with pytest.raises(_Stop):
                WorkerNode(settings, "127.0.0.1:1", server.url, ray_token="t").start()
        assert len(kept_clients) == 9
        assert len(probe.client_list()) == before, [c["addr"] for c in probe.client_list()]
