"""The render requests of a batch of jobs, with their image inputs read from the farm's input store.

A job names its init image and mask by content reference ("sha256:<hex>", renderfarm/inputs.py); the worker
reads each distinct image of a batch once (a hundred jobs on one init image: one read). An input that expired
or was never uploaded is the job's fault, never the node's (renderfarm/faults.py): it is raised as a SpecError
naming the job and the field, so the job fails at once with the reason and no node is charged. A store that
cannot be reached is not the job's fault: that error propagates as it is (an outage or a store refusal).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from renderfarm.errors import SpecError
from renderfarm.inputs import InputMissing, InputStore
from renderfarm.jobs import Job


class InputReader:
    """Reads uploaded images for a worker; the input store is opened on first use (most batches have none)."""

    def __init__(self, open_store: Callable[[], InputStore]):
        self._open_store = open_store
        self._store: InputStore | None = None

    def read(self, jobs: list[Job]) -> dict[str, bytes]:
        """The PNG of every image the jobs name, by reference, each read once."""
        images: dict[str, bytes] = {}
        for job in jobs:
            for field in ("init_image", "mask"):
                ref = getattr(job.spec, field)
                if ref is None or ref in images:
                    continue
                if self._store is None:
                    self._store = self._open_store()
                try:
                    images[ref] = self._store.get(ref)
                except InputMissing as exc:
                    raise SpecError(f"job {job.id}: {field} {ref}: {exc}") from exc
        return images


def render_requests(jobs: list[Job], reader: InputReader) -> list[Any]:
    """One pipelines.RenderRequest per job, its image inputs read by reference."""
    from renderfarm.actors.pipelines import RenderRequest

    images = reader.read(jobs)
    requests = []
    for job in jobs:
        spec = job.spec
        requests.append(RenderRequest(
            job_id=job.id,
            prompt=spec.prompt,
            negative_prompt=spec.negative_prompt,
            width=spec.width,
            height=spec.height,
            steps=spec.steps,
            guidance=spec.guidance,
            seed=spec.seed or 0,
            num_images=spec.num_images,
            sampler=spec.sampler,
            schedule=spec.schedule,
            init_image=images.get(spec.init_image) if spec.init_image else None,
            mask=images.get(spec.mask) if spec.mask else None,
            strength=spec.effective_strength,
            mask_blur=spec.mask_blur,
            resize_mode=spec.resize_mode,
            inpaint_area=spec.inpaint_area,
            mask_padding=spec.mask_padding,
        ))
    return requests
