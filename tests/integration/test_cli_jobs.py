"""Following jobs from the `renderfarm` command (a subprocess) against a real Redis: the batch id on submit,
the ids still pending on --timeout and Ctrl-C, `jobs`, `retry`, a full `status JOB`, exit codes that mean
something, the farm marker that catches a wrong database number, comments in --prompts, a closed pipe.

No Ray here: the Redis holds a farm marker and jobs nobody renders; states are moved through the Store as a
node would move them. The end-to-end run on a real farm is in test_cli.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from renderfarm.client import FarmClient
from renderfarm.cluster import auth
from renderfarm.cluster.keys import Keys
from renderfarm.jobs import JobState
from tests.helpers import one_json, run_cli, wait_until

pytestmark = pytest.mark.integration

SPEC = {"model": "tiny-sd15", "prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2}


@pytest.fixture
def farm_db(redis_url, store):
    """The test Redis with a farm marker, as `renderfarm up` leaves it (no node: nothing renders)."""
    store.mark_farm()
    return redis_url


def _env() -> dict[str, str]:
    """The environment run_cli gives the command (no farm URL or token inherited), for a Popen."""
    return {k: v for k, v in os.environ.items() if k not in ("RENDERFARM_REDIS_URL", "RENDERFARM_TOKEN")}


def _db(url: str, number: int) -> str:
    return url.rsplit("/", 1)[0] + f"/{number}"


def _fail(store, job_id: str, node: str = "n1") -> None:
    assert store.lease(job_id, node, 60) and store.start(job_id, node, 60)
    assert store.fail(job_id, "boom", node=node)


def test_submit_json_returns_the_batch_id(farm_db, store):
    out = one_json(run_cli("submit", "a fox", "--count", "3", "--no-wait", "--json", "--redis", farm_db))
    assert out["ok"] and len(out["jobs"]) == 3
    assert store.batch_ids(out["batch"]) == sorted(out["jobs"])
    proc = run_cli("submit", "a fox", "--no-wait", "--redis", farm_db)
    assert proc.returncode == 0 and "batch " in proc.stderr  # stdout stays the ids alone
    assert len(proc.stdout.split()) == 1


def test_timeout_prints_the_pending_ids_and_exits_3(farm_db):
    proc = run_cli("submit", "a fox", "--count", "2", "--timeout", "0.5", "--json", "--redis", farm_db)
    assert proc.returncode == 3, proc.stderr[-2000:]
    out = one_json(proc)
    assert out["ok"] is False and out["timeout"] is True and "timed out" in out["error"]
    assert sorted(out["pending"]) == sorted(out["jobs"]) and len(out["jobs"]) == 2 and out["batch"]

    proc = run_cli("submit", "a fox", "--count", "2", "--timeout", "0.5", "--redis", farm_db)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    pending = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("pending ")]
    assert len(pending) == 2 and "timed out after 0.5 s: 2 of 2 job(s) still pending" in proc.stderr


@pytest.mark.parametrize("as_json", [False, True])
def test_ctrl_c_while_waiting_prints_the_pending_ids(farm_db, store, as_json):
    argv = [sys.executable, "-m", "renderfarm.cli", "submit", "a fox", "--count", "2", "--redis", farm_db]
    proc = subprocess.Popen(argv + (["--json"] if as_json else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    try:
        wait_until(lambda: store.counts()["queued"] == 2, 60, "the jobs to be queued")
        time.sleep(0.3)  # into the wait
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-2000:]
    queued = set(store.ids_in(JobState.QUEUED))
    if as_json:
        payload = json.loads(out)
        assert payload["interrupted"] is True and set(payload["pending"]) == queued
    else:
        assert {line.split()[1] for line in out.splitlines() if line.startswith("pending ")} == queued
        assert "interrupted: 2 of 2 job(s) still pending" in err and "Traceback" not in err


def test_jobs_lists_newest_first_with_filters(farm_db, store, redis_client):
    client = FarmClient(farm_db)
    first = client.submit_batch([{**SPEC, "team": "design", "tags": ["hero"]}] * 2, batch_id="b-one")
    second = client.submit_batch([{**SPEC, "team": "research", "model": "tiny-flux"}], batch_id="b-two")
    _fail(store, first[0], node="n7")
    store.cancel(first[1])

    listed = one_json(run_cli("jobs", "--json", "--redis", farm_db))
    # Newest first; the jobs of one batch share their submit time.
    assert listed["ok"] and listed["jobs"][0]["id"] == second[0]
    assert sorted(r["id"] for r in listed["jobs"][1:]) == sorted(first)
    row = next(r for r in listed["jobs"] if r["id"] == first[0])
    assert (row["state"], row["team"], row["batch"], row["tags"], row["node"]) == ("failed", "design", "b-one",
                                                                                  ["hero"], "n7")

    def ids(*flags: str) -> list[str]:
        proc = run_cli("jobs", *flags, "--json", "--redis", farm_db)
        assert proc.returncode == 0, proc.stderr
        return [r["id"] for r in one_json(proc)["jobs"]]

    assert ids("--state", "failed") == [first[0]]
    assert ids("--team", "research") == second
    assert sorted(ids("--batch", "b-one")) == sorted(first)
    assert ids("--tag", "hero", "--state", "cancelled") == [first[1]]
    assert ids("--model", "tiny-flux") == second
    assert ids("--node", "n7") == [first[0]]
    assert ids("--limit", "1") == [second[0]]
    assert ids("--batch", "nope") == []

    table = run_cli("jobs", "--redis", farm_db).stdout.splitlines()
    assert table[0].split()[:3] == ["ID", "STATE", "TEAM"] and table[1].startswith(second[0])

    # A team token sees its own team only; naming another team is refused.
    admin, _ = auth.create_token(redis_client, Keys(), "ops", admin=True)
    design, _ = auth.create_token(redis_client, Keys(), "design")
    out = one_json(run_cli("jobs", "--json", "--redis", farm_db, token=design))
    assert sorted(r["id"] for r in out["jobs"]) == sorted(first)
    proc = run_cli("jobs", "--team", "research", "--redis", farm_db, token=design)
    assert proc.returncode == 1 and "this token is for team 'design'" in proc.stderr
    assert len(one_json(run_cli("jobs", "--json", "--redis", farm_db, token=admin))["jobs"]) == 3


def test_retry_puts_failed_and_cancelled_jobs_back(farm_db, store):
    client = FarmClient(farm_db)
    ids = client.submit_batch([SPEC] * 4, batch_id="b-retry")
    failed, cancelled, done, queued = ids
    _fail(store, failed)
    store.cancel(cancelled)
    assert store.lease(done, "n1", 60) and store.start(done, "n1", 60)
    assert store.complete(done, "n1", [f"file:///results/{done}-0.png"], {}, None)

    out = one_json(run_cli("retry", failed, "--json", "--redis", farm_db))
    assert out == {"ok": True, "jobs": {failed: "queued (was failed)"}}
    job = store.get(failed)
    assert (job.state.value, job.attempts, job.error, job.node) == ("queued", 0, None, None)

    proc = run_cli("retry", done, "nope", "--json", "--redis", farm_db)
    assert proc.returncode == 1
    assert one_json(proc)["jobs"] == {done: "not retried: it is done (only failed or cancelled jobs are retried)",
                                      "nope": "not retried: no such job"}

    out = one_json(run_cli("retry", "--batch", "b-retry", "--json", "--redis", farm_db))
    assert out == {"ok": True, "jobs": {cancelled: "queued (was cancelled)"}}  # done and queued ones left alone
    assert {store.state(i).value for i in (failed, cancelled, queued)} == {"queued"}
    pending = store.keys.pending  # back at their original place: the score they were submitted with
    assert store.redis.zscore(pending, cancelled) == store.redis.zscore(pending, failed) == store.redis.zscore(
        pending, queued)
    assert run_cli("retry", "--batch", "no-such-batch", "--redis", farm_db).returncode == 1


def test_cancel_of_a_job_that_does_not_exist_exits_1(farm_db):
    job_id = FarmClient(farm_db).submit(SPEC)
    proc = run_cli("cancel", "no-such-job", "--json", "--redis", farm_db)
    assert proc.returncode == 1 and one_json(proc)["jobs"] == {"no-such-job": "not cancelled: no such job"}
    assert run_cli("cancel", job_id, "--redis", farm_db).returncode == 0
    assert run_cli("cancel", job_id, "--redis", farm_db).returncode == 0  # already cancelled: nothing to do
    proc = run_cli("cancel", "--batch", "no-such-batch", "--redis", farm_db)
    assert proc.returncode == 1 and "no such batch" in proc.stderr


def test_status_of_a_job_shows_what_was_asked_and_when(farm_db, store):
    job_id = FarmClient(farm_db).submit_batch(
        [{**SPEC, "prompt": "a red fox", "negative_prompt": "blur", "seed": 42, "team": "design",
          "tags": ["hero", "v2"]}], batch_id="b-status")[0]
    assert store.lease(job_id, "n1", 60) and store.start(job_id, "n1", 60)
    row = one_json(run_cli("status", job_id, "--json", "--redis", farm_db))["jobs"][0]
    assert (row["prompt"], row["negative_prompt"], row["seed"], row["team"], row["batch"], row["tags"]) == (
        "a red fox", "blur", 42, "design", "b-status", ["hero", "v2"])
    assert row["created_at"] <= row["started_at"] and row["finished_at"] is None
    text = run_cli("status", job_id, "--redis", farm_db).stdout
    assert text.splitlines()[0].startswith(f"{job_id}  running")
    for part in ("prompt: a red fox", "negative: blur", "seed=42", "team=design", "batch=b-status", "tags=hero,v2",
                 "created 20", "started 20", "finished -"):
        assert part in text, text


def test_a_wrong_database_number_is_named(farm_db, store):
    wrong = _db(farm_db, 5)
    for argv in (["status"], ["jobs"], ["submit", "a fox", "--no-wait"], ["cancel", "x"]):
        proc = run_cli(*argv, "--redis", wrong)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert "no farm at" in proc.stderr and "wrong database number?" in proc.stderr, proc.stderr
        assert "database 0" in proc.stderr and "Traceback" not in proc.stderr
    assert FarmClient(wrong).store.counts()["queued"] == 0  # the submit enqueued nothing there

    # No farm anywhere on the server: an overview says so instead of showing an empty farm.
    store.redis.delete(store.keys.farm)
    proc = run_cli("status", "--json", "--redis", farm_db)
    assert proc.returncode == 1 and "no farm at" in one_json(proc)["error"]


def test_comment_lines_in_a_prompts_file_are_not_rendered(farm_db, store, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# shots for tuesday\na red fox\n\n   # a note, indented\na lighthouse\n")
    out = one_json(run_cli("submit", "--prompts", str(prompts), "--no-wait", "--json", "--redis", farm_db))
    assert sorted(job.spec.prompt for job in FarmClient(farm_db).jobs(out["jobs"])) == ["a lighthouse", "a red fox"]


def test_a_reader_that_stops_early_ends_the_command_quietly(farm_db):
    proc = subprocess.Popen([sys.executable, "-m", "renderfarm.cli", "status", "--redis", farm_db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    proc.stdout.close()  # like `| head -1` that has already gone: every write meets a closed pipe
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "BrokenPipeError" not in err and "Traceback" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 1
