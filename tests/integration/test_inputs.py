"""Image inputs through a real Redis and a directory blob store (renderfarm/inputs.py, FarmClient.submit_batch):
stored once, read back by reference, expiring no later than their blob; a submit with images as bytes, Path
or PIL image checks every input before writing anything, and a bad one (fuzzed: truncated, huge, bombs, wrong
modes, garbage, other formats) is refused naming jobs[i] and the field, with nothing enqueued or uploaded."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from renderfarm.client import FarmClient, SpecError
from renderfarm.cluster.blobs import open_blob_store
from renderfarm.inputs import InputMissing, InputStore, InvalidImage, read_input
from tests.unit.test_inputs import OTHER_FORMATS, SAMPLES, bad_or_odd_images, encoded, png_claiming

pytestmark = pytest.mark.integration

MODEL = "tiny-sd15"


@pytest.fixture
def blob_dir(tmp_path):
    return tmp_path / "blobs"


@pytest.fixture
def client(redis_url, redis_client, store, blob_dir):
    store.publish_settings({"input_store_url": blob_dir.as_uri(), "input_ttl_seconds": 3600,
                            "result_ttl_seconds": 7200, "input_max_bytes": 2 * 2**20, "input_max_pixels": 2**20})
    c = FarmClient(redis_url)
    yield c
    c.store.close()


def png(size=(64, 64), color=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    return encoded(Image.new(mode, size, color), fmt)


def spec(**fields):
    return {"model": MODEL, "prompt": "a fox", "width": 64, "height": 64, **fields}


def blobs(blob_dir):
    return sorted(p.name for p in blob_dir.rglob("*") if p.is_file()) if blob_dir.exists() else []


# --- the store ----------------------------------------------------------------------------------------------

def test_put_get_describe_and_the_same_image_stored_once(store, blob_dir):
    inputs = InputStore(store, open_blob_store(blob_dir.as_uri()), ttl_s=600)
    ref, valid = inputs.put(png(), "init_image")
    assert ref == valid.ref and ref.startswith("sha256:")
    record = inputs.describe(ref)
    assert {k: record[k] for k in ("width", "height", "mode", "bytes")} == {"width": 64, "height": 64, "mode": "RGB",
                                                                              "bytes": len(valid.png)}
    assert record["url"].startswith("file://") and record["url"].endswith(f"inputs/{ref[7:]}.png")
    assert inputs.get(ref) == valid.png == read_input(store, ref, {})
    assert 590 <= store.redis.ttl(store.keys.input(ref[7:])) <= 600
    mtime = next(blob_dir.rglob("*.png")).stat().st_mtime_ns
    assert inputs.put(png(), "init_image")[0] == ref  # again: nothing written
    assert next(blob_dir.rglob("*.png")).stat().st_mtime_ns == mtime and len(blobs(blob_dir)) == 1
    assert store.redis.dbsize() == 1  # one small record per input, nothing else
    assert len(store.redis.get(store.keys.input(ref[7:]))) < 400


def test_an_input_past_half_its_life_is_written_again_and_renewed(store, blob_dir):
    inputs = InputStore(store, open_blob_store(blob_dir.as_uri()), ttl_s=600)
    ref, _ = inputs.put(png(), "mask")
    key = store.keys.input(ref[7:])
    store.redis.pexpire(key, 100_000)  # 100 s of 600 left
    assert inputs.renew(ref)["mode"] == "L"
    assert store.redis.pttl(key) > 500_000
    store.redis.pexpire(key, 100_000)
    inputs.put(png(), "mask")
    assert store.redis.pttl(key) > 500_000


def test_an_expired_or_unknown_reference_is_a_clear_error(store, blob_dir):
    inputs = InputStore(store, open_blob_store(blob_dir.as_uri()), ttl_s=600)
    unknown = "sha256:" + "a" * 64
    assert inputs.describe(unknown) is None and inputs.describe("nonsense") is None
    for read in (inputs.get, lambda r: read_input(store, r, {}), inputs.renew):
        with pytest.raises(InputMissing, match="expired or never uploaded"):
            read(unknown)
    ref, _ = inputs.put(png(), "init_image")
    for blob in blob_dir.rglob("*.png"):
        blob.unlink()  # swept (or deleted by hand) while its record lives
    with pytest.raises(InputMissing, match="gone from the store"):
        inputs.get(ref)


def test_the_record_never_outlives_its_blob(store, blob_dir):
    """The result store's sweep deletes blobs older than result_ttl_seconds: the record's lifetime is capped there."""
    from renderfarm.config import Settings

    settings = Settings(input_ttl_seconds=10 * 24 * 3600, result_ttl_seconds=3600, result_store=str(blob_dir))
    inputs = InputStore.for_settings(store, settings)
    assert inputs.ttl_s == 3600
    ref, _ = inputs.put(png(), "init_image")
    assert store.redis.ttl(store.keys.input(ref[7:])) <= 3600


def test_the_client_finds_the_store_and_caps_the_head_published(client, blob_dir):
    inputs = client.inputs()
    assert inputs.ttl_s == 3600 and inputs.max_bytes == 2 * 2**20 and inputs.max_pixels == 2**20
    ref = client.upload(png())
    assert blobs(blob_dir) == [f"{ref[7:]}.png"]
    with pytest.raises(InvalidImage, match="^mask: .*cap of 1048576"):
        client.upload(png_claiming(2048, 1024), "mask")


# --- submit -------------------------------------------------------------------------------------------------

def test_submit_takes_bytes_a_path_and_a_pil_image_and_uploads_each_image_once(client, tmp_path, blob_dir):
    path = tmp_path / "init.png"
    path.write_bytes(png())
    mask = Image.new("L", (64, 64), 255)
    specs = [spec(init_image=png(), mask=mask, strength=0.5), spec(init_image=path), spec(init_image=png(),
                                                                                         resize_mode="none")]
    specs += [spec(init_image=Image.open(path))] * 97
    ids = client.submit_batch(specs)
    jobs = client.jobs(ids)
    refs = {job.spec.init_image for job in jobs}
    assert len(refs) == 1 and jobs[0].spec.mask and jobs[0].spec.task == "inpaint" and jobs[1].spec.task == "img2img"
    assert len(blobs(blob_dir)) == 2  # one init image for 100 jobs, one mask
    again = client.submit(spec(init_image=next(iter(refs))))  # by reference
    assert client.job(again).spec.init_image == next(iter(refs))


def test_a_bad_image_refuses_the_batch_naming_the_job_and_field(client, redis_client, blob_dir):
    before = redis_client.dbsize()
    cases = [
        ([spec(), spec(init_image=b"GIF89a" + b"\x00" * 40)], r"jobs\[1\]: init_image: not a PNG, JPEG or WebP"),
        ([spec(init_image=png((32, 32)))], r"jobs\[0\]: init_image: 32x32 is not the job's size 64x64: .*resize_mode"),
        ([spec(init_image=png(), mask=png((32, 32), mode="L", color=0))],
         r"jobs\[0\]: mask: 32x32 is not the init image's size 64x64"),
        ([spec(init_image="sha256:" + "b" * 64)], r"jobs\[0\]: init_image: no uploaded image sha256:b+: expired or "
                                                   "never uploaded"),
        ([spec(init_image=png(), mask=png()), spec(mask=png(mode="L", color=9))], r"jobs\[1\]: mask: .*give init_image"),
        ([spec(init_image=png(fmt="JPEG"), width=-4)], r"jobs\[0\]: width"),
        ([spec(init_image=png(mode="CMYK", fmt="JPEG"))], r"jobs\[0\]: init_image: mode CMYK"),
    ]
    for specs, message in cases:
        with pytest.raises(SpecError, match=message) as caught:
            client.submit_batch(specs)
        assert str(caught.value).endswith("nothing was enqueued")
        assert redis_client.dbsize() == before and blobs(blob_dir) == []


def test_a_mask_reference_used_as_an_init_image_is_refused(client):
    mask_ref = client.upload(png(mode="L", color=255), "mask")
    with pytest.raises(SpecError, match=r"jobs\[0\]: init_image: .* was uploaded as a mask \(L\)"):
        client.submit(spec(init_image=mask_ref))


def test_resize_mode_lets_another_size_through(client):
    job = client.job(client.submit(spec(init_image=png((128, 96)), resize_mode="crop")))
    assert client.inputs().describe(job.spec.init_image)["width"] == 128


@settings(max_examples=150, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=bad_or_odd_images(), field=st.sampled_from(["init_image", "mask"]), at=st.integers(0, 2))
def test_fuzz_a_bad_image_anywhere_in_a_batch_enqueues_nothing(client, redis_client, blob_dir, data, field,
                                                               at):
    if data in SAMPLES:  # a good image is not this test's business
        return
    specs = [spec(init_image=png()) for _ in range(3)]
    specs[at] = {**specs[at], field: data} if field == "init_image" else {**specs[at], "mask": data}
    before = redis_client.dbsize()
    try:
        client.submit_batch(specs)
    except SpecError as exc:
        assert f"jobs[{at}]: {field}: " in str(exc) and str(exc).endswith("nothing was enqueued"), str(exc)
        assert redis_client.dbsize() == before and blobs(blob_dir) == []
        return
    # Accepted: only a slightly damaged JPEG or WebP that still decodes whole, at the job's size
    image = Image.open(io.BytesIO(data))
    assert image.format in ("JPEG", "WEBP", "PNG") and image.size == (64, 64) or field == "mask", data[:16]
    import shutil

    redis_client.flushdb()
    shutil.rmtree(blob_dir, ignore_errors=True)
    client.store.publish_settings({"input_store_url": blob_dir.as_uri()})


def test_other_formats_through_the_client(client, redis_client, blob_dir):
    for data in OTHER_FORMATS:
        with pytest.raises(SpecError, match=r"jobs\[0\]: init_image: not a PNG, JPEG or WebP"):
            client.submit(spec(init_image=data))
    assert redis_client.keys("rf:job:*") == [] and blobs(blob_dir) == []
