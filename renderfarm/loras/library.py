"""The LoRA library: a folder (local, or a studio share every node mounts) of `.safetensors` LoRA files,
indexed by name, family, key style, rank, size and content hash.

Pure Python (no torch, no diffusers): the client validates job specs against it, the CLI lists it, nodes
report what they hold. Indexing reads each file's safetensors header only (an 8-byte length, then a JSON
table of every tensor's name, dtype and shape): a studio folder holds hundreds of LoRAs of 20 MB to 1 GB
each, and the keys and shapes already say everything the index needs.

Why keys and shapes, never the metadata: trainers may write some (kohya's `ss_base_model_version`, the
`modelspec.architecture` of newer tools) but diffusers' own `save_lora_weights` writes none, converters
drop it, and it can say anything; the tensor names and widths are what the weights will actually be
applied to. How each family is told apart is written beside its clue in `_family_clues`; a file whose
clues are absent or contradict each other is refused with the reason, naming the file.

Hashes (`LoraInfo.sha256`, `LoraInfo.short_hash`):
- `sha256` is the sha256 of the whole file: the identity a node checks its copy against. Any byte
  changed, metadata included, makes another file.
- `short_hash` is what AUTOMATIC1111 and Forge write into `Lora hashes: "name: hash"`, so that the usual
  metadata readers find the same LoRA. Read in their source (A1111 modules/hashes.py and
  extensions-builtin/Lora/network.py; Forge extensions-builtin/sd_forge_lora/network.py): for a
  `.safetensors` LoRA they use `addnet_hash_safetensors` (taken from kohya's sd-scripts), the sha256 of
  the bytes AFTER the 8-byte length and the JSON header, i.e. of the tensor data only, so a metadata
  edit keeps the hash; `NetworkOnDisk.set_hash` keeps its first 12 hex digits. They prefer the
  `sshs_model_hash` the kohya trainer stores in the metadata, which is that same hash of the same bytes;
  we compute it rather than trust a value the file states. The whole-file sha256 is A1111's hash for
  checkpoints, not for LoRAs, so the two differ and both are kept.
Both come from one read of the file, and are cached in a JSON file by (path, size, mtime) so that
re-indexing a big studio folder reads only what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from renderfarm.errors import RenderfarmError

log = logging.getLogger(__name__)

LoraFamily = Literal["sd15", "sdxl", "flux", "sd3"]
LoraStyle = Literal["diffusers", "kohya"]
FAMILIES: tuple[str, ...] = ("sd15", "sdxl", "flux", "sd3")  # the catalog's families (a unit test holds them equal)
SUFFIX = ".safetensors"
SHORT_HASH_DIGITS = 12  # A1111's NetworkOnDisk.shorthash
HASH_CACHE_FILE = "lora-hashes.json"
HASH_CACHE_VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_CHUNK = 1024 * 1024
# Characters a name cannot hold and still be written `<lora:name:weight>` in a prompt.
_NAME_FORBIDDEN = re.compile(r"[:<>]")


class LoraError(RenderfarmError, ValueError):
    """A LoRA file that cannot be indexed or used; the message names the file (or the name) and why."""


class UnknownLoraError(LoraError, LookupError):
    """A LoRA name the library does not hold; the message lists the ones it does."""

    def __init__(self, name: str, folder: Path, known: list[str]):
        self.name, self.known = name, known
        listed = ", ".join(known) if known else "none"
        super().__init__(f"unknown LoRA {name!r} in {folder}; known LoRAs: {listed}")


class LoraInfo(BaseModel):
    """One usable LoRA of the library (JSON: `model_dump(mode="json")`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str  # the file's stem: what `<lora:name:weight>` and a job's `loras: [{name, weight}]` use
    path: str  # absolute
    family: LoraFamily
    style: LoraStyle  # "diffusers": diffusers/PEFT keys (unet./transformer./text_encoder. prefixes); "kohya"
    rank: int = Field(ge=1)  # the largest rank among its layers (rows of the down / lora_A matrices)
    # The pipeline components it adapts, by pipeline attribute ("unet", "transformer", "text_encoder", ...):
    # one that adapts a text encoder changes prompt embeddings, not only the denoiser.
    components: tuple[str, ...]
    size_bytes: int = Field(ge=0)
    sha256: str  # of the whole file
    short_hash: str  # A1111's "Lora hashes" value: see the module docstring


class LoraProblem(BaseModel):
    """A file of the library that cannot be used, and why (listed, never fatal to the rest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    path: str
    error: str


# --- reading a file --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)
    metadata: dict[str, str]
    data_offset: int  # where the tensor data starts: 8 + the header's length
    data_bytes: int  # what the header says the tensor data takes


def read_header(path: str | Path) -> SafetensorsHeader:
    """The header of a safetensors file, checked against the file's size; LoraError naming the file if it
    is not a complete safetensors file (a partial copy from a share is the usual way to get one)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise LoraError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
            length = int.from_bytes(prefix, "little")
            if length > _MAX_HEADER_BYTES:
                raise LoraError(f"{path}: not a safetensors file (it announces a {length}-byte header)")
            if 8 + length > size:
                raise LoraError(f"{path}: incomplete or damaged: its header alone takes {8 + length} bytes, the "
                                f"file holds {size} (a partial copy?)")
            raw = f.read(length)
    except OSError as exc:
        raise LoraError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    try:
        table = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraError(f"{path}: not a safetensors file (its header is not JSON: {exc})") from None
    if not isinstance(table, dict):
        raise LoraError(f"{path}: not a safetensors file (its header is not a JSON object)")
    metadata = table.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    for name, entry in table.items():
        try:
            dtype, shape = entry["dtype"], tuple(int(n) for n in entry["shape"])
            stop = int(entry["data_offsets"][1])
        except (TypeError, KeyError, ValueError, IndexError):
            raise LoraError(f"{path}: not a safetensors file (tensor {name!r} has no dtype, shape and "
                            "data_offsets)") from None
        tensors[name] = (str(dtype), shape)
        end = max(end, stop)
    if 8 + length + end != size:
        raise LoraError(f"{path}: incomplete or damaged: its header describes {8 + length + end} bytes, the file "
                        f"holds {size} (a partial copy?)")
    metadata = metadata if isinstance(metadata, dict) else {}
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_offset=8 + length, data_bytes=end)


