"""Devices: what a card can hold and how fast it is, as plain data for planning (no torch).

A `Device` comes from a nodes file (`device_from_declaration`), from a worker's probe of its real hardware
(`device_from_spec`, see actors/hardware.py) or from a test. Its throughput figures only feed rough
estimates (seconds per step, offload streaming); what fits is decided by `vram_gib` and the compute
capability alone.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from renderfarm.config import NodeDeclaration
from renderfarm.errors import CorruptRecord

DeviceKind = Literal["cuda", "cpu"]

# Host memory a worker cannot give to weights: the operating system and a desktop (~2 GiB on a lean PC),
# plus the worker's runtime (Python, torch with its CUDA libraries, diffusers, transformers, Ray: ~1.5 GiB
# resident before any model loads).
HOST_RUNTIME_GIB = 1.5
HOST_RESERVED_GIB = 2.0 + HOST_RUNTIME_GIB
ComputeCapability = tuple[int, int]


@dataclass(frozen=True)
class Device:
    name: str
    vram_gib: float  # for a CPU device: the memory the worker may use
    compute_capability: ComputeCapability | None  # None for a CPU
    kind: DeviceKind = "cuda"
    # Dense fp16/bf16 tensor-core TFLOPS with fp32 accumulation (what PyTorch matmuls run at; GeForce cards
    # do this at half their fp16-accumulate rate). For a CPU: its fp32 rate.
    fp16_tflops: float = 40.0
    memory_gbps: float = 500.0
    pcie_gbps: float = 31.5  # host -> device link, one direction, as specified (not as measured)
    figures_from: str = "defaults"  # where the throughput figures came from, for `renderfarm plan`
    # Host memory: the machine's RAM in GiB (None: not known, so not planned against), and what was free when
    # the worker started. Offloaded weights live there (model offload, pinned streaming buffers, the pipeline
    # cache), so on an 8 GB card in a 16 GB PC it is as scarce as VRAM.
    ram_gib: float | None = None
    ram_available_gib: float | None = None
    # Free disk in the worker's cache folder (where disk offload writes a denoiser's blocks), and the rate it
    # reads large files at.
    disk_free_gib: float | None = None
    disk_gbps: float = 2.0  # a PCIe 3/4 NVMe SSD; a SATA SSD is ~0.5

    def __post_init__(self) -> None:
        if self.vram_gib <= 0:
            raise ValueError(f"device {self.name!r}: vram_gib must be positive, got {self.vram_gib}")
        if (self.kind == "cpu") != (self.compute_capability is None):
            raise ValueError(f"device {self.name!r}: a compute capability is given for CUDA devices only")
        for field in ("ram_gib", "ram_available_gib", "disk_free_gib"):
            value = getattr(self, field)
            if value is not None and value <= 0:
                raise ValueError(f"device {self.name!r}: {field} must be positive, got {value}")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    @property
    def bf16_native(self) -> bool:
        """Ampere (8.0) and later compute in bf16 at full speed; Turing and older have no bf16 units."""
        return self.compute_capability is not None and self.compute_capability >= (8, 0)

    @property
    def fp8_compute(self) -> bool:
        """Ada (8.9) and Hopper (9.0) have fp8 tensor cores. Planning stores fp8 on every card anyway
        (layerwise upcast), so this only informs estimates and reports."""
        return self.compute_capability is not None and self.compute_capability >= (8, 9)

    @property
    def cc_text(self) -> str | None:
        if self.compute_capability is None:
            return None
        major, minor = self.compute_capability
        return f"{major}.{minor}"

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "vram_gib": self.vram_gib,
            "compute_capability": self.cc_text,
            "bf16_native": self.bf16_native,
            "fp8_compute": self.fp8_compute,
            "fp16_tflops": self.fp16_tflops,
            "memory_gbps": self.memory_gbps,
            "pcie_gbps": self.pcie_gbps,
            "figures_from": self.figures_from,
            "ram_gib": self.ram_gib,
            "ram_available_gib": self.ram_available_gib,
            "disk_free_gib": self.disk_free_gib,
        }

    @property
    def host_budget_gib(self) -> float | None:
        """Host memory a worker may fill with weights: the RAM, less what the operating system and the worker's
        own runtime hold, and never more than was free when it started. None when the RAM is not known."""
        if self.ram_gib is None:
            return None
        budget = self.ram_gib - HOST_RESERVED_GIB
        if self.ram_available_gib is not None:
            budget = min(budget, self.ram_available_gib - HOST_RUNTIME_GIB)
        return max(0.0, budget)


def parse_compute_capability(value: str | ComputeCapability) -> ComputeCapability:
    """ "8.6" (or (8, 6)) -> (8, 6). Raises ValueError naming the bad value."""
    if isinstance(value, tuple):
        if len(value) == 2 and all(isinstance(v, int) and v >= 0 for v in value):
            return (value[0], value[1])
        raise ValueError(f"compute capability must be (major, minor), got {value!r}")
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", str(value))
    if not match:
        raise ValueError(f"compute capability must look like '8.6' (major.minor), got {value!r}")
    return int(match[1]), int(match[2])


# --- known cards -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CardSpec:
    name: str
    pattern: str  # regex over the normalised device name (lower case, '-'/'_' read as spaces)
    vram_gib: float
    compute_capability: ComputeCapability
    fp16_tflops: float
    memory_gbps: float
    pcie_gbps: float


_PCIE3_X16, _PCIE4_X8, _PCIE4_X16, _PCIE5_X16 = 15.75, 15.75, 31.5, 63.0

# Figures from NVIDIA's public datasheets and architecture whitepapers (Turing, GA102 Ampere, Ada Lovelace,
# A100, H100/H200, L4/L40S). TFLOPS are dense (no sparsity) fp16 tensor with fp32 accumulate; GeForce
# figures without a published fp32-accumulate number are derived from the published fp16/fp8 tensor rates
# (SMs x boost clock) and halved as on the other GeForce parts. Memory in GB/s; PCIe = link generation x
# lanes per direction. Rough by design: they only feed estimates.
KNOWN_CARDS: tuple[CardSpec, ...] = (
    CardSpec("Quadro RTX 6000", r"quadro rtx 6000", 24, (7, 5), 130.5, 672, _PCIE3_X16),
    CardSpec("Tesla T4", r"\bt4\b", 16, (7, 5), 65.0, 320, _PCIE3_X16),
    CardSpec("GeForce RTX 2080 Ti", r"rtx 2080 ti", 11, (7, 5), 53.8, 616, _PCIE3_X16),
    CardSpec("GeForce RTX 3060", r"rtx 3060(?! ?ti)", 12, (8, 6), 25.6, 360, _PCIE4_X16),
    CardSpec("GeForce RTX 3070", r"rtx 3070(?! ?ti)", 8, (8, 6), 40.6, 448, _PCIE4_X16),
    CardSpec("GeForce RTX 3090", r"rtx 3090(?! ?ti)", 24, (8, 6), 71.0, 936, _PCIE4_X16),
    CardSpec("RTX A6000", r"rtx a6000", 48, (8, 6), 154.8, 768, _PCIE4_X16),
    CardSpec("GeForce RTX 4060", r"rtx 4060(?! ?ti)", 8, (8, 9), 30.2, 272, _PCIE4_X8),
    CardSpec("GeForce RTX 4070", r"rtx 4070(?! ?ti| ?super)", 12, (8, 9), 58.3, 504, _PCIE4_X16),
    CardSpec("GeForce RTX 4080", r"rtx 4080(?! ?super)", 16, (8, 9), 97.5, 717, _PCIE4_X16),
    CardSpec("GeForce RTX 4090", r"rtx 4090", 24, (8, 9), 165.2, 1008, _PCIE4_X16),
    CardSpec("RTX 6000 Ada", r"rtx 6000 ada", 48, (8, 9), 364.2, 960, _PCIE4_X16),
    CardSpec("L4", r"\bl4\b", 24, (8, 9), 121.0, 300, _PCIE4_X16),
    CardSpec("L40S", r"\bl40s\b", 48, (8, 9), 362.0, 864, _PCIE4_X16),
    CardSpec("A100 40GB", r"\ba100\b", 40, (8, 0), 312.0, 1555, _PCIE4_X16),
    CardSpec("A100 80GB", r"\ba100\b", 80, (8, 0), 312.0, 2039, _PCIE4_X16),  # SXM; the PCIe card: 1935
    CardSpec("H100 80GB", r"\bh100\b", 80, (9, 0), 989.0, 3350, _PCIE5_X16),  # SXM; the PCIe card: 756 / 2000
    CardSpec("H200", r"\bh200\b", 141, (9, 0), 989.0, 4800, _PCIE5_X16),
)

# Figures typical of each compute capability, for cards not in the table (a mid-range part of the
# generation: an unknown card is more often a consumer card than a flagship).
_TYPICAL_BY_CC: dict[ComputeCapability, tuple[float, float, float]] = {
    (7, 0): (112.0, 900, _PCIE3_X16),  # V100
    (7, 5): (60.0, 450, _PCIE3_X16),
    (8, 0): (312.0, 1555, _PCIE4_X16),
    (8, 6): (40.0, 500, _PCIE4_X16),
    (8, 9): (100.0, 600, _PCIE4_X16),
    (9, 0): (989.0, 3350, _PCIE5_X16),
    (10, 0): (2250.0, 8000, _PCIE5_X16),  # B200
    (12, 0): (200.0, 1500, _PCIE5_X16),  # RTX 50xx
}

# A CPU worker: a few cores of fp32, host memory bandwidth, no link to cross.
_CPU_FIGURES = (0.5, 20.0, 20.0)


def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[-_/]", " ", name.lower()).split())


def known_card(name: str, vram_gib: float | None = None) -> CardSpec | None:
    """The table entry `name` describes ("NVIDIA GeForce RTX 3070", "NVIDIA A100-SXM4-80GB", ...), or None.

    Where one name covers several memory sizes (A100 40/80 GB), the one nearest `vram_gib` wins.
    """
    text = _normalise(name)
    matches = [card for card in KNOWN_CARDS if re.search(card.pattern, text)]
    if not matches:
        return None
    if vram_gib is None:
        return matches[0]
    return min(matches, key=lambda card: abs(card.vram_gib - vram_gib))


def _typical(cc: ComputeCapability) -> tuple[float, float, float]:
    lower = [known for known in _TYPICAL_BY_CC if known <= cc]
    return _TYPICAL_BY_CC[max(lower) if lower else min(_TYPICAL_BY_CC)]


def device_from_spec(
    name: str, vram_gib: float, compute_capability: str | ComputeCapability | None, **host: Any
) -> Device:
    """A device from what it says about itself; `compute_capability` None means a CPU.

    Throughput comes from the known-card table when `name` matches, else from figures typical of the
    compute capability. The given VRAM and compute capability always win over the table's.
    """
    if compute_capability is None:
        tflops, memory, link = _CPU_FIGURES
        return Device(name, vram_gib, None, "cpu", tflops, memory, link, "typical of a CPU worker")
    cc = parse_compute_capability(compute_capability)
    card = known_card(name, vram_gib)
    if card is not None:
        return Device(
            name, vram_gib, cc, "cuda", card.fp16_tflops, card.memory_gbps, card.pcie_gbps,
            f"known card {card.name}", **host,
        )
    tflops, memory, link = _typical(cc)
    return Device(
        name, vram_gib, cc, "cuda", tflops, memory, link, f"typical of compute capability {cc[0]}.{cc[1]}", **host
    )


def device_from_declaration(node: NodeDeclaration) -> Device:
    """The device a nodes-file entry declares.

    A known `gpu` name supplies throughput, and its compute capability when the entry leaves it out; a
    compute capability that contradicts the named card is an error rather than a guess.
    """
    cc_given = "compute_capability" in node.model_fields_set
    cc = parse_compute_capability(node.compute_capability)
    card = known_card(node.gpu, node.vram_gib) if node.gpu else None
    if card is not None:
        if not cc_given:
            cc = card.compute_capability
        elif cc != card.compute_capability:
            raise ValueError(
                f"node {node.name!r}: gpu {node.gpu!r} has compute capability "
                f"{card.compute_capability[0]}.{card.compute_capability[1]}, "
                f"but the node declares {node.compute_capability}"
            )
    return device_from_spec(node.gpu or node.name, node.vram_gib, cc, ram_gib=node.ram_gib)


def device_from_record(record: Mapping[str, Any]) -> Device | None:
    """The card a node reported in its Redis record (the `card` field, `Device.as_dict()`); None when the
    record carries none. A card that does not describe a device raises CorruptRecord naming the node and the
    field: whoever reads node records skips that one (and counts it) rather than fail for every node."""
    card = record.get("card")
    if card is None:
        return None

    def bad(why: str) -> CorruptRecord:
        return CorruptRecord(f"node {record.get('name')!r}: its card {why}")

    def number(name: str) -> float | None:
        value = card.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise bad(f"{name}={value!r} is not a positive number")
        return float(value)

    if not isinstance(card, dict):
        raise bad(f"is a {type(card).__name__}, not an object")
    if not isinstance(card.get("name"), str) or not card["name"]:
        raise bad(f"name={card.get('name')!r} is not a device name")
    vram_gib = number("vram_gib")
    if vram_gib is None:
        raise bad("has no vram_gib")
    host = {name: number(name) for name in ("ram_gib", "ram_available_gib", "disk_free_gib")}
    cc = card.get("compute_capability")
    if cc is not None and not isinstance(cc, str):
        raise bad(f"compute_capability={cc!r} is not text like '8.6'")
    try:
        return device_from_spec(card["name"], vram_gib, cc, **host)
    except ValueError as exc:  # a compute capability that is not major.minor
        raise bad(str(exc)) from None
