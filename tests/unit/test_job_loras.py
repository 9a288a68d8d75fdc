"""A job's LoRAs (jobs.py): `loras: [{name, weight}]` or A1111's `<lora:name:weight>` in the prompt, checked at
validation against the farm's LoRAs (a LoraRules: here a table standing in for what the nodes hold, the pure
logic of client.py's FarmLoras is tested beside the client)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from renderfarm.jobs import MAX_LORA_WEIGHT, MAX_LORAS, JobSpec, describe_validation_error, lora_tags
from renderfarm.planning.catalog import default_catalog

CATALOG = default_catalog()
SHA = {"style": "a" * 64, "hero": "b" * 64, "xl-look": "c" * 64}
FAMILY = {"style": "sd15", "hero": "sd15", "xl-look": "sdxl"}


class Held:
    """The farm's LoRAs as a table: name -> (family, sha256)."""

    def resolve(self, name: str, sha256: str | None, family: str) -> str:
        if name not in SHA:
            raise ValueError(f"no node of this farm holds LoRA {name!r}")
        if FAMILY[name] != family:
            raise ValueError(f"LoRA {name!r} is made for {FAMILY[name]} models, not {family}")
        if sha256 is not None and sha256 != SHA[name]:
            raise ValueError(f"no node holds LoRA {name!r} with sha256 {sha256[:12]}...")
        return SHA[name]


def spec(loras=None, **kw):
    base = {"model": "tiny-sd15", "prompt": "a red fox", "width": 64, "height": 64, "steps": 2}
    if loras is not None:
        base["loras"] = loras
    return JobSpec.validate_for({**base, **kw}, CATALOG, Held())


def error_of(**kw) -> str:
    with pytest.raises(ValidationError) as info:
        spec(**kw)
    return describe_validation_error(info.value)


def test_loras_are_pinned_to_the_hash_of_the_copy_the_farm_holds():
    s = spec([{"name": "style", "weight": 0.8}, {"name": "hero"}])
    assert [(lo.name, lo.weight, lo.sha256) for lo in s.loras] == [("style", 0.8, SHA["style"]),
                                                                     ("hero", 1.0, SHA["hero"])]
    # stored and read back as JSON (Redis): the same spec, pinned hashes included
    assert JobSpec.model_validate_json(s.model_dump_json()) == s


def test_a1111_prompt_tags_become_loras_and_leave_the_prompt():
    s = spec(prompt="a red fox <lora:style:0.7>, in snow <lora:hero>")
    assert s.prompt == "a red fox , in snow"
    assert [(lo.name, lo.weight) for lo in s.loras] == [("style", 0.7), ("hero", 1.0)]
    # given both ways: the field's first, then the prompt's
    both = spec([{"name": "hero", "weight": 0.5}], prompt="<lora:style:-1.5> a fox")
    assert [(lo.name, lo.weight) for lo in both.loras] == [("hero", 0.5), ("style", -1.5)]
    assert both.prompt == "a fox"


@pytest.mark.parametrize("kw, reason", [
    ({"loras": [{"name": "nope"}]}, "loras: no node of this farm holds LoRA 'nope'"),
    ({"loras": [{"name": "xl-look"}]}, "loras: LoRA 'xl-look' is made for sdxl models, not sd15"),
    ({"loras": [{"name": "style", "sha256": "d" * 64}]}, "loras: no node holds LoRA 'style' with sha256"),
    ({"loras": [{"name": "style"}, {"name": "style", "weight": 0.5}]}, "loras: LoRA 'style' is given twice"),
    ({"loras": [{"name": "style"}], "prompt": "fox <lora:style:0.5>"}, "LoRA 'style' is given twice"),
    ({"loras": [{"name": "style", "weight": MAX_LORA_WEIGHT + 1}]}, "loras.0.weight: Input should be less than"),
    ({"loras": [{"name": "style", "weight": float("nan")}]}, "loras.0.weight: weight must be a finite number"),
    ({"loras": [{"name": "style", "weight": True}]}, "loras.0.weight: weight must be a number, not a boolean"),
    ({"loras": [{"name": "style", "weight": "1"}]}, "loras.0.weight"),
    ({"loras": [{"name": "sty:le"}]}, "loras.0.name: String should match pattern"),
    ({"loras": [{"name": "style", "strength": 1}]}, "loras.0.strength: Extra inputs are not permitted"),
    ({"loras": "style"}, "loras: loras must be a list of {name, weight}, not str"),
    ({"loras": [{"name": f"l{i}"} for i in range(MAX_LORAS + 1)]}, f"loras: Tuple should have at most {MAX_LORAS}"),
    ({"prompt": "fox <lora:style:strong>"}, "prompt tag '<lora:style:strong>': weight 'strong' is not a number"),
    ({"prompt": "fox <lora:style:1:0.5>"}, "expected <lora:name> or <lora:name:weight>"),
    ({"prompt": "fox <lora::1>"}, "expected <lora:name> or <lora:name:weight>"),
    ({"prompt": " <lora:style:1> "}, "spec: prompt holds nothing but <lora:...> tags"),
])
def test_bad_loras_are_refused_naming_the_field_and_the_reason(kw, reason):
    assert reason in error_of(**kw)


def test_without_the_farms_loras_names_are_kept_unpinned():
    """Before any node has reported (a queue filled ahead of the farm), a LoRA cannot be checked: it is kept by
    name, and only a node holding that name takes the job."""
    s = JobSpec.validate_for({"model": "tiny-sd15", "prompt": "<lora:anything:0.5> fox"}, CATALOG)
    assert [(lo.name, lo.weight, lo.sha256) for lo in s.loras] == [("anything", 0.5, None)]


def test_the_order_loras_are_given_in_does_not_split_a_batch_but_their_weights_do():
    a = spec([{"name": "style", "weight": 0.8}, {"name": "hero"}])
    b = spec([{"name": "hero"}, {"name": "style", "weight": 0.8}])
    c = spec([{"name": "hero"}, {"name": "style", "weight": 0.7}])
    plain = spec()
    assert a.batch_key() == b.batch_key() != c.batch_key()
    assert plain.batch_key() != a.batch_key() and plain.lora_set() == ()


@given(st.text(max_size=80))
def test_prompts_without_a_tag_are_left_exactly_as_written(text):
    if "<lora:" in text:
        return
    assert lora_tags(text) == (text, [])
