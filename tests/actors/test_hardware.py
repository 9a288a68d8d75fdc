"""Probing the device a worker runs on: a real CUDA card (gpu tests), the CPU, and a faked CUDA device."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from renderfarm.actors import hardware


def test_cpu_probe_describes_the_processor_and_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    found = hardware.probe()
    assert found.kind == "cpu" and found.index is None and found.torch_device == "cpu"
    assert found.name.startswith("CPU (") and found.name != "CPU ()"
    assert found.memory_gib > 0
    assert found.compute_capability is None
    assert found.multiprocessors == hardware.os.cpu_count()


def _fake_cuda(monkeypatch, count=2):
    props = types.SimpleNamespace(
        name="NVIDIA GeForce RTX 3070", total_memory=8 * 2**30 - 123 * 2**20, major=8, minor=6,
        multi_processor_count=46,
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)


def test_cuda_probe_reads_name_memory_and_compute_capability(monkeypatch):
    _fake_cuda(monkeypatch)
    found = hardware.probe(1)
    assert found == hardware.DeviceProbe(
        kind="cuda", index=1, name="NVIDIA GeForce RTX 3070", memory_gib=7.88, compute_capability=(8, 6),
        multiprocessors=46,
    )
    assert found.torch_device == "cuda:1"
    with pytest.raises(ValueError, match="no CUDA device 2: this process sees 2"):
        hardware.probe(2)


def test_probe_device_builds_a_planning_device_from_the_probe(monkeypatch):
    calls = []
    fake = types.ModuleType("renderfarm.planning.devices")
    fake.device_from_spec = lambda name, vram_gib, compute_capability, **host: calls.append(
        (name, vram_gib, compute_capability, host)
    ) or "device"
    monkeypatch.setitem(sys.modules, "renderfarm.planning.devices", fake)
    _fake_cuda(monkeypatch)
    assert hardware.probe_device(0) == "device"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    hardware.probe_device()
    assert calls[0][:3] == ("NVIDIA GeForce RTX 3070", 7.88, (8, 6))
    assert calls[1][0].startswith("CPU (") and calls[1][2] is None
    # the machine's RAM comes along: total, and what is available now
    host = calls[0][3]
    assert set(host) == {"ram_gib", "ram_available_gib", "disk_free_gib"}
    assert host["ram_gib"] > 0 and 0 < host["ram_available_gib"] <= host["ram_gib"]


def test_host_memory_reports_ram_and_the_disk_where_the_cache_lives(tmp_path):
    host = hardware.host_memory(tmp_path / "not-yet" / "made")  # an unborn cache folder: its parent's disk
    assert host["ram_gib"] == pytest.approx(hardware.system_memory_bytes() / 2**30, abs=0.01)
    assert 0 < host["ram_available_gib"] <= host["ram_gib"]
    assert host["disk_free_gib"] > 0
    assert hardware.host_memory()["disk_free_gib"] is None


def test_probe_device_with_the_real_planning_module(monkeypatch):
    from renderfarm.planning import devices

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cpu = hardware.probe_device()
    assert isinstance(cpu, devices.Device)
    assert cpu.compute_capability is None and cpu.vram_gib > 0
    _fake_cuda(monkeypatch)
    card = hardware.probe_device(0)
    assert card.compute_capability == (8, 6) and card.vram_gib == 7.88 and card.bf16_native


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_device():
    found = hardware.probe(0)
    props = torch.cuda.get_device_properties(0)
    assert found.kind == "cuda" and found.name == props.name
    assert found.compute_capability == (props.major, props.minor)
    assert abs(found.memory_gib - props.total_memory / 2**30) < 0.01
