"""The tiny stand-in models: built offline, deterministic, saved once, loadable like real models."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import multiprocessing
from pathlib import Path

import diffusers
import pytest
import torch

from renderfarm.actors import standins
from renderfarm.actors.standins import build_standin, default_cache_dir, ensure_standin
from renderfarm.planning.catalog import default_catalog

STANDINS = ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd3"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


def entry(name: str):
    return default_catalog().get(name)


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RENDERFARM_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("RENDERFARM_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "renderfarm" / "models"


@pytest.mark.parametrize("name", STANDINS)
def test_standin_builds_reloads_and_renders(cache_dir, name):
    model = entry(name)
    folder = ensure_standin(model, cache_dir)
    assert folder == cache_dir / name
    assert (folder / "model_index.json").is_file()
    assert (folder / standins.STANDIN_MARKER).is_file()

    pipeline_cls = getattr(diffusers, model.family.pipeline)
    pipe = pipeline_cls.from_pretrained(folder)
    assert type(pipe) is pipeline_cls
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red fox",
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=model.default_guidance,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_sdxl_standin_has_both_encoders_and_consistent_time_ids(cache_dir):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(ensure_standin(entry("tiny-sdxl"), cache_dir))
    assert pipe.text_encoder is not None and pipe.text_encoder_2 is not None
    # The pipeline raises if the UNet's added-conditioning width disagrees with the encoders.
    projection_dim = pipe.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids(
        (64, 64), (0, 0), (64, 64), torch.float32, text_encoder_projection_dim=projection_dim
    )
    assert time_ids.shape == (1, 6)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_same_seed_gives_identical_weights(family):
    first = build_standin(family, seed=0)
    second = build_standin(family, seed=0)
    other = build_standin(family, seed=1)
    for name, component in first.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        a, b = component.state_dict(), second.components[name].state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), f"{family}.{name} differs between builds"
    denoiser = "transformer" if family in ("flux", "sd3") else "unet"
    # (parameters: SD3's first state-dict entry is its sin-cos position table, the same for every seed)
    assert not torch.equal(
        next(first.components[denoiser].parameters()), next(other.components[denoiser].parameters())
    )


def test_build_does_not_disturb_callers_random_state():
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_standin("flux")
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "flux", "sd3"])
def test_linear_widths_are_multiples_of_64(family):
    # bitsandbytes' CPU nf4 kernels need it.
    pipe = build_standin(family)
    for name, component in pipe.components.items():
        if not isinstance(component, torch.nn.Module):
            continue
        for module_name, module in component.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert module.in_features % 64 == 0 and module.out_features % 64 == 0, (
                    f"{family}.{name}.{module_name}: {module.in_features} -> {module.out_features}"
                )


def test_sd3_standin_widths_meet_where_the_pipeline_joins_them(cache_dir):
    """The pipeline pads the two CLIPs' hidden states (concatenated) to T5's width and joins them on the sequence
    axis, and concatenates the pooled projections: the transformer's joint and pooled widths must be those."""
    pipe = diffusers.StableDiffusion3Pipeline.from_pretrained(ensure_standin(entry("tiny-sd3"), cache_dir))
    clip_l, clip_g, t5 = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.text_encoder_3.config
    config = pipe.transformer.config
    assert type(pipe.text_encoder).__name__ == type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert clip_l.hidden_size + clip_g.hidden_size <= t5.d_model == config.joint_attention_dim
    assert config.pooled_projection_dim == clip_l.projection_dim + clip_g.projection_dim
    assert pipe.vae.config.latent_channels == config.in_channels == 16
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)  # SD 3.5's
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0]
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipe.tokenizer_3.convert_ids_to_tokens(pipe.tokenizer_3("a red fox").input_ids)[-1] == "</s>"
    # The catalog's max_size is what the position embeddings cover.
    patches = entry("tiny-sd3").max_size // (pipe.vae_scale_factor * config.patch_size)
    assert config.pos_embed_max_size == patches


