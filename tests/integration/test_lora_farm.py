"""LoRA jobs through a real farm (real redis-server, a private Ray, two simulated nodes rendering the tiny
stand-ins): each node publishes the LoRAs its library holds; the client pins a job's LoRA to a copy's hash and
refuses, enqueueing nothing, a LoRA no node holds or one made for another family; the scheduler never sends a
LoRA job to a node without the file (nor with another copy of it), and jobs with the same LoRA set share a
batch."""

from __future__ import annotations

import os
import shutil

import pytest

from renderfarm.actors.model_assets import fingerprint
from renderfarm.config import NodeDeclaration, Settings
from renderfarm.dashboard import queries
from renderfarm.errors import SpecError
from renderfarm.farm import Farm
from renderfarm.jobs import JobState
from renderfarm.loras.library import LoraLibrary
from renderfarm.loras.standins import ensure_standin_loras
from renderfarm.planning.catalog import default_catalog

pytestmark = pytest.mark.integration

FAST = {"heartbeat_seconds": 0.5, "lease_seconds": 10.0, "eta_seconds": 0.5, "max_batch": 4}
STYLE, OTHER = "tiny-sd15-style", "tiny-sd15-character"


def job(i: int, **kw) -> dict:
    return {"model": "tiny-sd15", "prompt": f"a fox {i}", "width": 64, "height": 64, "steps": 2, "seed": i, **kw}


@pytest.fixture(scope="module")
def standin_loras():
    return ensure_standin_loras()


def test_lora_jobs_go_only_to_the_node_holding_the_file(tmp_path, standin_loras):
    holder, lacking = tmp_path / "with", tmp_path / "without"
    holder.mkdir()
    lacking.mkdir()
    shutil.copy(standin_loras / f"{STYLE}.safetensors", holder)
    shutil.copy(standin_loras / "tiny-sdxl-style.safetensors", holder)
    # The other node holds an older, different copy of the second LoRA (stale): the newest copy is the one a
    # job is pinned to, and a node holding another is treated as lacking it.
    shutil.copy(standin_loras / f"{OTHER}.safetensors", holder)
    stale = shutil.copy(standin_loras / f"{STYLE}.safetensors", lacking / f"{OTHER}.safetensors")
    os.utime(stale, (1e9, 1e9))
    nodes = [NodeDeclaration(name="holder", vram_gib=24, lora_dir=holder),
             NodeDeclaration(name="lacking", vram_gib=24, lora_dir=lacking)]
    settings = Settings(data_dir=tmp_path / "farm", **FAST)
    sha = LoraLibrary(holder, hash_cache=tmp_path / "h.json").get(STYLE).sha256
    with Farm(settings, nodes, warm_models=["tiny-sd15"], log_to_driver=False) as farm:
        client = farm.client()
        before = client.store.counts()
        with pytest.raises(SpecError) as refused:
            client.submit_batch([job(0), job(1, loras=[{"name": "nope", "weight": 0.5}])])
        assert "jobs[1]: loras: no node of this farm holds LoRA 'nope'" in str(refused.value)
        with pytest.raises(SpecError) as wrong_family:
            client.submit_batch([job(2, prompt="a fox <lora:tiny-sdxl-style:0.8>")])
        assert "LoRA 'tiny-sdxl-style' is made for sdxl models, not sd15" in str(wrong_family.value)
        assert client.store.counts() == before, "a refused batch enqueued something"

        # The LoRA jobs (the prompt form and the field form) go to the holder; plain jobs to either node.
        lora_ids = client.submit_batch(
            [job(10 + i, prompt=f"a fox {i} <lora:{STYLE}:0.7>") for i in range(4)]
            + [job(20 + i, loras=[{"name": OTHER, "weight": 1.0}]) for i in range(2)])
        plain_ids = client.submit_batch([job(30 + i) for i in range(8)])
        finished = {j.id: j for j in client.wait(lora_ids + plain_ids, timeout=300)}
        assert {j.state for j in finished.values()} == {JobState.DONE}
        lora_jobs = [finished[i] for i in lora_ids]
        assert {j.node for j in lora_jobs} == {"holder"}, [(j.id, j.node) for j in lora_jobs]
        # pinned at submit to the holder's copies (the lacking node's file of the same name differs)
        assert {lo.sha256 for j in lora_jobs[:4] for lo in j.spec.loras} == {sha}
        assert lora_jobs[0].spec.prompt == "a fox 0" and lora_jobs[0].spec.loras[0].weight == 0.7
        # and to the copy of the model the nodes hold (a node with another copy would be treated as lacking it)
        standin = fingerprint(default_catalog().get("tiny-sd15"))["fingerprint"]
        assert {j.spec.model_fingerprint for j in finished.values()} == {standin}
        # the four jobs of one LoRA set rendered as one batch (max_batch 4), apart from the other set
        assert len({j.timings.get("batch_size") for j in lora_jobs[:4]}) == 1
        assert lora_jobs[0].timings["batch_size"] == 4.0
        assert "lacking" in {finished[i].node for i in plain_ids}  # the node without them still works

        # What each node holds, as `renderfarm status` and the dashboard show it.
        held = client.status()["assets"]
        assert any(entry.startswith(f"{STYLE} (") for entry in held["holder"]["loras"])
        assert held["lacking"]["loras"] == [f"{OTHER} ({client.store.assets()['lacking']['loras'][OTHER]['short_hash']})"]
        assert any(m.startswith("tiny-sd15 (standin ") for m in held["lacking"]["models"])
        rows = {row["name"]: row for row in queries.nodes(client.store, [], 15)}
        assert rows["holder"]["loras"] == held["holder"]["loras"] and rows["lacking"]["lora_problems"] == {}


