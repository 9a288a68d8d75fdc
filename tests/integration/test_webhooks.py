"""Webhooks against a real redis-server and a real HTTP receiver (http.server on loopback, in a thread): jobs
moved through the store's real transitions, dispatchers following the real finish stream (no Ray)."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import queue
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from renderfarm.cli import webhooks as webhooks_cli
from renderfarm.cli.common import parent_parsers
from renderfarm.client import FarmClient
from renderfarm.cluster.redis_server import connect
from renderfarm.config import Settings
from renderfarm.errors import SpecError
from renderfarm.jobs import Job, JobSpec, JobState
from renderfarm.webhooks import WebhookDispatcher, deliveries, rotate_secret, team_secret, verify
from tests.helpers import put_pngs, wait_until

pytestmark = pytest.mark.integration

WAIT = 60  # seconds a test waits for what it needs before it fails (never reached when things work)


class Receiver:
    """A local HTTP endpoint that records every POST and answers with the statuses it is given (then 200)."""

    def __init__(self, statuses=()):
        self.requests: queue.Queue = queue.Queue()
        self.statuses = list(statuses)
        self.seen: list[dict] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    request = {"path": self.path, "headers": dict(self.headers.items()), "body": body,
                               "status": status}
                    receiver.seen.append(request)
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
                receiver.requests.put(request)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook?token=abc"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def next(self) -> dict:
        return self.requests.get(timeout=WAIT)

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def receiver():
    made = []

    def make(statuses=()):
        made.append(Receiver(statuses))
        return made[-1]

    yield make
    for r in made:
        r.close()


@pytest.fixture
def dispatcher(store):
    started = []

    def make(client=None, **settings):
        options = {"webhook_allow_private": True, "webhook_timeout_s": 5.0, **settings}
        d = WebhookDispatcher(client or store.redis, store.keys, Settings(**options), poll_s=0.05,
                              backoff_base_s=0.05, follow_published=False, claim_idle_s=0.5)
        started.append(d)
        return d.start()

    yield make
    for d in started:
        d.stop()


def make_job(job_id, webhook=None, team="default"):
    spec = JobSpec(model="tiny-sd15", prompt="a fox", width=64, height=64, steps=2, webhook=webhook, team=team)
    return Job(id=job_id, spec=spec)


def finish(store, job_id, tmp_path, state=JobState.DONE):
    """Drive one queued job to `state` through the store's real moves, as the scheduler and a worker do."""
    if state is JobState.CANCELLED:
        store.cancel(job_id)
        return
    assert store.lease(job_id, "n1", 600) and store.start(job_id, "n1", 600)
    if state is JobState.DONE:
        assert store.complete(job_id, "n1", put_pngs(tmp_path, job_id, [b"\x89PNG-a"]), {}, None)
    else:
        assert store.fail(job_id, "out of luck", "n1")


def all_handled(store) -> bool:
    """Every finish event was read by the dispatchers' group and acknowledged."""
    last = store.redis.xrevrange(store.keys.finished, count=1)
    group = store.redis.xinfo_groups(store.keys.finished)[0]
    return group["pending"] == 0 and (not last or group["last-delivered-id"] == last[0][0])


def record_in(store, state, **filters):
    found = deliveries(store, state=state, **filters)
    return found[0] if found else None


def test_a_finished_job_is_posted_once_signed(store, receiver, dispatcher, tmp_path):
    hook = receiver()
    dispatcher()
    store.submit([make_job("j1", webhook=hook.url)], "b1")
    finish(store, "j1", tmp_path)
    request = hook.next()
    secret = team_secret(store.redis, store.keys, "default", create=False)
    verify(secret.secret, request["headers"], request["body"])  # raises when it does not verify
    body = json.loads(request["body"])
    assert body["event"] == "job.done" == request["headers"]["X-Renderfarm-Event"]
    assert body["delivery"] == request["headers"]["X-Renderfarm-Delivery"]
    assert request["path"] == "/hook?token=abc" and request["headers"]["Content-Type"] == "application/json"
    job = body["job"]
    assert (job["id"], job["state"], job["batch_id"], job["team"], job["images"]) == ("j1", "done", "b1", "default", 1)
    assert job["results"] == store.result_blobs("j1")
    record = wait_until(lambda: record_in(store, "delivered", job="j1"), WAIT, "the delivered record")
    assert record["attempts"] == 1 and record["last_status"] == 200 and record["event"] == "job.done"
    assert record["url"].endswith("/hook?...") and "token" not in json.dumps(record), "query string redacted"
    counters = store.counters()
    assert counters["webhook_delivered"] == 1 and counters["webhook_attempts"] == 1
    assert "webhook_failed" not in counters


