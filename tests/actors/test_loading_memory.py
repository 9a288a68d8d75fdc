"""What loading costs in host memory, as the libraries really do it (planning/vram.py's host model relies on
it): diffusers' `from_pretrained` reads safetensors through a private memory map, so weights loaded in the
dtype their file stores stay file-backed (page cache, not the process's anonymous memory) until something
copies them; loaded in another dtype they are converted into anonymous memory. If a diffusers or safetensors
upgrade changes either, these fail and the host model must change with them."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import diffusers
import pytest
import torch

STATUS = "/proc/self/status"
pytestmark = pytest.mark.skipif(not os.path.exists(STATUS), reason="needs Linux /proc")


# Each load runs in a fresh interpreter: in a long test session the allocator reuses memory earlier tests
# freed, which hides how much a load really takes.
PROBE = """
import gc, sys, torch, diffusers
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
# a first load imports and initialises what from_pretrained needs lazily; it is not what is measured
warm = diffusers.UNet2DConditionModel.from_pretrained(sys.argv[1], torch_dtype=torch.bfloat16)
del warm
gc.collect()
before = anon()
model = diffusers.UNet2DConditionModel.from_pretrained(sys.argv[1], torch_dtype=getattr(torch, sys.argv[2]))
assert next(model.parameters()).dtype == getattr(torch, sys.argv[2])
print(anon() - before)
"""


@pytest.fixture(scope="module")
def saved_bf16(tmp_path_factory):
    """A ~137M-parameter UNet saved in bf16 (550 MB in fp32: large against the noise of a process)."""
    folder = tmp_path_factory.mktemp("unet-bf16")
    model = diffusers.UNet2DConditionModel(block_out_channels=(128, 256, 512, 512), cross_attention_dim=256)
    model.to(torch.bfloat16).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return folder, params


def grown_by_loading(folder, dtype: str) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(folder), dtype], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.strip().splitlines()[-1])


def test_weights_loaded_in_their_stored_dtype_stay_memory_mapped(saved_bf16):
    folder, params = saved_bf16
    grown = grown_by_loading(folder, "bfloat16")
    assert grown < 0.25 * params * 2, grown  # file-backed, not copied


def test_weights_converted_at_load_land_in_anonymous_memory(saved_bf16):
    folder, params = saved_bf16
    grown = grown_by_loading(folder, "float32")
    assert grown > 0.8 * params * 4, grown
