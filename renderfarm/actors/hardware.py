"""Probe the device a worker really runs on and describe it as a `planning.devices.Device`.

A CUDA device describes itself (name, total memory, compute capability: `torch.cuda.get_device_properties`).
Without CUDA the worker renders on the CPU; it is described by its processor's name, with the machine's
memory as its "VRAM" (that is where the weights and activations live) and no compute capability.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceProbe:
    """What the hardware says about itself, before the planner's knowledge of cards is applied."""

    kind: str  # "cuda" or "cpu"
    index: int | None
    name: str
    memory_gib: float
    compute_capability: tuple[int, int] | None
    multiprocessors: int | None = None  # CUDA streaming multiprocessors; CPU cores for "cpu"

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def probe(index: int = 0) -> DeviceProbe:
    """The CUDA device `index` when CUDA is available, else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return probe_cpu()
    count = torch.cuda.device_count()
    if not 0 <= index < count:
        raise ValueError(f"no CUDA device {index}: this process sees {count} (CUDA_VISIBLE_DEVICES applies)")
    props = torch.cuda.get_device_properties(index)
    return DeviceProbe(
        kind="cuda",
        index=index,
        name=props.name,
        memory_gib=round(props.total_memory / 2**30, 2),
        compute_capability=(int(props.major), int(props.minor)),
        multiprocessors=int(getattr(props, "multi_processor_count", 0)) or None,
    )


def probe_cpu() -> DeviceProbe:
    return DeviceProbe(
        kind="cpu",
        index=None,
        name=f"CPU ({cpu_model_name()})",
        memory_gib=round(system_memory_bytes() / 2**30, 2),
        compute_capability=None,
        multiprocessors=os.cpu_count(),
    )


def probe_device(index: int = 0, host: dict[str, float | None] | None = None) -> Any:
    """The device this process renders on, as a `renderfarm.planning.devices.Device`, with the machine's host
    memory (`host`, as `host_memory()` reads it; read now when not given)."""
    from renderfarm.planning.devices import (
        device_from_spec,  # planning stays importable without torch
    )

    found = probe(index)
    host = host_memory() if host is None else host
    return device_from_spec(found.name, found.memory_gib, found.compute_capability, **host)


def host_memory(disk_path: str | os.PathLike | None = None) -> dict[str, float | None]:
    """`ram_gib`, `ram_available_gib` (MemAvailable: what can be had without swapping) and `disk_free_gib`
    at `disk_path`, rounded to 0.01 GiB; None for what the platform will not say."""
    total = system_memory_bytes()
    available = available_memory_bytes()
    disk = None
    if disk_path is not None:
        try:
            import shutil

            path = os.fspath(disk_path)
            while path and not os.path.exists(path):
                path = os.path.dirname(path)
            disk = shutil.disk_usage(path or ".").free
        except OSError:
            disk = None
    gib = 2**30
    return {
        "ram_gib": round(total / gib, 2) if total else None,
        "ram_available_gib": round(available / gib, 2) if available else None,
        "disk_free_gib": round(disk / gib, 2) if disk else None,
    }


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), 0 where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def cpu_model_name() -> str:
    """The processor's marketing name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def system_memory_bytes() -> int:
    """Total physical memory, 0 where the platform will not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
