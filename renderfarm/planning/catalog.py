"""The model catalog: which models the farm knows, their family, and the rules a job must follow.

Pure data (configs/models.yaml); imports neither torch nor Ray nor Redis, so `renderfarm plan`,
the simulator and submit-time validation run anywhere.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MODELS_FILE = Path(__file__).resolve().parent.parent / "configs" / "models.yaml"


class UnknownModelError(ValueError):
    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(f"unknown model {name!r}; known models: {', '.join(known)}")


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pipeline: str
    size_multiple: int = Field(gt=0)
    uses_cfg: bool


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
                name: Family(name=name, **spec) for name, spec in (data.get("families") or {}).items()
            }
            models: dict[str, ModelEntry] = {}
            for name, spec in (data.get("models") or {}).items():
                spec = dict(spec)
                family_name = spec.pop("family", None)
                if family_name not in families:
                    raise ValueError(
                        f"models.{name}.family: {family_name!r} is not one of {sorted(families)}"
                    )
                models[name] = ModelEntry(name=name, family=families[family_name], **spec)
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


@lru_cache(maxsize=8)
def _cached(path: str) -> Catalog:
    return Catalog.load(path)


def default_catalog(path: str | Path | None = None) -> Catalog:
    """The catalog from `path` (default: the packaged models.yaml), parsed once per process."""
    return _cached(str(Path(path) if path else DEFAULT_MODELS_FILE))