def test_failed_and_cancelled_jobs_are_posted_too(store, receiver, dispatcher, tmp_path):
    hook = receiver()
    dispatcher()
    store.submit([make_job("f1", webhook=hook.url), make_job("c1", webhook=hook.url)], "b1")
    finish(store, "f1", tmp_path, JobState.FAILED)
    finish(store, "c1", tmp_path, JobState.CANCELLED)
    bodies = {json.loads(r["body"])["job"]["id"]: json.loads(r["body"]) for r in (hook.next(), hook.next())}
    assert bodies["f1"]["event"] == "job.failed" and bodies["f1"]["job"]["error"] == "out of luck"
    assert bodies["c1"]["event"] == "job.cancelled"


def test_a_receiver_failing_twice_gets_three_attempts(store, receiver, dispatcher, tmp_path):
    hook = receiver(statuses=[500, 500])
    dispatcher()
    store.submit([make_job("j1", webhook=hook.url)], "b1")
    finish(store, "j1", tmp_path)
    attempts = [hook.next() for _ in range(3)]
    assert [a["status"] for a in attempts] == [500, 500, 200]
    assert len({a["headers"]["X-Renderfarm-Delivery"] for a in attempts}) == 1, "one delivery, retried"
    assert len({a["body"] for a in attempts}) == 1, "every retry sends the same body"
    record = wait_until(lambda: record_in(store, "delivered", job="j1"), WAIT, "the delivered record")
    assert record["attempts"] == 3 and record["last_status"] == 200
    assert store.counters()["webhook_attempts"] == 3


def test_a_receiver_that_always_fails_gives_a_failed_record(store, receiver, dispatcher, tmp_path):
    hook = receiver(statuses=[503] * 1000)
    dispatcher(webhook_retry_s=0.5)
    store.submit([make_job("j1", webhook=hook.url)], "b1")
    finish(store, "j1", tmp_path)
    record = wait_until(lambda: record_in(store, "failed", job="j1"), WAIT, "the failed record")
    assert record["attempts"] >= 2 and record["last_status"] == 503 and "503" in record["last_error"]
    assert store.counters()["webhook_failed"] == 1
    assert not store.redis.zscore(store.keys.webhook_due, record["id"]), "a failed delivery is not due again"


def test_two_dispatchers_deliver_each_event_once(store, redis_url, receiver, dispatcher, tmp_path):
    hook = receiver()
    clients = [connect(redis_url), connect(redis_url)]
    try:
        first, second = dispatcher(clients[0]), dispatcher(clients[1])
        ids = [f"j{i}" for i in range(12)]
        store.submit([make_job(i, webhook=hook.url) for i in ids], "b1")
        for job_id in ids:
            finish(store, job_id, tmp_path)
        got = sorted(json.loads(hook.next()["body"])["job"]["id"] for _ in ids)
        assert got == sorted(ids)
        wait_until(lambda: len(deliveries(store, state="delivered")) == len(ids), WAIT, "every delivery recorded")
        first.stop()
        second.stop()
        assert len(hook.seen) == len(ids), "no event was delivered twice"
        assert store.counters()["webhook_delivered"] == len(ids)
    finally:
        for client in clients:
            client.close()


def test_a_dead_dispatchers_events_are_claimed_by_another(store, receiver, dispatcher, tmp_path):
    hook = receiver()
    store.ensure_webhook_group()
    store.submit([make_job("j1", webhook=hook.url)], "b1")
    finish(store, "j1", tmp_path)
    taken = store.read_finished("dead-one", 10, None)  # read, never acknowledged: its dispatcher died
    assert [e.job for e in taken] == ["j1"]
    dispatcher()  # claims what stayed pending longer than claim_idle_s
    body = json.loads(hook.next()["body"])
    assert body["job"]["id"] == "j1"
    wait_until(lambda: all_handled(store), WAIT, "the event acknowledged")


