"""The catalog's `pinned_factor` (planning: pinned host bytes per stored byte when a component streams with
CUDA streams) against the real Flux and SDXL architectures built on the meta device."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from renderfarm.planning.catalog import default_catalog
from tests.bench import bench_module

pinned_rounding = bench_module("pinned_rounding")

MODELS = {"flux": "flux-dev", "sdxl": "sdxl"}


def test_power_of_two_rounding():
    assert [pinned_rounding.next_power_of_two(n) for n in (1, 2, 3, 4, 5, 3 * 2**20)] == [1, 2, 4, 4, 8, 4 * 2**20]


@pytest.mark.parametrize("family", sorted(MODELS))
def test_catalog_pinned_factors_match_the_architecture(family):
    measured = pinned_rounding.factors()[family]
    entry = default_catalog().get(MODELS[family])
    for name, component in entry.components.items():
        assert component.pinned_factor == pytest.approx(measured[name], abs=0.005), name
