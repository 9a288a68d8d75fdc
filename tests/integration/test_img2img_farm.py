"""Img2img and inpainting end to end on a real farm (real redis-server, real Ray, the packaged catalog): the
client uploads the images once, the workers read them by reference and render them with the family's
Img2Img/Inpaint pipeline under the profile each declared card picks (fp16 / bf16 on these CPUs)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from renderfarm.actors.tasks import blur_mask, overlay_mask
from renderfarm.client import FarmClient
from renderfarm.config import Settings, two_card_nodes
from renderfarm.farm import Farm
from renderfarm.infotext import parse_a1111_parameters
from renderfarm.jobs import JobState

pytestmark = pytest.mark.integration


def png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_img2img_and_inpaint_jobs_render_through_a_real_farm(tmp_path):
    settings = Settings(data_dir=tmp_path, max_batch=4, lease_seconds=60)
    init = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    base = {"model": "tiny-sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 4, "seed": 3}
    specs = [
        {**base, "init_image": png(init, "RGB"), "strength": 0.5},
        {**base, "init_image": png(init, "RGB"), "mask": png(mask, "L"), "mask_blur": 2},
        # Another size, fitted by the job's resize mode.
        {**base, "init_image": png(init[:, :48], "RGB"), "resize_mode": "fill", "strength": 0.5},
    ]
    with Farm(settings, two_card_nodes(big="big", small="small"), log_to_driver=False) as farm:
        client = FarmClient(farm.redis_url)
        try:
            ids = client.submit_batch(specs, batch_id="img2img")
            finished = client.wait(ids, timeout=300)
            assert [job.state for job in finished] == [JobState.DONE] * len(specs), [j.error for j in finished]
            results = [client.result(job.id).png[0] for job in finished]
        finally:
            client.store.close()
    images = [Image.open(io.BytesIO(data)) for data in results]
    assert all(image.size == (64, 64) for image in images)
    params = [parse_a1111_parameters(image.info["parameters"]) for image in images]
    assert params[0]["Denoising strength"] == "0.5" and "Mask blur" not in params[0]
    assert params[1]["Denoising strength"] == "0.75" and params[1]["Mask blur"] == "2"  # A1111's default strength
    overlay = np.asarray(overlay_mask(blur_mask(Image.fromarray(mask, "L"), 2)))
    painted = np.asarray(images[1].convert("RGB"))
    assert np.array_equal(painted[overlay == 0], init[overlay == 0])  # the original outside the mask, exactly
    assert np.abs(painted[overlay == 255].astype(int) - init[overlay == 255]).mean() > 10
