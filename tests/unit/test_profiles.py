import itertools
from dataclasses import replace

import pytest

from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.choose import choose_profile, next_rung, next_rung_for_host
from renderfarm.planning.devices import KNOWN_CARDS, device_from_spec
from renderfarm.planning.profiles import (
    ComputeDtype,
    Placement,
    TextEncoderPolicy,
    VaeMode,
    WeightsFormat,
    component_formats,
    compute_dtype_for,
    fp16_clamp_for,
    ladder,
    stored_format,
    unavailable_reason,
    vae_dtype_for,
)
from renderfarm.planning.vram import predict
from tests.unit.cards import CPU, H100, L40S, QUADRO, RTX3070, RTX4070, RTX4090


@pytest.fixture(scope="module")
def cat():
    return default_catalog()


# --- precision rules --------------------------------------------------------------------------------


def test_compute_dtype_is_bf16_from_ampere_fp16_before_and_fp32_on_cpu():
    assert compute_dtype_for(QUADRO) is ComputeDtype.FP16
    assert compute_dtype_for(RTX3070) is ComputeDtype.BF16
    assert compute_dtype_for(H100) is ComputeDtype.BF16
    assert compute_dtype_for(CPU) is ComputeDtype.FP32


def test_16bit_weights_take_the_compute_dtype_quantized_formats_stay():
    assert stored_format(WeightsFormat.BF16, ComputeDtype.FP16) is WeightsFormat.FP16
    assert stored_format(WeightsFormat.BF16, ComputeDtype.FP32) is WeightsFormat.FP32
    assert stored_format(WeightsFormat.FP16, ComputeDtype.BF16) is WeightsFormat.BF16
    for fmt in (WeightsFormat.FP8_E4M3FN, WeightsFormat.NF4, WeightsFormat.GGUF_Q8_0):
        assert stored_format(fmt, ComputeDtype.FP16) is fmt  # fp8 stays storage even on Turing


def test_sdxl_vae_decodes_in_fp32_on_fp16_cards_unless_a_fixed_vae_is_configured(cat):
    sdxl = cat.get("sdxl")
    assert vae_dtype_for(sdxl, ComputeDtype.FP16) is ComputeDtype.FP32
    assert vae_dtype_for(sdxl, ComputeDtype.BF16) is ComputeDtype.BF16  # bf16 has fp32's range
    fixed = sdxl.model_copy(update={"fp16_vae_source": "madebyollin/sdxl-vae-fp16-fix"})
    assert vae_dtype_for(fixed, ComputeDtype.FP16) is ComputeDtype.FP16
    assert vae_dtype_for(cat.get("flux-dev"), ComputeDtype.FP16) is ComputeDtype.FP16
    assert vae_dtype_for(cat.get("sd15"), ComputeDtype.FP16) is ComputeDtype.FP16


def test_only_flux_in_fp16_clamps(cat):
    assert fp16_clamp_for(cat.get("flux-dev"), ComputeDtype.FP16)
    assert not fp16_clamp_for(cat.get("flux-dev"), ComputeDtype.BF16)
    assert not fp16_clamp_for(cat.get("sdxl"), ComputeDtype.FP16)


def test_component_formats_quantize_t5_but_never_clip_or_vae(cat):
    flux = cat.get("flux-dev")
    nf4 = next(p for p in ladder(flux, H100) if p.name == "nf4")
    assert component_formats(flux, nf4) == {
        "transformer": WeightsFormat.NF4,
        "text_encoder": WeightsFormat.BF16,
        "text_encoder_2": WeightsFormat.NF4,
        "vae": WeightsFormat.BF16,
    }
    q8 = next(p for p in ladder(flux, H100) if p.name == "gguf-q8_0")
    assert component_formats(flux, q8)["text_encoder_2"] is WeightsFormat.BF16  # GGUF is for denoisers


# --- ladders ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["flux-dev", "sdxl", "sd15", "sd3.5-large", "tiny-flux"])
def test_ladder_runs_from_all_resident_to_leaf_offload(cat, model):
    rungs = ladder(cat.get(model), H100)
    assert len({r.name for r in rungs}) == len(rungs)
    top, floor = rungs[0], rungs[-1]
    assert top.placement is Placement.GPU and top.text_encoders is TextEncoderPolicy.RESIDENT
    assert top.weights is WeightsFormat.BF16
    assert floor.placement is Placement.LEAF_OFFLOAD
    assert all(r.vae is VaeMode.FULL for r in rungs)  # choose_profile tries tiled itself


