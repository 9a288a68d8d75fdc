"""`renderfarm submit PROMPT --init IMG [--mask IMG] [--strength S] [--mask-blur N] [--resize-mode M]`, in-process
against a real Redis: one upload for every job, and each bad flag refused naming the flag, nothing enqueued."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from renderfarm.cli import main
from tests.integration.test_inputs import encoded

pytestmark = pytest.mark.integration


@pytest.fixture
def farm(redis_url, store, tmp_path):
    store.mark_farm()
    store.publish_settings({"input_store_url": (tmp_path / "blobs").as_uri()})
    (tmp_path / "init.png").write_bytes(encoded(Image.new("RGB", (64, 64), "red")))
    (tmp_path / "mask.png").write_bytes(encoded(Image.new("L", (64, 64), 255)))
    (tmp_path / "small.png").write_bytes(encoded(Image.new("RGB", (32, 32), "red")))
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    return redis_url


def submit(capsys, redis_url, *argv):
    code = main(["submit", "a fox", "--size", "64x64", "--no-wait", "--json", "--redis", redis_url, *argv])
    out, err = capsys.readouterr()
    return code, json.loads(out.splitlines()[-1]) if out.strip() else {}, err


def test_init_and_mask_flags_submit_every_job_with_one_upload(farm, capsys, tmp_path, store):
    code, out, err = submit(capsys, farm, "--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                            "--strength", "0.4", "--mask-blur", "8", "--count", "5")
    assert code == 0 and out["ok"], err
    jobs = store.get_many(out["jobs"])
    assert len({(j.spec.init_image, j.spec.mask) for j in jobs}) == 1 and len(jobs) == 5
    assert jobs[0].spec.task == "inpaint" and jobs[0].spec.strength == 0.4 and jobs[0].spec.mask_blur == 8
    assert len(list((tmp_path / "blobs").rglob("*.png"))) == 2


@pytest.mark.parametrize("argv,flag", [
    (["--init", "{tmp}/missing.png"], "--init"),
    (["--init", "{tmp}/junk.png"], "--init"),
    (["--init", "{tmp}/small.png"], "--init"),
    (["--init", "{tmp}/init.png", "--mask", "{tmp}/small.png"], "--mask"),
    (["--init", "{tmp}/init.png", "--strength", "2"], "--strength"),
    (["--init", "{tmp}/init.png", "--strength", "x"], "--strength"),
    (["--init", "{tmp}/init.png", "--mask-blur", "99"], "--mask-blur"),
    (["--init", "{tmp}/small.png", "--resize-mode", "stretch"], "--resize-mode"),
    (["--mask", "{tmp}/mask.png"], "--mask"),
])
def test_a_bad_flag_is_refused_naming_it(farm, capsys, tmp_path, redis_client, argv, flag):
    before = redis_client.dbsize()
    code, out, err = submit(capsys, farm, *[a.format(tmp=tmp_path) for a in argv])
    assert code != 0 and out["ok"] is False and flag in out["error"], out
    assert redis_client.dbsize() == before


def test_resize_mode_fits_another_size(farm, capsys, tmp_path, store):
    code, out, err = submit(capsys, farm, "--init", str(tmp_path / "small.png"), "--resize-mode", "fill")
    assert code == 0, out
    assert store.get(out["jobs"][0]).spec.resize_mode == "fill"