def test_a_batch_webhook_fires_once_when_its_last_job_finishes(store, redis_url, receiver, dispatcher, tmp_path):
    hook = receiver()
    store.publish_settings({"webhook_allow_private": True})
    client = FarmClient(redis_url)
    try:
        spec = {"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64, "steps": 2}
        ids = client.submit_batch([spec, spec, spec], batch_id="batch1", webhook=hook.url)
    finally:
        client.store.close()
    dispatcher()
    dispatcher()  # two, so that the last finishes may reach both
    finish(store, ids[0], tmp_path, JobState.DONE)
    finish(store, ids[1], tmp_path, JobState.FAILED)
    wait_until(lambda: store.redis.smembers(store.keys.batch_open("batch1")) == {ids[2].encode()}, WAIT,
               "the first two jobs seen finished")
    assert store.delivery("batch-batch1") is None, "not before the batch has finished"
    finish(store, ids[2], tmp_path, JobState.CANCELLED)
    request = hook.next()
    body = json.loads(request["body"])
    assert body["event"] == "batch.finished" == request["headers"]["X-Renderfarm-Event"]
    assert body["batch"]["id"] == "batch1" and body["batch"]["team"] == "default"
    assert {j["id"]: j["state"] for j in body["batch"]["jobs"]} == {ids[0]: "done", ids[1]: "failed",
                                                                     ids[2]: "cancelled"}
    assert body["batch"]["counts"] == {"done": 1, "failed": 1, "cancelled": 1}
    verify(team_secret(store.redis, store.keys, "default").secret, request["headers"], request["body"])
    wait_until(lambda: record_in(store, "delivered", batch="batch1"), WAIT, "the batch delivery recorded")
    store.retry(ids[1])  # the batch finishes again later: its webhook has fired, once
    finish(store, ids[1], tmp_path, JobState.DONE)
    wait_until(lambda: all_handled(store), WAIT, "every event handled")
    assert len(deliveries(store, batch="batch1")) == 1
    assert sum(1 for r in hook.seen if json.loads(r["body"])["event"] == "batch.finished") == 1


def test_a_private_target_is_refused_unless_allowed(store, receiver, dispatcher, tmp_path):
    hook = receiver()
    dispatcher(webhook_allow_private=False)
    store.submit([make_job("j1", webhook=hook.url)], "b1")  # past the client's check: judged again at delivery
    finish(store, "j1", tmp_path)
    record = wait_until(lambda: record_in(store, "failed", job="j1"), WAIT, "the refused record")
    assert record["attempts"] == 1 and record["last_status"] is None
    assert "127.0.0.1 is a loopback address" in record["last_error"]
    assert "webhook_allow_private" in record["last_error"]
    assert hook.seen == []


def test_a_name_resolving_to_a_private_address_is_refused_at_delivery(store, receiver, dispatcher, tmp_path):
    import ipaddress
    import socket

    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
    except OSError:
        pytest.skip(f"this machine's name {name!r} does not resolve")
    if any(ipaddress.ip_address(a.split("%")[0]).is_global for a in addresses):
        pytest.skip(f"this machine's name {name!r} resolves to a public address")
    hook = receiver()
    url = hook.url.replace("127.0.0.1", name)
    dispatcher(webhook_allow_private=False)
    store.submit([make_job("j1", webhook=url)], "b1")
    finish(store, "j1", tmp_path)
    record = wait_until(lambda: record_in(store, "failed", job="j1"), WAIT, "the refused record")
    assert f"{name.lower()} resolves to" in record["last_error"] and "webhook_allow_private" in record["last_error"]
    assert hook.seen == []


def test_a_submit_with_a_bad_webhook_enqueues_nothing(store, redis_url):
    client = FarmClient(redis_url)
    spec = {"model": "tiny-sd15", "prompt": "a fox", "width": 64, "height": 64, "steps": 2}
    try:
        before = sorted(store.redis.keys("*"))
        cases = [
            ([{**spec}, {**spec, "webhook": "ftp://example.com/x"}], {}, "jobs[1]: webhook: "),
            ([{**spec, "webhook": "https://user:pw@example.com/x"}], {}, "credentials"),
            ([{**spec, "webhook": "http://127.0.0.1:9/x"}], {}, "jobs[0]: webhook: 127.0.0.1 is a loopback address"),
            ([{**spec, "webhook": "http://localhost/x"}], {}, "localhost is a loopback name"),
            ([spec], {"webhook": "http://10.1.2.3/x"}, "webhook: 10.1.2.3 is a private address"),
            ([spec], {"webhook": "http://exa mple.com/"}, "webhook: contains whitespace"),
            ([spec], {"webhook": 42}, "webhook: expected a URL string"),
            ([spec, {**spec, "team": "other"}], {"webhook": "https://example.com/"}, "webhook: a batch webhook needs"),
        ]
        for specs, options, message in cases:
            with pytest.raises(SpecError, match="nothing was enqueued") as caught:
                client.submit_batch(specs, **options)
            assert message in str(caught.value)
        assert sorted(store.redis.keys("*")) == before, "nothing was written"
        # a public URL passes, and the farm's setting lets private ones through
        client.submit_batch([{**spec, "webhook": "https://example.com/x"}], webhook="https://example.com/b")
        store.publish_settings({"webhook_allow_private": True})
        allowed = FarmClient(redis_url)
        try:
            allowed.submit_batch([{**spec, "webhook": "http://127.0.0.1:9/x"}], webhook="http://localhost/b")
        finally:
            allowed.store.close()
    finally:
        client.store.close()


def _cli(redis_url, *argv):
    common, with_redis = parent_parsers()
    parser = argparse.ArgumentParser(prog="renderfarm")
    webhooks_cli.register(parser.add_subparsers(dest="command", required=True), common, with_redis)
    args = parser.parse_args(["webhooks", *argv, "--json", "--redis", redis_url])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert args.func(args) == 0
    return json.loads(out.getvalue())


def test_cli_shows_and_rotates_a_secret_and_lists_deliveries(store, redis_url, receiver, dispatcher, tmp_path):
    shown = _cli(redis_url, "secret", "--team", "lighting")
    assert shown["team"] == "lighting" and shown["secret"].startswith("whsec_") and not shown["rotated"]
    assert _cli(redis_url, "secret", "--team", "lighting")["secret"] == shown["secret"], "kept until rotated"
    rotated = _cli(redis_url, "secret", "--team", "lighting", "--rotate")
    assert rotated["secret"] != shown["secret"] and rotated["previous_until"] > rotated["created"]
    assert team_secret(store.redis, store.keys, "lighting").signing() == [rotated["secret"], shown["secret"]]

    hook = receiver(statuses=[500] * 1000)
    dispatcher(webhook_retry_s=0.2)
    store.submit([make_job("j1", webhook=hook.url, team="lighting")], "b1")
    finish(store, "j1", tmp_path)
    wait_until(lambda: record_in(store, "failed", job="j1"), WAIT, "the failed record")
    request = hook.seen[0]
    verify(shown["secret"], request["headers"], request["body"])  # the old secret still verifies, during its grace
    verify(rotated["secret"], request["headers"], request["body"])
    listed = _cli(redis_url, "deliveries", "--state", "failed", "--job", "j1")["deliveries"]
    assert [(d["job"], d["state"], d["team"]) for d in listed] == [("j1", "failed", "lighting")]
    assert "target" not in listed[0] and "payload" not in listed[0]
    assert _cli(redis_url, "deliveries", "--state", "delivered")["deliveries"] == []


def test_rotation_without_grace_signs_with_the_new_secret_only(store):
    first = team_secret(store.redis, store.keys, "t")
    assert team_secret(store.redis, store.keys, "t").secret == first.secret, "created once"
    fresh = rotate_secret(store.redis, store.keys, "t", grace_s=0)
    assert fresh.signing() == [fresh.secret] and fresh.secret != first.secret


def test_dispatcher_restart_resumes_a_scheduled_retry(store, redis_url, receiver, tmp_path):
    hook = receiver(statuses=[500])
    settings = Settings(webhook_allow_private=True, webhook_timeout_s=5.0)
    store.submit([make_job("j1", webhook=hook.url)], "b1")
    finish(store, "j1", tmp_path)
    first = WebhookDispatcher(store.redis, store.keys, settings, poll_s=0.05, backoff_base_s=0.05,
                              follow_published=False)
    store.ensure_webhook_group()
    while first.step() == 0:  # inline, without threads: the event, then the first attempt
        pass
    assert hook.next()["status"] == 500
    record = store.delivery(deliveries(store, job="j1")[0]["id"])
    assert record["state"] == "pending" and record["attempts"] == 1
    assert store.redis.zscore(store.keys.webhook_due, record["id"]) is not None, "its retry is scheduled in Redis"
    first.stop()
    second = WebhookDispatcher(store.redis, store.keys, settings, poll_s=0.05, backoff_base_s=0.05,
                               follow_published=False).start()
    try:
        assert hook.next()["status"] == 200
        done = wait_until(lambda: record_in(store, "delivered", job="j1"), WAIT, "the retried delivery")
        assert done["attempts"] == 2
    finally:
        second.stop()


def test_a_dispatcher_on_a_store_follows_the_heads_settings_and_leaves_the_client_open(store, receiver, tmp_path):
    """How the HTTP API starts one: on its own Store, the head's published webhook settings winning."""
    hook = receiver()
    store.publish_settings({"webhook_allow_private": True, "webhook_timeout_s": 3.0})
    with WebhookDispatcher.for_settings(store, None, poll_s=0.05) as d:
        assert d.settings.webhook_allow_private and d.settings.webhook_timeout_s == 3.0
        store.submit([make_job("j1", webhook=hook.url)], "b1")
        finish(store, "j1", tmp_path)
        assert json.loads(hook.next()["body"])["job"]["id"] == "j1"
        wait_until(lambda: record_in(store, "delivered", job="j1"), WAIT, "the delivered record")
    assert not d.running and store.redis.ping()


def test_a_dead_consumer_holding_nothing_is_forgotten(store):
    store.ensure_webhook_group()
    store.redis.xgroup_createconsumer(store.keys.finished, "webhooks", "gone")  # a dispatcher that held nothing
    assert store.forget_idle_consumers(idle_s=3600) == 0, "not idle long enough"
    assert store.forget_idle_consumers(idle_s=0) == 1
    assert store.redis.xinfo_consumers(store.keys.finished, "webhooks") == []
