"""Profiles applied to whole pipelines: placement, VAE mode and dtype, the prompt-embedding cache, the
per-worker pipeline cache, and out-of-memory errors. CPU tests use the tiny stand-ins; the paths that need
CUDA (streams, model offload, bitsandbytes without the CPU bypass) are in the `gpu` tests at the end."""

from __future__ import annotations

import os

# No model hub is reachable: never wait on one (set before diffusers / huggingface_hub are imported).
os.environ["HF_HUB_OFFLINE"] = "1"

import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from renderfarm.actors import loading, quantize
from renderfarm.actors.embeddings import EmbeddingCache
from renderfarm.actors.families import family_for
from renderfarm.actors.loading import (
    load_pipeline,
    pipeline_bytes,
    pipeline_key,
    set_vae_mode,
)
from renderfarm.actors.pipelines import (
    PipelineCache,
    RenderRequest,
    is_out_of_memory,
    render_batch,
)
from renderfarm.actors.standins import ensure_standin
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, TextEncoderPolicy, VaeMode, WeightsFormat

W, C, P = WeightsFormat, ComputeDtype, Placement


def _card_compute() -> ComputeDtype:
    """The compute dtype the planner gives this card: by compute capability, as planning.profiles does.
    (`torch.cuda.is_bf16_supported()` is True on Turing through emulation, which would leave the fp16 +
    clamp path without GPU coverage.)"""
    major, _ = torch.cuda.get_device_capability()
    return C.BF16 if major >= 8 else C.FP16


def entry(name: str):
    return default_catalog().get(name)


def profile(weights=W.BF16, compute=C.BF16, placement=P.GPU, name=None, **fields) -> Profile:
    name = name or f"{weights.value}-{compute.value}-{placement.value}"
    return Profile(name, weights, compute, placement, **fields)


def request(job_id="job", prompt="a red fox", negative_prompt="blurry", seed=3, num_images=1, **overrides):
    fields = {"width": 64, "height": 64, "steps": 2, "guidance": 5.0, **overrides}
    return RenderRequest(job_id=job_id, prompt=prompt, negative_prompt=negative_prompt, seed=seed,
                         num_images=num_images, **fields)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def count_calls(module: torch.nn.Module, counter: list[int]):
    def hook(*_args):
        counter[0] += 1

    return module.register_forward_pre_hook(hook)


class DecoderWatch:
    """Counts VAE decoder calls and records whether each output was finite."""

    def __init__(self, pipe):
        self.finite: list[bool] = []
        self.handle = pipe.vae.decoder.register_forward_hook(self._record)

    def _record(self, _module, _args, output):
        self.finite.append(bool(torch.isfinite(output).all()))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# --- each format x family, loaded and rendered through load_pipeline -------------------------------------

def _case_id(name: str, chosen: Profile) -> str:
    return f"{name}-{chosen.name}" + ("-no-t5" if chosen.drop_large_text_encoder else "") + (
        f"-te-{chosen.text_encoder_weights.value}" if chosen.text_encoder_weights else "")


CASES = [
    ("tiny-flux", profile(W.BF16)),
    ("tiny-flux", profile(W.FP16, C.FP16, fp16_clamp=True)),
    ("tiny-flux", profile(W.FP8_E4M3FN, C.BF16, vae_dtype=C.FP32)),
    ("tiny-flux", profile(W.NF4, C.BF16, text_encoder_weights=W.FP8_E4M3FN)),
    ("tiny-flux", profile(W.GGUF_Q4_0, C.FP16, fp16_clamp=True)),
    ("tiny-sdxl", profile(W.FP16, C.FP16)),
    ("tiny-sdxl", profile(W.FP4, C.BF16)),
    ("tiny-sd15", profile(W.FP8_E5M2, C.FP16)),
    ("tiny-sd15", profile(W.GGUF_Q8_0, C.BF16, vae_dtype=C.FP32)),
    # SD3: its ladder quantizes T5 (text_encoder_3) or drops it.
    ("tiny-sd3", profile(W.BF16)),
    ("tiny-sd3", profile(W.BF16, text_encoder_weights=W.NF4)),
    ("tiny-sd3", profile(W.BF16, drop_large_text_encoder=True)),
    ("tiny-sd3", profile(W.FP8_E4M3FN, C.BF16)),
    ("tiny-sd3", profile(W.FP8_E4M3FN, C.BF16, drop_large_text_encoder=True)),
    ("tiny-sd3", profile(W.NF4, C.BF16)),
    ("tiny-sd3", profile(W.NF4, C.BF16, drop_large_text_encoder=True)),
    ("tiny-sd3", profile(W.GGUF_Q8_0, C.FP16)),
    ("tiny-sd3", profile(W.FP16, C.FP16, drop_large_text_encoder=True)),
]