def test_turing_never_computes_bf16_and_flux_clamps(cat):
    for model in ("flux-dev", "sdxl", "sd15"):
        for rung in ladder(cat.get(model), QUADRO):
            assert rung.compute_dtype is ComputeDtype.FP16
            assert WeightsFormat.BF16 not in component_formats(cat.get(model), rung).values()
            assert rung.fp16_clamp == (model == "flux-dev")
    chosen = choose_profile(cat.get("flux-dev"), QUADRO, 1024, 1024).chosen
    assert chosen.compute_dtype is ComputeDtype.FP16 and chosen.fp16_clamp


def test_ada_and_hopper_compute_bf16_without_clamp(cat):
    for device in (L40S, H100):
        chosen = choose_profile(cat.get("flux-dev"), device, 1024, 1024).chosen
        assert chosen.compute_dtype is ComputeDtype.BF16 and not chosen.fp16_clamp


def test_gguf_rungs_need_a_file_in_the_catalog(cat):
    sd3 = cat.get("sd3.5-large")
    q8 = next(p for p in ladder(sd3, H100) if p.weights is WeightsFormat.GGUF_Q8_0)
    assert "no GGUF Q8_0 file for sd3.5-large" in unavailable_reason(sd3, q8, H100)
    assert unavailable_reason(cat.get("flux-dev"), q8, H100) is None
    assert unavailable_reason(cat.get("tiny-flux"), q8, H100) is None  # stand-ins write their own


def test_cpu_runs_everything_resident_in_fp32(cat):
    for model in ("tiny-sd15", "tiny-sdxl", "tiny-flux"):
        choice = choose_profile(cat.get(model), CPU, 64, 64)
        assert choice.chosen.name == "fp32+te-resident"
        assert choice.chosen.compute_dtype is ComputeDtype.FP32
        assert [c.profile for c in choice.candidates if c.fits] == [choice.chosen]
    flux = cat.get("tiny-flux")
    nf4 = next(p for p in ladder(flux, CPU) if p.weights is WeightsFormat.NF4)
    resident_nf4 = replace(nf4, text_encoders=TextEncoderPolicy.RESIDENT)
    assert "bitsandbytes 4-bit needs a CUDA device" in unavailable_reason(flux, resident_nf4, CPU)


# --- choosing ---------------------------------------------------------------------------------------


def test_flux_on_80_gib_runs_bf16_all_on_the_gpu(cat):
    choice = choose_profile(cat.get("flux-dev"), H100, 1024, 1024)
    chosen = choice.chosen
    assert chosen.name == "bf16+te-resident"
    assert (chosen.weights, chosen.compute_dtype, chosen.placement) == (
        WeightsFormat.BF16, ComputeDtype.BF16, Placement.GPU,
    )
    assert choice.chosen_candidate.prediction.peak_gib <= 80 - choice.margin_gib


def test_flux_on_8_gib_picks_a_profile_predicted_under_8(cat):
    choice = choose_profile(cat.get("flux-dev"), RTX3070, 1024, 1024)
    assert choice.chosen is not None
    assert choice.chosen_candidate.prediction.peak_gib <= 8 - choice.margin_gib
    assert choice.chosen.placement is not Placement.LEAF_OFFLOAD  # group offload still fits


@pytest.mark.parametrize("device", [RTX4070, RTX4090], ids=["12GiB", "24GiB"])
def test_flux_on_12_and_24_gib_picks_middle_rungs(cat, device):
    flux = cat.get("flux-dev")
    rungs = [r.name for r in ladder(flux, device)]
    chosen = choose_profile(flux, device, 1024, 1024).chosen
    index = rungs.index(chosen.name.rsplit("+vae-", 1)[0])
    assert 0 < index < len(rungs) - 1
    assert chosen.placement in (Placement.GPU, Placement.MODEL_OFFLOAD)


def test_flux_choices_by_card_size(cat):
    flux = cat.get("flux-dev")
    picks = {d.vram_gib: choose_profile(flux, d, 1024, 1024).chosen.name for d in (RTX3070, RTX4070, RTX4090, H100)}
    assert picks == {
        8: "bf16+te-nf4+group-offload",
        12: "nf4+model-offload",
        24: "nf4",  # Q8_0 also fits, but dequantizing it costs ~10% per step (the published H100 runs)
        80: "bf16+te-resident",
    }


