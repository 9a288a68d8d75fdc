"""What LoRAs cost a profile (planning/loras.py) and `renderfarm plan --lora`: the mode, the memory, the step
factor and the switch, pure planning."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from renderfarm import cli
from renderfarm.planning.catalog import default_catalog
from renderfarm.planning.devices import device_from_spec
from renderfarm.planning.loras import UNMERGED_STEP_OVERHEAD, lora_cost
from renderfarm.planning.profiles import ladder

CATALOG = default_catalog()


def lora(rank=32, size=200 * 2**20, components=("transformer",)):
    return SimpleNamespace(rank=rank, size_bytes=size, components=components, family="flux")


def profiles(model="flux-dev"):
    entry = CATALOG.get(model)
    return entry, {p.name: p for p in ladder(entry, device_from_spec("card", 24, "8.9"))}


def test_unmerged_adapters_cost_every_step_and_their_weights_on_the_card():
    entry, by_name = profiles()
    nf4 = next(p for name, p in by_name.items() if name.startswith("nf4"))
    one, three = lora_cost(entry, nf4, [(lora(), 1.0)]), lora_cost(entry, nf4, [(lora(), 1.0)] * 3)
    assert one.mode == three.mode == "unmerged" and "nf4" in one.reason
    width = next(c.width for c in entry.components.values() if c.role.value == "denoiser")
    assert one.step_factor == pytest.approx(1 + 2 * 32 / width + UNMERGED_STEP_OVERHEAD)
    assert three.step_factor - 1 == pytest.approx(3 * (one.step_factor - 1))
    assert one.device_gib == pytest.approx(200 / 1024) and one.host_gib == 0
    assert lora_cost(entry, nf4, [(lora(), 0.0)]).step_factor == 1.0  # weight 0 is left out


def test_fused_sets_cost_no_step_but_a_host_backup_and_a_patch_on_switch():
    entry, by_name = profiles()
    bf16 = next(p for name, p in by_name.items() if name.startswith("bf16") and "offload" not in name)
    fused = lora_cost(entry, bf16, [(lora(), 0.8)])
    assert fused.mode == "fused" and fused.step_factor == 1.0 and fused.device_gib == 0
    assert fused.host_gib > 200 / 1024  # the adapted layers' originals, larger than the LoRA
    assert fused.switch_s > lora_cost(entry, bf16, [(lora(), 0.8)], prefer="unmerged").switch_s
    assert lora_cost(entry, bf16, [(lora(), 0.8)], prefer="unmerged").mode == "unmerged"


def test_plan_shows_the_mode_and_cost_of_library_loras(capsys):
    assert cli.main(["plan", "--model", "tiny-sd15", "--vram", "8", "--size", "64x64",
                     "--lora", "tiny-sd15-style:0.8", "--lora", "tiny-sd15-character", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["loras"]
    assert [(lo["name"], lo["weight"]) for lo in report["loras"]] == [("tiny-sd15-style", 0.8),
                                                                        ("tiny-sd15-character", 1.0)]
    assert report["mode"] in ("fused", "unmerged") and report["step_factor"] >= 1.0
    assert report["profile"] and report["seconds_per_step"] > 0
    assert cli.main(["plan", "--model", "tiny-sd15", "--vram", "8", "--lora", "tiny-flux-style"]) == 1
    assert "LoRA 'tiny-flux-style' is made for flux models, not sd15" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "tiny-sd15", "--vram", "8", "--lora", "nope:0.5"]) == 1
    assert "--lora nope:0.5: unknown LoRA 'nope'" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "tiny-sd15", "--vram", "8", "--lora", "tiny-sd15-style:x"]) == 1