@pytest.mark.parametrize("name, chosen", CASES, ids=[_case_id(n, p) for n, p in CASES])
def test_profile_loads_and_renders_finite_images_of_the_right_size(name, chosen):
    model = entry(name)
    pipe = load_pipeline(model, profile=chosen)
    info = pipe.renderfarm_info
    assert info.profile is chosen and info.placement == "resident" and info.weights_bytes > 0
    assert pipe.vae.dtype == quantize.torch_dtype(chosen.vae_dtype or chosen.compute_dtype)
    if name == "tiny-sd3":
        assert (pipe.text_encoder_3 is None) is chosen.drop_large_text_encoder
    with DecoderWatch(pipe) as watch:
        [result] = render_batch(pipe, model, [request(width=48, height=80 if name == "tiny-flux" else 64)])
    assert watch.finite == [True]
    image = Image.open(io.BytesIO(result.images[0]))
    assert image.size == (48, 80 if name == "tiny-flux" else 64) and image.mode == "RGB"


@pytest.mark.parametrize("chosen", [
    profile(W.FP32, C.FP32),  # what a CPU node chooses
    profile(W.FP32, C.FP32, drop_large_text_encoder=True),
    profile(W.NF4, C.BF16, drop_large_text_encoder=True),
], ids=["fp32", "fp32-no-t5", "nf4-no-t5"])
def test_sd3_batch_renders_what_each_job_renders_alone_with_and_without_t5(chosen):
    """Seeds per image: a job's images depend on its own seed and prompt only, with T5 or with zeros in its
    place, whatever else shares the batch (other prompt, other negative prompt, other image count)."""
    model = entry("tiny-sd3")
    pipe = load_pipeline(model, profile=chosen)
    assert (pipe.text_encoder_3 is None) is chosen.drop_large_text_encoder
    first = request("first", prompt="a castle in the fog", negative_prompt="", seed=11, num_images=2)
    second = request("second", prompt="a blue whale", negative_prompt="ugly", seed=5)
    [first_alone] = render_batch(pipe, model, [first], embedding_cache=EmbeddingCache())
    [second_alone] = render_batch(pipe, model, [second], embedding_cache=EmbeddingCache())
    together = render_batch(pipe, model, [second, first], embedding_cache=EmbeddingCache())
    assert [r.seeds for r in together] == [[5], [11, 12]]
    # fp32: a rounding step at most (a batch may pick other CPU kernels); bf16 keeps 8 bits of mantissa, so a
    # few steps here and there, still the same picture.
    worst, mean = (2, 0.1) if chosen.compute_dtype is C.FP32 else (8, 0.5)
    for got, alone in ((together[0], second_alone), (together[1], first_alone)):
        for a, b in zip(got.images, alone.images):
            difference = np.abs(pixels(a) - pixels(b))
            assert difference.max() <= worst and difference.mean() < mean, (difference.max(), difference.mean())
    assert np.abs(pixels(first_alone.images[0]) - pixels(first_alone.images[1])).mean() > 1


def test_dropping_t5_changes_the_image_and_only_sd3_can():
    model = entry("tiny-sd3")
    with_t5 = load_pipeline(model, profile=profile(W.FP32, C.FP32))
    without = load_pipeline(model, profile=profile(W.FP32, C.FP32, drop_large_text_encoder=True))
    assert pipeline_bytes(without) < pipeline_bytes(with_t5)
    [a] = render_batch(with_t5, model, [request()])
    [b] = render_batch(without, model, [request()])
    assert np.abs(pixels(a.images[0]) - pixels(b.images[0])).mean() > 1  # T5 conditions the picture
    with pytest.raises(ValueError, match="cannot render without"):
        load_pipeline(entry("tiny-flux"), profile=profile(W.BF16, drop_large_text_encoder=True))


def test_dtype_must_agree_with_the_profile():
    with pytest.raises(ValueError, match="contradicts profile"):
        load_pipeline(entry("tiny-sd15"), dtype=torch.float32, profile=profile(W.BF16, C.BF16))


def test_fp16_vae_source_replaces_the_vae_in_fp16():
    base = entry("tiny-sdxl")
    vae_folder = ensure_standin(base) / "vae"
    model = base.model_copy(update={"fp16_vae_source": str(vae_folder)})
    pipe = load_pipeline(model, profile=profile(W.FP16, C.FP16))
    assert pipe.vae.dtype == torch.float16
    assert pipe.vae.config["_name_or_path"] == str(vae_folder)
    assert len(render_batch(pipe, model, [request()])[0].images) == 1


# --- placement on a CPU device ------------------------------------------------------------------------


