import pytest

from renderfarm.cluster.keys import Keys
from renderfarm.config import ConfigError, Settings, load_nodes
from renderfarm.jobs import JobState
from renderfarm.planning.catalog import Catalog, UnknownModelError, default_catalog


def test_catalog_has_real_models_and_standins_of_each_family():
    cat = default_catalog()
    for name in ("flux-dev", "flux-schnell", "sdxl", "sd15"):
        assert not cat.get(name).standin and cat.get(name).source
    families = {cat.get(n).family.name for n in ("tiny-sd15", "tiny-sdxl", "tiny-flux")}
    assert families == {"sd15", "sdxl", "flux"}
    assert cat.get("flux-dev").family.size_multiple == 16


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="known models: .*tiny-sd15"):
        default_catalog().get("sd9")


def test_catalog_rejects_a_model_of_an_unknown_family():
    with pytest.raises(ValueError, match="models.x.family: 'dalle'"):
        Catalog.from_dict({"families": {}, "models": {"x": {"family": "dalle"}}})


def test_keys_one_style_one_prefix():
    keys = Keys("rf")
    built = [keys.job("a"), keys.result("a"), keys.batch("b"), keys.node("n"), keys.nodes,
             keys.events, keys.metrics("m"), *keys.all_indexes()]
    assert all(k.startswith("rf:") for k in built)
    assert len(set(built)) == len(built)
    assert keys.index(JobState.QUEUED) == keys.pending == "rf:pending"
    assert Keys("test").job("x") == "test:job:x"
    with pytest.raises(ValueError):
        Keys("a:b")


def test_settings_precedence_file_env_override(tmp_path, monkeypatch):
    f = tmp_path / "farm.yaml"
    f.write_text("max_batch: 4\nmax_attempts: 5\n")
    monkeypatch.setenv("RENDERFARM_MAX_ATTEMPTS", "7")
    s = Settings.load(f, lease_seconds=12)
    assert (s.max_batch, s.max_attempts, s.lease_seconds) == (4, 7, 12)


def test_settings_errors_name_file_and_field(tmp_path):
    f = tmp_path / "farm.yaml"
    f.write_text("max_batch: 0\nnot_a_field: 1\n")
    with pytest.raises(ConfigError) as info:
        Settings.load(f)
    assert str(f) in str(info.value) and "max_batch" in str(info.value) and "not_a_field" in str(info.value)


def test_nodes_file(tmp_path):
    nodes = load_nodes()  # the packaged example
    assert [n.vram_gib for n in nodes] == [24, 8]
    bad = tmp_path / "nodes.yaml"
    bad.write_text("nodes:\n  - {name: a, vram_gib: -1}\n")
    with pytest.raises(ConfigError, match=r"nodes\[0\]: vram_gib"):
        load_nodes(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text("nodes:\n  - {name: a, vram_gib: 8}\n  - {name: a, vram_gib: 8}\n")
    with pytest.raises(ConfigError, match="unique"):
        load_nodes(dup)


# --- components -------------------------------------------------------------------------------------


def test_every_family_lists_its_components_and_geometry():
    cat = default_catalog()
    expected = {
        "flux-dev": {"transformer": 11.9e9, "text_encoder": 123e6, "text_encoder_2": 4.76e9, "vae": 84e6},
        "sdxl": {"unet": 2.57e9, "text_encoder": 123e6, "text_encoder_2": 694e6, "vae": 84e6},
        "sd15": {"unet": 860e6, "text_encoder": 123e6, "vae": 84e6},
        "sd3.5-large": {"transformer": 8.1e9, "text_encoder": 123e6, "text_encoder_2": 694e6,
                        "text_encoder_3": 4.76e9, "vae": 84e6},
    }
    for name, params in expected.items():
        entry = cat.get(name)
        assert {n: pytest.approx(p, rel=0.01) for n, p in params.items()} == {
            n: c.params for n, c in entry.components.items()
        }
        assert entry.denoiser.role.value == "denoiser" and entry.vae is not None
    assert cat.get("flux-dev").family.latent_channels == 16 and cat.get("sdxl").family.latent_channels == 4
    assert cat.get("flux-dev").family.latent_tokens(1024, 1024) == 4096  # 1/8, then 2x2 patches
    assert cat.get("sdxl").family.latent_tokens(1024, 1024) == 128 * 128
    sd3 = cat.get("sd3.5-large")
    assert (sd3.family.pipeline, sd3.family.size_multiple, sd3.family.uses_cfg) == ("StableDiffusion3Pipeline", 16, True)


def test_a_model_overrides_its_familys_components():
    cat = default_catalog()
    medium, large = cat.get("sd3.5-medium").components, cat.get("sd3.5-large").components
    assert medium["transformer"].params == 2.5e9 and medium["transformer"].width == 1536
    assert medium["text_encoder_3"] == large["text_encoder_3"]  # untouched components are the family's


def test_real_models_list_gguf_files_by_normalised_type():
    flux = default_catalog().get("flux-dev")
    assert set(flux.gguf_sources) >= {"q8_0", "q4_1", "q4_0"}
    data = {
        "families": {"sd15": {"pipeline": "StableDiffusionPipeline", "size_multiple": 8, "uses_cfg": True}},
        "models": {"m": {"family": "sd15", "gguf_sources": {"Q8_0": "a.gguf", "gguf-q4_1": "b.gguf"}}},
    }
    assert Catalog.from_dict(data).get("m").gguf_sources == {"q8_0": "a.gguf", "q4_1": "b.gguf"}
    data["models"]["m"]["gguf_sources"] = {"q3_k": "c.gguf"}
    with pytest.raises(ValueError, match=r"unknown GGUF type\(s\) \['q3_k'\]"):
        Catalog.from_dict(data)


def test_catalog_rejects_bad_components():
    family = {"pipeline": "StableDiffusionPipeline", "size_multiple": 8, "uses_cfg": True,
              "components": {"unet": {"role": "denoiser", "params": 1e6, "width": 64}}}
    with pytest.raises(ValueError, match=r"models.m.components: \['vae'\] not among"):
        Catalog.from_dict({"families": {"sd15": family}, "models": {"m": {"family": "sd15", "components": {"vae": {}}}}})
    bad = dict(family, components={"unet": {"role": "denoiser", "params": 1e6, "width": 64,
                                            "unquantized_params": {"fp8": 2e6}}})
    with pytest.raises(ValueError, match="exceed params"):
        Catalog.from_dict({"families": {"sd15": bad}, "models": {}})
    bad = dict(family, components={"unet": {"role": "denoiser", "params": 1e6, "width": 64,
                                            "unquantized_params": {"int8": 1}}})
    with pytest.raises(ValueError, match="unknown method"):
        Catalog.from_dict({"families": {"sd15": bad}, "models": {}})


def test_a_catalog_without_components_still_loads_but_cannot_be_planned():
    cat = Catalog.from_dict({
        "families": {"sd15": {"pipeline": "StableDiffusionPipeline", "size_multiple": 8, "uses_cfg": True}},
        "models": {"m": {"family": "sd15", "standin": True}},
    })
    with pytest.raises(ValueError, match="0 denoiser components"):
        _ = cat.get("m").denoiser


def test_entries_stay_hashable():
    cat = default_catalog()
    assert len({cat.get("sd15"), cat.get("sd15"), cat.get("sdxl")}) == 2
    assert hash(cat.get("flux-dev").family) == hash(cat.get("flux-schnell").family)
