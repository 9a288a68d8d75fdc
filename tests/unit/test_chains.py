"""renderfarm/chains.py, pure logic: references resolved, hires fixes built, cycles and bad parents refused with
the spec and the field named (the store and the farm: tests/integration/test_chains_*.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from renderfarm.chains import hires_size, hires_steps, parse_init_from, plan_chains
from renderfarm.errors import SpecError
from renderfarm.jobs import Job, JobSpec, JobState, describe_validation_error

BASE = {"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64, "steps": 3, "seed": 7}


def spec(**kw) -> JobSpec:
    return JobSpec(**{**BASE, **kw})


def plan(specs, ids, existing=(), team_ok=lambda team: True):
    found = {job.id: job for job in existing}
    def validate(data, where):  # as FarmClient.validate: SpecError naming where and the field
        try:
            return JobSpec.model_validate(data)
        except ValidationError as exc:
            raise SpecError(f"{where}: {describe_validation_error(exc)}") from None

    return plan_chains(specs, ids, validate=validate,
                       read=lambda wanted: [found.get(i) for i in wanted], may_touch=team_ok,
                       family=lambda model: SimpleNamespace(size_multiple=8, flow_matching=False))


def test_a_batch_without_chains_is_left_as_it_is():
    specs = [spec(), spec(prompt="b")]
    assert plan(specs, ["a", "b"]) == (specs, ["a", "b"])


def test_local_references_become_ids_and_init_from_implies_after():
    specs, ids = plan([spec(num_images=2), spec(init_from="#0:1", strength=0.4), spec(after=["#1", "#0"])],
                      ["x", "y", "z"])
    assert ids == ["x", "y", "z"]
    assert (specs[1].init_from, specs[1].after) == ("x:1", ("x",))
    assert specs[2].after == ("y", "x")


def test_a_hires_fix_becomes_two_jobs_the_second_keeping_the_id():
    specs, ids = plan([spec(num_images=2, webhook="https://hooks.example.com/a",
                            hires={"scale": 1.5, "strength": 0.55, "steps": 2}), spec(after=["#0"])], ["h", "k"])
    assert ids == ["h-base", "h", "k"]
    first, second, after = specs
    assert (first.hires, first.webhook, first.width, first.num_images) == (None, None, 64, 2)
    # 2 steps run at strength 0.55, as A1111's hires pass runs its steps: the job's steps stretched to 4
    assert (second.width, second.height, second.steps, second.strength) == (96, 96, 4, 0.55)
    assert (second.init_from, second.after, second.resize_mode, second.seed) == ("h-base", ("h-base",), "resize", 7)
    assert second.webhook == "https://hooks.example.com/a" and second.hires.scale == 1.5
    assert after.after == ("h",)  # "#0" is the job asked for: its second pass


@pytest.mark.parametrize(("value", "scale", "multiple", "want"), [
    (64, 2.0, 8, 128), (100, 1.5, 8, 144), (1024, 1.5, 16, 1536), (832, 1.3, 64, 1024), (8, 1.1, 8, 8)])
def test_hires_size_rounds_down_to_the_family_multiple(value, scale, multiple, want):
    assert hires_size(value, scale, multiple) == want


def test_parse_init_from():
    assert parse_init_from("abc") == ("abc", None) and parse_init_from("abc:3") == ("abc", 3)


@pytest.mark.parametrize(("specs", "message"), [
    ([spec(after=["#0"])], r"jobs\[0\]: after: a job cannot wait for itself"),
    ([spec(after=["#5"])], r"jobs\[0\]: after: #5 is past the batch's 1 specs"),
    ([spec(after=["#1"]), spec(after=["#2"]), spec(after=["#0"])], r"jobs\[0\]: after: a cycle: a -> b -> c -> a"),
    ([spec(after=["nope"])], r"jobs\[0\]: after: job nope does not exist"),
    ([spec(after=["dead"])], r"jobs\[0\]: after: job dead is failed: retry it first"),
    ([spec(after=["theirs"])], r"jobs\[0\]: after: job theirs belongs to team 'other'"),
    ([spec(num_images=2), spec(init_from="#0:2")], r"jobs\[1\]: init_from: job a renders 2 images; there is no image 2"),
    ([spec(num_images=2), spec(init_from="#0")], r"jobs\[1\]: init_from: job a renders 2 images and this job 1"),
    ([spec(width=128), spec(init_from="#0")], r"jobs\[1\]: init_from: job a renders 128x64, this job 64x64: give a "
                                              r"resize_mode"),
])
def test_bad_chains_are_refused_naming_the_spec_and_the_field(specs, message):
    existing = [Job(id="dead", spec=spec(), state=JobState.FAILED), Job(id="theirs", spec=spec(team="other"))]
    with pytest.raises(SpecError, match=message + ".*nothing was enqueued"):
        plan(specs, ["a", "b", "c"][: len(specs)], existing, team_ok=lambda team: team != "other")


def test_a_hires_first_pass_id_taken_by_the_batch_is_refused():
    with pytest.raises(SpecError, match=r"jobs\[0\]: hires: its first pass would take the id a-base"):
        plan([spec(hires={}), spec()], ["a", "a-base"])


@pytest.mark.parametrize(("fields", "message"), [
    ({"init_from": "a", "init_image": "sha256:" + "0" * 64}, "init_image or from an earlier job"),
    ({"mask": "sha256:" + "0" * 64}, "give init_image \\(or init_from\\) too"),
    ({"hires": {"scale": 2}, "init_image": "sha256:" + "0" * 64}, "a hires fix follows a text-to-image pass"),
    ({"hires": {"scale": 1.0}}, "hires.scale"),
    ({"after": ["a", "a"]}, "'a' is named twice"),
    ({"after": ["a b"]}, "after.0"),
    ({"init_from": "a:x"}, "init_from"),
])
def test_the_spec_fields_are_checked(fields, message):
    with pytest.raises(ValidationError, match=message):
        spec(**fields)


@pytest.mark.parametrize("flow", [False, True])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.55, 0.65, 0.7, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 28, 50])
def test_a_hires_pass_runs_the_steps_asked_for(steps, strength, flow):
    from renderfarm.planning.vram import effective_steps

    total = hires_steps(steps, strength, flow)
    if total < 200:
        assert effective_steps(total, strength, flow) == steps
        assert total == steps or effective_steps(total - 1, strength, flow) < steps  # the fewest that do
    assert hires_steps(steps, 0.0, flow) == steps


def test_a_hires_pass_too_long_for_the_farm_is_refused():
    with pytest.raises(SpecError, match=r"jobs\[0\] \(hires pass\): .*steps"):
        plan([spec(steps=50, hires={"strength": 0.1})], ["a"])
