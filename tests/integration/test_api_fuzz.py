"""Fuzz the HTTP API from its own OpenAPI schema (schemathesis: requests generated to match and to break the
schema) against a real redis-server, bounded in examples. No request may cause a server error (a 5xx other than
501, img2img on purpose, and 504, an A1111 request whose render does not finish in the API's short timeout:
there are no nodes here), and nothing may be left half-written: every job in Redis belongs to a whole batch.

The event stream (/v1/events without a filter never ends) is fuzzed by its parameters in test_api.py instead."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ALLOWED_5XX = {501, 504}


@pytest.fixture(scope="module")
def fuzzed_app(redis_url):
    from renderfarm.api import ApiContext, create_app
    from renderfarm.cluster.redis_server import connect

    redis = connect(redis_url)
    redis.flushdb()
    redis.close()
    ctx = ApiContext(redis_url, a1111_timeout_s=0.5)
    yield create_app(ctx)
    ctx.base.store.close()


def operations(app):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/v1/events")
    return [result.ok() for result in schema.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_causes_a_server_error(fuzzed_app, mode):
    """Every operation, with requests that match its schema (positive) and that break it (negative)."""
    from hypothesis import given
    from schemathesis.generation import GenerationMode

    seen: dict[str, set[int]] = {}
    for operation in operations(fuzzed_app):

        @given(case=operation.as_strategy(GenerationMode(mode)))
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def call(case):
            response = case.call()
            seen.setdefault(f"{case.method} {case.path}", set()).add(response.status_code)
            assert response.status_code < 500 or response.status_code in ALLOWED_5XX, (
                f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:2000]}\n"
                f"{case.as_curl_command()}")

        try:
            call()
        except Unsatisfiable:  # an operation without inputs has no request that breaks its schema
            assert mode == "negative", operation
    assert len(seen) >= (20 if mode == "positive" else 5), seen  # every operation (with inputs to break)


def test_nothing_is_half_written(redis_url):
    """After the fuzzing above: every job record in Redis is in the batch its record names, and every batch's
    ids are job records (a submit is one Lua script: whole or nothing)."""
    from renderfarm.cluster.keys import Keys
    from renderfarm.cluster.redis_server import connect

    redis, keys = connect(redis_url), Keys()
    try:
        jobs = [key.decode() for key in redis.scan_iter(match=keys.job("*"), count=1000)]
        batches = [key.decode() for key in redis.scan_iter(match=keys.batch("*"), count=1000)]
        assert jobs, "the fuzzing enqueued nothing at all: it did not exercise submit"
        for batch_key in batches:
            members = {m.decode() for m in redis.smembers(batch_key)} if redis.type(batch_key) == b"set" else {
                m.decode() for m in redis.lrange(batch_key, 0, -1)}
            for job_id in members:
                assert redis.exists(keys.job(job_id)), f"{batch_key} names {job_id}, which has no record"
        for job_key in jobs:
            raw = redis.hget(job_key, "batch_id")
            assert raw, f"{job_key} has no batch"
            batch_key = keys.batch(raw.decode())
            assert redis.exists(batch_key), f"{job_key} names batch {raw.decode()}, which does not exist"
    finally:
        redis.close()
