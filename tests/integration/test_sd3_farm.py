"""SD 3.x end to end on a real farm (real redis-server, real Ray, the packaged catalog): tiny-sd3 jobs go from the
client through the scheduler to the workers, render through diffusers' StableDiffusion3Pipeline with the profile
each declared card picks, and come back as PNGs carrying their infotext (issue 17: every family renders)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from renderfarm.client import FarmClient
from renderfarm.config import Settings, two_card_nodes
from renderfarm.farm import Farm
from renderfarm.infotext import parse_a1111_parameters
from renderfarm.jobs import JobState
from renderfarm.planning.catalog import default_catalog

pytestmark = pytest.mark.integration


def test_tiny_sd3_jobs_render_through_a_real_farm(tmp_path):
    settings = Settings(data_dir=tmp_path, max_batch=4, lease_seconds=60)  # the packaged catalog
    default_guidance = default_catalog().get("tiny-sd3").default_guidance
    specs = [
        {"model": "tiny-sd3", "prompt": f"a lighthouse at dusk {i}", "negative_prompt": "blurry" if i % 2 else "",
         "width": 64, "height": 48, "steps": 2, "seed": 10 + i, "num_images": 2 if i == 0 else 1}
        for i in range(3)
    ]
    with Farm(settings, two_card_nodes(big="big", small="small"), log_to_driver=False) as farm:
        client = FarmClient(farm.redis_url)
        try:
            nodes = {n["name"]: n for n in client.store.nodes()}
            assert all("tiny-sd3" in node["loadable"] for node in nodes.values())
            ids = client.submit_batch(specs, batch_id="sd3")
            finished = client.wait(ids, timeout=300)
            assert [job.state for job in finished] == [JobState.DONE] * len(specs), [j.error for j in finished]
            for spec, job in zip(specs, finished):
                # Each card's own profile: the Turing Quadro computes in fp16, the Ampere RTX in bf16; both keep T5.
                assert job.profile.startswith("fp16" if job.node == "big" else "bf16"), (job.node, job.profile)
                assert "no-t5" not in job.profile
                result = client.result(job.id)
                assert len(result.png) == spec["num_images"]
                for i, png in enumerate(result.png):
                    image = Image.open(io.BytesIO(png))
                    assert image.size == (64, 48) and image.mode == "RGB"
                    params = parse_a1111_parameters(image.info["parameters"])
                    assert params["prompt"] == spec["prompt"] and params["Model"] == "tiny-sd3"
                    assert params["negative_prompt"] == spec["negative_prompt"]  # SD3 guides with it (CFG)
                    assert params["Seed"] == str(spec["seed"] + i)
                    assert (params["Sampler"], params["Schedule type"]) == ("Euler", "Simple")
                    assert float(params["CFG scale"]) == default_guidance
        finally:
            client.store.close()
