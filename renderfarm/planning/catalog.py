"""The model catalog: which models the farm knows, their family, and the rules a job must follow.

Pure data (configs/models.yaml); imports neither torch nor Ray nor Redis, so `renderfarm plan`,
the simulator and submit-time validation run anywhere.

A family lists its components (denoiser, text encoders, VAE) with parameter counts and widths: the facts
planning/vram.py turns into bytes and activations. A model inherits its family's components and may
override any field of one (SD3.5 Medium is smaller than Large; every stand-in is tiny).
"""

from __future__ import annotations

from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from renderfarm.errors import UnknownModelError

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "configs" / "models.yaml"


class Role(str, Enum):
    DENOISER = "denoiser"
    TEXT_ENCODER = "text_encoder"
    VAE = "vae"


QUANTIZATION_METHODS = ("bnb", "fp8", "gguf")
GGUF_TYPES = ("q8_0", "q5_0", "q5_1", "q4_0", "q4_1")  # what diffusers' GGUF loader and `gguf` both handle


class Component(BaseModel):
    """One module of a pipeline, named as the pipeline attribute (`transformer`, `text_encoder_2`, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    role: Role
    params: float = Field(gt=0)
    # Denoiser and text encoder: hidden size (a UNet: channels of its first, full-resolution level).
    # VAE: channels of its full-resolution decoder level. Activations scale with it.
    width: int = Field(gt=0)
    blocks: int = Field(default=1, ge=1)  # repeated blocks; group offload moves whole blocks
    largest_block_params: float | None = Field(default=None, gt=0)  # None: params / blocks
    largest_layer_params: float | None = Field(default=None, gt=0)  # leaf offload; None: largest block
    # False: never quantized, stays in the compute dtype (CLIP encoders: small, and sensitive).
    quantize: bool = True
    # Parameters a quantization method leaves in the compute dtype, by method (bnb, fp8, gguf): modules it
    # does not convert (embeddings; diffusers' layerwise fp8 skips modules named *norm*; GGUF converters
    # keep small and sensitive tensors).
    unquantized_params: dict[str, float] = Field(default_factory=dict)
    # Parameters transformers keeps in fp32 when the model loads in fp16 or through bitsandbytes
    # (`_keep_in_fp32_modules`: T5's `wo`, which overflows in fp16).
    keep_fp32_params: float = Field(default=0.0, ge=0)
    # Pinned host bytes per stored byte when every tensor is pinned (streamed with CUDA streams): torch's
    # pinned allocator rounds each allocation up to a power of two. The sum over the real architecture's
    # tensors (bench/pinned_rounding.py computes it on the meta device; tests/actors pin Flux's and SDXL's).
    # Exact for 16-bit, fp8 and 4-bit storage (scaling by a power of two keeps the rounding); GGUF: close.
    pinned_factor: float = Field(default=1.6, ge=1.0, le=2.0)
    # The pipeline renders without this text encoder (SD3's T5: `text_encoder_3=None`, zeros in place of its
    # embeddings), so a profile may drop it to save its memory (planning/profiles.py).
    droppable: bool = False

    @field_validator("unquantized_params")
    @classmethod
    def _known_methods(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(QUANTIZATION_METHODS))
        if unknown:
            raise ValueError(f"unquantized_params: unknown method(s) {unknown}; known: {list(QUANTIZATION_METHODS)}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Component:
        if self.droppable and self.role is not Role.TEXT_ENCODER:
            raise ValueError(f"component {self.name}: only a text encoder can be droppable, not a {self.role.value}")
        for method, kept in self.unquantized_params.items():
            if kept + self.keep_fp32_params > self.params:
                raise ValueError(
                    f"component {self.name}: unquantized_params.{method} + keep_fp32_params exceed params"
                )
        return self

    def __hash__(self) -> int:  # frozen models stay hashable despite their dict fields (equal => same name)
        return hash((self.name, self.params))

    @property
    def block_params(self) -> float:
        return self.largest_block_params or self.params / self.blocks

    @property
    def layer_params(self) -> float:
        return self.largest_layer_params or self.block_params


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pipeline: str
    size_multiple: int = Field(gt=0)
    uses_cfg: bool
    components: dict[str, Component] = Field(default_factory=dict)
    latent_channels: int = Field(default=4, gt=0)
    vae_scale_factor: int = Field(default=8, gt=0)  # image pixels per latent pixel, per side
    patch_size: int = Field(default=1, gt=0)  # latent pixels per denoiser token, per side (1: a UNet)
    text_tokens: int = Field(default=77, gt=0)  # prompt tokens (a transformer attends over them jointly)
    fp16_clamp: bool = False  # activations overflow fp16: clamp them when computing in fp16 (Flux)
    vae_force_upcast: bool = False  # the VAE overflows in fp16 (SDXL's original VAE): decode in fp32
    # Listed so the planner can size its models (`renderfarm plan`), but no worker renders it: a submit is refused
    # (client.py) and every node reports its models unloadable (actors/loading.py, why_unloadable).
    planning_only: bool = False

    def __hash__(self) -> int:  # frozen models stay hashable despite their dict fields
        return hash(self.name)

    @property
    def flow_matching(self) -> bool:
        """A flow-matching model (Flux, SD 3.x): only flow-matching samplers render it (renderfarm/samplers.py)."""
        return self.pipeline.startswith(("Flux", "StableDiffusion3"))

    def latent_tokens(self, width: int, height: int) -> int:
        side = self.vae_scale_factor * self.patch_size
        return (width // side) * (height // side)


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    family: Family
    source: str | None = None  # Hugging Face id, local folder or single file; None for stand-ins
    standin: bool = False
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 4096
    default_steps: int = 28
    default_guidance: float = 5.0
    components: dict[str, Component] = Field(default_factory=dict)  # the family's, with this model's overrides
    gguf_sources: dict[str, str] = Field(default_factory=dict)  # "q8_0" -> local file, URL or org/repo/file
    fp16_vae_source: str | None = None  # a VAE safe in fp16 (madebyollin/sdxl-vae-fp16-fix), used on fp16 cards
    # The dtype the source's weight files store. Loaded in that dtype they stay memory-mapped (page cache);
    # loaded in another they are converted into anonymous host memory first. None: not known, counted as
    # converted (the safe side).
    checkpoint_dtype: Literal["bf16", "fp16", "fp32"] | None = None

    @field_validator("gguf_sources")
    @classmethod
    def _gguf_types(cls, value: dict[str, str]) -> dict[str, str]:
        normalised = {str(key).lower().removeprefix("gguf-"): path for key, path in value.items()}
        unknown = sorted(set(normalised) - set(GGUF_TYPES))
        if unknown:
            raise ValueError(f"gguf_sources: unknown GGUF type(s) {unknown}; known: {list(GGUF_TYPES)}")
        return normalised

    def __hash__(self) -> int:  # hashable as before components and gguf_sources (dicts) were added
        return hash((self.name, self.family.name))

    def components_by_role(self, role: Role) -> list[Component]:
        return [c for c in self.components.values() if c.role is role]

    @property
    def denoiser(self) -> Component:
        found = self.components_by_role(Role.DENOISER)
        if len(found) != 1:
            raise ValueError(
                f"model {self.name!r}: the catalog gives {len(found)} denoiser components; planning needs one "
                "(add `components:` to its family in models.yaml)"
            )
        return found[0]

    @property
    def text_encoders(self) -> list[Component]:
        return self.components_by_role(Role.TEXT_ENCODER)

    @property
    def vae(self) -> Component | None:
        found = self.components_by_role(Role.VAE)
        return found[0] if found else None

    def check_size(self, field: str, value: int) -> None:
        """Raise ValueError naming the field when `value` does not suit this model's family."""
        multiple = self.family.size_multiple
        if value % multiple:
            raise ValueError(
                f"{field}={value} must be a multiple of {multiple} for {self.family.name} models "
                f"such as {self.name}"
            )
        if not self.min_size <= value <= self.max_size:
            raise ValueError(
                f"{field}={value} is outside {self.min_size}..{self.max_size} for {self.name}"
            )


