"""A worker reads each job's uploaded images by reference: once per batch, and a missing one is the job's fault."""

from __future__ import annotations

import pytest

from renderfarm.actors.job_inputs import InputReader, render_requests
from renderfarm.errors import SpecError
from renderfarm.faults import Fault, classify
from renderfarm.inputs import InputMissing
from renderfarm.jobs import Job, JobSpec

INIT, MASK, GONE = "sha256:" + "a" * 64, "sha256:" + "b" * 64, "sha256:" + "c" * 64


class FakeInputs:
    def __init__(self):
        self.reads: list[str] = []

    def get(self, ref: str) -> bytes:
        self.reads.append(ref)
        if ref == GONE:
            raise InputMissing(f"no uploaded image {ref}: expired or never uploaded; upload it again")
        return ref.encode()


def job(job_id: str, **fields) -> Job:
    return Job(id=job_id, spec=JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, **fields))


def test_each_image_is_read_once_and_carried_into_the_requests():
    fake = FakeInputs()
    reader = InputReader(lambda: fake)
    jobs = [job("a", init_image=INIT, mask=MASK, mask_blur=2, resize_mode="crop"), job("b", init_image=INIT,
                                                                                      strength=0.3), job("c")]
    first, second, third = render_requests(jobs, reader)
    assert sorted(fake.reads) == [INIT, MASK]
    assert (first.init_image, first.mask, first.strength, first.mask_blur, first.resize_mode, first.task) == (
        INIT.encode(), MASK.encode(), 0.75, 2, "crop", "inpaint")
    assert (second.task, second.strength) == ("img2img", 0.3)
    assert (third.task, third.init_image, third.strength) == ("txt2img", None, None)


def test_no_store_is_opened_for_text_only_batches():
    def refuse():
        raise AssertionError("opened")

    assert render_requests([job("a")], InputReader(refuse))[0].task == "txt2img"


def test_an_expired_input_is_the_jobs_fault():
    with pytest.raises(SpecError, match="job x: init_image sha256:c+: no uploaded image") as raised:
        render_requests([job("x", init_image=GONE)], InputReader(FakeInputs))
    assert classify(raised.value) is Fault.JOB