def hash_file(path: str | Path, data_offset: int | None = None) -> tuple[str, str]:
    """(sha256 of the whole file, A1111's short hash: the first 12 hex of the sha256 of the tensor data),
    from one read of the file. `data_offset`: where the tensor data starts (read from the file if None)."""
    path = Path(path)
    whole, data = hashlib.sha256(), hashlib.sha256()
    with path.open("rb") as f:
        if data_offset is None:
            data_offset = 8 + int.from_bytes(f.read(8), "little")
            f.seek(0)
        whole.update(f.read(data_offset))
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            whole.update(chunk)
            data.update(chunk)
    return whole.hexdigest(), data.hexdigest()[:SHORT_HASH_DIGITS]


# --- what the keys say ------------------------------------------------------------------------------

# kohya (sd-scripts, and the A1111/ComfyUI world): `lora_unet_<module with _ for .>.lora_down.weight`,
# `.lora_up.weight`, `.alpha`; text encoders `lora_te_` (SD 1.x, Flux's CLIP), `lora_te1_`/`lora_te2_` (SDXL),
# `lora_te3_` (SD3's T5); `lora_transformer_` in some Flux files diffusers also reads.
_KOHYA_KEY = re.compile(r"^lora_(unet|te[123]?|transformer)_([A-Za-z0-9_]+)\.(.+)$")
_KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
# diffusers / PEFT: `<component>.<module>.lora_A.weight` / `.lora_B.weight` (PEFT), the older
# `.lora.down.weight` / `.lora.up.weight`, the attention-processor `...attn1.processor.to_q_lora.down.weight`,
# the text encoders' `.lora_linear_layer.down.weight`; an optional `.alpha`.
_DIFFUSERS_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:(unet|transformer|text_encoder(?:_[23])?)\.)?(.+?)"
    r"(?:\.lora_(A|B)(?:\.[A-Za-z0-9_]+)?\.weight|[._]lora\.(down|up)\.weight"
    r"|\.lora_linear_layer\.(down|up)\.weight|\.(alpha)|\.(lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?)$"
)
# Component of a diffusers key written without its prefix (the oldest diffusers files), by its first name.
_UNET_ROOTS = {"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "time_embedding", "add_embedding"}
_TRANSFORMER_ROOTS = {"transformer_blocks", "single_transformer_blocks", "x_embedder", "context_embedder",
                      "time_text_embed", "pos_embed", "norm_out", "proj_out"}
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2",
                     "te3": "text_encoder_3", "transformer": "transformer"}