class Catalog:
    """The models a farm can render, by name."""

    def __init__(self, models: dict[str, ModelEntry]):
        if not models:
            raise ValueError("the model catalog is empty")
        self.models = models

    def names(self) -> list[str]:
        return sorted(self.models)

    def get(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise UnknownModelError(name, self.names()) from None

    def __contains__(self, name: object) -> bool:
        return name in self.models

    @classmethod
    def from_dict(cls, data: dict[str, Any], origin: str = "<dict>") -> Catalog:
        try:
            families = {
                name: _family(name, dict(spec)) for name, spec in (data.get("families") or {}).items()
            }
            models: dict[str, ModelEntry] = {}
            for name, spec in (data.get("models") or {}).items():
                spec = dict(spec)
                family_name = spec.pop("family", None)
                if family_name not in families:
                    raise ValueError(
                        f"models.{name}.family: {family_name!r} is not one of {sorted(families)}"
                    )
                family = families[family_name]
                components = _merged_components(name, family, spec.pop("components", None) or {})
                models[name] = ModelEntry(name=name, family=family, components=components, **spec)
        except ValidationError as exc:
            raise ValueError(f"invalid model catalog {origin}: {exc}") from None
        return cls(models)

    @classmethod
    def load(cls, path: str | Path | None = None) -> Catalog:
        path = Path(path) if path else DEFAULT_MODELS_FILE
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ValueError(f"cannot read model catalog {path}: {exc.strerror}") from None
        return cls.from_dict(data or {}, origin=str(path))


def _family(name: str, spec: dict[str, Any]) -> Family:
    components = {
        cname: Component(name=cname, **cspec) for cname, cspec in (spec.pop("components", None) or {}).items()
    }
    return Family(name=name, components=components, **spec)


def _merged_components(model: str, family: Family, overrides: dict[str, Any]) -> dict[str, Component]:
    """The family's components with the fields a model overrides (a stand-in's tiny sizes, say)."""
    unknown = sorted(set(overrides) - set(family.components))
    if unknown:
        raise ValueError(
            f"models.{model}.components: {unknown} not among family {family.name}'s components "
            f"{sorted(family.components)}"
        )
    merged = dict(family.components)
    for cname, fields in overrides.items():
        merged[cname] = Component.model_validate({**merged[cname].model_dump(), **(fields or {})})
    return merged


@lru_cache(maxsize=8)
def _cached(path: str) -> Catalog:
    return Catalog.load(path)


def default_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog from `path` (default: the packaged models.yaml), parsed once per process."""
    return _cached(str(Path(path) if path else DEFAULT_MODELS_FILE))
