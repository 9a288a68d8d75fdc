import math

import pytest
from pydantic import ValidationError

from renderfarm.jobs import (
    TRANSITIONS,
    IllegalTransition,
    Job,
    JobSpec,
    JobState,
    check_transition,
    describe_validation_error,
    sources_of,
)
from renderfarm.planning.catalog import default_catalog

CATALOG = default_catalog()


def spec(**kw):
    base = {"model": "tiny-sd15", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}
    return JobSpec.validate_for({**base, **kw}, CATALOG)


def error_of(**kw) -> str:
    with pytest.raises(ValidationError) as info:
        spec(**kw)
    return describe_validation_error(info.value)


def test_valid_spec_keeps_fields():
    s = spec(seed=7, tags=["a", "b"], team="lighting")
    assert (s.width, s.height, s.seed, s.tags, s.team) == (64, 64, 7, ("a", "b"), "lighting")
    assert s.batch_key() == ("tiny-sd15", 64, 64, 2, 5.0, (), None, None)
    assert spec(sampler="Euler a").batch_key() != s.batch_key()  # another sampler: another pipeline call


@pytest.mark.parametrize(
    "kw, field, reason",
    [
        ({"width": 60}, "width", "multiple of 8"),
        ({"model": "tiny-flux", "width": 72}, "width", "multiple of 16"),
        ({"model": "tiny-flux", "height": 40}, "height", "multiple of 16"),
        ({"width": 2048}, "width", "outside 32..1024"),
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"steps": 10_000}, "steps", "less than or equal to 200"),
        ({"num_images": 0}, "num_images", "greater than or equal to 1"),
        ({"guidance": math.nan}, "guidance", "finite"),
        ({"guidance": math.inf}, "guidance", "finite"),
        ({"prompt": "   "}, "prompt", "blank"),
        ({"prompt": "x" * 5000}, "prompt", "at most 4000"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"width": "64"}, "width", "valid integer"),
        ({"width": 64.0}, "width", "valid integer"),
        ({"team": "a b"}, "team", "pattern"),
        ({"colour": "red"}, "colour", "Extra inputs"),
        ({"model": "nope"}, "model", "known models: flux-dev"),
    ],
)
def test_invalid_specs_name_the_field(kw, field, reason):
    message = error_of(**kw)
    assert message.startswith(f"{field}:"), message
    assert reason in message


def test_sizes_checked_without_catalog_too():
    with pytest.raises(ValidationError):
        JobSpec(model="anything", prompt="x", width=65)


def test_transition_table_covers_every_state_and_done_is_final():
    assert set(TRANSITIONS) == set(JobState)
    assert JobState.DONE.terminal and TRANSITIONS[JobState.DONE] == frozenset()
    # failed and cancelled jobs leave only by an operator's retry: to the queue, or to wait for their parents
    assert TRANSITIONS[JobState.FAILED] == TRANSITIONS[JobState.CANCELLED] == {JobState.QUEUED, JobState.WAITING}
    assert sources_of(JobState.LEASED) == {JobState.QUEUED}  # a waiting job is queued before any node leases it
    assert not JobState.WAITING.terminal and TRANSITIONS[JobState.WAITING] == {
        JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}


@pytest.mark.parametrize(
    "current, target",
    [("queued", "done"), ("queued", "running"), ("done", "queued"), ("cancelled", "leased"), ("done", "failed")],
)
def test_illegal_transitions_raise(current, target):
    with pytest.raises(IllegalTransition, match=f"{current} -> {target}"):
        check_transition("j1", current, target)


def test_job_transition_walks_the_happy_path_and_refuses_shortcuts():
    job = Job(id="j1", spec=spec())
    for target in (JobState.LEASED, JobState.RUNNING, JobState.DONE):
        job.transition(target)
    assert job.state is JobState.DONE
    with pytest.raises(IllegalTransition):
        job.transition(JobState.RUNNING)