def test_tokenizers_come_from_the_shipped_vocab(cache_dir):
    pipe = diffusers.FluxPipeline.from_pretrained(ensure_standin(entry("tiny-flux"), cache_dir))
    clip_ids = pipe.tokenizer("a red fox").input_ids
    assert clip_ids[0] == pipe.tokenizer.bos_token_id and clip_ids[-1] == pipe.tokenizer.eos_token_id
    assert pipe.tokenizer.convert_ids_to_tokens(clip_ids[1:-1]) == ["a</w>", "red</w>", "fox</w>"]
    assert pipe.tokenizer.model_max_length == pipe.text_encoder.config.max_position_embeddings
    t5_tokens = pipe.tokenizer_2.convert_ids_to_tokens(pipe.tokenizer_2("a red fox").input_ids)
    assert t5_tokens == ["▁a", "▁red", "▁fox", "</s>"]


def test_second_call_returns_existing_folder_without_building(cache_dir, monkeypatch):
    model = entry("tiny-sd15")
    folder = ensure_standin(model, cache_dir)

    def fail(*args, **kwargs):
        raise AssertionError("the stand-in was built again")

    monkeypatch.setattr(standins, "build_standin", fail)
    assert ensure_standin(model, cache_dir) == folder


def test_losing_the_rename_race_returns_the_winners_folder(tmp_path, monkeypatch):
    model = entry("tiny-flux")
    real_build = standins.build_standin

    def build_while_another_process_finishes_first(family, seed=standins.STANDIN_SEED):
        pipe = real_build(family, seed)
        monkeypatch.setattr(standins, "build_standin", real_build)
        ensure_standin(model, tmp_path)  # the "other process" renames its folder into place first
        return pipe

    monkeypatch.setattr(standins, "build_standin", build_while_another_process_finishes_first)
    folder = ensure_standin(model, tmp_path)
    assert folder == tmp_path / "tiny-flux"
    assert [path.name for path in tmp_path.iterdir()] == ["tiny-flux"]  # our staging copy is gone


def _build_in_a_race(cache: Path, start, built, results) -> None:
    # A forked child must not enter the OpenMP pool it inherited from the parent: one thread.
    torch.set_num_threads(1)
    real_build = standins.build_standin

    def build_then_wait(family, seed=standins.STANDIN_SEED):
        pipe = real_build(family, seed)
        built.wait(timeout=60)  # both processes hold a finished build before either renames
        return pipe

    standins.build_standin = build_then_wait
    start.wait(timeout=60)
    results.put(str(ensure_standin(entry("tiny-sd15"), cache)))


def test_concurrent_processes_yield_one_valid_folder(tmp_path):
    # fork: the children inherit the imported modules, so the test does not pay for two more imports.
    context = multiprocessing.get_context("fork")
    start, built, results = context.Barrier(2), context.Barrier(2), context.Queue()
    cache = tmp_path / "cache"
    procs = [context.Process(target=_build_in_a_race, args=(cache, start, built, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    try:
        folders = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert folders == [str(cache / "tiny-sd15")] * 2
    assert [path.name for path in cache.iterdir()] == ["tiny-sd15"]  # the loser's copy is gone
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(cache / "tiny-sd15")
    assert pipe.unet is not None


def test_real_models_are_not_standins(cache_dir):
    with pytest.raises(ValueError, match="sd15 is not a stand-in"):
        ensure_standin(entry("sd15"), cache_dir)


def test_foreign_folder_is_reported(tmp_path):
    (tmp_path / "tiny-sd15").mkdir()
    with pytest.raises(RuntimeError, match="no model_index.json"):
        ensure_standin(entry("tiny-sd15"), tmp_path)


def test_folder_from_an_older_recipe_is_served_with_a_warning(cache_dir, caplog):
    model = entry("tiny-sd15")
    folder = ensure_standin(model, cache_dir)
    marker = folder / standins.STANDIN_MARKER
    original = marker.read_text()
    marker.write_text('{"recipe_version": 0}')
    try:
        with caplog.at_level("WARNING", logger=standins.__name__):
            assert ensure_standin(model, cache_dir) == folder
        assert "delete the folder to rebuild it" in caplog.text
    finally:
        marker.write_text(original)


def test_stand_in_parameter_counts_match_the_built_stand_ins():
    # The planner's parameter counts for the stand-ins are what the builder really makes.
    cat = default_catalog()
    for name in STANDINS:
        entry = cat.get(name)
        pipe = build_standin(entry.family.name)
        built = {
            attr: sum(p.numel() for p in module.parameters())
            for attr, module in pipe.components.items()
            if isinstance(module, torch.nn.Module)
        }
        declared = {attr: c.params for attr, c in entry.components.items()}
        assert declared == {attr: pytest.approx(n, rel=0.01) for attr, n in built.items()}, name
