"""The `renderfarm` command, run as a user runs it (a subprocess), against real Redis and a real farm."""

from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import one_json, run_cli

pytestmark = pytest.mark.integration


def test_demo_json_renders_and_reports_per_node(tmp_path):
    proc = run_cli("demo", "--json", "--jobs", "8", "--out", str(tmp_path / "renders"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # A quiet start: no Ray chatter, no error-level line from Ray's core (an actor handle among the
    # scheduler's constructor arguments made Ray log one, and risked its restart).
    assert "Connecting to existing Ray cluster" not in proc.stderr, proc.stderr[-3000:]
    assert "core_worker.cc" not in proc.stderr and "constructor arguments" not in proc.stderr, proc.stderr[-3000:]
    out = one_json(proc)
    assert out["jobs"] == out["done"] == 8 and out["failed"] == 0 and out["seconds"] > 0
    assert len(out["images"]) == 8
    assert out["hires_fixes"] == 1  # the eighth job: a first pass at 64 px, its hires pass at 128
    hires = [Image.open(path) for path in out["images"] if "Hires upscale" in Image.open(path).info["parameters"]]
    assert [(im.size, "Size: 64x64" in im.info["parameters"]) for im in hires] == [((128, 128), True)]
    for path in out["images"]:
        assert "parameters" in Image.open(path).info
    assert {n["name"]: n["vram_gib"] for n in out["nodes"]} == {"quadro-24g": 24, "rtx-8g": 8}
    assert sum(n["jobs_done"] for n in out["nodes"]) == 8
    # Each simulated card picks its own profile: Turing computes in fp16, Ampere in bf16.
    expected = {"quadro-24g": "fp16", "rtx-8g": "bf16"}
    for node in out["nodes"]:
        assert node["profiles"], node
        assert all(p.startswith(expected[node["name"]]) for p in node["profiles"].values()), node


def test_invalid_submit_is_one_clear_line_and_enqueues_nothing(redis_url, store, tmp_path):
    proc = run_cli("submit", "a fox", "--model", "tiny-flux", "--size", "72x64", "--redis", redis_url)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "width: width=72 must be a multiple of 16" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("submit", "a fox", "--model", "sd9", "--redis", redis_url, "--json")
    assert proc.returncode == 1
    out = one_json(proc)
    assert out["ok"] is False and "known models" in out["error"]
    assert store.counts()["queued"] == 0


def test_unreachable_redis_names_the_url():
    proc = run_cli("status", "--redis", "redis://:hunter2@127.0.0.1:1/0")
    assert proc.returncode == 1
    assert "127.0.0.1:1" in proc.stderr and "hunter2" not in proc.stderr
    assert "Traceback" not in proc.stderr


def test_no_farm_found_says_how_to_start_one(tmp_path):
    proc = run_cli("status", "--data-dir", str(tmp_path))
    assert proc.returncode == 1 and "renderfarm up" in proc.stderr


def test_submit_status_cancel_against_a_farm(farm, tmp_path):
    url = farm.redis_url
    proc = run_cli("submit", "a lighthouse", "--model", "tiny-sd15", "--size", "64x64", "--steps", "2",
               "--count", "2", "--seed", "5", "--out", str(tmp_path), "--redis", url, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = one_json(proc)
    assert out["done"] == 2 and len(out["images"]) == 2
    assert all(Path(p).exists() for p in out["images"])

    proc = run_cli("status", *out["jobs"], "--redis", url, "--json")
    rows = one_json(proc)["jobs"]
    assert [r["state"] for r in rows] == ["done", "done"]
    assert all(r["timings"]["denoise_s_per_step"] > 0 for r in rows)

    proc = run_cli("submit", "slow", "--model", "tiny-sd15", "--size", "512x512", "--steps", "50", "--count", "6",
               "--redis", url, "--no-wait", "--json")
    ids = one_json(proc)["jobs"]
    proc = run_cli("cancel", *ids, "--redis", url, "--json")
    outcome = one_json(proc)["jobs"]
    assert set(outcome) == set(ids)
    assert all(v.startswith(("cancelled", "not cancelled: already done")) for v in outcome.values())

    proc = run_cli("status", "--redis", url, "--json")
    status = one_json(proc)
    assert {n["name"] for n in status["nodes"]} == {"big", "small"}
    assert status["counts"]["cancelled"] >= 1


def test_demo_with_an_existing_redis_leaves_its_state_there(redis_url, store, tmp_path):
    proc = run_cli("demo", "--json", "--jobs", "4", "--redis", redis_url, "--out", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert one_json(proc)["done"] == 4
    assert store.counts()["done"] == 4
    assert {n["name"] for n in store.nodes()} == {"quadro-24g", "rtx-8g"}


def test_follow_a_batch_on_a_farm(farm, tmp_path):
    """The batch id from submit finds its jobs again; a cancelled job retried renders; the head's farm marker
    tells a URL with the wrong database number from the farm's."""
    url = farm.redis_url
    proc = run_cli("submit", "a harbour", "--model", "tiny-sd15", "--size", "64x64", "--steps", "2", "--count", "2",
                   "--tag", "harbour", "--out", str(tmp_path), "--redis", url, "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = one_json(proc)
    listed = one_json(run_cli("jobs", "--batch", out["batch"], "--json", "--redis", url))["jobs"]
    assert sorted(r["id"] for r in listed) == sorted(out["jobs"])
    assert all(r["state"] == "done" and r["node"] in ("big", "small") and r["tags"] == ["harbour"] for r in listed)

    job_id = one_json(run_cli("submit", "slow", "--model", "tiny-sd15", "--size", "256x256", "--steps", "40",
                              "--redis", url, "--no-wait", "--json"))["jobs"][0]
    outcome = one_json(run_cli("cancel", job_id, "--redis", url, "--json"))["jobs"][job_id]
    if outcome.startswith("cancelled"):  # else it rendered before the cancel reached it
        assert one_json(run_cli("retry", job_id, "--redis", url, "--json"))["ok"]
        assert farm.client().wait([job_id], timeout=240)[0].state.value == "done"

    proc = run_cli("status", "--redis", url.rsplit("/", 1)[0] + "/3")
    assert proc.returncode == 1 and "wrong database number?" in proc.stderr, proc.stderr
