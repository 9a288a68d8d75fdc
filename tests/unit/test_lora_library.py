"""The LoRA library (renderfarm/loras/library.py): family, key style and rank told from real key names and
widths of each family, in hand-written tiny safetensors files; hashes and their cache; `renderfarm loras`.

The files are written with safetensors' own writer (numpy, no torch), with the key names real LoRAs carry:
kohya's sd-scripts (`lora_unet_...`, `lora_te1_...`, BFL Flux names) and diffusers/PEFT (`unet.` /
`transformer.` / `text_encoder.` ... `lora_A` / `lora_B`, and the older `lora.down` / processor forms)."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from renderfarm.cli import main
from renderfarm.loras import (
    FAMILIES,
    LoraError,
    LoraInfo,
    LoraLibrary,
    UnknownLoraError,
    hash_file,
    read_header,
)
from renderfarm.planning.catalog import default_catalog


def lora(path, layers: dict[str, tuple[int, int]], style: str, rank: int = 4, alpha: float | None = None,
         metadata: dict[str, str] | None = None, extra: dict[str, np.ndarray] | None = None):
    """Write a LoRA: `layers` maps each layer's key stem to its (in, out) width; `style` picks the suffixes."""
    down, up = {"kohya": ("lora_down.weight", "lora_up.weight"),
                "peft": ("lora_A.weight", "lora_B.weight"),
                "old": ("lora.down.weight", "lora.up.weight"),
                "processor": ("down.weight", "up.weight")}[style]
    sep = "_lora." if style == "processor" else "."
    rng = np.random.default_rng(len(layers) + rank)
    tensors = {}
    for stem, (fan_in, fan_out) in layers.items():
        tensors[f"{stem}{sep}{down}"] = rng.standard_normal((rank, fan_in)).astype(np.float16)
        tensors[f"{stem}{sep}{up}"] = rng.standard_normal((fan_out, rank)).astype(np.float16)
        if alpha is not None:
            tensors[f"{stem}.alpha"] = np.array(alpha, dtype=np.float16)
    tensors.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def library(folder, tmp_path) -> LoraLibrary:
    return LoraLibrary(folder, hash_cache=tmp_path / "cache" / "lora-hashes.json")