def test_sdxl_and_sd15_fit_8_gib_without_heavy_offload(cat):
    for model, size in (("sdxl", 1024), ("sd15", 512)):
        choice = choose_profile(cat.get(model), RTX3070, size, size)
        assert choice.chosen.placement in (Placement.GPU, Placement.MODEL_OFFLOAD), model
        assert choice.chosen.weights is WeightsFormat.BF16, model
    assert choose_profile(cat.get("sd15"), RTX3070, 512, 512).chosen.name == "bf16+te-resident"


def test_a_job_that_fits_nowhere_says_why(cat):
    tiny_card = device_from_spec("old card", 2, "8.6")
    choice = choose_profile(cat.get("flux-dev"), tiny_card, 1024, 1024)
    assert choice.chosen is None and choice.chosen_candidate is None
    assert "nothing fits" in choice.reason and "bf16+leaf-offload+vae-tiled" in choice.reason
    assert not any(c.fits for c in choice.candidates)
    assert "chosen: none" in choice.explain()


def test_fitting_candidates_fit_and_the_others_say_what_they_need(cat):
    choice = choose_profile(cat.get("flux-dev"), RTX4090, 1024, 1024)
    assert len(choice.candidates) == len(ladder(cat.get("flux-dev"), RTX4090))
    for c in choice.candidates:
        assert c.fits == (c.prediction.peak_gib <= choice.usable_gib)
        assert c.reason.startswith("fits") if c.fits else c.reason.startswith("needs")
    text = choice.explain()
    assert all(c.profile.name in text for c in choice.candidates)


def test_tiled_vae_is_tried_before_the_next_rung(cat):
    # SDXL at 1024 on 8 GiB: the full decode does not fit beside the resident UNet, a tiled one does.
    choice = choose_profile(cat.get("sdxl"), RTX3070, 1024, 1024)
    assert choice.chosen.vae is VaeMode.TILED and "tiled VAE" in choice.chosen_candidate.reason


def test_stand_ins_fit_on_every_card_and_the_cpu(cat):
    devices = [device_from_spec(c.name, c.vram_gib, c.compute_capability) for c in KNOWN_CARDS] + [CPU]
    for model in ("tiny-sd15", "tiny-sdxl", "tiny-flux"):
        entry = cat.get(model)
        for device in devices:
            choice = choose_profile(entry, device, entry.default_size, entry.default_size)
            assert choice.chosen == ladder(entry, device)[0], (model, device.name)


def test_choose_checks_the_job(cat):
    with pytest.raises(ValueError, match="multiple of 16"):
        choose_profile(cat.get("flux-dev"), H100, 1000, 1024)
    with pytest.raises(ValueError, match="batch=0"):
        choose_profile(cat.get("flux-dev"), H100, 1024, 1024, batch=0)


# --- escalation -------------------------------------------------------------------------------------


def test_next_rung_tiles_the_vae_first_then_walks_down_to_the_floor(cat):
    flux = cat.get("flux-dev")
    current = choose_profile(flux, RTX4090, 1024, 1024).chosen
    assert current.vae is VaeMode.FULL
    tiled = next_rung(flux, RTX4090, current, 1024, 1024)
    assert tiled == current.with_vae(VaeMode.TILED)
    seen, peaks, step = [], [], tiled
    while step is not None:
        seen.append(step.name)
        peaks.append(predict(flux, step, RTX4090, 1024, 1024).peak_gib)
        step = next_rung(flux, RTX4090, step, 1024, 1024)
    assert seen[-1] == "bf16+leaf-offload+vae-tiled"
    assert all(b < a for a, b in itertools.pairwise(peaks[1:]))  # every step down predicts less
    assert all(name.endswith("+vae-tiled") for name in seen)


def test_next_rung_skips_what_the_device_cannot_run(cat):
    sd3 = cat.get("sd3.5-large")
    step = ladder(sd3, H100)[0].with_vae(VaeMode.TILED)
    while step is not None:
        assert not step.weights.is_gguf  # sd3.5-large lists no GGUF files
        step = next_rung(sd3, H100, step, 1024, 1024)


# --- host memory and time per job --------------------------------------------------------------------


def test_quadro_picks_the_profile_predicted_fastest_not_the_first_that_fits(cat):
    # Turing, 24 GiB, 64 GiB of RAM: fp8 + model offload fits above nf4 on the ladder, but moves ~17 GiB
    # between host and card per job and computes no faster: nf4 resident finishes first.
    quadro = replace(QUADRO, ram_gib=64.0)
    choice = choose_profile(cat.get("flux-dev"), quadro, 1024, 1024)
    fitting = [c for c in choice.candidates if c.fits]
    assert fitting[0].profile.name.startswith("fp8-e4m3fn+model-offload")
    assert choice.chosen.name == "nf4"
    assert "predicted fastest" in choice.reason
    chosen = choice.chosen_candidate.prediction.seconds_per_job(choice.steps)
    assert all(chosen <= c.prediction.seconds_per_job(choice.steps) * 1.05 for c in fitting)


