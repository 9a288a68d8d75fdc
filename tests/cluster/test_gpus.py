"""gpu_count() without torch: NVML through Ray's copy, else `nvidia-smi -L`, capped by CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from renderfarm.cluster import gpus
from renderfarm.cluster.gpus import gpu_count


def test_gpu_count_without_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    count = gpu_count()
    assert isinstance(count, int) and count >= 0
    if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidia0"):
        assert count == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_count() == 0


def test_gpu_count_falls_back_to_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setattr(gpus, "_nvml_gpu_count", lambda: None)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gpu_count() == 1
