"""Chains end to end on a real farm (real redis-server, real Ray, two simulated nodes, the tiny stand-ins): a
hires fix built by the client runs as two jobs in order, each routed on its own; `init_from` feeds an earlier
job's images to img2img; a job waits for its parents and fails with a parent that fails; `status` names what a
waiting job waits for. The catalog (tests/conftest.py) has a model `broken` whose weights are absent."""

from __future__ import annotations

import json

import numpy as np
import pytest

from renderfarm.errors import SpecError
from renderfarm.infotext import parse_a1111_parameters
from renderfarm.jobs import Job, JobSpec, JobState

pytestmark = pytest.mark.integration

BASE = {"model": "tiny-sd15", "prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 3}


@pytest.fixture
def client(farm_client):
    return farm_client


def test_a_hires_fix_runs_as_two_jobs_in_order(client):
    (final,) = client.submit_batch([{**BASE, "seed": 11, "num_images": 2,
                                     "hires": {"scale": 2, "strength": 0.6, "steps": 2}}], job_ids=["hr"])
    assert final == "hr"
    first = client.job("hr-base")
    second = client.job("hr")
    assert (first.spec.width, first.spec.hires, first.spec.num_images) == (64, None, 2)
    assert (second.spec.width, second.spec.height, second.spec.steps) == (128, 128, 4)  # runs 2 at strength 0.6
    assert (second.spec.init_from, second.spec.after, second.spec.strength) == ("hr-base", ("hr-base",), 0.6)
    assert second.spec.seed == first.spec.seed == 11
    done = client.wait(["hr"], timeout=300)
    assert done[0].state is JobState.DONE, done[0].error
    first = client.job("hr-base")
    assert first.state is JobState.DONE and first.finished_at <= done[0].started_at  # in order
    result = client.result("hr")
    assert [image.size for image in result.images] == [(128, 128)] * 2
    params = parse_a1111_parameters(result.parameters[0])
    # As A1111 writes a hires fix: the first pass's size and steps, then the fix.
    assert params["Size"] == "64x64" and params["Steps"] == "3"
    assert params["Hires upscale"] == "2.0" and params["Hires steps"] == "2" and params["Hires upscaler"] == "Lanczos"
    assert params["Denoising strength"] == "0.6"


def test_init_from_and_after_inside_one_batch(client):
    ids = client.submit_batch([
        {**BASE, "seed": 1, "num_images": 2},
        # strength 0: the parent's images through the VAE, image for image, and its image 1 alone
        {**BASE, "seed": 2, "num_images": 2, "init_from": "#0", "strength": 0.0},
        {**BASE, "seed": 3, "init_from": "#0:1", "strength": 0.0},
        {**BASE, "seed": 4, "after": ["#2"]},
    ])
    jobs = client.wait(ids, timeout=300)
    assert [j.state for j in jobs] == [JobState.DONE] * 4, [j.error for j in jobs]
    assert jobs[2].spec.init_from == f"{ids[0]}:1" and jobs[3].spec.after == (ids[2],)
    assert jobs[3].started_at >= jobs[2].finished_at
    parent = [np.asarray(image, dtype=float) for image in client.result(ids[0]).images]
    each = [np.asarray(image, dtype=float) for image in client.result(ids[1]).images]
    (one,) = [np.asarray(image, dtype=float) for image in client.result(ids[2]).images]

    def far(a, b):
        return np.abs(a - b).mean()

    # The stand-in's VAE is random, so a round trip is far from its input; but it is a function of it: the
    # image made from the parent's image 1 is (up to the nodes' dtypes) the one made image for image from it.
    assert far(one, each[1]) < 2 and far(one, each[0]) > 10 * max(far(one, each[1]), 0.5)
    assert far(parent[0], parent[1]) > 10


def test_a_failing_parent_fails_its_chain_and_status_says_what_waits(client, capsys):
    from renderfarm.cli import main

    # Enqueued as a job submitted before any node had reported would be: its weights are absent on every node.
    client.store.submit([Job(id="bad", spec=JobSpec(model="broken", prompt="p", width=64, height=64, seed=1))], "b1")
    ids = client.submit_batch([{**BASE, "after": ["bad"]}, {**BASE, "after": ["#0"]}])
    assert client.job(ids[0]).state is JobState.WAITING or client.job("bad").state.terminal
    capsys.readouterr()
    main(["status", "--redis", client.redis_settings.url, "--json", ids[1]])
    row = json.loads(capsys.readouterr().out)["jobs"][0]
    assert row["after"] == [ids[0]]
    if row["state"] == "waiting":
        assert row["waits_on"][0]["job"] == ids[0]
    jobs = client.wait(ids, timeout=180)
    assert [j.state for j in jobs] == [JobState.FAILED, JobState.FAILED]
    assert "job bad it waits for failed" in jobs[0].error and "ModelSourceError" in jobs[0].error
    assert "job " + ids[0] + " it waits for failed" in jobs[1].error
    assert jobs[0].attempts == 0 and not any(n.get("draining") for n in client.store.nodes())
    # A job can no longer be put after the failed one: refused with the reason, nothing enqueued.
    before = client.store.counts()
    with pytest.raises(SpecError, match=r"jobs\[1\]: after: job bad is failed: retry it first"):
        client.submit_batch([BASE, {**BASE, "after": ["bad"]}])
    with pytest.raises(SpecError, match=r"jobs\[0\]: after: a cycle"):
        client.submit_batch([{**BASE, "after": ["#1"]}, {**BASE, "after": ["#0"]}])
    with pytest.raises(SpecError, match=r"jobs\[0\]: after: job nope does not exist"):
        client.submit_batch([{**BASE, "after": ["nope"]}])
    assert client.store.counts() == before
    # Retrying a child whose parent failed says what to retry instead.
    assert "retry bad" in client.retry([ids[0]])[ids[0]]


def test_the_cli_builds_chains(client, capsys, tmp_path):
    from renderfarm.cli import main

    url = client.redis_settings.url
    capsys.readouterr()
    main(["submit", "--redis", url, "--json", "--no-wait", "--size", "64x64", "--steps", "2", "--seed", "5",
          "--hires", "1.5", "--hires-strength", "0.5", "--hires-steps", "2", "a tower"])
    (final,) = json.loads(capsys.readouterr().out)["jobs"]
    main(["submit", "--redis", url, "--json", "--out", str(tmp_path), "--size", "96x96", "--steps", "2",
          "--init-from", f"{final}:0", "--strength", "0.5", "--after", f"{final}-base", "the tower at night"])
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] and out["done"] == 1 and len(out["images"]) == 1, out
    (child,) = client.jobs(out["jobs"])
    assert child.spec.after == (f"{final}-base", final) and child.spec.init_from == f"{final}:0"
    first, second = client.jobs([f"{final}-base", final])
    assert (first.spec.width, second.spec.width, second.spec.hires.scale) == (64, 96, 1.5)
    assert first.state is second.state is JobState.DONE