def test_cpu_group_offload_runs_diffusers_hooks_without_streams_and_renders_the_same(monkeypatch):
    from diffusers.hooks import group_offloading

    model = entry("tiny-flux")
    resident = load_pipeline(model, profile=profile(W.BF16))
    grouped = load_pipeline(model, profile=profile(W.BF16, placement=P.GROUP_OFFLOAD))
    assert group_offloading._is_group_offload_enabled(grouped.transformer)
    assert grouped.renderfarm_info.placement.startswith("group-offload (block_level, 1 block/group")
    assert "no streams" in grouped.renderfarm_info.placement
    assert any("cpu" in note for note in grouped.renderfarm_info.notes)

    onloads = [0]
    real_onload = group_offloading.ModuleGroup.onload_

    def counting_onload(self):
        onloads[0] += 1
        return real_onload(self)

    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_", counting_onload)
    [expected] = render_batch(resident, model, [request()])
    [got] = render_batch(grouped, model, [request()])
    assert onloads[0] > 0  # the hooks really ran
    assert np.array_equal(pixels(got.images[0]), pixels(expected.images[0]))


@pytest.mark.parametrize("placement, drop_t5", [(P.GROUP_OFFLOAD, False), (P.LEAF_OFFLOAD, True)])
def test_cpu_offload_hooks_run_on_sd3_and_render_the_resident_image(placement, drop_t5):
    from diffusers.hooks import group_offloading

    model = entry("tiny-sd3")
    resident = load_pipeline(model, profile=profile(W.FP32, C.FP32, drop_large_text_encoder=drop_t5))
    offloaded = load_pipeline(model, profile=profile(W.FP32, C.FP32, placement, drop_large_text_encoder=drop_t5))
    assert group_offloading._is_group_offload_enabled(offloaded.transformer)
    assert offloaded.renderfarm_info.placement.startswith(placement.value)
    if placement is P.LEAF_OFFLOAD:  # the encoders that are there stream too; the dropped T5 is nowhere
        assert group_offloading._is_group_offload_enabled(offloaded.text_encoder_2)
        assert offloaded.text_encoder_3 is None
    [expected] = render_batch(resident, model, [request()])
    [got] = render_batch(offloaded, model, [request()])
    assert np.array_equal(pixels(got.images[0]), pixels(expected.images[0]))


def test_cpu_leaf_offload_hooks_denoiser_and_text_encoders():
    from diffusers.hooks import group_offloading

    model = entry("tiny-sd15")
    pipe = load_pipeline(model, profile=profile(W.GGUF_Q8_0, placement=P.LEAF_OFFLOAD))
    assert group_offloading._is_group_offload_enabled(pipe.unet)
    assert group_offloading._is_group_offload_enabled(pipe.text_encoder)
    assert pipe.renderfarm_info.placement.startswith("leaf-offload")
    with DecoderWatch(pipe) as watch:
        render_batch(pipe, model, [request()])
    assert watch.finite == [True]


def test_cpu_model_offload_degrades_to_resident_and_says_so():
    model = entry("tiny-sd15")
    pipe = load_pipeline(model, profile=profile(W.BF16, placement=P.MODEL_OFFLOAD))
    assert pipe.renderfarm_info.placement == "resident"
    assert any("model offload needs an accelerator" in note for note in pipe.renderfarm_info.notes)
    assert not hasattr(pipe.unet, "_hf_hook")
    assert len(render_batch(pipe, model, [request()])[0].images) == 1


def test_diffusers_runs_one_block_per_group_with_streams_whatever_is_asked():
    """The library behaviour the planner models (planning/vram.py: two single blocks in flight): with a CUDA
    stream, block-level group offload resets num_blocks_per_group to 1. Pinned on CPU with a stand-in stream
    object (low_cpu_mem_usage skips the pinning, record_stream the synchronising, that need CUDA): if diffusers ever honours the value, this
    fails and the "GPU weights" budget can come back."""
    from diffusers.hooks import group_offloading as go

    transformer = load_pipeline(entry("tiny-flux"), profile=profile(W.BF16)).transformer
    config = go.GroupOffloadingConfig(
        onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
        offload_type=go.GroupOffloadingType.BLOCK_LEVEL, non_blocking=False, record_stream=True,
        low_cpu_mem_usage=True, num_blocks_per_group=4, stream=object(),
    )
    go._apply_group_offloading_block_level(transformer, config)
    assert config.num_blocks_per_group == 1
    groups = {id(block._diffusers_hook.get_hook("group_offloading").group)
              for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]}
    assert len(groups) == len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


# --- VAE mode -----------------------------------------------------------------------------------------------


