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
