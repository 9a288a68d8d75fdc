"""Loading, caching and batch rendering on the tiny stand-ins; A1111 infotext in the PNGs."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from renderfarm.actors.loading import ModelSourceError, load_pipeline, resolve_source
from renderfarm.actors.pipelines import PipelineCache, RenderRequest, render_batch
from renderfarm.infotext import a1111_parameters, parse_a1111_parameters
from renderfarm.planning.catalog import default_catalog

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]
TIMING_KEYS = {"load_s", "move_s", "encode_s", "denoise_s", "denoise_s_per_step", "decode_s", "total_s"}


def entry(name: str):
    return default_catalog().get(name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> PipelineCache:
    return PipelineCache(max_pipelines=len(STANDINS), cache_dir=tmp_path_factory.mktemp("models"))


def request(job_id="job", prompt="a red fox", negative_prompt="blurry", seed=123, num_images=1, **overrides):
    fields = dict(width=64, height=64, steps=2, guidance=5.0)
    fields.update(overrides)
    return RenderRequest(
        job_id=job_id,
        prompt=prompt,
        negative_prompt=negative_prompt,
        seed=seed,
        num_images=num_images,
        **fields,
    )


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def assert_same_image(a: bytes, b: bytes) -> None:
    # A batch may pick other CPU kernels than a single image: allow a rounding step, nothing more.
    assert np.abs(pixels(a) - pixels(b)).max() <= 2


@pytest.mark.parametrize("name", STANDINS)
def test_render_writes_pngs_with_parameters(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(seed=7, num_images=2)])

    assert result.job_id == "job"
    assert result.seeds == [7, 8]
    assert len(result.images) == len(result.parameters) == 2
    for png, text, seed in zip(result.images, result.parameters, result.seeds):
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
        assert image.text["parameters"] == text
        parsed = parse_a1111_parameters(text)
        assert parsed["prompt"] == "a red fox"
        assert parsed["Steps"] == "2"
        assert parsed["Seed"] == str(seed)
        assert parsed["Size"] == "64x64"
        assert parsed["Model"] == name
        assert parsed["Sampler"] == "Euler"
        assert parsed["Version"].startswith("renderfarm ")
        if model.family.uses_cfg:
            assert parsed["negative_prompt"] == "blurry"
            assert parsed["CFG scale"] == "5.0"
        else:
            # Flux is guidance-distilled: no negative prompt, guidance written the Forge way.
            assert parsed["negative_prompt"] == ""
            assert parsed["CFG scale"] == "1.0"
            assert parsed["Distilled CFG Scale"] == "5.0"

    assert set(result.timings) == TIMING_KEYS
    assert result.timings["load_s"] == 0.0
    assert all(value >= 0 for value in result.timings.values())
    assert result.timings["total_s"] >= result.timings["denoise_s"] > 0
    assert result.peak_memory_mb >= 0


@pytest.mark.parametrize("name", STANDINS)
def test_batch_renders_what_each_job_renders_alone(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    # Different prompts, negative prompts (one empty) and image counts in one batch.
    two_images = request("two", prompt="a castle in the fog", negative_prompt="", seed=11, num_images=2)
    other = request("other", prompt="a blue whale", negative_prompt="ugly", seed=5)

    [alone] = render_batch(pipe, model, [two_images])
    [alone_second_seed] = render_batch(pipe, model, [replace(two_images, seed=12, num_images=1)])
    batch = render_batch(pipe, model, [other, two_images])

    assert [result.job_id for result in batch] == ["other", "two"]
    assert batch[1].seeds == alone.seeds == [11, 12]
    assert_same_image(batch[1].images[0], alone.images[0])
    assert_same_image(batch[1].images[1], alone.images[1])
    # A1111 convention: image i of a job is the image of seed + i.
    assert_same_image(alone.images[1], alone_second_seed.images[0])
    assert batch[0].timings == batch[1].timings  # stage times belong to the batch


@pytest.mark.parametrize("name", STANDINS)
def test_different_seeds_give_different_images(cache, name):
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(seed=1, num_images=2)])
    assert np.abs(pixels(result.images[0]) - pixels(result.images[1])).mean() > 1


@pytest.mark.parametrize(
    "name, width, height",
    [("tiny-sd15", 40, 56), ("tiny-sdxl", 32, 48), ("tiny-flux", 48, 80), ("tiny-sd3", 48, 80)],
)
def test_renders_at_any_size_the_family_allows(cache, name, width, height):
    model = entry(name)
    pipe, _ = cache.get(model)
    [result] = render_batch(pipe, model, [request(width=width, height=height, steps=1)])
    assert Image.open(io.BytesIO(result.images[0])).size == (width, height)
    assert parse_a1111_parameters(result.parameters[0])["Size"] == f"{width}x{height}"


@pytest.mark.parametrize("field, value", [("width", 128), ("height", 32), ("steps", 3), ("guidance", 2.0),
                                          ("sampler", "DDIM"), ("schedule", "Karras")])
def test_batch_requests_must_share_shape_steps_and_guidance(cache, field, value):
    model = entry("tiny-sd15")
    pipe, _ = cache.get(model)
    with pytest.raises(ValueError, match=f"share {field}"):
        render_batch(pipe, model, [request("a"), request("b", **{field: value})])


def test_bad_requests_are_refused(cache):
    model = entry("tiny-flux")
    pipe, _ = cache.get(model)
    with pytest.raises(ValueError, match="width=72 must be a multiple of 16"):
        render_batch(pipe, model, [request(width=72)])
    with pytest.raises(ValueError, match="num_images"):
        render_batch(pipe, model, [request(num_images=0)])
    with pytest.raises(ValueError, match="at least one request"):
        render_batch(pipe, model, [])


def test_cache_loads_once_and_evicts_least_recently_used():
    loads = []

    def loader(model):
        loads.append(model.name)
        return object()

    cache = PipelineCache(max_pipelines=2, loader=loader)
    sd15, sdxl, flux = (entry(name) for name in ("tiny-sd15", "tiny-sdxl", "tiny-flux"))
    first, _ = cache.get(sd15)
    again, seconds = cache.get(sd15)
    assert again is first and seconds == 0.0
    cache.get(sdxl)
    cache.get(sd15)  # now sdxl is the least recently used
    cache.get(flux)
    assert cache.loaded() == ["tiny-sd15", "tiny-flux"]
    assert loads == ["tiny-sd15", "tiny-sdxl", "tiny-flux"]
    with pytest.raises(ValueError, match="max_pipelines"):
        PipelineCache(max_pipelines=0)


def test_cache_reports_load_seconds_then_zero(tmp_path):
    cache = PipelineCache(max_pipelines=1, cache_dir=tmp_path)
    model = entry("tiny-flux")
    pipe, seconds = cache.get(model)
    assert seconds > 0.0
    assert cache.get(model) == (pipe, 0.0)
    assert cache.loaded() == ["tiny-flux"]


def test_load_pipeline_names_the_missing_source(tmp_path):
    local = entry("sd15").model_copy(update={"name": "my-sd15", "source": str(tmp_path / "nowhere")})
    with pytest.raises(ModelSourceError, match=r"my-sd15.*nowhere.*does not exist"):
        load_pipeline(local)
    hub = entry("sd15").model_copy(update={"name": "my-hub-sd15", "source": "nobody/no-such-model"})
    with pytest.raises(ModelSourceError, match=r"my-hub-sd15.*nobody/no-such-model"):
        load_pipeline(hub)
    assert resolve_source(entry("flux-dev")) == "black-forest-labs/FLUX.1-dev"


def test_a1111_parameters_round_trip():
    text = a1111_parameters(
        prompt="a red fox\nin the snow",
        negative_prompt="blurry, lowres",
        steps=4,
        sampler="DPM++ 2M",
        schedule_type="Karras",
        cfg_scale=7,
        seed=123,
        width=64,
        height=96,
        model="my model, v2",
        version="renderfarm 0.1.0",
    )
    assert text == (
        "a red fox\nin the snow\nNegative prompt: blurry, lowres\n"
        "Steps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0, Seed: 123, Size: 64x96, "
        'Model: "my model, v2", Version: renderfarm 0.1.0'
    )
    assert parse_a1111_parameters(text) == {
        "prompt": "a red fox\nin the snow",
        "negative_prompt": "blurry, lowres",
        "Steps": "4",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.0",
        "Seed": "123",
        "Size": "64x96",
        "Model": "my model, v2",
        "Version": "renderfarm 0.1.0",
    }


def test_a1111_parameters_without_negative_prompt():
    text = a1111_parameters(
        prompt="a cat",
        steps=2,
        sampler="Euler",
        schedule_type=None,
        cfg_scale=1.0,
        distilled_cfg_scale=3.5,
        seed=0,
        width=32,
        height=32,
        model="tiny-flux",
    )
    assert "Negative prompt" not in text
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == "a cat" and parsed["negative_prompt"] == ""
    assert parsed["Distilled CFG Scale"] == "3.5"
    assert "Schedule type" not in parsed


def test_infotext_version_falls_back_to_the_source_trees_pyproject(monkeypatch):
    # A source tree that is not installed has no package metadata: the version comes from the pyproject.toml
    # at the repository root, which must still be found now that infotext.py sits one folder higher.
    import importlib.metadata
    import re
    from pathlib import Path

    from renderfarm import infotext

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    pyproject = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    expected = re.search(r'^version\s*=\s*"([^"]+)"', pyproject, flags=re.MULTILINE).group(1)
    assert infotext._version() == expected != "unknown"


@pytest.mark.parametrize("name, sampler, schedule", [("tiny-sd15", "Euler a", None), ("tiny-sdxl", "DPM++ 2M", "Karras"),
                                                     ("tiny-flux", "Euler", "Karras")])
def test_a_sampler_renders_its_batch_and_the_pipeline_gets_its_own_back(cache, name, sampler, schedule):
    """renderfarm/samplers.py through render_batch: the batch renders with the sampler asked for (its infotext says
    so, and the image differs from the model's own sampler's), each image still depends on its own seed only,
    and the pipeline's own scheduler is back afterwards, also after a failed render."""
    model = entry(name)
    pipe, _ = cache.get(model)
    own = pipe.scheduler
    plain = render_batch(pipe, model, [request("a", steps=3)])[0]
    asked = dict(steps=3, sampler=sampler, schedule=schedule)
    alone = render_batch(pipe, model, [request("a", **asked)])[0]
    assert pipe.scheduler is own
    assert f"Sampler: {sampler}" in alone.parameters[0]
    if schedule:
        assert f"Schedule type: {schedule}" in alone.parameters[0]
    assert pixels(alone.images[0]).tolist() != pixels(plain.images[0]).tolist()
    both = render_batch(pipe, model, [request("a", **asked), request("b", seed=7, **asked)])
    assert_same_image(both[0].images[0], alone.images[0])

    def broken(*_):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        render_batch(pipe, model, [request("a", **asked)], should_stop=None, on_step=broken)
    assert pipe.scheduler is own