@dataclass
class _Module:
    component: str  # unet / transformer / text_encoder / text_encoder_2 / text_encoder_3
    name: str  # the module, as the file spells it (kohya: underscores; diffusers: dots)
    down: tuple[int, ...] | None = None
    up: tuple[int, ...] | None = None
    other: str | None = None  # a key of another kind (DoRA magnitude, LyCORIS factors)


@dataclass(frozen=True)
class LoraKeys:
    """What a LoRA file's keys say: its style, family, rank and the components it adapts."""

    style: LoraStyle
    family: LoraFamily
    rank: int
    components: tuple[str, ...]


def _parse(tensors: dict[str, tuple[str, tuple[int, ...]]], origin: str) -> tuple[LoraStyle, dict]:
    styles: dict[str, str] = {}  # style -> an example key
    modules: dict[tuple[str, str], _Module] = {}
    for key, (_dtype, shape) in tensors.items():
        kohya = _KOHYA_KEY.match(key)
        diffusers = None if kohya else _DIFFUSERS_KEY.match(key)
        if kohya:
            component, name, tail = _KOHYA_COMPONENTS[kohya[1]], kohya[2], kohya[3]
            part = _KOHYA_PARTS.get(tail, "other")
            styles.setdefault("kohya", key)
        elif diffusers:
            component, name = diffusers[1], diffusers[2]
            if component is None:
                root = name.split(".")[0]
                component = ("unet" if root in _UNET_ROOTS else "transformer" if root in _TRANSFORMER_ROOTS
                             else "text_encoder" if root == "text_model" else None)
                if component is None:
                    raise LoraError(f"{origin}: key {key!r} names no pipeline component (unet., transformer., "
                                    "text_encoder., ...): not a LoRA renderfarm can place")
            ab, down_up = diffusers[3], diffusers[4] or diffusers[5]
            part = ("down" if ab == "A" or down_up == "down" else "up" if ab == "B" or down_up == "up"
                    else "alpha" if diffusers[6] else "other")
            styles.setdefault("diffusers", key)
        else:
            raise LoraError(f"{origin}: key {key!r} is neither a diffusers/PEFT LoRA key (unet./transformer./"
                            "text_encoder. ... lora_A/lora_B) nor a kohya one (lora_unet_/lora_te_ ... "
                            "lora_down/lora_up): not a LoRA file renderfarm can read")
        module = modules.setdefault((component, name), _Module(component, name))
        if part in ("down", "up"):
            setattr(module, part, shape)
        elif part == "other":
            module.other = key
    if len(styles) > 1:
        raise LoraError(f"{origin}: mixes diffusers keys ({styles['diffusers']!r}) and kohya keys "
                        f"({styles['kohya']!r}); convert it to one style")
    if not styles:
        raise LoraError(f"{origin}: holds no tensors")
    return next(iter(styles)), modules  # type: ignore[return-value]


