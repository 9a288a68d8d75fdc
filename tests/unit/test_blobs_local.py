"""The directory blob store (cluster/blobs/local.py): atomic writes, key validation, retention by age, and the
errors a full or unwritable store gives. No Redis, no Ray. Full and read-only disks are real (a tiny tmpfs)
where this process may mount one (root with CAP_SYS_ADMIN); elsewhere those tests skip, and the ENOSPC one
still runs through /dev/full, whose writes fail with a real ENOSPC from the kernel."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from renderfarm.cluster.blobs import (
    BlobStoreError,
    is_full_or_unwritable,
    is_missing,
    open_blob_store,
    result_keys,
    validate_key,
)
from renderfarm.cluster.blobs.local import TMP_PREFIX, LocalBlobStore
from renderfarm.config import Settings
from renderfarm.errors import ConfigError, RenderfarmError


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` at `path` for the test's length; skips where this process may not mount."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True, timeout=30)


# --- round trip ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["path", "file-url"])
def test_put_get_round_trip_creates_the_directory_on_first_use(tmp_path, form):
    root = tmp_path / "not" / "yet" / "there"
    store = open_blob_store(str(root) if form == "path" else root.as_uri())
    assert isinstance(store, LocalBlobStore) and not root.exists()
    data = os.urandom(4096)
    url = store.put("job-1/abc-0.png", data)
    assert url == (root / "job-1" / "abc-0.png").as_uri() == store.url_of("job-1/abc-0.png")
    assert store.get(url) == data and store.exists(url)
    assert (root / "job-1" / "abc-0.png").read_bytes() == data
    assert store.presign(url) is None  # a directory has no HTTP URL to hand out


def test_a_url_with_spaces_and_unicode_in_the_root_round_trips(tmp_path):
    store = open_blob_store(str(tmp_path / "résults dir"))
    url = store.put("a/b.png", b"x")
    assert "%20" in url and store.get(url) == b"x"


def test_get_reads_a_url_of_another_directory_store(tmp_path):
    """A job keeps the URL it was written under: a reader opened on today's store reads yesterday's too."""
    old = open_blob_store(str(tmp_path / "old"))
    url = old.put("j/0.png", b"old image")
    new = open_blob_store(str(tmp_path / "new"))
    assert new.get(url) == b"old image" and new.exists(url)
    new.delete(url)
    assert not old.exists(url)


def test_missing_blob_is_a_missing_error_and_delete_is_idempotent(tmp_path):
    store = open_blob_store(str(tmp_path))
    url = store.put("j/0.png", b"x")
    store.delete(url)
    store.delete(url)  # deleting what is not there is not an error
    assert not store.exists(url)
    with pytest.raises(BlobStoreError, match="missing") as caught:
        store.get(url)
    assert caught.value.kind == "missing" and is_missing(caught.value) and not is_full_or_unwritable(caught.value)
    assert isinstance(caught.value.__cause__, FileNotFoundError)  # the original is chained
    assert isinstance(caught.value, RenderfarmError) and isinstance(caught.value, OSError)


def test_a_blob_store_error_survives_pickling_with_its_kind():
    """Ray carries an exception from a worker to its caller by pickle: the kind must come along."""
    import pickle

    error = pickle.loads(pickle.dumps(BlobStoreError("blob store full: cannot write /x: No space", "full")))
    assert type(error) is BlobStoreError and error.kind == "full" and is_full_or_unwritable(error)
    assert str(error) == "blob store full: cannot write /x: No space"
    with pytest.raises(ValueError, match="kind"):
        BlobStoreError("x", "weird")


# --- atomic writes ---------------------------------------------------------------------------------------


def test_a_put_never_shows_a_partial_blob_and_leaves_no_temp_file(tmp_path):
    """While the new bytes are written, the blob's path still holds the old blob whole: the bytes go to a temp
    file beside it, which os.replace then puts in place (a new inode: a reader holding the old one keeps it)."""
    store = LocalBlobStore(tmp_path, {})
    old, new = b"A" * 100_000, b"B" * 100_000
    url = store.put("j/0.png", old)
    path = tmp_path / "j" / "0.png"
    seen_during_write = []
    real_fdopen = store._fdopen

    class Watching:
        def __init__(self, fd):
            self.inner = real_fdopen(fd)

        def write(self, data):
            seen_during_write.append(path.read_bytes())
            half = len(data) // 2
            self.inner.write(data[:half])
            self.inner.flush()
            seen_during_write.append(path.read_bytes())  # half the new bytes are on disk, not at the path
            return self.inner.write(data[half:])

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.inner.close()

    store._fdopen = Watching
    with open(path, "rb") as reader:
        assert store.put("j/0.png", new) == url
        assert reader.read() == old  # the old inode, whole
    assert seen_during_write == [old, old]
    assert path.read_bytes() == new
    assert files_under(tmp_path) == ["j/0.png"]


def test_enospc_mid_write_is_a_full_error_keeps_the_old_blob_and_removes_the_temp_file(tmp_path):
    """A real ENOSPC from the kernel: the file object writes to /dev/full (not a tiny file system, which needs
    root; see test_a_real_full_file_system_is_a_full_error)."""
    store = LocalBlobStore(tmp_path, {})
    url = store.put("j/0.png", b"old")

    def dev_full(fd):
        os.close(fd)
        return open("/dev/full", "wb")

    store._fdopen = dev_full
    with pytest.raises(BlobStoreError, match="full") as caught:
        store.put("j/0.png", b"new" * 10_000)
    assert caught.value.kind == "full" and is_full_or_unwritable(caught.value)
    assert isinstance(caught.value.__cause__, OSError) and caught.value.__cause__.errno == errno.ENOSPC
    assert store.get(url) == b"old"
    assert files_under(tmp_path) == ["j/0.png"]  # no temp file left behind


def test_a_real_full_file_system_is_a_full_error(tmp_path):
    with tmpfs(tmp_path / "small", "64k") as mount:
        store = open_blob_store(str(mount / "results"))
        with pytest.raises(BlobStoreError) as caught:
            store.put("j/0.png", os.urandom(1 << 20))
        assert caught.value.kind == "full" and is_full_or_unwritable(caught.value)
        assert caught.value.__cause__.errno == errno.ENOSPC
        assert files_under(mount / "results") == []  # the partial temp file was removed: the space is back
        assert store.get(store.put("j/1.png", b"small")) == b"small"


def test_a_read_only_file_system_is_an_unwritable_error(tmp_path):
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as mount:
        store = open_blob_store(str(mount / "results"))
        with pytest.raises(BlobStoreError, match="unwritable") as caught:
            store.put("j/0.png", b"x")
        assert caught.value.kind == "unwritable" and is_full_or_unwritable(caught.value)
        assert caught.value.__cause__.errno == errno.EROFS
        assert str(mount / "results") in str(caught.value)


def put_as_nobody(url: str) -> tuple[str, str, int, str]:
    """(kind, cause type, errno, message) of a put into `url` made by a forked child that dropped to the
    `nobody` user (root may write anywhere, so only an unprivileged writer meets EACCES)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                open_blob_store(url).put("j/0.png", b"x")
                report = "no error"
            except BlobStoreError as exc:
                report = f"{exc.kind}\t{type(exc.__cause__).__name__}\t{exc.__cause__.errno}\t{exc}"
            os.write(write_end, report.encode())
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        report = pipe.read().decode()
    assert os.waitpid(pid, 0)[1] == 0 and report != "no error", report
    kind, cause, code, message = report.split("\t", 3)
    return kind, cause, int(code), message