def test_a_tiled_vae_tiles_at_the_plans_tile_size_whatever_its_config():
    """diffusers' AutoencoderKL takes its tile size from its config's sample_size (1024 px for the SDXL, Flux and
    SD3 VAEs) and decodes whole a latent no larger than a tile: pinned here, so an upgrade that changes either
    fails loudly. The worker's tiled mode caps the tiles at the plan's VAE_TILE_PX (loading.cap_tiles)."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from renderfarm.planning.vram import VAE_TILE_PX

    blocks = 4  # a latent cell is 2 ** (4 - 1) = 8 pixels, as in every family's VAE
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                        block_out_channels=(8,) * blocks, layers_per_block=1, norm_num_groups=8, sample_size=1024)
    assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (1024, 128)
    tiled = []
    real = vae.tiled_decode
    vae.tiled_decode = lambda *args, **kwargs: tiled.append(1) or real(*args, **kwargs)
    latent = torch.zeros(1, 4, 128, 128)  # a 1024x1024 image
    vae.enable_tiling()
    with torch.no_grad():
        assert vae.decode(latent).sample.shape[-1] == 1024 and tiled == [], "decoded whole: no larger than a tile"
        set_vae_mode(SimpleNamespace(vae=vae), VaeMode.TILED)
        assert (vae.tile_sample_min_size, vae.tile_latent_min_size) == (VAE_TILE_PX, VAE_TILE_PX // 8)
        assert vae.decode(latent).sample.shape[-1] == 1024 and tiled == [1], "decoded in tiles of the plan's size"


def test_tiled_vae_decodes_in_tiles_at_the_right_size():
    model = entry("tiny-sd15")
    pipe = load_pipeline(model, profile=profile(W.BF16, vae=VaeMode.TILED))
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    with DecoderWatch(pipe) as watch:
        [result] = render_batch(pipe, model, [request(width=128, height=128, steps=1)])
    assert len(watch.finite) > 1 and all(watch.finite)  # several tiles, each decoded on its own
    assert Image.open(io.BytesIO(result.images[0])).size == (128, 128)

    set_vae_mode(pipe, VaeMode.SLICED)
    assert not pipe.vae.use_tiling and pipe.vae.use_slicing
    set_vae_mode(pipe, VaeMode.FULL)
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    with DecoderWatch(pipe) as watch:
        render_batch(pipe, model, [request(width=128, height=128, steps=1)])
    assert watch.finite == [True]


# --- the prompt-embedding cache -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sdxl"])
def test_second_render_of_a_prompt_runs_no_text_encoder_and_gives_the_same_image(name):
    model = entry(name)
    pipe = load_pipeline(model, profile=profile(W.BF16))
    cache = EmbeddingCache()
    calls = [0]
    handles = [count_calls(pipe.text_encoder, calls), count_calls(pipe.text_encoder_2, calls)]
    try:
        [first] = render_batch(pipe, model, [request(seed=5)], embedding_cache=cache)
        per_prompt = calls[0]  # two encoders; under CFG (SDXL) the negative prompt is a second pass
        assert per_prompt == (4 if model.family.uses_cfg else 2)
        assert (first.encoded_prompts, first.cached_prompts) == (1, 0)
        [again] = render_batch(pipe, model, [request(seed=5)], embedding_cache=cache)
        assert calls[0] == per_prompt and (again.encoded_prompts, again.cached_prompts) == (0, 1)
        assert np.array_equal(pixels(again.images[0]), pixels(first.images[0]))
        # Other seeds and other jobs of the same prompt reuse it too; a new prompt is encoded once.
        batch = render_batch(
            pipe, model,
            [request("a", seed=9), request("b", prompt="a whale", seed=1), request("c", prompt="a whale")],
            embedding_cache=cache,
        )
        assert calls[0] == 2 * per_prompt
        assert (batch[0].encoded_prompts, batch[0].cached_prompts) == (1, 1)
    finally:
        for handle in handles:
            handle.remove()
    assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 2 and len(cache) == 2


def test_negative_prompt_splits_the_cache_only_under_cfg():
    cache = EmbeddingCache()
    for name, guidance in [("tiny-flux", 3.5), ("tiny-sd15", 5.0)]:
        model = entry(name)
        pipe = load_pipeline(model, profile=profile(W.BF16))
        render_batch(pipe, model, [request(negative_prompt="blurry", guidance=guidance)],
                     embedding_cache=cache)
        [other] = render_batch(pipe, model, [request(negative_prompt="ugly", guidance=guidance)],
                               embedding_cache=cache)
        # Flux has no CFG pass: the negative prompt plays no part and the embeddings are reused.
        assert other.cached_prompts == (1 if name == "tiny-flux" else 0)


def test_embedding_cache_is_bounded_by_entries_and_bytes():
    def key(prompt):
        return (("m", "p"), prompt, "", False)

    row = {"prompt_embeds": torch.zeros(1, 4, 8)}  # 128 bytes
    cache = EmbeddingCache(max_entries=2)
    for prompt in ("a", "b", "c"):
        cache.put(key(prompt), row)
    assert cache.get(key("a")) is None and cache.get(key("b")) is not None and len(cache) == 2
    cache.put(key("d"), row)  # "c" is now the least recently used
    assert cache.get(key("c")) is None and cache.get(key("b")) is not None

    by_bytes = EmbeddingCache(max_bytes=300)
    for prompt in ("a", "b", "c"):
        by_bytes.put(key(prompt), row)
    assert len(by_bytes) == 2 and by_bytes.bytes == 256
    by_bytes.put(key("big"), {"prompt_embeds": torch.zeros(1, 100)})  # larger than the whole cache
    assert by_bytes.get(key("big")) is None and len(by_bytes) == 2
    assert by_bytes.drop(("m", "p")) == 2 and by_bytes.bytes == 0
    with pytest.raises(ValueError):
        EmbeddingCache(max_entries=0)


def test_cached_embeddings_live_in_host_memory_as_copies():
    cache = EmbeddingCache()
    source = torch.ones(3, 2)
    cache.put((("m", None), "p", "", False), {"x": source[1:2]})
    stored = cache.get((("m", None), "p", "", False))["x"]
    assert stored.device.type == "cpu" and stored.untyped_storage().nbytes() == 8  # not a view of `source`


# --- the per-worker pipeline cache --------------------------------------------------------------------------


def test_pipeline_cache_keys_by_model_and_profile_and_shares_embeddings(tmp_path):
    cache = PipelineCache(max_pipelines=3)
    model = entry("tiny-sd15")
    bf16, fp8 = profile(W.BF16, name="bf16"), profile(W.FP8_E4M3FN, name="fp8")
    first, load_s = cache.get(model, bf16)
    assert load_s > 0 and first.renderfarm_info.embedding_cache is cache.embedding_cache
    other, _ = cache.get(model, fp8)
    assert other is not first
    assert cache.loaded_keys() == [("tiny-sd15", "bf16"), ("tiny-sd15", "fp8")]
    assert cache.loaded() == ["tiny-sd15", "tiny-sd15"]
    assert cache.bytes_loaded() == pipeline_bytes(first) + pipeline_bytes(other)
    assert pipeline_bytes(other) < pipeline_bytes(first)  # fp8 storage is smaller

    # A VAE mode is a switch on the loaded pipeline, not another load.
    tiled, seconds = cache.get(model, bf16.with_vae(VaeMode.TILED))
    assert tiled is first and seconds == 0.0 and first.vae.use_tiling
    cache.get(model, bf16)
    assert not first.vae.use_tiling

    # render_batch finds the worker's embedding cache on the pipeline: no argument needed.
    render_batch(first, model, [request()])
    [again] = render_batch(first, model, [request(seed=4)])
    assert again.cached_prompts == 1 and len(cache.embedding_cache) == 1
    assert cache.evict("tiny-sd15", bf16) and cache.loaded_keys() == [("tiny-sd15", "fp8")]
    assert len(cache.embedding_cache) == 0  # the evicted pipeline's embeddings go with it
    assert cache.evict("tiny-sd15") and not cache.evict("tiny-sd15")


class _FakePipe:
    def __init__(self, size: int):
        self.components = {"unet": torch.nn.Linear(size, 1, bias=False)}  # size * 4 bytes


def test_pipeline_cache_evicts_by_bytes():
    sizes = {"tiny-sd15": 1000, "tiny-sdxl": 1000, "tiny-flux": 2000}  # parameters of float32
    loads: list[str] = []

    def loader(model, chosen=None):
        loads.append(model.name)
        return _FakePipe(sizes[model.name])

    cache = PipelineCache(max_pipelines=5, loader=loader, max_bytes=9000)
    sd15, sdxl, flux = entry("tiny-sd15"), entry("tiny-sdxl"), entry("tiny-flux")
    cache.get(sd15)
    cache.get(sdxl)
    assert cache.bytes_loaded() == 8000
    cache.get(flux)  # 16000 bytes together: the two older ones go, after the load (size not known before)
    assert cache.loaded() == ["tiny-flux"] and cache.bytes_loaded() == 8000
    cache.get(sd15)
    assert cache.loaded() == ["tiny-sd15"]  # 12000 > 9000: flux (least recently used) is evicted
    # Now flux's size is known: room is made before it loads.
    cache.get(flux)
    assert cache.loaded() == ["tiny-flux"]
    assert loads == ["tiny-sd15", "tiny-sdxl", "tiny-flux", "tiny-sd15", "tiny-flux"]
    # One pipeline larger than the whole budget is still served.
    small = PipelineCache(loader=loader, max_bytes=10)
    pipe, _ = small.get(flux)
    assert isinstance(pipe, _FakePipe) and small.loaded() == ["tiny-flux"]


def test_pipeline_key_ignores_the_vae_mode():
    base = profile(W.NF4, name="nf4-offload")
    assert pipeline_key("m", base) == pipeline_key("m", base.with_vae(VaeMode.TILED)) == ("m", "nf4-offload")
    assert pipeline_key("m", None) == ("m", None)


# --- out of memory ------------------------------------------------------------------------------------------


def test_is_out_of_memory_recognises_torch_and_cuda_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                         "can't allocate memory: you tried to allocate 1099511627776 bytes"))
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError as oom:
            raise ValueError("render failed") from oom
    except ValueError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("width=72 must be a multiple of 16"))


def _raise_oom(*_args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected in VAE decode)")


@pytest.mark.parametrize("name, chosen", [
    ("tiny-sdxl", profile(W.FP16, C.FP16)),  # the SDXL VAE is upcast to fp32 for decoding, then restored
    ("tiny-flux", profile(W.NF4, C.BF16)),
])
def test_out_of_memory_in_decode_reaches_the_caller_and_the_pipeline_still_renders(name, chosen):
    model = entry(name)
    pipe = load_pipeline(model, profile=chosen)
    [before] = render_batch(pipe, model, [request()])
    handle = pipe.vae.decoder.register_forward_pre_hook(_raise_oom)
    try:
        with pytest.raises(torch.OutOfMemoryError) as failure:
            render_batch(pipe, model, [request()])
    finally:
        handle.remove()
    assert is_out_of_memory(failure.value)
    assert pipe.vae.dtype == quantize.torch_dtype(chosen.compute_dtype)
    # What the worker does next: the first rung down is a tiled VAE, on the same loaded pipeline.
    set_vae_mode(pipe, VaeMode.TILED)
    [after] = render_batch(pipe, model, [request()])
    assert np.abs(pixels(after.images[0]) - pixels(before.images[0])).max() <= 2


# --- GPU only: streams, model offload, bitsandbytes without the bypass --------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("weights", [W.BF16, W.NF4, W.GGUF_Q8_0, W.FP8_E4M3FN])
@pytest.mark.parametrize("placement", [P.GPU, P.MODEL_OFFLOAD, P.GROUP_OFFLOAD, P.LEAF_OFFLOAD])
def test_gpu_placements_render(weights, placement):
    from diffusers.hooks import group_offloading

    model = entry("tiny-flux")
    compute = _card_compute()
    chosen = profile(weights, compute, placement, fp16_clamp=compute is C.FP16)
    pipe = load_pipeline(model, device="cuda", profile=chosen)
    info = pipe.renderfarm_info
    assert not any("bypass" in note for note in info.notes)  # nothing is bypassed where CUDA exists
    assert pipe._execution_device.type == "cuda"
    if placement is P.GROUP_OFFLOAD:
        assert group_offloading._is_group_offload_enabled(pipe.transformer) and "streams" in info.placement
        assert "no streams" not in info.placement
    if placement is P.MODEL_OFFLOAD:
        assert info.placement == "model-offload"
    with DecoderWatch(pipe) as watch:
        [result] = render_batch(pipe, model, [request(width=64, height=64)])
    assert watch.finite == [True]
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)
    assert result.peak_memory_mb > 0


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("weights, te_weights", [(W.BF16, W.NF4), (W.NF4, None), (W.FP8_E4M3FN, None)])
@pytest.mark.parametrize("placement", [P.GPU, P.MODEL_OFFLOAD, P.GROUP_OFFLOAD])
@pytest.mark.parametrize("drop_t5", [False, True], ids=["t5", "no-t5"])
def test_gpu_sd3_placements_render_with_and_without_t5(weights, te_weights, placement, drop_t5):
    model = entry("tiny-sd3")
    compute = _card_compute()
    chosen = profile(weights, compute, placement, text_encoder_weights=te_weights, drop_large_text_encoder=drop_t5)
    pipe = load_pipeline(model, device="cuda", profile=chosen)
    assert (pipe.text_encoder_3 is None) is drop_t5
    assert pipe._execution_device.type == "cuda"
    with DecoderWatch(pipe) as watch:
        [result] = render_batch(pipe, model, [request(width=64, height=64)])
    assert watch.finite == [True]
    assert Image.open(io.BytesIO(result.images[0])).size == (64, 64)


@pytest.mark.gpu
@needs_cuda
def test_gpu_bnb_loads_without_the_cpu_bypass():
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes.bnb_quantizer import (
        BnB4BitDiffusersQuantizer,
    )

    original = BnB4BitDiffusersQuantizer.validate_environment
    pipe = load_pipeline(entry("tiny-flux"), device="cuda", profile=profile(W.NF4))
    assert BnB4BitDiffusersQuantizer.validate_environment is original
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.device.type == "cuda"


@pytest.mark.gpu
@needs_cuda
def test_gpu_cache_and_offload_keeps_text_encoders_in_host_memory_between_encodes():
    model = entry("tiny-flux")
    chosen = profile(W.BF16, _card_compute(),
                     text_encoders=TextEncoderPolicy.CACHE_AND_OFFLOAD)
    pipe = load_pipeline(model, device="cuda", profile=chosen)
    assert pipe.renderfarm_info.text_encoders_offloaded
    assert pipe.text_encoder_2.device.type == "cpu" and pipe.transformer.device.type == "cuda"
    seen: list[str] = []
    handle = pipe.text_encoder_2.register_forward_pre_hook(
        lambda module, _args: seen.append(next(module.parameters()).device.type)
    )
    try:
        render_batch(pipe, model, [request()])
    finally:
        handle.remove()
    assert seen == ["cuda"]  # encoded on the GPU...
    assert pipe.text_encoder_2.device.type == "cpu"  # ...and moved off afterwards

    resident_profile = replace(chosen, text_encoders=TextEncoderPolicy.RESIDENT)
    resident = load_pipeline(model, device="cuda", profile=resident_profile)
    assert resident.text_encoder_2.device.type == "cuda"
    assert not resident.renderfarm_info.text_encoders_offloaded


@pytest.mark.gpu
@needs_cuda
def test_gpu_real_out_of_memory_is_recognised():
    total = torch.cuda.get_device_properties(0).total_memory
    with pytest.raises(torch.OutOfMemoryError) as failure:
        torch.empty(total * 2, dtype=torch.uint8, device="cuda")
    assert is_out_of_memory(failure.value)


def test_text_encoder_weights_follow_the_profile():
    from renderfarm.actors.loading import text_encoder_weights

    assert text_encoder_weights(profile(W.NF4)) is W.NF4  # None: as the denoiser, where that applies
    assert text_encoder_weights(profile(W.FP8_E5M2)) is W.FP8_E5M2
    assert text_encoder_weights(profile(W.GGUF_Q8_0)) is None  # GGUF is for denoisers: compute dtype
    assert text_encoder_weights(profile(W.BF16, text_encoder_weights=W.NF4)) is W.NF4
    assert text_encoder_weights(profile(W.NF4, text_encoder_weights=W.BF16)) is None
    with pytest.raises(ValueError, match="GGUF text encoders"):
        text_encoder_weights(profile(W.BF16, text_encoder_weights=W.GGUF_Q8_0))


def test_an_fp32_vae_is_loaded_at_fp32_not_cast_from_the_compute_dtype():
    import diffusers

    model = entry("tiny-flux")
    pipe = load_pipeline(model, profile=profile(W.BF16, C.BF16, vae_dtype=C.FP32))
    saved = diffusers.AutoencoderKL.from_pretrained(ensure_standin(model), subfolder="vae")
    assert pipe.transformer.dtype == torch.bfloat16
    for (name, got), expected in zip(pipe.vae.state_dict().items(), saved.state_dict().values()):
        assert got.dtype == torch.float32 and torch.equal(got, expected), name


def test_model_offload_frees_its_hooks_after_our_decode(monkeypatch):
    """We decode after the pipeline call returns (it freed its model-offload hooks already), so the VAE's
    accelerate hook would leave the VAE on the card into the next render. render_batch frees the hooks again
    after decoding when the pipeline has offload hooks; a pipeline without them is left alone."""
    model = entry("tiny-sd15")
    pipe = load_pipeline(model, profile=profile(W.BF16))
    calls = []
    monkeypatch.setattr(type(pipe), "maybe_free_model_hooks", lambda self: calls.append(len(calls)), raising=True)
    render_batch(pipe, model, [request()])
    during_call = len(calls)  # the pipeline's own call, at the end of __call__ (it returns early without hooks)
    pipe._all_hooks = ["an accelerate hook"]
    render_batch(pipe, model, [request()])
    assert len(calls) == 2 * during_call + 1


def _pinned_bytes() -> int:
    """Bytes torch's pinned host allocator holds for live tensors now (its own counter)."""
    return int(torch.cuda.host_memory_stats()["allocated_bytes.current"])