def inspect_keys(tensors: dict[str, tuple[str, tuple[int, ...]]], origin: str = "<tensors>") -> LoraKeys:
    """Style, family, rank and components of a LoRA from its tensor names and shapes (a safetensors
    header's `tensors`). LoraError naming `origin` when the file is not a LoRA or its family cannot be told."""
    style, modules = _parse(tensors, origin)
    ranks = []
    for module in modules.values():
        if module.down is None or module.up is None:
            if module.down is None and module.up is None:
                if module.other is None:  # an alpha alone
                    raise LoraError(f"{origin}: layer {module.name!r} has an alpha but no down/up weights")
                raise LoraError(f"{origin}: layer {module.name!r} has no LoRA down/up (A/B) weights (key "
                                f"{module.other!r}): another kind of adapter (LyCORIS LoHa/LoKr?), not a LoRA")
            missing = "up (B)" if module.up is None else "down (A)"
            raise LoraError(f"{origin}: layer {module.name!r} has no {missing} weight: damaged or truncated")
        if len(module.down) < 2 or module.down[0] < 1:
            raise LoraError(f"{origin}: layer {module.name!r}: down weight of shape {list(module.down)} is no matrix")
        ranks.append(module.down[0])
    family = _family(style, list(modules.values()), origin)
    if family == "sd3" and style == "kohya":
        # diffusers (0.42) converts kohya keys for SD 1.x, SDXL and Flux only: its SD3 loader would take no
        # layer from this file and say nothing (tests/actors/test_lora_standins.py pins it).
        raise LoraError(f"{origin}: an SD3 LoRA in kohya keys, which diffusers does not convert (it would load "
                        "nothing); convert it to diffusers keys (transformer.transformer_blocks.N...)")
    components = {m.component for m in modules.values()}
    if family in ("flux", "sd3"):  # kohya calls the denoiser `unet` whatever it is
        components = {"transformer" if c == "unet" else c for c in components}
    return LoraKeys(style=style, family=family, rank=max(ranks), components=tuple(sorted(components)))


_SEP = r"[._]"  # kohya spells a module path with `_`, diffusers with `.`: every pattern below takes either
_FLUX_BFL = re.compile(r"^(double_blocks|single_blocks|img_in|txt_in|guidance_in|time_in|vector_in)_")  # kohya
_SD3_MMDIT = re.compile(r"^joint_blocks_")  # kohya (sd-scripts' SD3 trainer)
_FLUX_ONLY = re.compile(r"^(single_transformer_blocks|x_embedder|time_text_embed" + _SEP + r"guidance_embedder)"
                        r"|proj_mlp$")
_SD3_ONLY = re.compile(r"(?:^|" + _SEP + r")(attn2|pos_embed)(?:" + _SEP + r"|$)")
_TRANSFORMER_BLOCK = re.compile(r"^transformer_blocks" + _SEP + r"(\d+)" + _SEP)
_QUERY = re.compile(r"(?:^|" + _SEP + r")attn" + _SEP + r"to_q$")
_SGM = re.compile(r"^(input_blocks|middle_block|output_blocks|label_emb)" + _SEP)
_UNET_DEEP = re.compile(r"transformer_blocks" + _SEP + r"[1-9]|^add_embedding")
_UNET_FIRST_LEVEL_ATTENTION = re.compile(r"^down_blocks" + _SEP + r"0" + _SEP + r"attentions")
_CROSS_ATTENTION_KV = re.compile(r"attn2" + _SEP + r"(?:processor" + _SEP + r")?to_[kv]$")
# The denoisers' real widths. Stand-ins are tiny and match none: they are told by names alone.
_CROSS_ATTENTION_WIDTH = {768: "sd15", 1024: "sd2", 2048: "sdxl"}  # the text width the UNet attends to
_TRANSFORMER_WIDTH = {3072: "flux", 2432: "sd3", 1536: "sd3"}  # Flux.1; SD3.5 Large; SD3 / SD3.5 Medium
_TEXT_ENCODERS = {"text_encoder", "text_encoder_2", "text_encoder_3"}