def test_a_directory_without_write_permission_is_an_unwritable_error(tmp_path):
    """A real EACCES; as root (who may write anywhere) the write is made by a child process as `nobody`."""
    root = Path(tempfile.mkdtemp(prefix="rf-blobs-ro-"))
    try:
        os.chmod(root, 0o555)
        if os.geteuid() != 0:
            with pytest.raises(BlobStoreError) as caught:
                open_blob_store(str(root / "results")).put("j/0.png", b"x")
            kind, cause, code = caught.value.kind, type(caught.value.__cause__).__name__, caught.value.__cause__.errno
            message = str(caught.value)
        else:
            kind, cause, code, message = put_as_nobody(str(root / "results"))
        assert (kind, cause, code) == ("unwritable", "PermissionError", errno.EACCES)
        assert str(root / "results") in message and "unwritable" in message
        assert list(root.iterdir()) == []
    finally:
        os.chmod(root, 0o755)
        os.rmdir(root)


# --- keys ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, why", [
    ("../escape.png", "'..'"), ("a/../../b", "'..'"), ("/etc/passwd", "absolute"), ("a//b", "empty"),
    ("./a", "'.'"), ("", "non-empty"), ("a/b c.png", "segment 'b c.png'"), ("a\\b", "segment"),
    (".hidden", "start with a letter or digit"), ("x" * 600, "longer than"), (None, "non-empty string"),
])
def test_a_bad_key_is_refused_naming_it_and_writes_nothing(tmp_path, key, why):
    store = open_blob_store(str(tmp_path / "store"))
    with pytest.raises(BlobStoreError, match="blob key") as caught:
        store.put(key, b"x")
    assert why in str(caught.value) and caught.value.kind == "invalid"
    assert repr(key)[:20] in str(caught.value)
    assert files_under(tmp_path) == []


def test_result_keys_are_valid_ordered_and_differ_per_render():
    first, again = result_keys("job_1-a", 3), result_keys("job_1-a", 3)
    assert [validate_key(k) for k in first] == first
    assert [k.rsplit("-", 1)[1] for k in first] == ["0.png", "1.png", "2.png"]
    today = time.strftime("%Y%m%d", time.gmtime())
    assert all(k.startswith(f"{today}/job_1-a-") for k in first) and set(first).isdisjoint(again)
    assert result_keys("j", 2, token="t1", day="20261130") == ["20261130/j-t1-0.png", "20261130/j-t1-1.png"]