@pytest.mark.gpu
@needs_cuda
def test_gpu_group_offload_pins_each_streamed_tensor_rounded_up_to_a_power_of_two():
    """What planning/vram.py's `pinned_factor` models: with CUDA streams diffusers pins a copy of every tensor
    of every block group (the group of the remaining modules is not streamed), and torch's pinned allocator
    rounds each allocation up to a power of two."""
    from tests.bench import bench_module

    pinned_rounding = bench_module("pinned_rounding")
    model = entry("tiny-flux")
    before = _pinned_bytes()
    pipe = load_pipeline(model, device="cuda", profile=profile(W.BF16, _card_compute(), P.GROUP_OFFLOAD))
    pinned = _pinned_bytes() - before
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    tensors = [t for block in blocks for t in [*block.parameters(), *block.buffers()]]
    exact = sum(t.numel() * t.element_size() for t in tensors)
    rounded = sum(pinned_rounding.next_power_of_two(t.numel() * t.element_size()) for t in tensors)
    assert rounded > exact
    assert rounded <= pinned <= rounded * 1.05 + 2**20, (pinned, rounded, exact)


@pytest.mark.gpu
@needs_cuda
def test_gpu_pin_per_step_keeps_only_a_few_blocks_pinned():
    model = entry("tiny-flux")
    before = _pinned_bytes()
    lean = replace(profile(W.BF16, _card_compute(), P.GROUP_OFFLOAD), pin_streamed=False)
    pipe = load_pipeline(model, device="cuda", profile=lean)
    assert "pinned per step" in pipe.renderfarm_info.placement
    assert _pinned_bytes() - before == 0  # nothing pinned at setup
    with DecoderWatch(pipe) as watch:
        render_batch(pipe, model, [request(width=64, height=64)])
    assert watch.finite == [True]
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    largest = max(loading.module_bytes(block) for block in blocks)
    held = int(torch.cuda.host_memory_stats()["reserved_bytes.current"])
    assert held <= 4 * 2 * largest + 2**20  # a few blocks' buffers (rounded up), not the model


