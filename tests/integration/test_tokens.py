"""Team tokens (cluster/auth.py) through FarmClient, the CLI and the dashboard, and result expiry, against a real
redis-server (no Ray: jobs are moved through their states with the Store, as a worker would)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from renderfarm.client import FarmClient, SpecError
from renderfarm.cluster import auth
from renderfarm.cluster.auth import AuthError
from renderfarm.cluster.blobs import open_blob_store
from renderfarm.cluster.blobs.local import path_of
from renderfarm.cluster.keys import Keys
from renderfarm.cluster.store import Store
from renderfarm.config import Settings
from tests.helpers import one_json, put_pngs, run_cli

pytestmark = pytest.mark.integration

KEYS = Keys()
SPEC = {"model": "tiny-sd15", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch):
    monkeypatch.delenv("RENDERFARM_TOKEN", raising=False)


@pytest.fixture
def tokens(redis_client):
    """An admin token and two team tokens on a clean database."""
    admin, _ = auth.create_token(redis_client, KEYS, "ops", admin=True, label="farm operator")
    design, _ = auth.create_token(redis_client, KEYS, "design", label="design pipeline")
    research, _ = auth.create_token(redis_client, KEYS, "research")
    return {"admin": admin, "design": design, "research": research}


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def finish(store: Store, job_id: str, results: Path) -> None:
    """What a worker does: lease, start, complete with one image (in a directory result store at `results`)."""
    deadline = time.time() + 60
    assert store.lease(job_id, "node-a", deadline) and store.start(job_id, "node-a", deadline)
    assert store.complete(job_id, "node-a", put_pngs(results, job_id, [png()]), {"denoise_s": 0.1}, None)


# --- open farm and the token store ------------------------------------------------------------------------------


def test_without_tokens_the_farm_is_open(redis_url, redis_client):
    client = FarmClient(redis_url, token="not-a-token-anyone-made")  # an open farm ignores a token
    assert client.access() == auth.OPEN and not auth.token_mode(redis_client, KEYS)
    job_id = client.submit({**SPEC, "team": "anyone"})
    assert client.job(job_id).spec.team == "anyone"
    assert client.cancel([job_id]) == {job_id: "cancelled (was queued)"}


def test_tokens_are_stored_as_digests_only(redis_client):
    with pytest.raises(AuthError, match="first token must be an admin token"):
        auth.create_token(redis_client, KEYS, "design")
    assert not auth.token_mode(redis_client, KEYS)
    token, record = auth.create_token(redis_client, KEYS, "ops", admin=True, label="operator", now=1000.0)
    assert len(token) >= 43 and record.digest == hashlib.sha256(token.encode()).hexdigest()
    stored = redis_client.hgetall("rf:tokens")
    assert list(stored) == [record.digest.encode()]
    assert json.loads(stored[record.digest.encode()]) == {"team": "ops", "admin": True, "created": 1000.0,
                                                          "label": "operator"}
    everything = b"".join(k + b"".join(redis_client.hgetall(k)) + b"".join(redis_client.hvals(k))
                          for k in redis_client.keys("*") if redis_client.type(k) == b"hash")
    assert token.encode() not in everything
    assert auth.list_tokens(redis_client, KEYS)[0].public() == {
        "team": "ops", "admin": True, "label": "operator", "created": 1000.0, "digest": record.digest[:12]}
    second, _ = auth.create_token(redis_client, KEYS, "design")
    assert second != token and auth.lookup(redis_client, KEYS, second).team == "design"
    for bad in ("", "-design", "a b", "x" * 65):
        with pytest.raises(ValueError, match="team"):
            auth.create_token(redis_client, KEYS, bad)


def test_revoke(redis_url, redis_client, tokens):
    records = {r.team: r for r in auth.list_tokens(redis_client, KEYS)}
    with pytest.raises(ValueError, match="at least 6 hex"):
        auth.revoke_token(redis_client, KEYS, "abc")
    with pytest.raises(ValueError, match="no token"):
        auth.revoke_token(redis_client, KEYS, "0" * 64)
    with pytest.raises(AuthError, match="last admin token"):
        auth.revoke_token(redis_client, KEYS, records["ops"].digest[:12])
    assert auth.revoke_token(redis_client, KEYS, records["design"].digest[:12].upper()).team == "design"
    with pytest.raises(AuthError, match="not valid"):
        FarmClient(redis_url, token=tokens["design"]).jobs([])
    auth.revoke_token(redis_client, KEYS, records["research"].digest[:8])
    auth.revoke_token(redis_client, KEYS, records["ops"].digest[:8])  # the only one left: the farm opens again
    assert not auth.token_mode(redis_client, KEYS)


# --- token mode through FarmClient ------------------------------------------------------------------------------


def test_no_valid_token_no_jobs(redis_url, tokens, redis_client):
    store = Store(redis_client)
    admin = FarmClient(redis_url, token=tokens["admin"])
    job_id = admin.submit({**SPEC, "team": "design"})
    for client, reason in ((FarmClient(redis_url), "requires a team token"),
                           (FarmClient(redis_url, token="forged-" + "x" * 40), "not valid")):
        calls = [lambda: client.submit(SPEC), lambda: client.job(job_id), lambda: client.jobs([job_id]),
                 lambda: client.result(job_id), lambda: client.cancel([job_id]), lambda: client.estimates([job_id]),
                 lambda: client.wait([job_id], timeout=1), lambda: next(client.as_completed([job_id], timeout=1)),
                 lambda: client.status(), lambda: client.position(job_id)]
        for call in calls:
            with pytest.raises(AuthError, match=reason):
                call()
    assert store.counts()["queued"] == 1 and store.state(job_id).value == "queued"


def test_team_tokens_see_and_cancel_their_own_jobs_only(redis_url, tokens, redis_client, tmp_path):
    store = Store(redis_client)
    design = FarmClient(redis_url, token=tokens["design"])
    research = FarmClient(redis_url, token=tokens["research"])
    admin = FarmClient(redis_url, token=tokens["admin"])

    mine = design.submit_batch([SPEC, {**SPEC, "team": "design"}, {**SPEC, "team": "default"}])
    assert [j.spec.team for j in design.jobs(mine)] == ["design"] * 3  # left out or default: the token's team
    before = store.counts()["queued"]
    with pytest.raises(SpecError) as info:
        design.submit_batch([SPEC, {**SPEC, "team": "research"}])
    assert "jobs[1]: team: 'research' is not this token's team ('design')" in str(info.value)
    assert "nothing was enqueued" in str(info.value) and store.counts()["queued"] == before
    theirs = research.submit(SPEC)
    assert admin.submit({**SPEC, "team": "research"}) and admin.job(theirs).spec.team == "research"

    assert design.job(mine[0]).id == mine[0]
    assert set(design.estimates(mine)) == set(mine) and design.position(mine[0]) is not None
    for call in (lambda: research.job(mine[0]), lambda: research.jobs([theirs, mine[0]]),
                 lambda: research.result(mine[0]), lambda: research.estimates([mine[0]]),
                 lambda: research.wait([mine[0]], timeout=1), lambda: research.position(mine[0])):
        with pytest.raises(AuthError, match="belongs to team 'design'; this token is for team 'research'"):
            call()
    assert research.cancel([mine[0], theirs, "no-such-job"]) == {
        mine[0]: "not cancelled: belongs to team design", theirs: "cancelled (was queued)",
        "no-such-job": "not cancelled: no such job"}
    assert store.state(mine[0]).value == "queued"
    assert research.status()["counts"]["queued"] >= 1  # the overview: any valid token

    finish(store, mine[1], tmp_path / "results")
    assert design.result(mine[1]).png == [png()]
    assert [j.id for j in design.as_completed([mine[1]], timeout=5)] == [mine[1]]
    assert admin.result(mine[1]).job.spec.team == "design"
    assert admin.cancel([mine[0]]) == {mine[0]: "cancelled (was queued)"}
    assert design.cancel([mine[2]]) == {mine[2]: "cancelled (was queued)"}

    with pytest.raises(AuthError, match="needs an admin token"):
        design.require_admin("draining a node")
    admin.require_admin("draining a node")


def test_token_from_the_environment(redis_url, tokens, monkeypatch):
    monkeypatch.setenv("RENDERFARM_TOKEN", tokens["research"])
    client = FarmClient(redis_url)
    assert client.access().team == "research"
    assert client.job(client.submit(SPEC)).spec.team == "research"


def test_revoked_token_stops_at_once(redis_url, tokens, redis_client):
    design = FarmClient(redis_url, token=tokens["design"])
    job_id = design.submit(SPEC)
    digest = auth.lookup(redis_client, KEYS, tokens["design"]).digest
    auth.revoke_token(redis_client, KEYS, digest[:10])
    with pytest.raises(AuthError, match="not valid"):
        design.job(job_id)


# --- the CLI ----------------------------------------------------------------------------------------------------


def test_cli_tokens(redis_url, redis_client):
    proc = run_cli("token", "create", "design", "--redis", redis_url)
    assert proc.returncode == 1 and "first token must be an admin token" in proc.stderr

    proc = run_cli("token", "create", "ops", "--admin", "--label", "operator", "--redis", redis_url)
    assert proc.returncode == 0, proc.stderr
    admin = proc.stdout.strip()  # the token alone on stdout, a note on stderr
    assert auth.lookup(redis_client, KEYS, admin).admin and "shown only now" in proc.stderr

    proc = run_cli("token", "create", "design", "--redis", redis_url, "--json")
    assert proc.returncode == 1 and "admin token" in one_json(proc)["error"]
    out = one_json(run_cli("token", "create", "design", "--redis", redis_url, "--json", "--token", admin))
    design = out["token"]
    assert out["team"] == "design" and out["admin"] is False and len(out["digest"]) == 12

    proc = run_cli("token", "list", "--redis", redis_url, "--json", token=admin)
    listed = one_json(proc)
    assert [(r["team"], r["admin"]) for r in listed["tokens"]] == [("ops", True), ("design", False)]
    assert admin not in proc.stdout and design not in proc.stdout
    assert run_cli("token", "list", "--redis", redis_url, token=design).returncode == 1

    job_id = FarmClient(redis_url, token=admin).submit({**SPEC, "team": "research"})
    proc = run_cli("status", "--redis", redis_url)
    assert proc.returncode == 1 and "requires a team token" in proc.stderr and "Traceback" not in proc.stderr
    assert run_cli("status", "--redis", redis_url, token=design).returncode == 0
    proc = run_cli("status", job_id, "--redis", redis_url, token=design)
    assert proc.returncode == 1 and "belongs to team 'research'" in proc.stderr
    out = one_json(run_cli("cancel", job_id, "--redis", redis_url, "--json", "--token", design))
    assert out["jobs"] == {job_id: "not cancelled: belongs to team research"}
    proc = run_cli("drain", "node-a", "--redis", redis_url, token=design)
    assert proc.returncode == 1 and "needs an admin token" in proc.stderr

    out = one_json(run_cli("token", "revoke", listed["tokens"][1]["digest"], "--redis", redis_url, "--json", token=admin))
    assert out["revoked"]["team"] == "design" and out["token_mode"] is True
    proc = run_cli("status", "--redis", redis_url, token=design)
    assert proc.returncode == 1 and "not valid" in proc.stderr


# --- the dashboard's actions ------------------------------------------------------------------------------------


def test_dashboard_actions_accept_an_admin_token(monkeypatch, redis_url, redis_client):
    from streamlit.testing.v1 import AppTest

    from renderfarm.jobs import Job, JobSpec

    app = Path(__file__).resolve().parents[2] / "renderfarm" / "dashboard" / "app.py"
    keys = Keys("dashtok")
    store = Store(redis_client, keys)
    store.register_node("node-a", {"gpu": "RTX 4090", "vram_gib": 24.0, "state": "idle"})
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, team="design", seed=1)
    assert store.submit([Job(id="q0", spec=spec, created_at=time.time())], "b1") == [True]
    monkeypatch.setenv("RENDERFARM_REDIS_URL", redis_url)
    monkeypatch.setenv("RENDERFARM_KEY_PREFIX", keys.prefix)
    monkeypatch.delenv("RENDERFARM_DASHBOARD_TOKEN", raising=False)

    at = AppTest.from_file(str(app), default_timeout=30).run()
    # Read-only: no action inputs in the sidebar (the chains view's job lookup only reads)
    assert not at.exception and not at.sidebar.text_input and not at.button, "an open farm without a dashboard token"

    admin, _ = auth.create_token(redis_client, keys, "ops", admin=True)
    team, _ = auth.create_token(redis_client, keys, "design")
    at = AppTest.from_file(str(app), default_timeout=30).run()
    assert [t.label for t in at.sidebar.text_input] == ["Admin token"] and not at.button
    at.text_input(key="token").input(team).run()
    assert not at.button and "Wrong token" in "\n".join(w.value for w in at.sidebar.warning)
    at.text_input(key="token").input(admin).run()
    assert {b.key for b in at.sidebar.button} >= {"action_cancel", "action_drain"}
    at.text_input(key="action_job").input("q0").run()
    at.button(key="action_cancel").click().run()
    assert [s.value for s in at.sidebar.success] == ["Cancelled job q0 (was queued)."]

    # With a dashboard token configured, both it and an admin token open the actions.
    monkeypatch.setenv("RENDERFARM_DASHBOARD_TOKEN", "s3cret-dashboard-token")
    for entered in ("s3cret-dashboard-token", admin):
        at = AppTest.from_file(str(app), default_timeout=30).run()
        assert [t.label for t in at.sidebar.text_input] == ["Dashboard token"]
        at.text_input(key="token").input(entered).run()
        assert not at.exception and "action_drain" in {b.key for b in at.sidebar.button}


# --- result expiry ----------------------------------------------------------------------------------------------


def test_result_expiry(redis_url, redis_client, tmp_path):
    """Images are kept `result_ttl_seconds` in the result store (its retention sweep, cluster/blobs); once swept,
    the job's record stays and the client says the images expired. Redis never held them."""
    assert Settings(result_ttl_seconds=1).result_ttl_seconds == 1
    store = Store(redis_client)
    client = FarmClient(redis_url)
    results = open_blob_store(str(tmp_path / "results"))
    old_id, new_id = client.submit(SPEC), client.submit(SPEC)
    finish(store, old_id, tmp_path / "results")
    (old_url,) = store.result_blobs(old_id)
    aged = time.time() - 120
    os.utime(path_of(old_url), (aged, aged))  # written two minutes ago
    finish(store, new_id, tmp_path / "results")
    assert client.result(old_id).png == [png()]  # still there
    assert not redis_client.exists(KEYS.result(old_id))
    assert results.sweep(older_than_s=60) == 1
    with pytest.raises(ValueError, match="images have expired"):
        client.result(old_id)
    assert client.job(old_id).state.value == "done"  # the job's record stays; only the images go
    assert client.result(new_id).png == [png()]