Clues = dict[frozenset[str], str]  # the families a clue allows -> why (the first layer that showed it)


def _clue(clues: Clues, families: str, reason: str) -> None:
    clues.setdefault(frozenset(families.split()), reason)


def _family_clues(style: str, modules: list[_Module]) -> tuple[Clues, Clues]:
    """(strong clues, fallback clues). Fallbacks count only when no strong clue speaks."""
    strong: Clues = {}
    fallback: Clues = {}
    text_encoders = {m.component for m in modules} & _TEXT_ENCODERS
    unet, transformer = [], []  # the denoiser's layers, by kind (kohya calls every denoiser `unet`)
    for m in modules:
        if m.component == "transformer":
            transformer.append(m)
        elif m.component == "unet" and _FLUX_BFL.match(m.name):
            _clue(strong, "flux", f"Flux's BFL block names ({m.name})")
        elif m.component == "unet" and _SD3_MMDIT.match(m.name):
            _clue(strong, "sd3", f"SD3's MMDiT block names ({m.name})")
        elif m.component == "unet":
            unet.append(m)
    for m in transformer:
        if _FLUX_ONLY.search(m.name):
            _clue(strong, "flux", f"a layer only Flux has ({m.name})")
        if _SD3_ONLY.search(m.name):
            _clue(strong, "sd3", f"a layer only SD3 has ({m.name})")
        block = _TRANSFORMER_BLOCK.match(m.name)
        if block and int(block[1]) >= 19:
            _clue(strong, "sd3", f"joint block {block[1]}: Flux has 19 ({m.name})")
        if _QUERY.search(m.name) and m.down is not None and m.down[1] in _TRANSFORMER_WIDTH:
            _clue(strong, _TRANSFORMER_WIDTH[m.down[1]], f"a transformer {m.down[1]} wide ({m.name})")
    if transformer and text_encoders & {"text_encoder_2", "text_encoder_3"}:
        _clue(strong, "sd3", "a transformer with a second or third text encoder (a Flux LoRA adapts CLIP only)")
    for m in unet:
        if _SGM.match(m.name):
            _clue(strong, "sdxl", f"the SGM UNet's block names, as kohya writes SDXL LoRAs ({m.name})")
        if _UNET_DEEP.search(m.name):
            _clue(strong, "sdxl", f"a UNet layer only SDXL has ({m.name})")
        if _UNET_FIRST_LEVEL_ATTENTION.match(m.name):
            _clue(strong, "sd15 sd2", f"attention at the UNet's first level, which SDXL lacks ({m.name})")
        if _CROSS_ATTENTION_KV.search(m.name) and m.down is not None and m.down[1] in _CROSS_ATTENTION_WIDTH:
            width = m.down[1]
            _clue(strong, _CROSS_ATTENTION_WIDTH[width], f"cross-attention over {width}-wide text ({m.name})")
    if unet and "text_encoder_2" in text_encoders:
        _clue(strong, "sdxl", "a UNet with a second text encoder")
    if unet and "text_encoder_2" not in text_encoders:
        if style == "kohya":
            # kohya's SD 1.x trainer names the diffusers UNet's blocks, its SDXL trainer the SGM UNet's.
            _clue(fallback, "sd15", "kohya keys with diffusers UNet block names")
        elif "text_encoder" in text_encoders:
            _clue(fallback, "sd15", "a UNet with one text encoder (an SDXL LoRA adapts both or neither)")
    return strong, fallback


