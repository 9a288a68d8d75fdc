"""What loading costs in host memory, as the libraries really do it (planning/vram.py's host model relies on
it): diffusers' `from_pretrained` reads safetensors through a private memory map, so weights loaded in the
dtype their file stores stay file-backed (page cache, not the process's anonymous memory) until something
copies them; loaded in another dtype they are converted into anonymous memory. If a diffusers or safetensors
upgrade changes either, these fail and the host model must change with them."""

from __future__ import annotations

import gc
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers
import pytest
import torch

STATUS = "/proc/self/status"
pytestmark = pytest.mark.skipif(not os.path.exists(STATUS), reason="needs Linux /proc")


def anon_bytes() -> int:
    with open(STATUS) as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.fixture(scope="module")
def saved_bf16(tmp_path_factory):
    """A ~100M-parameter UNet saved in bf16 (400 MB in fp32: large against the noise of the process)."""
    folder = tmp_path_factory.mktemp("unet-bf16")
    model = diffusers.UNet2DConditionModel(block_out_channels=(128, 256, 512, 512), cross_attention_dim=256)
    model.to(torch.bfloat16).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return folder, params


def load(folder, dtype):
    gc.collect()
    before = anon_bytes()
    model = diffusers.UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    grown = anon_bytes() - before
    return model, grown


def test_weights_loaded_in_their_stored_dtype_stay_memory_mapped(saved_bf16):
    folder, params = saved_bf16
    model, grown = load(folder, torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert grown < 0.25 * params * 2, grown  # file-backed, not copied


def test_weights_converted_at_load_land_in_anonymous_memory(saved_bf16):
    folder, params = saved_bf16
    model, grown = load(folder, torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    assert grown > 0.8 * params * 4, grown