def test_a_token_never_reads_as_a_flag(redis_client):
    """A url-safe token starts with '-' one time in 64, and `--token -x...` is then taken for a flag (the CLI
    test failed that way in CI): every token carries a prefix."""
    tokens = [auth.create_token(redis_client, KEYS, "ops", admin=True)[0] for _ in range(200)]
    assert all(t.startswith(auth.TOKEN_PREFIX) for t in tokens) and len(set(tokens)) == 200
    assert all(auth.lookup(redis_client, KEYS, t).admin for t in tokens[:5])


def test_a_request_bound_client_checks_its_token_once(redis_url, redis_client, tokens):
    """The API checks a caller's token once per request and binds the answer (FarmClient.with_access): the
    request's calls then skip the token read, one Redis round trip each; the team rules still apply."""
    red = FarmClient(redis_url, token=tokens["design"])
    (job_id,) = red.submit_batch([SPEC])
    before = red.store.round_trips
    red.job(job_id)
    plain = red.store.round_trips - before
    bound = red.with_access(red.access())
    before = red.store.round_trips
    assert bound.job(job_id).id == job_id
    assert red.store.round_trips - before == plain - 1
    with pytest.raises(AuthError, match="belongs to team 'design'"):
        FarmClient(redis_url, token=tokens["research"]).with_access(auth.access(redis_client, KEYS, tokens["research"])).job(job_id)
