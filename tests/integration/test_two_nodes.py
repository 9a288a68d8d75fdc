"""Two Ray nodes on one machine, as two machines would be: the head (`Farm(head=True)`, a 24 GiB node) and a
second node joined by the real `renderfarm worker` command in its own process (an 8 GiB node), with the
cluster's token. Jobs that fit only the big card land there, small ones run on either, and killing the
second node's process mid-render sends its jobs to the head."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import yaml

from renderfarm.client import FarmClient
from renderfarm.config import Settings, two_card_nodes
from renderfarm.farm import Farm, node_resource
from renderfarm.jobs import JobState
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import device_from_declaration
from renderfarm.planning.profiles import VaeMode, ladder
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

BIG, SMALL = two_card_nodes(big="big", small="small")
FAST = {"heartbeat_seconds": 0.5, "lease_seconds": 5.0, "eta_seconds": 0.5, "max_batch": 4}


def job(i: int, size: int, steps: int = 2) -> dict:
    return {"model": "tiny-sd15", "prompt": f"p{i}", "width": size, "height": size, "steps": steps, "seed": i}


def measured_peak(store, model: str, size: int, gib: float) -> None:
    """As if nodes had measured `model` at `size` peaking at `gib` in every profile either card could run:
    the planner then never predicts less (online calibration)."""
    entry = default_catalog().get(model)
    names = set()
    for card in (BIG, SMALL):
        for profile in ladder(entry, device_from_declaration(card)):
            names |= {profile.name, profile.with_vae(VaeMode.TILED).name}
    for name in names:
        store.record_measurement("big", model, name, size, size, 1, peak_gib=gib, s_per_step=None)


def test_a_joined_machine_takes_work_by_fit_and_its_death_sends_its_jobs_to_the_head(tmp_path):
    settings = Settings(data_dir=tmp_path / "head", **FAST)
    with Farm(settings, [BIG], head=True, warm_models=["tiny-sd15"], log_to_driver=False) as farm:
        assert farm.redis_url.startswith("redis://:")  # a head's Redis has a password
        client = FarmClient(farm.redis_url)
        nodes_file = tmp_path / "small.yaml"
        # With an override: 1 GiB of its 8 kept free for something else.
        nodes_file.write_text(yaml.safe_dump({"nodes": [{**SMALL.model_dump(mode="json", exclude_none=True),
                                                         "reserve_gib": 1}]}))
        # No settings of its own: the joining machine takes the head's farm-wide ones from Redis.
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_TOKEN": farm.ray_token}
        env.pop("RAY_ADDRESS", None)
        log = open(tmp_path / "worker.log", "wb")
        ray_dirs_before = set(glob.glob("/tmp/rfray-*"))
        worker = subprocess.Popen(
            [sys.executable, "-m", "renderfarm.cli", "worker", "--address", farm.ray_address_in_use,
             "--redis", farm.redis_url, "--nodes", str(nodes_file), "--data-dir", str(tmp_path / "w"), "--json",
             "--warm", "tiny-sd15"],
            stdout=subprocess.PIPE, stderr=log, env=env, start_new_session=True,
        )
        try:
            line = worker.stdout.readline()  # the worker prints one JSON line once its node is in the farm
            assert line, (tmp_path / "worker.log").read_text()[-3000:]
            joined = json.loads(line)
            assert joined["ok"] and [n["name"] for n in joined["nodes"]] == ["small"]
            # The scheduler adopts it from its Redis record: no restart of anything.
            wait_until(lambda: farm.scheduler_stats()["workers"].get("small", {}).get("alive"), 60, "small to join")
            # The second Ray node advertises its card.
            ray_node = next(n for n in farm._ray.nodes() if n.alive and node_resource("small") in n.resources)
            assert ray_node.labels["renderfarm.io/vram-gib"] == "8"
            assert ray_node.labels["renderfarm.io/gpu"] == "GeForce-RTX-3070"
            records = {n["name"]: n for n in client.store.nodes()}
            assert records["small"]["vram_gib"] == 7 and records["small"]["card"]["vram_gib"] == 7
            assert records["small"]["farm_settings"] == records["big"]["farm_settings"]
            assert records["small"]["farm_settings"]["lease_seconds"] == FAST["lease_seconds"]

            measured_peak(client.store, "tiny-sd15", 256, 12.0)  # fits 24 GiB, not 8 GiB
            small = client.submit_batch([job(i, 64) for i in range(16)])
            big_only = client.submit_batch([job(i, 256) for i in range(4)])
            finished = {j.id: j for j in client.wait(big_only + small, timeout=300)}
            assert all(j.state is JobState.DONE for j in finished.values())
            assert {finished[i].node for i in big_only} == {"big"}
            # Small jobs fit both: where each went is the scheduler's call (predicted finish, loads, backlog).
            assert {finished[i].node for i in small} <= {"big", "small"}

            # Kill the second machine's process while it renders: its jobs finish on the head. (The head is
            # drained while the batch is sent, so the second node surely holds some of it.)
            client.store.set_draining("big", True)
            wait_until(lambda: farm.scheduler_stats()["workers"]["big"]["draining"], 30, "big to drain")
            slow = client.submit_batch([job(100 + i, 128, steps=30) for i in range(16)])
            victims = wait_until(lambda: [j.id for j in client.jobs(slow)
                                        if j.state is JobState.RUNNING and j.node == "small"], 120,
                               "a job running on small")
            client.store.set_draining("big", False)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=30)
            done = {j.id: j for j in client.wait(slow, timeout=300)}
            assert all(j.state is JobState.DONE for j in done.values())
            assert all(done[i].node == "big" and done[i].attempts >= 2 for i in victims)
            wait_until(lambda: farm.scheduler_stats()["workers"]["small"]["alive"] is False, 60, "small marked dead")
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
            log.close()
            # A machine killed outright cannot remove its Ray temp dir (its processes died with it): the
            # test does, as an operator would.
            for leftover in set(glob.glob("/tmp/rfray-*")) - ray_dirs_before - {farm.ray_temp_dir}:
                shutil.rmtree(leftover, ignore_errors=True)