def _family(style: str, modules: list[_Module], origin: str) -> LoraFamily:
    strong, fallback = _family_clues(style, modules)
    clues = strong or fallback
    if not clues:
        components = sorted({m.component for m in modules})
        example = modules[0].name
        if set(components) <= _TEXT_ENCODERS:
            why = "it adapts text encoders only, which several families share"
        elif "unet" in components:
            why = "an SD UNet LoRA, but neither its layer names nor its widths tell SD 1.5 from SDXL"
        else:
            why = "a transformer LoRA, but neither its layer names nor its widths tell Flux from SD3"
        raise LoraError(f"{origin}: cannot tell its model family: {why} (components {components}, "
                        f"e.g. layer {example!r})")
    allowed = frozenset.intersection(*clues)
    if not allowed:
        said = "; ".join(f"{' or '.join(sorted(families))} ({reason})" for families, reason in clues.items())
        raise LoraError(f"{origin}: its keys point to more than one family: {said}")
    if allowed == {"sd2"}:
        raise LoraError(f"{origin}: an SD 2.x LoRA ({clues[frozenset({'sd2'})]}); the catalog has no SD 2 family")
    # SD 2.x shows itself by its 1024-wide cross-attention, which nearly every SD LoRA adapts; without that
    # width, what is left of SD 1.x/2.x is read as SD 1.5 (SD 2.x LoRAs are rare, and no catalog family).
    allowed -= {"sd2"}
    [family] = allowed
    return family  # type: ignore[return-value]


# --- the hash cache ---------------------------------------------------------------------------------


def default_hash_cache() -> Path:
    """`$RENDERFARM_CACHE_DIR/lora-hashes.json`, else `~/.cache/renderfarm/models/lora-hashes.json`: the
    stand-in models' cache folder (the same rule as actors.standins.default_cache_dir, not imported: the
    client reads the library and never imports the actors)."""
    configured = os.environ.get("RENDERFARM_CACHE_DIR")
    base = Path(configured).expanduser() if configured else Path.home() / ".cache" / "renderfarm" / "models"
    return base / HASH_CACHE_FILE


