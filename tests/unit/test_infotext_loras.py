"""The infotext of a render with LoRAs (infotext.py), written the A1111 way and read back by the A1111-style
parser the dashboard uses: the prompt carries a <lora:name:weight> tag per LoRA, and `Lora hashes` maps each
name to its short hash."""

from __future__ import annotations

from renderfarm.infotext import a1111_parameters, parse_a1111_parameters
from renderfarm.jobs import lora_tags

BASE = {"steps": 20, "sampler": "Euler", "schedule_type": "Normal", "cfg_scale": 5.0, "seed": 7, "width": 64,
        "height": 64, "model": "tiny-sd15", "version": "renderfarm test"}


def test_loras_are_written_as_tags_and_hashes_and_read_back():
    text = a1111_parameters(prompt="a fox, in snow", negative_prompt="blurry", **BASE,
                            loras=(("style", 0.7, "a8b319a187c7"), ("hero-v2", 1.0, "e57cecfc0199")))
    parsed = parse_a1111_parameters(text)
    assert parsed["prompt"] == "a fox, in snow <lora:style:0.7> <lora:hero-v2:1>"
    assert parsed["negative_prompt"] == "blurry"
    assert parsed["Lora hashes"] == "style: a8b319a187c7, hero-v2: e57cecfc0199"
    assert parsed["Model"] == "tiny-sd15" and parsed["Version"] == "renderfarm test"
    # pasting the prompt back into a job gives the same LoRAs (jobs.py reads the same tags)
    prompt, loras = lora_tags(parsed["prompt"])
    assert prompt == "a fox, in snow" and loras == [{"name": "style", "weight": 0.7}, {"name": "hero-v2", "weight": 1.0}]


def test_without_loras_the_infotext_is_unchanged():
    text = a1111_parameters(prompt="a fox", **BASE)
    assert "Lora hashes" not in text and "<lora:" not in text
    assert text == a1111_parameters(prompt="a fox", **BASE, loras=())
