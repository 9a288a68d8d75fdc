"""The S3 blob store (cluster/blobs/s3.py) against a real S3-compatible HTTP server on a free loopback port:
moto's ThreadedMotoServer (no MinIO binary can be installed offline here; moto speaks the same wire protocol,
boto3 signs and parses real HTTP). What moto cannot do (fill up, refuse a key) is answered by a tiny HTTP server
that replies as MinIO does (its error XML and status). Skips, saying so, when boto3 or moto is not installed."""

from __future__ import annotations

import contextlib
import http.server
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("boto3", reason="the S3 blob store needs boto3 (pip install 'renderfarm[s3]')")
moto_server = pytest.importorskip("moto.server", reason="the S3 test server is moto[server] (the test extra)")

from renderfarm.cluster.blobs import (  # noqa: E402
    BlobStoreError,
    is_full_or_unwritable,
    open_blob_store,
    read_blob,
    result_keys,
)
from renderfarm.cluster.blobs import s3 as s3_backend  # noqa: E402
from renderfarm.cluster.processes import free_port  # noqa: E402

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def moto_s3():
    """A moto S3 server on a free loopback port; yields the store options that reach it."""
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{port}", "region": "us-east-1",
               "aws_access_key_id": "farm-test", "aws_secret_access_key": "farm-test-secret"}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def s3_options():
    with moto_s3() as options:
        yield options


_buckets = iter(range(10**6))


@pytest.fixture
def bucket():
    """A fresh bucket name per test (moto keeps its buckets for the life of the process)."""
    return f"rf-test-{next(_buckets)}-{int(time.time() * 1000) % 10**8}"


def test_put_get_exists_delete_round_trip(s3_options, bucket):
    store = open_blob_store(f"s3://{bucket}/farm-a", **s3_options)
    keys = result_keys("job-1", 2)
    urls = [store.put(key, f"image {i}".encode()) for i, key in enumerate(keys)]  # the bucket is made on first put
    assert urls == [f"s3://{bucket}/farm-a/{key}" for key in keys] == [store.url_of(k) for k in keys]
    assert [store.get(u) for u in urls] == [b"image 0", b"image 1"]
    assert store.exists(urls[0])
    store.delete(urls[0])
    store.delete(urls[0])  # not there any more: still not an error
    assert not store.exists(urls[0]) and store.exists(urls[1])
    with pytest.raises(BlobStoreError, match="missing") as caught:
        store.get(urls[0])
    assert caught.value.kind == "missing" and caught.value.__cause__ is not None  # the ClientError, chained


def test_a_put_replaces_the_blob_whole(s3_options, bucket):
    store = open_blob_store(f"s3://{bucket}", **s3_options)
    url = store.put("j/0.png", b"A" * 100_000)
    assert store.put("j/0.png", b"B" * 50_000) == url
    assert store.get(url) == b"B" * 50_000


def test_a_presigned_url_fetches_the_blob_over_plain_http(s3_options, bucket):
    store = open_blob_store(f"s3://{bucket}/p", **s3_options)
    data = bytes(range(256)) * 40
    url = store.put("j/0.png", data)
    link = store.presign(url, expires_s=120)
    assert link.startswith(s3_options["endpoint_url"] + f"/{bucket}/p/j/0.png?") and "X-Amz-Signature=" in link
    with urllib.request.urlopen(link, timeout=30) as response:  # no credentials: the signature is the grant
        assert response.status == 200 and response.read() == data
        assert response.headers["Content-Type"] == "image/png"
    tampered = link.replace("j/0.png", "j/1.png")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(tampered, timeout=30)
    assert refused.value.code in (403, 404)
    with pytest.raises(BlobStoreError, match="expires_s"):
        store.presign(url, expires_s=0)


def test_sweep_deletes_blobs_older_than_the_age_and_keeps_the_rest(s3_options, bucket):
    """LastModified is the server's, to the second: the old blobs are written 3 s before the new ones and the
    sweep takes those older than 2 s, so a new blob (at most ~1 s old by its truncated stamp) is kept."""
    store = open_blob_store(f"s3://{bucket}/farm", **s3_options)
    other = open_blob_store(f"s3://{bucket}/other-farm", **s3_options)
    old = [store.put(f"old/{i}.png", b"o") for i in range(3)]
    foreign = other.put("old/0.png", b"not ours")
    time.sleep(3.0)
    new = [store.put(f"new/{i}.png", b"n") for i in range(2)]
    assert store.sweep(2.0) == 3
    assert [store.exists(u) for u in old + new] == [False] * 3 + [True] * 2
    assert other.exists(foreign), "a sweep stays under its own prefix"
    assert store.sweep(2.0) == 0
    assert store.sweep(0) == 2 and not any(store.exists(u) for u in new)


