"""How many NVIDIA GPUs this process can use, without importing torch (the farm plans one worker per GPU)."""

from __future__ import annotations

import os
import shutil
import subprocess

__all__ = ["gpu_count"]


def gpu_count() -> int:
    """NVIDIA GPUs visible to this process, without importing torch.

    Honors CUDA_VISIBLE_DEVICES. Asks NVML through the copy Ray ships (what Ray itself uses to count GPUs);
    only when NVML cannot be loaded or queried, counts the lines of `nvidia-smi -L`; 0 when neither works.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return 0
    count = _nvml_gpu_count()
    if count is None:
        count = _nvidia_smi_gpu_count()
    if visible is not None:
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def _nvml_gpu_count() -> int | None:
    try:
        from ray._private.thirdparty import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no library: ask nvidia-smi
        return None
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _nvidia_smi_gpu_count() -> int:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    if out.returncode != 0:
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