@pytest.mark.parametrize("ram, expected", [(64.0, None), (32.0, "nf4+group-offload+pin-per-step"),
                                           (16.0, "nf4+group-offload+pin-per-step")])
def test_an_8_gb_card_never_gets_a_profile_its_ram_cannot_hold(cat, ram, expected):
    card = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6", ram_gib=ram)
    choice = choose_profile(cat.get("flux-dev"), card, 1024, 1024)
    assert choice.chosen is not None
    assert choice.chosen_candidate.prediction.host_peak_gib <= card.host_budget_gib
    if expected:
        assert choice.chosen.name == expected
    for c in choice.candidates:
        if c.prediction.host_peak_gib > card.host_budget_gib and not c.reason.startswith("unavailable"):
            assert not c.fits and "host RAM" in c.reason


def test_without_ram_figures_host_memory_is_not_checked(cat):
    card = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6")
    assert card.host_budget_gib is None
    choice = choose_profile(cat.get("flux-dev"), card, 1024, 1024)
    assert choice.chosen.name == "bf16+te-nf4+group-offload"  # 61 GiB of host memory, unchecked


def test_next_rung_for_host_finds_a_lighter_rung_that_fits_the_card(cat):
    flux = cat.get("flux-dev")
    card = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6", ram_gib=64.0)
    heavy = next(r for r in ladder(flux, card) if r.name == "bf16+te-nf4+group-offload")
    lighter = next_rung_for_host(flux, card, heavy, 1024, 1024)
    assert lighter is not None and lighter.name.startswith("nf4+group-offload+pin-per-step")
    assert predict(flux, lighter, card, 1024, 1024).host_peak_gib < predict(flux, heavy, card, 1024, 1024).host_peak_gib
    floor = lighter
    assert next_rung_for_host(flux, card, floor, 1024, 1024) is None or \
        predict(flux, next_rung_for_host(flux, card, floor, 1024, 1024), card, 1024, 1024).host_peak_gib < \
        predict(flux, floor, card, 1024, 1024).host_peak_gib


def test_host_budget_keeps_room_for_the_os_and_what_was_free(cat):
    from renderfarm.planning.devices import HOST_RESERVED_GIB, HOST_RUNTIME_GIB

    card = device_from_spec("x", 8, "8.6", ram_gib=16.0)
    assert card.host_budget_gib == pytest.approx(16 - HOST_RESERVED_GIB)
    busy = device_from_spec("x", 8, "8.6", ram_gib=16.0, ram_available_gib=6.0)
    assert busy.host_budget_gib == pytest.approx(6 - HOST_RUNTIME_GIB)
    with pytest.raises(ValueError, match="ram_gib must be positive"):
        device_from_spec("x", 8, "8.6", ram_gib=-1.0)


def test_an_8_gb_card_in_an_8_gb_pc_reads_the_denoiser_from_disk(cat):
    card = device_from_spec("NVIDIA GeForce RTX 3070", 7.6, "8.6", ram_gib=8.0, disk_free_gib=200.0)
    choice = choose_profile(cat.get("flux-dev"), card, 1024, 1024)
    assert choice.chosen.name == "bf16+te-nf4+disk-offload"
    pred = choice.chosen_candidate.prediction
    assert pred.host_peak_gib <= card.host_budget_gib and pred.pinned_gib == 0
    # far slower than streaming from RAM: the whole denoiser crosses the disk every step
    richer = choose_profile(cat.get("flux-dev"), replace(card, ram_gib=32.0), 1024, 1024)
    assert pred.seconds_per_step > 2 * richer.chosen_candidate.prediction.seconds_per_step
    full_disk = replace(card, disk_free_gib=10.0)
    refused = choose_profile(cat.get("flux-dev"), full_disk, 1024, 1024)
    disk = next(c for c in refused.candidates if c.profile.name.startswith("bf16+te-nf4+disk-offload"))
    assert not disk.fits and "free disk" in disk.reason
    # on Turing the bf16 files are converted to fp16 in host memory at load: not for an 8 GB PC
    turing = device_from_spec("NVIDIA GeForce RTX 2080 Ti", 10.7, "7.5", ram_gib=8.0)
    assert choose_profile(cat.get("flux-dev"), turing, 1024, 1024).chosen is None
