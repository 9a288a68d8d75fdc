"""The scheduler places img2img and inpainting jobs by their own fit and time (the VAE-encode stage and what it
leaves on the card, planning/vram.py): an image task never goes to a node where only its text-to-image twin fits,
through `pick`, the large-farm NodeIndex and the submit-time verdict alike, and its finish estimate counts the
encode. dispatch.pending_job gives placement the spec's task."""

import pytest

from renderfarm.jobs import Job, JobSpec
from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.fit import JobShape, NodeView, fit_for, fit_on, why_nothing_fits
from renderfarm.scheduler.dispatch import pending_job, run_steps
from renderfarm.scheduler.placement import INDEX_FROM_NODES, PendingJob, filter_nodes, pick, plan_dispatch, score
from tests.unit.cards import H100, RTX4090

REF = "sha256:" + "a" * 64


def small_card():
    """A card in a 16 GB PC that holds SDXL text-to-image at 1024 and not its image tasks (leaf offload pins more
    than the RAM holds; fp8 + model offload fits only without the VAE that an image task leaves beside the
    UNet). Scanned for, so the test follows the model's constants."""
    for tenths in range(40, 80):
        card = device_from_spec("small", round(tenths / 10 + 0.05, 2), "8.6", ram_gib=16)
        if fit_on("sdxl", 1024, 1024, 1, card).fits and not fit_on("sdxl", 1024, 1024, 1, card, task="inpaint").fits:
            return card
    raise AssertionError("no card holds SDXL text-to-image at 1024 and not its inpainting")


SMALL = small_card()


def job(task="txt2img", i=0, images=1):
    key = ("sdxl", 1024, 1024, 20) + ((task,) if task != "txt2img" else ())
    return PendingJob(id=f"{task}{i}", model="sdxl", batch_key=key, num_images=images, width=1024, height=1024,
                      steps=20, task=task)


def node(name, device, backlog=0.0, slots=1):
    return NodeView(name, device, frozenset({"sdxl"}), backlog, slots)


def nodes():
    """The small card idle; a 4090 busy for hours: text-to-image goes to the small one, which finishes first."""
    return [node("small", SMALL), node("big", RTX4090, backlog=10_000.0)]


def test_text_to_image_takes_the_idle_small_card_and_image_tasks_wait_for_the_one_they_fit():
    plan = plan_dispatch([job()], nodes(), 4)
    assert [a.worker for a in plan.assignments] == ["small"]
    for task in ("img2img", "inpaint"):
        plan = plan_dispatch([job(task)], nodes(), 4)
        assert plan.etas[f"{task}0"].node == "big"
        assert [a.worker for a in plan.assignments] == ["big"]
        assert plan.assignments[0].finish_s > 10_000.0


def test_the_small_card_is_filtered_out_with_the_denoise_that_keeps_the_vae():
    fitting, rejected = filter_nodes(job("inpaint").shape, nodes())
    assert [n.name for n, _ in fitting] == ["big"]
    assert rejected["small"].startswith("nothing fits: the most frugal rung") and "model-offload" in rejected["small"]
    assert pick(job("inpaint").shape, nodes()).node == "big"
    assert pick(job().shape, nodes()).node == "small"


def test_an_image_task_that_fits_no_node_is_unplaced_with_its_task_named():
    only_small = [node("small", SMALL)]
    plan = plan_dispatch([job("inpaint"), job()], only_small, 4)
    assert "inpaint0" in plan.unplaced and "sdxl inpaint at 1024x1024" in plan.unplaced["inpaint0"]
    assert [a.job_ids for a in plan.assignments] == [("txt2img0",)]
    assert why_nothing_fits(job("inpaint").shape, only_small) is not None
    assert why_nothing_fits(job().shape, only_small) is None


def test_the_large_farm_index_places_by_the_task_too():
    farm = [node(f"small{i}", SMALL) for i in range(INDEX_FROM_NODES // 2)]
    farm += [node(f"big{i}", RTX4090, backlog=10_000.0 + i) for i in range(INDEX_FROM_NODES // 2)]
    assert len(farm) >= INDEX_FROM_NODES
    plan = plan_dispatch([job("inpaint"), job()], farm, 1)
    by_job = {a.job_ids[0]: a.worker for a in plan.assignments}
    assert by_job["inpaint0"] == "big0"
    assert by_job["txt2img0"].startswith("small")


def test_the_finish_counts_the_encode_of_the_batch():
    big = node("big", H100)
    for task in ("txt2img", "img2img", "inpaint"):
        shape = job(task, images=2).shape
        fit = fit_for(shape, big)
        decision = score(shape, big, fit)
        assert decision.run_s == pytest.approx(shape.steps * fit.seconds_per_step + fit.encode_s)
        assert (fit.encode_s > 0) == (task != "txt2img")
    img, inp = (fit_for(job(t, images=2).shape, big).encode_s for t in ("img2img", "inpaint"))
    assert inp == pytest.approx(2 * img)  # the masked images are encoded too


def test_the_shape_carries_the_task_and_defaults_to_text_to_image():
    plain = PendingJob("j", "sdxl", ("sdxl",), 1, 1024, 1024, 20)
    assert plain.task == "txt2img" and plain.shape.task == "txt2img"
    assert JobShape("sdxl", 1024, 1024, 20).describe() == "sdxl at 1024x1024, batch 1"
    assert job("img2img").shape.describe() == "sdxl img2img at 1024x1024, batch 1"


def spec(**fields):
    return JobSpec.model_validate({"model": "sdxl", "prompt": "x", "width": 1024, "height": 1024, "steps": 20,
                                   **fields})


@pytest.mark.parametrize(("fields", "task"), [
    ({}, "txt2img"),
    ({"init_image": REF, "strength": 0.5}, "img2img"),
    ({"init_image": REF, "mask": REF}, "inpaint"),
])
def test_dispatch_gives_placement_the_specs_task_and_the_steps_it_runs(fields, task):
    from renderfarm.planning.catalog import default_catalog

    j = Job(id="j", spec=spec(**fields))
    pending = pending_job(j, run_steps(j.spec, default_catalog()))
    assert pending.task == task and pending.shape.task == task
    assert pending.steps == (10 if task == "img2img" else 15 if task == "inpaint" else 20)
    assert pending.batch_key == j.spec.batch_key()


def test_a_chains_second_pass_is_an_image_task_with_its_strengths_steps():
    """`init_from` (an earlier job's image, renderfarm/chains.py) leaves init_image empty on the spec: the task and
    the steps that run come from it all the same."""
    from renderfarm.planning.catalog import default_catalog

    j = Job(id="j", spec=spec(init_from="parent-job", strength=0.5))
    pending = pending_job(j, run_steps(j.spec, default_catalog()))
    assert (pending.task, pending.steps) == ("img2img", 10)
