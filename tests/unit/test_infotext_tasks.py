"""The img2img and inpainting fields of the A1111 infotext, where A1111's create_infotext puts them."""

from renderfarm.infotext import a1111_parameters, parse_a1111_parameters

BASE = dict(prompt="a fox", steps=20, sampler="Euler", schedule_type="Normal", cfg_scale=7.0, seed=1, width=512,
            height=512, model="sd15", version="renderfarm test")


def keys(text: str) -> list[str]:
    return [key for key in parse_a1111_parameters(text) if key not in ("prompt", "negative_prompt")]


def test_txt2img_has_neither_field():
    assert "Denoising strength" not in keys(a1111_parameters(**BASE))


def test_strength_after_the_model_and_mask_blur_before_the_lora_hashes():
    text = a1111_parameters(**BASE, denoising_strength=0.75, mask_blur=4, loras=(("ink", 0.8, "abcdef123456"),))
    assert keys(text) == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model",
                          "Denoising strength", "Mask blur", "Lora hashes", "Version"]
    parsed = parse_a1111_parameters(text)
    assert parsed["Denoising strength"] == "0.75" and parsed["Mask blur"] == "4"


def test_img2img_writes_the_strength_as_a_float_and_no_mask_blur():
    parsed = parse_a1111_parameters(a1111_parameters(**BASE, denoising_strength=1))
    assert parsed["Denoising strength"] == "1.0" and "Mask blur" not in parsed
