"""renderfarm/faults.py: whose fault a failure is (pure: no Redis server, no Ray cluster, no GPU)."""

from __future__ import annotations

import pytest
import redis.exceptions
from ray import exceptions as ray_exceptions

from renderfarm.errors import (
    CorruptRecord,
    DoesNotFit,
    ModelSourceError,
    RedisUnavailable,
    SpecError,
    UnknownModelError,
    UnsupportedFamily,
)
from renderfarm.faults import Fault, classify


@pytest.mark.parametrize("exc", [
    ModelSourceError("model 'sdxl': local source '/models/sdxl' does not exist"),
    UnsupportedFamily("model 'sd3.5-large': the workers do not know how to render family 'sd3'"),
    SpecError("jobs[0]: width: 100 is not a multiple of 8"),
    UnknownModelError("nope", ["tiny-sd15"]),
    CorruptRecord("job j: spec does not parse"),
])
def test_what_no_other_node_could_mend_is_the_jobs_fault(exc):
    assert classify(exc) is Fault.JOB


@pytest.mark.parametrize("exc", [
    DoesNotFit("out of memory with fp8+leaf-offload, the most frugal profile of flux-dev in VRAM"),
    RuntimeError("CUDA error: an illegal memory access was encountered"),
    ValueError("something a render did not expect"),
    KeyError("unet"),
    ray_exceptions.ActorDiedError(),
])
def test_a_failed_render_is_the_nodes_fault(exc):
    assert classify(exc) is Fault.NODE


@pytest.mark.parametrize("exc", [
    redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
    redis.exceptions.TimeoutError("Timeout reading from socket"),
    redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"),
    RedisUnavailable("redis://127.0.0.1:6379/0", "connection refused"),
    ray_exceptions.ActorUnavailableError("the actor is temporarily unavailable", None),
    ray_exceptions.GetTimeoutError("Get timed out"),
])
def test_unreachable_infrastructure_is_nobodys_fault(exc):
    assert classify(exc) is Fault.OUTAGE


def test_the_outermost_recognised_exception_decides():
    try:
        try:
            raise OSError("model_index.json: no such file")
        except OSError as cause:
            raise ModelSourceError("model 'broken': cannot load") from cause
    except ModelSourceError as exc:
        assert classify(exc) is Fault.JOB
    # An unrecognised wrapper is looked through: a RuntimeError raised from a lost connection is an outage.
    try:
        try:
            raise redis.exceptions.ConnectionError("Connection reset by peer")
        except redis.exceptions.ConnectionError as cause:
            raise RuntimeError("could not complete the job") from cause
    except RuntimeError as exc:
        assert classify(exc) is Fault.OUTAGE


def test_a_ray_task_error_is_judged_by_its_cause():
    cause = ModelSourceError("model 'broken': local source '/nonexistent' does not exist")
    wrapped = ray_exceptions.RayTaskError("render", "Traceback ...", cause)
    assert classify(wrapped) is Fault.JOB
    lost = ray_exceptions.RayTaskError("render", "Traceback ...", redis.exceptions.ConnectionError("gone"))
    assert classify(lost) is Fault.OUTAGE
    assert classify(ray_exceptions.RayTaskError("render", "Traceback ...", ZeroDivisionError())) is Fault.NODE


def test_a_summary_without_a_known_fault_is_the_nodes():
    assert Fault.parse("job") is Fault.JOB and Fault.parse("outage") is Fault.OUTAGE
    assert Fault.parse(None) is Fault.NODE and Fault.parse("weird") is Fault.NODE