@pytest.mark.parametrize("url, why", [
    ("ftp://host/x", "unknown scheme 'ftp'"), ("relative/dir", "absolute path"), ("", "non-empty"),
    ("file://server/share", "no host"), ("file:///a/../b", "'..'"),
])
def test_a_bad_store_url_is_refused_naming_it(url, why):
    with pytest.raises(BlobStoreError, match="URL") as caught:
        open_blob_store(url)
    assert why in str(caught.value) and caught.value.kind == "invalid"


# --- retention -------------------------------------------------------------------------------------------


def test_sweep_deletes_what_is_older_than_the_age_and_nothing_else(tmp_path):
    store = open_blob_store(str(tmp_path / "results"))
    now = time.time()
    ages = {"old/a-0.png": 7200, "old/a-1.png": 3601, "new/b-0.png": 3599, "mixed/c-0.png": 10, "mixed/d-0.png": 9999}
    for key, age in ages.items():
        url = store.put(key, key.encode())
        path = tmp_path / "results" / key
        os.utime(path, (now - age, now - age))
        assert store.get(url) == key.encode()
    left_over = tmp_path / "results" / "mixed" / f"{TMP_PREFIX}crashed"  # a writer killed mid-put
    left_over.write_bytes(b"partial")
    os.utime(left_over, (now - 9999, now - 9999))

    assert store.sweep(3600) == 3  # the two of old/ and mixed/d: the temp file is removed, not counted
    assert files_under(tmp_path / "results") == ["mixed/c-0.png", "new/b-0.png"]
    assert not (tmp_path / "results" / "old").exists()  # emptied directories go
    assert store.sweep(3600) == 0
    assert store.sweep(0) == 2 and files_under(tmp_path / "results") == []
    assert (tmp_path / "results").is_dir()  # the root stays


def test_sweep_of_a_store_never_written_is_zero_and_a_negative_age_is_refused(tmp_path):
    store = open_blob_store(str(tmp_path / "never"))
    assert store.sweep(60) == 0
    with pytest.raises(BlobStoreError, match="older_than_s"):
        store.sweep(-1)


def test_a_put_after_a_sweep_removed_its_directory_succeeds(tmp_path):
    store = LocalBlobStore(tmp_path, {})
    url = store.put("j/0.png", b"x")
    os.utime(tmp_path / "j" / "0.png", (0, 0))
    assert store.sweep(60) == 1 and not (tmp_path / "j").exists()
    assert store.get(store.put("j/1.png", b"y")) == b"y" and not store.exists(url)


# --- S3 without boto3, and settings ----------------------------------------------------------------------


def test_importing_the_blob_modules_does_not_import_boto3():
    code = ("import sys, renderfarm.cluster.blobs, renderfarm.cluster.blobs.local, renderfarm.cluster.blobs.s3;"
            "print('boto3' in sys.modules, 'botocore' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["False", "False"], done.stderr


def test_an_s3_store_without_boto3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    with pytest.raises(BlobStoreError, match=r"pip install 'renderfarm\[s3\]'") as caught:
        open_blob_store("s3://results/farm")
    assert caught.value.kind == "unavailable" and isinstance(caught.value.__cause__, ImportError)


def test_settings_give_the_effective_store_url(tmp_path):
    assert Settings.load(data_dir=str(tmp_path)).result_store_url() == (tmp_path / "results").as_uri()
    assert Settings.load(result_store="/srv/nas/rf").result_store_url() == "file:///srv/nas/rf"
    assert Settings.load(result_store="file:///srv/nas/rf").result_store_url() == "file:///srv/nas/rf"
    s3 = Settings.load(result_store="s3://renders/farm-a", result_store_endpoint="http://minio:9000",
                       result_store_region="eu-west-1")
    assert s3.result_store_url() == "s3://renders/farm-a"
    assert s3.result_store_options() == {"endpoint_url": "http://minio:9000", "region": "eu-west-1"}


def test_settings_read_the_store_from_the_environment(monkeypatch):
    monkeypatch.setenv("RENDERFARM_RESULT_STORE", "s3://renders")
    assert Settings.load().result_store_url() == "s3://renders"


@pytest.mark.parametrize("field, value, why", [
    ("result_store", "ftp://x/y", "unknown scheme 'ftp'"),
    ("result_store", "results", "absolute path"),
    ("result_store", "s3://Not_A_Bucket/x", "not a valid S3 bucket name"),
    ("result_store", "file://nas/share", "absolute path"),
    ("result_store_endpoint", "minio:9000", "http:// or https://"),
    ("result_sweep_seconds", "0", "greater than 0"),
])
def test_a_bad_store_setting_is_refused_naming_the_field(field, value, why):
    with pytest.raises(ConfigError) as caught:
        Settings.load(**{field: value})
    assert f"{field}:" in str(caught.value) and why in str(caught.value)
