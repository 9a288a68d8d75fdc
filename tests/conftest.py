"""Shared fixtures. Integration fixtures start a real redis-server and a real private Ray, on private
ports and temp dirs, and stop every process they start."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# No model hub is reachable here: never wait on one. Stand-ins are built into a private cache.
os.environ["HF_HUB_OFFLINE"] = "1"
_CACHE = tempfile.mkdtemp(prefix="rf-test-models-")
os.environ.setdefault("RENDERFARM_CACHE_DIR", _CACHE)
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    from renderfarm.cluster.redis_server import EmbeddedRedis

    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url):
    from renderfarm.cluster.redis_server import connect

    client = connect(redis_url)
    client.flushdb()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def store(redis_client):
    from renderfarm.cluster.store import Store

    return Store(redis_client)


BROKEN_MODELS = """
families:
  sd15: {pipeline: StableDiffusionPipeline, size_multiple: 8, uses_cfg: true}
  flux: {pipeline: FluxPipeline, size_multiple: 16, uses_cfg: false}
models:
  tiny-sd15: {family: sd15, standin: true, default_size: 64, min_size: 32, max_size: 1024, default_steps: 2}
  tiny-flux: {family: flux, standin: true, default_size: 64, min_size: 32, max_size: 1024, default_steps: 2}
  broken: {family: sd15, source: /nonexistent/model/folder, min_size: 32}
"""


@pytest.fixture(scope="session")
def models_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "models.yaml"
    path.write_text(BROKEN_MODELS)
    return path


@pytest.fixture(scope="module")
def farm(tmp_path_factory, models_file):
    """A farm with two simulated heterogeneous nodes, shared by the tests of one module (Ray allows one
    driver per process, so farms run one after another)."""
    from renderfarm.config import Settings, two_card_nodes
    from renderfarm.farm import Farm

    settings = Settings(
        data_dir=tmp_path_factory.mktemp("farm"),
        models_file=models_file,
        max_attempts=2,
        max_batch=4,
        lease_seconds=60,
    )
    farm = Farm(settings, two_card_nodes(big="big", small="small"), warm_models=["tiny-sd15"])
    farm.start()
    try:
        yield farm
    finally:
        farm.stop()


@pytest.fixture
def farm_client(farm, models_file):
    """A FarmClient of the module's `farm`, with its catalog (the `broken` model included)."""
    from renderfarm.client import FarmClient
    from renderfarm.planning.catalog import default_catalog

    client = FarmClient(farm.redis_url, catalog=default_catalog(models_file))
    try:
        yield client
    finally:
        client.store.close()