# Real layer names and widths of each family and style (SD 1.5: 320-wide first level, 768-wide CLIP-L text;
# SDXL: 2048-wide text, CLIP-bigG 1280; Flux: 3072; SD3 Medium: 1536).
CASES = {
    "sd15-kohya": ("kohya", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (768, 320),
        "lora_unet_up_blocks_3_attentions_2_proj_out": (320, 320),
        "lora_te_text_model_encoder_layers_11_self_attn_q_proj": (768, 768),
        "lora_te_text_model_encoder_layers_11_mlp_fc1": (768, 3072),
    }, "sd15", ("text_encoder", "unet")),
    "sd15-peft": ("peft", {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (768, 320),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q": (1280, 1280),
    }, "sd15", ("unet",)),
    "sd15-processor": ("processor", {
        # the attention-processor keys of early diffusers LoRAs, without a component prefix
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q": (320, 320),
    }, "sd15", ("unet",)),
    "sdxl-kohya": ("kohya", {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (2048, 640),
        "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2": (5120, 1280),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }, "sdxl", ("text_encoder", "text_encoder_2", "unet")),
    "sdxl-old-diffusers": ("old", {
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": (640, 640),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": (1280, 1280),
    }, "sdxl", ("text_encoder_2", "unet")),
    "flux-peft": ("peft", {
        "transformer.transformer_blocks.0.attn.to_q": (3072, 3072),
        "transformer.single_transformer_blocks.37.proj_mlp": (3072, 12288),
    }, "flux", ("transformer",)),
    "flux-kohya": ("kohya", {
        "lora_unet_double_blocks_0_img_attn_qkv": (3072, 9216),
        "lora_unet_single_blocks_37_linear2": (15360, 3072),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (768, 768),
    }, "flux", ("text_encoder", "transformer")),
    "sd3-peft": ("peft", {
        "transformer.transformer_blocks.23.attn.to_q": (1536, 1536),
        "transformer.transformer_blocks.23.attn.add_k_proj": (1536, 1536),
    }, "sd3", ("transformer",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_style_rank_and_components_from_real_keys(tmp_path, case):
    style, layers, family, components = CASES[case]
    lora(tmp_path / "lib" / f"{case}.safetensors", layers, style, rank=8, alpha=4.0 if style == "kohya" else None)
    info = library(tmp_path / "lib", tmp_path).get(case)
    assert (info.family, info.rank, info.components) == (family, 8, components)
    assert info.style == ("kohya" if style == "kohya" else "diffusers")


def test_an_sd3_lora_in_kohya_keys_is_told_and_refused_since_diffusers_would_load_nothing(tmp_path):
    path = lora(tmp_path / "lib" / "mmdit.safetensors", {
        "lora_unet_joint_blocks_0_x_block_attn_qkv": (1536, 4608),  # sd-scripts' SD3 names
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": (1280, 1280),
    }, "kohya", alpha=2.0)
    with pytest.raises(LoraError, match="an SD3 LoRA in kohya keys, which diffusers does not convert") as caught:
        library(tmp_path / "lib", tmp_path).get("mmdit")
    assert str(path) in str(caught.value)


def test_rank_is_the_largest_among_the_layers(tmp_path):
    folder = tmp_path / "lib"
    path = lora(folder / "mixed.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320)},
                "kohya", rank=4)
    header = read_header(path)
    assert header.tensors["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"][1] == (4, 320)
    lora(folder / "mixed.safetensors", {"lora_unet_down_blocks_0_attentions_0_proj_in": (320, 320)}, "kohya",
         rank=4, extra={"lora_unet_up_blocks_1_attentions_0_proj_in.lora_down.weight": np.zeros((16, 1280), np.float16),
                        "lora_unet_up_blocks_1_attentions_0_proj_in.lora_up.weight": np.zeros((1280, 16), np.float16)})
    assert library(folder, tmp_path).get("mixed").rank == 16


def test_the_tiny_widths_of_a_transformer_cannot_tell_flux_from_sd3(tmp_path):
    folder = tmp_path / "lib"
    path = lora(folder / "vague.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (64, 64)}, "peft")
    lora(folder / "fine.safetensors", {"transformer.single_transformer_blocks.0.attn.to_q": (64, 64)}, "peft")
    lib = library(folder, tmp_path)
    assert lib.names() == ["fine"]  # listed apart, not fatal to the rest
    [problem] = lib.problems
    assert problem.name == "vague" and problem.path == str(path)
    assert str(path) in problem.error and "cannot tell its model family" in problem.error
    assert "Flux from SD3" in problem.error
    with pytest.raises(LoraError, match="LoRA 'vague' cannot be used: .*vague.safetensors: cannot tell"):
        lib.get("vague")


@pytest.mark.parametrize("layers,style,expected", [
    # An SD UNet LoRA in diffusers keys at widths no real model has, no text encoder: SD 1.5 or SDXL?
    ({"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (64, 64)}, "peft",
     "neither its layer names nor its widths tell SD 1.5 from SDXL"),
    ({"text_encoder.text_model.encoder.layers.0.self_attn.q_proj": (768, 768)}, "peft",
     "text encoders only"),
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (1024, 320)}, "peft",
     "an SD 2.x LoRA .*1024-wide text.*no SD 2 family"),
    # names of SD 1.5 (attention at the first level) and a width of SDXL (2048-wide text) in one file
    ({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (2048, 320)}, "peft",
     "more than one family: sd15 .* sdxl"),
    ({"model.diffusion_model.input_blocks.0.0": (4, 320)}, "peft", "names no pipeline component"),
])
def test_what_cannot_be_told_is_refused_naming_the_file_and_why(tmp_path, layers, style, expected):
    path = lora(tmp_path / "lib" / "unclear.safetensors", layers, style)
    lib = library(tmp_path / "lib", tmp_path)
    with pytest.raises(LoraError, match=expected) as caught:
        lib.get("unclear")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("tensors,expected", [
    ({"model.diffusion_model.out.2.weight": np.zeros((4, 320), np.float16)}, "neither a diffusers/PEFT LoRA key"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": np.zeros((4, 320), np.float16)},
     "no LoRA down/up .*LyCORIS"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 320), np.float16)},
     "has no up \\(B\\) weight"),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.zeros((4, 320), np.float16),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": np.zeros((320, 4), np.float16),
      "unet.down_blocks.0.attentions.0.proj_out.lora_A.weight": np.zeros((4, 320), np.float16),
      "unet.down_blocks.0.attentions.0.proj_out.lora_B.weight": np.zeros((320, 4), np.float16)}, "mixes diffusers"),
])
def test_files_that_are_not_usable_loras_are_refused(tmp_path, tensors, expected):
    path = tmp_path / "lib" / "odd.safetensors"
    path.parent.mkdir()
    save_file(tensors, str(path))
    with pytest.raises(LoraError, match=expected):
        library(tmp_path / "lib", tmp_path).get("odd")


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "lib"
    good = lora(folder / "good.safetensors", CASES["sd15-kohya"][1], "kohya")
    (folder / "partial.safetensors").write_bytes(good.read_bytes()[:-100])  # a copy cut short
    (folder / "short.safetensors").write_bytes(good.read_bytes()[:100])
    (folder / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    (folder / "empty.safetensors").write_bytes(b"")
    lib = library(folder, tmp_path)
    assert lib.names() == ["good"]
    errors = {p.name: p.error for p in lib.problems}
    assert "incomplete or damaged" in errors["partial"] and str(folder / "partial.safetensors") in errors["partial"]
    assert "incomplete or damaged" in errors["short"]
    assert "header is not JSON" in errors["junk"]
    assert "not a safetensors file" in errors["empty"]


def test_duplicate_names_are_refused_clearly(tmp_path):
    folder = tmp_path / "lib"
    style, layers = CASES["sdxl-kohya"][:2]
    lora(folder / "characters" / "hero.safetensors", layers, style)
    lora(folder / "archive" / "Hero.safetensors", layers, style)  # the same name on a case-blind share
    lora(folder / "styles" / "ink.safetensors", layers, style)
    (folder / ".hidden").mkdir()
    lora(folder / ".hidden" / "ink.safetensors", layers, style)  # hidden folders are not part of the library
    lib = library(folder, tmp_path)
    assert lib.names() == ["ink"]
    assert sorted(p.name for p in lib.problems) == ["Hero", "hero"]
    for problem in lib.problems:
        assert "duplicate LoRA name" in problem.error
        assert "archive/Hero.safetensors" in problem.error and "characters/hero.safetensors" in problem.error
    with pytest.raises(LoraError, match="duplicate LoRA name 'hero'"):
        lib.get("hero")


def test_unknown_names_list_the_known_ones(tmp_path):
    lora(tmp_path / "lib" / "ink.safetensors", CASES["flux-peft"][1], "peft")
    lib = library(tmp_path / "lib", tmp_path)
    with pytest.raises(UnknownLoraError, match="unknown LoRA 'paint' .*known LoRAs: ink"):
        lib.get("paint")
    assert "ink" in lib and "paint" not in lib
    with pytest.raises(LoraError, match="does not exist"):
        LoraLibrary(tmp_path / "nowhere", hash_cache=tmp_path / "h.json").scan()


def test_names_that_cannot_be_written_in_a_prompt_are_refused(tmp_path):
    lora(tmp_path / "lib" / "a:b.safetensors", CASES["flux-peft"][1], "peft")
    [problem] = library(tmp_path / "lib", tmp_path).problems
    assert "<lora:name:weight>" in problem.error


def test_info_is_json_and_its_families_are_the_catalogs():
    assert set(FAMILIES) == {family.name for family in {m.family for m in default_catalog().models.values()}}
    info = LoraInfo(name="ink", path="/x/ink.safetensors", family="flux", style="kohya", rank=16,
                    components=("transformer",), size_bytes=10, sha256="0" * 64, short_hash="0" * 12)
    assert LoraInfo.model_validate_json(info.model_dump_json()) == info
    assert json.loads(info.model_dump_json())["components"] == ["transformer"]


def a1111_lora_hash(path) -> str:
    """A1111's `addnet_hash_safetensors` (modules/hashes.py), then `shorthash = hash[0:12]` (network.py)."""
    digest = hashlib.sha256()
    with open(path, "rb") as b:
        n = int.from_bytes(b.read(8), "little")
        b.seek(n + 8)
        for chunk in iter(lambda: b.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()[0:12]


def test_hashes_are_the_whole_files_and_a1111s(tmp_path):
    folder = tmp_path / "lib"
    path = lora(folder / "ink.safetensors", CASES["sd15-kohya"][1], "kohya", metadata={"ss_output_name": "ink"})
    info = library(folder, tmp_path).get("ink")
    assert info.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info.short_hash == a1111_lora_hash(path)
    assert info.size_bytes == path.stat().st_size
    assert hash_file(path) == (info.sha256, info.short_hash)
    # A metadata edit makes another file but keeps A1111's hash, which covers the tensors only.
    lora(folder / "ink.safetensors", CASES["sd15-kohya"][1], "kohya", metadata={"ss_output_name": "renamed"})
    again = library(folder, tmp_path).get("ink")
    assert again.sha256 != info.sha256 and again.short_hash == info.short_hash


def test_the_hash_cache_is_used_while_size_and_mtime_hold_and_dropped_when_they_change(tmp_path):
    folder = tmp_path / "lib"
    cache_file = tmp_path / "cache" / "lora-hashes.json"
    path = lora(folder / "ink.safetensors", CASES["flux-kohya"][1], "kohya", rank=4)
    first = library(folder, tmp_path).get("ink")
    cached = json.loads(cache_file.read_text())["files"][str(path)]
    assert (cached["sha256"], cached["size"], cached["mtime_ns"]) == (first.sha256, path.stat().st_size,
                                                                      path.stat().st_mtime_ns)

    # Unchanged file: the cached hashes are taken as they are, the file is not read again. Proven by planting
    # a value no file hashes to.
    data = json.loads(cache_file.read_text())
    data["files"][str(path)]["sha256"] = "f" * 64
    cache_file.write_text(json.dumps(data))
    assert library(folder, tmp_path).get("ink").sha256 == "f" * 64

    # Same size, other bytes, another mtime (a file rewritten in place): hashed again.
    before = path.stat()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    changed = library(folder, tmp_path).get("ink")
    assert changed.size_bytes == first.size_bytes
    assert changed.sha256 == hashlib.sha256(bytes(raw)).hexdigest() != first.sha256
    assert changed.short_hash == a1111_lora_hash(path) != first.short_hash

    # Another size (retrained at another rank): hashed again; a deleted file leaves the cache.
    lora(folder / "ink.safetensors", CASES["flux-kohya"][1], "kohya", rank=8)
    assert library(folder, tmp_path).get("ink").sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    path.unlink()
    assert library(folder, tmp_path).names() == []
    assert str(path) not in json.loads(cache_file.read_text())["files"]


def test_an_unreadable_hash_cache_is_rebuilt(tmp_path):
    folder = tmp_path / "lib"
    path = lora(folder / "ink.safetensors", CASES["flux-peft"][1], "peft")
    cache_file = tmp_path / "cache" / "lora-hashes.json"
    cache_file.parent.mkdir()
    cache_file.write_text("{ not json")
    assert library(folder, tmp_path).get("ink").sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(path) in json.loads(cache_file.read_text())["files"]


def test_cli_json_lists_loras_and_problems(tmp_path, capsys):
    folder = tmp_path / "lib"
    lora(folder / "ink.safetensors", CASES["sdxl-kohya"][1], "kohya", rank=8, alpha=4.0)
    lora(folder / "hero.safetensors", CASES["flux-peft"][1], "peft", rank=16)
    bad = lora(folder / "vague.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (64, 64)}, "peft")
    assert main(["loras", "--dir", str(folder), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1, out
    doc = json.loads(out[0])
    assert doc["ok"] is True and doc["dir"] == str(folder)
    rows = {row["name"]: row for row in doc["loras"]}
    assert sorted(rows) == ["hero", "ink"]
    assert (rows["ink"]["family"], rows["ink"]["style"], rows["ink"]["rank"]) == ("sdxl", "kohya", 8)
    assert (rows["hero"]["family"], rows["hero"]["style"], rows["hero"]["rank"]) == ("flux", "diffusers", 16)
    assert rows["ink"]["short_hash"] == a1111_lora_hash(folder / "ink.safetensors")
    assert rows["ink"]["size_bytes"] == (folder / "ink.safetensors").stat().st_size
    [problem] = doc["problems"]
    assert problem["name"] == "vague" and problem["path"] == str(bad) and "cannot tell" in problem["error"]


def test_cli_text_lists_problems_and_reads_lora_dir_from_settings(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "lib"
    lora(folder / "ink.safetensors", CASES["sd15-kohya"][1], "kohya")
    lora(folder / "vague.safetensors", {"transformer.transformer_blocks.0.attn.to_q": (64, 64)}, "peft")
    monkeypatch.setenv("RENDERFARM_LORA_DIR", str(folder))
    assert main(["loras"]) == 0
    text = capsys.readouterr().out
    assert "ink" in text and "sd15" in text and "kohya" in text
    assert "1 file cannot be used:" in text and "vague:" in text and "cannot tell" in text


def test_cli_refuses_a_missing_folder(tmp_path, capsys):
    assert main(["loras", "--dir", str(tmp_path / "nowhere"), "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False and "nowhere" in doc["error"] and "does not exist" in doc["error"]
