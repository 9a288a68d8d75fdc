"""An img2img or inpainting job runs fewer denoising steps than it asks for (strength): the scheduler's finish
estimate and fair-share cost count the steps that run (scheduler/dispatch.py run_steps)."""

from __future__ import annotations

from renderfarm.jobs import Job, JobSpec
from renderfarm.planning.catalog import default_catalog
from renderfarm.scheduler.dispatch import queued_view, run_steps

REF = "sha256:" + "a" * 64


def spec(**fields) -> JobSpec:
    return JobSpec.model_validate({"model": "tiny-sd15", "prompt": "x", "width": 64, "height": 64, "steps": 20,
                                   **fields})


def test_text_to_image_runs_every_step():
    assert run_steps(spec(), default_catalog()) == 20


def test_img2img_runs_its_strength_of_the_steps_as_each_family_counts_them():
    catalog = default_catalog()
    assert run_steps(spec(init_image=REF, strength=0.5), catalog) == 10
    assert run_steps(spec(init_image=REF), catalog) == 15  # 0.75 by default
    assert run_steps(spec(init_image=REF, strength=0.0), catalog) == 0
    flux = spec(model="tiny-flux", steps=10, init_image=REF, strength=0.65)
    assert run_steps(flux, catalog) == 7  # flow matching rounds up: 7 of 10, where SD would run 6
    assert run_steps(spec(steps=10, init_image=REF, strength=0.65), catalog) == 6


def test_fair_share_cost_counts_the_steps_that_run():
    job = Job(id="j", spec=spec(init_image=REF, strength=0.5))
    assert queued_view(job, run_steps(job.spec, default_catalog())).cost == queued_view(job).cost / 2