def test_sweep_deletes_in_batches(s3_options, bucket, monkeypatch):
    monkeypatch.setattr(s3_backend, "DELETE_BATCH", 2)  # DeleteObjects takes 1000 keys; 5 blobs make 3 calls
    store = open_blob_store(f"s3://{bucket}", **s3_options)
    urls = [store.put(f"j/{i}.png", b"x") for i in range(5)]
    calls = []
    real = store._delete_many
    monkeypatch.setattr(store, "_delete_many", lambda keys: calls.append(len(keys)) or real(keys))
    assert store.sweep(0) == 5 and calls == [2, 2, 1]
    assert not any(store.exists(u) for u in urls)


def test_sweep_of_a_bucket_never_written_is_zero(s3_options, bucket):
    assert open_blob_store(f"s3://{bucket}/x", **s3_options).sweep(0) == 0


def test_any_store_reads_a_url_of_the_other_backend(s3_options, bucket, tmp_path):
    """A job keeps the URL it was written under: after moving from a directory to S3 (or back), a reader
    opened on either store still reads every job's images."""
    s3_store = open_blob_store(f"s3://{bucket}/farm", **s3_options)
    directory = open_blob_store(str(tmp_path / "results"), **s3_options)
    s3_url, file_url = s3_store.put("a/0.png", b"from s3"), directory.put("b/0.png", b"from a directory")
    assert directory.get(s3_url) == b"from s3" and s3_store.get(file_url) == b"from a directory"
    other_bucket = open_blob_store(f"s3://{bucket}-2", **s3_options)
    assert other_bucket.get(s3_url) == b"from s3" and other_bucket.presign(file_url) is None
    assert directory.presign(s3_url).startswith("http://127.0.0.1:")
    assert read_blob(s3_url, **s3_options) == b"from s3" and read_blob(file_url) == b"from a directory"


def test_credentials_and_endpoint_from_the_standard_environment(s3_options, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = open_blob_store(f"s3://{bucket}/env")  # no options at all
    url = store.put("j/0.png", b"via env")
    assert store.get(url) == b"via env"
    assert "env-key%2F" in store.presign(url)  # signed with the environment's key


def test_an_unreachable_store_says_so(bucket):
    closed = free_port()  # nothing listens there
    store = open_blob_store(f"s3://{bucket}", endpoint_url=f"http://127.0.0.1:{closed}", region="us-east-1",
                            aws_access_key_id="k", aws_secret_access_key="s")
    with pytest.raises(BlobStoreError, match="unreachable") as caught:
        store.put("j/0.png", b"x")
    assert caught.value.kind == "unreachable" and is_full_or_unwritable(caught.value)
    assert f"127.0.0.1:{closed}" in str(caught.value)
    with pytest.raises(BlobStoreError, match="unreachable"):
        store.get(f"s3://{bucket}/j/0.png")


def test_an_unknown_option_is_refused_naming_it():
    with pytest.raises(BlobStoreError, match="endpoint") as caught:
        open_blob_store("s3://renders", endpoint="http://minio:9000")
    assert caught.value.kind == "invalid" and "endpoint_url" in str(caught.value)


# --- errors a real MinIO gives that moto does not: a tiny server answering as MinIO does ------------------

MINIO_ERROR = """<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>{code}</Code><Message>{message}</Message><Key>j/0.png</Key><BucketName>renders</BucketName>
<Resource>/renders/j/0.png</Resource><RequestId>17B0C2D5A1E4F9C3</RequestId></Error>"""


@contextlib.contextmanager
def answering(status: int, code: str, message: str):
    """An HTTP server on a free loopback port that answers every request with this S3 error."""
    body = MINIO_ERROR.format(code=code, message=message).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_PUT = do_GET = do_HEAD = do_POST = do_DELETE = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"endpoint_url": f"http://127.0.0.1:{server.server_address[1]}", "region": "us-east-1",
               "aws_access_key_id": "k", "aws_secret_access_key": "s"}
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.mark.parametrize("status, code, kind", [
    (507, "XMinioStorageFull", "full"),  # MinIO's answer when its drives reach the free-space threshold
    (400, "XMinioAdminBucketQuotaExceeded", "full"),
    (403, "AccessDenied", "unwritable"),
    (403, "InvalidAccessKeyId", "unwritable"),
])
def test_a_store_that_refuses_writes_is_full_or_unwritable(status, code, kind):
    with answering(status, code, "refused for the test") as options:
        store = open_blob_store("s3://renders", **options)
        with pytest.raises(BlobStoreError) as caught:
            store.put("j/0.png", b"x")
    assert caught.value.kind == kind and is_full_or_unwritable(caught.value)
    assert code in str(caught.value) and "s3://renders/j/0.png" in str(caught.value)


def test_a_read_refused_is_denied_not_missing():
    with answering(403, "AccessDenied", "no") as options:
        with pytest.raises(BlobStoreError) as caught:
            open_blob_store("s3://renders", **options).get("s3://renders/j/0.png")
    assert caught.value.kind == "denied" and not is_full_or_unwritable(caught.value)
