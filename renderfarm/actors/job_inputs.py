"""The render requests of a batch of jobs, with their image inputs read from the farm's input store.

A job names its init image and mask by content reference ("sha256:<hex>", renderfarm/inputs.py); the worker
reads each distinct image of a batch once (a hundred jobs on one init image: one read). An input that expired
or was never uploaded is the job's fault, never the node's (renderfarm/faults.py): it is raised as a SpecError
naming the job and the field, so the job fails at once with the reason and no node is charged. A store that
cannot be reached is not the job's fault: that error propagates as it is (an outage or a store refusal).
A job whose init image is an earlier job's output (`init_from`, renderfarm/chains.py) gets that job's images from
the result store: a list, image for image, or the one image it names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from renderfarm.chains import parse_init_from
from renderfarm.cluster.blobs import BlobStoreError, is_missing
from renderfarm.errors import JobNotFound, SpecError
from renderfarm.inputs import InputMissing, InputStore
from renderfarm.jobs import Job, JobState


class InputReader:
    """Reads uploaded images for a worker; the input store is opened on first use (most batches have none)."""

    def __init__(self, open_store: Callable[[], InputStore]):
        self._open_store = open_store
        self._store: InputStore | None = None
        self.parents: dict[str, Any] = {}  # the spec of each job an `init_from` named, by its id (last `read`)

    def _opened(self) -> InputStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def read(self, jobs: list[Job]) -> dict[str, bytes | list[bytes]]:
        """The PNG of every image the jobs name, by reference, each read once; for `init_from`, the parent's
        images by the job's `init_from` (a list, image for image, or the one it names)."""
        images: dict[str, bytes | list[bytes]] = {}
        for job in jobs:
            if job.spec.init_from is not None and job.spec.init_from not in images:
                images[job.spec.init_from] = self._parent_images(job)
            for field in ("init_image", "mask"):
                ref = getattr(job.spec, field)
                if ref is None or ref in images:
                    continue
                try:
                    images[ref] = self._opened().get(ref)
                except InputMissing as exc:
                    raise SpecError(f"job {job.id}: {field} {ref}: {exc}") from exc
        return images

    def _parent_images(self, job: Job) -> bytes | list[bytes]:
        """The images of the job `init_from` names, from the result store: the job's fault (SpecError) when that
        job is not done, has no such image, or its images are gone (expired by retention)."""
        assert job.spec.init_from is not None
        parent, index = parse_init_from(job.spec.init_from)
        inputs = self._opened()
        try:
            record, urls = inputs.store.get_with_blobs(parent)
        except JobNotFound:
            raise SpecError(f"job {job.id}: init_from: job {parent} does not exist") from None
        self.parents[parent] = record.spec
        if record.state is not JobState.DONE or not urls:
            raise SpecError(f"job {job.id}: init_from: job {parent} is {record.state.value} with no images")
        if index is not None and index >= len(urls):
            raise SpecError(f"job {job.id}: init_from: job {parent} has {len(urls)} images, no image {index}")
        images = []
        for url in urls if index is None else [urls[index]]:
            try:
                images.append(inputs.blobs.get(url))
            except BlobStoreError as exc:
                if is_missing(exc):
                    raise SpecError(f"job {job.id}: init_from: an image of job {parent} is gone from the result "
                                    f"store ({exc})") from exc
                raise  # the store's fault, not the job's
        if index is None and len(images) != job.spec.num_images:
            raise SpecError(f"job {job.id}: init_from: job {parent} has {len(images)} images for its "
                            f"{job.spec.num_images}")
        return images if index is None else images[0]


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
            init_image=images.get(spec.init_image or spec.init_from) if spec.task != "txt2img" else None,
            mask=images.get(spec.mask) if spec.mask else None,
            strength=spec.effective_strength,
            mask_blur=spec.mask_blur,
            resize_mode=spec.resize_mode,
            inpaint_area=spec.inpaint_area,
            mask_padding=spec.mask_padding,
            hires=_hires(spec, reader.parents),
        ))
    return requests


def _hires(spec: Any, parents: dict[str, Any]) -> tuple[float, int, int, int, int] | None:
    """RenderRequest.hires of a hires fix's second pass: the fix and its first pass's size and steps."""
    if spec.hires is None or spec.init_from is None:
        return None
    first = parents.get(parse_init_from(spec.init_from)[0])
    if first is None:
        return None
    return spec.hires.scale, spec.hires.steps, first.width, first.height, first.steps
