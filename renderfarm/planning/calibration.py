"""Published measurements the VRAM model is calibrated against, and the profiles that reproduce them.

diffusers' quantization benchmarks for Flux.1-dev, 1024x1024, batch 1, on an H100 80 GB (quoted with
its source in renderfarm/configs/published_figures.yaml):
"loaded" is memory allocated after loading, "peak" is `max_memory_reserved`, in GiB. Those runs moved the
whole pipeline to cuda, so the text encoders stayed on the GPU in bf16 (TextEncoderPolicy.RESIDENT), except
the nf4 run, which quantized T5 to nf4 as well (components_to_quantize = transformer, text_encoder_2).
`max_memory_reserved` does not count the CUDA context: compare it with `Prediction.allocator_peak_gib`.
"""

from __future__ import annotations

from dataclasses import dataclass

from renderfarm.planning.profiles import ComputeDtype, Placement, Profile, TextEncoderPolicy, WeightsFormat

MODEL, WIDTH, HEIGHT = "flux-dev", 1024, 1024
DEVICE = ("NVIDIA H100 80GB HBM3", 80, "9.0")  # device_from_spec arguments


@dataclass(frozen=True)
class Reference:
    weights: WeightsFormat
    text_encoder_weights: WeightsFormat
    placement: Placement
    loaded_gib: float | None
    peak_gib: float
    # Run with transformers 4.x, whose bitsandbytes path kept T5's `wo` in fp32 whatever the dtype; transformers
    # 5 (required now) keeps it in the compute dtype (tests/actors/test_quantize.py pins that). Such a run's T5
    # was larger by `wo`'s params x 2 bytes: `like_for_like_gib` takes that out.
    t5_wo_fp32: bool = False

    def like_for_like_gib(self, value: float, wo_params: float) -> float:
        return value - (wo_params * 2 / 2**30 if self.t5_wo_fp32 else 0.0)


PUBLISHED = [
    Reference(WeightsFormat.BF16, WeightsFormat.BF16, Placement.GPU, 31.45, 36.17),
    Reference(WeightsFormat.NF4, WeightsFormat.NF4, Placement.GPU, 12.58, 17.28, t5_wo_fp32=True),
    Reference(WeightsFormat.GGUF_Q8_0, WeightsFormat.BF16, Placement.GPU, 21.50, 25.97),
    Reference(WeightsFormat.GGUF_Q4_1, WeightsFormat.BF16, Placement.GPU, 16.84, 21.33),
    Reference(WeightsFormat.FP8_E4M3FN, WeightsFormat.BF16, Placement.GPU, 23.68, 28.45),
    # With model CPU offload. nf4 + offload (published 12.38) is left out: bitsandbytes quantizes on the GPU
    # while loading, so that run's reserved peak is the load (transformer and T5 in nf4 at once), not the render.
    Reference(WeightsFormat.BF16, WeightsFormat.BF16, Placement.MODEL_OFFLOAD, None, 23.27),
    Reference(WeightsFormat.GGUF_Q8_0, WeightsFormat.BF16, Placement.MODEL_OFFLOAD, None, 12.97),
    Reference(WeightsFormat.GGUF_Q4_1, WeightsFormat.BF16, Placement.MODEL_OFFLOAD, None, 9.16),
]


def reference_profile(
    weights: WeightsFormat,
    text_encoder_weights: WeightsFormat = WeightsFormat.BF16,
    placement: Placement = Placement.GPU,
) -> Profile:
    """The profile that reproduces a published run: bf16 compute; encoders resident unless offloaded."""
    offloaded = placement is not Placement.GPU
    return Profile(
        name=f"{weights.value}{'+' + placement.value if offloaded else ''}", weights=weights,
        compute_dtype=ComputeDtype.BF16, placement=placement, text_encoder_weights=text_encoder_weights,
        text_encoders=TextEncoderPolicy.CACHE_AND_OFFLOAD if offloaded else TextEncoderPolicy.RESIDENT,
    )