class _HashCache:
    """Hashes by absolute path, valid while (size, mtime_ns) are unchanged. One JSON file shared by every
    library folder; written whole to a temporary file and renamed, so a reader never sees half of it. Two
    processes saving at once lose one's new entries, which are simply hashed again next time.

    The limit of any (size, mtime) cache: a file rewritten in place at the same size within the
    filesystem's timestamp granularity keeps its entry. Copy tools that preserve the source's mtime
    preserve its content too."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        self.dirty = False
        try:
            data = json.loads(path.read_text())
            if data.get("version") == HASH_CACHE_VERSION and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("LoRA hash cache %s is unreadable (%s): hashing afresh", path, exc)

    def get(self, path: Path, stat: os.stat_result) -> tuple[str, str] | None:
        entry = self.entries.get(str(path))
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return entry["sha256"], entry["short_hash"]
        return None

    def put(self, path: Path, stat: os.stat_result, hashes: tuple[str, str]) -> None:
        self.entries[str(path)] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                                   "sha256": hashes[0], "short_hash": hashes[1]}
        self.dirty = True

    def forget_missing(self, folder: Path, present: Iterable[Path]) -> None:
        keep = {str(p) for p in present}
        prefix = str(folder) + os.sep
        gone = [p for p in self.entries if p.startswith(prefix) and p not in keep]
        for p in gone:
            del self.entries[p]
        self.dirty = self.dirty or bool(gone)

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": HASH_CACHE_VERSION, "files": self.entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:  # a read-only home: indexing still works, it just hashes again next time
            log.warning("cannot write the LoRA hash cache %s (%s); hashes will be computed again", self.path, exc)


# --- the library ------------------------------------------------------------------------------------


class LoraLibrary:
    """The `.safetensors` LoRAs under `folder` (subfolders included; hidden files and folders skipped),
    by name. `hash_cache`: the JSON file of cached hashes (default: `default_hash_cache()`).

    A name is a file's stem, as in A1111. Two files whose names differ only in case are duplicates (a
    share seen from Windows or macOS cannot tell them apart): neither is usable until one is renamed.
    Files that cannot be used are in `problems`, with the reason; `get` of one raises that reason.
    """

    def __init__(self, folder: str | Path, hash_cache: str | Path | None = None):
        self.folder = Path(folder).expanduser().absolute()
        self.hash_cache = Path(hash_cache).expanduser() if hash_cache is not None else default_hash_cache()
        self._loras: dict[str, LoraInfo] | None = None
        self._problems: list[LoraProblem] = []

    def scan(self) -> list[LoraInfo]:
        """Index the folder again; the usable LoRAs, by name. Raises LoraError if the folder is missing."""
        if not self.folder.is_dir():
            raise LoraError(f"LoRA folder {self.folder} does not exist or is not a folder")
        files = self._files()
        by_name: dict[str, list[Path]] = {}
        for path in files:
            by_name.setdefault(path.stem.casefold(), []).append(path)
        cache = _HashCache(self.hash_cache)
        loras: dict[str, LoraInfo] = {}
        problems: dict[str, LoraProblem] = {}
        for path in files:
            name = path.stem
            same = by_name[name.casefold()]
            try:
                if len(same) > 1:
                    others = ", ".join(str(p.relative_to(self.folder)) for p in same)
                    raise LoraError(f"{path}: duplicate LoRA name {name!r} (names ignore case): {others}; "
                                    "rename all but one")
                if _NAME_FORBIDDEN.search(name):
                    raise LoraError(f"{path}: its name {name!r} holds ':', '<' or '>', which cannot be written "
                                    "<lora:name:weight> in a prompt; rename the file")
                loras[name] = self._index(path, cache)
            except LoraError as exc:
                problems[str(path)] = LoraProblem(name=name, path=str(path), error=str(exc))
        cache.forget_missing(self.folder, files)
        cache.save()
        self._loras = dict(sorted(loras.items()))
        self._problems = sorted(problems.values(), key=lambda p: (p.name, p.path))
        return list(self._loras.values())

    def _files(self) -> list[Path]:
        found = []
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found += [Path(root) / n for n in sorted(names)
                      if n.lower().endswith(SUFFIX) and not n.startswith(".")]
        return found

    def _index(self, path: Path, cache: _HashCache) -> LoraInfo:
        header = read_header(path)
        keys = inspect_keys(header.tensors, origin=str(path))
        stat = path.stat()
        hashes = cache.get(path, stat)
        if hashes is None:
            try:
                hashes = hash_file(path, header.data_offset)
            except OSError as exc:
                raise LoraError(f"{path}: cannot read it ({exc.strerror or exc})") from None
            cache.put(path, stat, hashes)
        return LoraInfo(name=path.stem, path=str(path), family=keys.family, style=keys.style, rank=keys.rank,
                        components=keys.components, size_bytes=stat.st_size, sha256=hashes[0],
                        short_hash=hashes[1])

    def _index_once(self) -> dict[str, LoraInfo]:
        if self._loras is None:
            self.scan()
        assert self._loras is not None
        return self._loras

    @property
    def problems(self) -> list[LoraProblem]:
        self._index_once()
        return list(self._problems)

    def names(self) -> list[str]:
        """The usable LoRAs' names, sorted (the folder is indexed on first use; `scan` re-indexes it)."""
        return list(self._index_once())

    def get(self, name: str) -> LoraInfo:
        """The LoRA called `name`; UnknownLoraError listing the known names, or LoraError with the reason
        a file of that name cannot be used."""
        loras = self._index_once()
        if name in loras:
            return loras[name]
        for problem in self._problems:
            if problem.name == name:
                raise LoraError(f"LoRA {name!r} cannot be used: {problem.error}")
        raise UnknownLoraError(name, self.folder, list(loras))

    def __contains__(self, name: object) -> bool:
        return name in self._index_once()