@pytest.mark.parametrize("model", ["flux-dev", "sdxl", "sd3.5-large", "sd3.5-medium"])
def test_the_loader_and_the_planner_agree_on_where_components_live(model):
    """planning/vram.py predicts host memory and the load stage from `host_homed`; actors/loading.py loads by
    `load_targets`. On a card they must agree for every rung: a quantized component the planner homes in host
    memory is loaded there or parked there at once, and one it keeps on the card is neither."""
    from renderfarm.planning.devices import device_from_spec
    from renderfarm.planning.profiles import ladder
    from renderfarm.planning.vram import host_homed

    card = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6")
    catalog_entry = entry(model)
    denoiser = catalog_entry.denoiser.name
    large = family_for(catalog_entry).large_text_encoder
    for rung in ladder(catalog_entry, card):
        homed = host_homed(catalog_entry, rung)
        targets = loading.load_targets(rung, on_card=True)
        assert (targets.denoiser_in_host or targets.park_denoiser) == (denoiser in homed), rung.name
        if large and not rung.drop_large_text_encoder:
            assert (targets.encoder_in_host or targets.park_encoder) == (large in homed), rung.name
        elif large:
            assert large not in homed, rung.name  # a dropped T5 is nowhere
        cpu = loading.load_targets(rung, on_card=False)
        assert not any(vars(cpu).values()), rung.name  # a CPU loads everything where it computes