def test_a_lora_changes_the_image_and_the_png_says_which(tmp_path, standin_loras):
    """The same seed with and without a LoRA, on one node: the LoRA job's image differs, its PNG carries the
    A1111 tags and hashes, the node's record says which set its pipeline has applied, and a plain job after it
    renders the base image again (the set is taken off)."""
    from renderfarm.infotext import parse_a1111_parameters
    from renderfarm.loras.library import LoraLibrary

    info = LoraLibrary(standin_loras, hash_cache=tmp_path / "h.json").get(STYLE)
    settings = Settings(data_dir=tmp_path / "farm", **FAST)
    with Farm(settings, [NodeDeclaration(name="solo", vram_gib=24)], warm_models=["tiny-sd15"],
              log_to_driver=False) as farm:
        client = farm.client()
        plain = client.submit(job(5))
        client.wait([plain], timeout=300)
        with_lora = client.submit(job(5, loras=[{"name": STYLE, "weight": 1.0}]))
        client.wait([with_lora], timeout=300)
        record = {n["name"]: n for n in client.store.nodes()}["solo"]
        assert record["applied_loras"]["tiny-sd15"] == [[STYLE, info.sha256, 1.0]]
        again = client.submit(job(5))
        client.wait([again], timeout=300)
        images = {j: client.result(j) for j in (plain, with_lora, again)}
        (done,) = client.jobs([with_lora])
    pixels = {j: result.images[0].tobytes() for j, result in images.items()}
    assert pixels[with_lora] != pixels[plain]
    assert pixels[again] == pixels[plain], "the LoRA was left on the pipeline"
    parsed = parse_a1111_parameters(images[with_lora].parameters[0])
    assert parsed["prompt"] == f"a fox 5 <lora:{STYLE}:1>" and parsed["Lora hashes"] == f"{STYLE}: {info.short_hash}"
    assert "Lora hashes" not in images[plain].parameters[0]
    assert done.spec.loras[0].sha256 == info.sha256 and done.timings["lora_s"] >= 0.0


def test_a_lora_job_goes_where_its_set_is_applied_and_a_plain_job_where_none_is(tmp_path):
    """Two identical idle nodes holding the same LoRAs: the second job of a LoRA set goes to the node whose
    pipeline has it applied (the other would switch), and a plain job to the node with nothing to take off."""
    nodes = [NodeDeclaration(name="n1", vram_gib=24), NodeDeclaration(name="n2", vram_gib=24)]
    settings = Settings(data_dir=tmp_path / "farm", **FAST)
    with Farm(settings, nodes, warm_models=["tiny-sd15"], log_to_driver=False) as farm:
        client = farm.client()
        on = []
        for spec in (job(40, loras=[{"name": STYLE, "weight": 0.6}]), job(41, loras=[{"name": STYLE, "weight": 0.6}]),
                     job(42)):
            (done,) = client.wait([client.submit(spec)], timeout=300)
            assert done.state is JobState.DONE, done.error
            on.append(done.node)
    assert on[1] == on[0], f"the second job of the set switched node {on[1]} instead of reusing {on[0]}"
    assert on[2] != on[0], "the plain job went to the node that had to take the LoRA off"