def test_cpu_disk_offload_reads_each_block_from_its_file_and_renders_the_same(tmp_path, monkeypatch):
    """Disk offload, the rung for PCs whose RAM cannot hold the denoiser: diffusers writes each block to a
    safetensors file under the worker's cache folder, keeps only empty placeholders in memory, and reads the
    block back for every forward. The image matches the resident one exactly."""
    from diffusers.hooks import group_offloading

    model = entry("tiny-flux")
    resident = load_pipeline(model, profile=profile(W.FP32, C.FP32))
    disk = load_pipeline(model, cache_dir=tmp_path, profile=profile(W.FP32, C.FP32, placement=P.DISK_OFFLOAD))
    assert group_offloading._is_group_offload_enabled(disk.transformer)
    assert disk.renderfarm_info.placement.startswith("disk-offload (block_level, 1 block/group read from")
    blocks = len(disk.transformer.transformer_blocks) + len(disk.transformer.single_transformer_blocks)
    assert len(list((tmp_path / "offload").rglob("*.safetensors"))) >= blocks
    reads = [0]
    real = group_offloading.ModuleGroup._onload_from_disk

    def counting(self):
        reads[0] += 1
        return real(self)

    monkeypatch.setattr(group_offloading.ModuleGroup, "_onload_from_disk", counting)
    [expected] = render_batch(resident, model, [request()])
    [got] = render_batch(disk, model, [request()])
    assert reads[0] >= blocks
    assert np.array_equal(pixels(got.images[0]), pixels(expected.images[0]))
    # a second load starts from an empty folder: files another load left are never read back
    again = load_pipeline(model, cache_dir=tmp_path, profile=profile(W.FP32, C.FP32, placement=P.DISK_OFFLOAD))
    [third] = render_batch(again, model, [request()])
    assert np.array_equal(pixels(third.images[0]), pixels(expected.images[0]))


def test_evicting_a_disk_offloaded_pipeline_removes_its_block_files(tmp_path):
    cache = PipelineCache(cache_dir=tmp_path)
    model = entry("tiny-flux")
    pipe, _ = cache.get(model, profile(W.FP32, C.FP32, placement=P.DISK_OFFLOAD))
    folder = pipe.renderfarm_info.offload_dir
    assert folder is not None and any(folder.rglob("*.safetensors"))
    del pipe
    assert cache.evict("tiny-flux")
    assert not folder.exists()
