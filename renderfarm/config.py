"""Typed settings. The YAML keys ARE the field names; RENDERFARM_<FIELD> env vars override the file,
and explicit keyword overrides (CLI flags) override both."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from renderfarm.errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).resolve().parent / "configs"
DEFAULT_NODES_FILE = PACKAGE_CONFIGS / "nodes.example.yaml"
ENV_PREFIX = "RENDERFARM_"


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors()
    )


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    redis_url: str | None = None  # None: the farm starts its own redis-server
    data_dir: Path = Path("~/.local/share/renderfarm")  # embedded Redis AOF, Ray temp, logs
    cache_dir: Path | None = None  # stand-in models; None: ~/.cache/renderfarm/models
    models_file: Path | None = None  # None: the packaged configs/models.yaml
    # The LoRA library (renderfarm/loras): a folder of .safetensors LoRAs, local or a studio share that every
    # node mounts at the same path. None: the stand-in LoRAs, built offline into the cache dir.
    lora_dir: Path | None = None
    nodes_file: Path | None = None  # nodes YAML: simulated nodes (no GPU here), or overrides per GPU
    max_attempts: int = Field(default=3, ge=1, le=100)
    # A leased job is held for this long past the last renewal: the scheduler renews the leases of batches it
    # has sent, the node those it renders, every `heartbeat_seconds`. A dead holder's jobs return to the queue
    # this long after its last renewal (at once when Ray reports the worker's death).
    lease_seconds: float = Field(default=30.0, gt=0)
    # Each render gets this much time (AI Horde-style TTL that scales with the work): base + rate x steps x
    # megapixels x images of its batch. The default rate is the worst figure known: an 8 GiB card spilling
    # into shared memory (30 s/it at 1 MP); a render past its time is stopped and retried, a node that hangs
    # outright loses its lease at that time.
    job_timeout_base_s: float = Field(default=300.0, gt=0)
    job_timeout_s_per_megapixel_step: float = Field(default=30.0, ge=0)
    # A node whose batches fail this many times in a row (errors, timeouts, expired leases), with no success
    # in between, is drained with the reason, not left to eat the queue; 0: never.
    drain_after_failures: int = Field(default=3, ge=0)
    max_batch: int = Field(default=8, ge=1, le=64)  # jobs coalesced into one pipeline call
    # Batches a worker may hold: 2 lets the next batch start the moment the current one ends.
    worker_queue_depth: int = Field(default=2, ge=1, le=8)
    result_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=1)  # how long a done job's images are kept
    # Where finished images go (cluster/blobs): a directory (an absolute path or file:///abs/path: a studio NAS
    # that every node mounts at the same path) or an S3-compatible bucket, s3://bucket/prefix (MinIO, AWS).
    # None: <data_dir>/results, which only a one-machine farm can share. Redis keeps each image's URL only.
    result_store: str | None = None
    # The S3 backend's endpoint (MinIO: http://minio:9000) and region; None: boto3's own (AWS_ENDPOINT_URL,
    # AWS_DEFAULT_REGION / AWS_REGION). Credentials come from the environment only (AWS_ACCESS_KEY_ID, ...).
    result_store_endpoint: str | None = None
    result_store_region: str | None = None
    # Image inputs (img2img, inpainting: renderfarm/inputs.py, docs/inputs.md), stored in the result store under
    # inputs/. An input is kept input_ttl_seconds from its last upload, never longer than result_ttl_seconds (the
    # result store's sweep deletes every blob older than that). An upload is refused past input_max_bytes (the
    # file as sent) or input_max_pixels (read from its header, before decoding): 8192 x 4096 by default, a
    # 134 MB RGBA decode at most, and below Pillow's own decompression-bomb threshold (89.5 MP), so that never
    # fires first. The cap on pixels is at most 8192 x 8192: every side is 8..8192 anyway.
    input_ttl_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    input_max_bytes: int = Field(default=20 * 2**20, ge=1024, le=256 * 2**20)
    input_max_pixels: int = Field(default=8192 * 4096, ge=64, le=8192 * 8192)
    # How often the scheduler deletes blobs older than result_ttl_seconds (a sweep lists the whole store).
    result_sweep_seconds: float = Field(default=300.0, gt=0)
    heartbeat_seconds: float = Field(default=2.0, gt=0)
    poll_seconds: float = Field(default=0.02, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)  # per CPU worker; None: cores / workers
    # Weight bytes of the pipelines a worker keeps loaded; None: its card's VRAM less the planning margin.
    pipeline_cache_gib: float | None = Field(default=None, gt=0)
    # Fairness (scheduler/fairness.py): priority first; within a priority, teams share the farm in proportion
    # to their weight (a team not listed weighs 1), charged by the work dispatched for them, which decays
    # with this half-life; a waiting job gains one priority level per `aging_seconds`, so none starves.
    team_weights: dict[str, float] = Field(default_factory=dict)
    fair_share_half_life_s: float = Field(default=3600.0, gt=0)
    aging_seconds: float = Field(default=600.0, ge=0)  # 0: no aging
    eta_seconds: float = Field(default=2.0, gt=0)  # how often the scheduler republishes ETAs and positions
    sample_seconds: float = Field(default=5.0, gt=0)  # how often it samples queue depth and node totals
    dead_after_seconds: float = Field(default=15.0, gt=0)  # a node silent this long is shown dead
    # Webhooks (renderfarm/webhooks): a delivery to a loopback, private, link-local or otherwise non-public
    # address is refused (at submit for a literal address, at delivery for every address a name resolves to)
    # unless this is set; a failed delivery is retried with backoff for `webhook_retry_s`, each attempt
    # waiting at most `webhook_timeout_s` for the receiver.
    webhook_allow_private: bool = False
    webhook_retry_s: float = Field(default=600.0, ge=0, le=7 * 24 * 3600)
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120)

    def job_timeout_s(self, steps: int, width: int, height: int, images: int) -> float:
        """Seconds a batch of `images` images at `width` x `height` with `steps` steps may render."""
        return self.job_timeout_base_s + self.job_timeout_s_per_megapixel_step * steps * width * height * images / 1e6

    @field_validator("team_weights")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        for team, weight in value.items():
            if not (weight > 0 and weight < float("inf")):
                raise ValueError(f"team_weights.{team}={weight!r} must be a finite number > 0")
        return value

    @field_validator("result_store")
    @classmethod
    def _result_store(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip()
        scheme = value.split("://", 1)[0].lower() if "://" in value else ""
        if scheme == "s3":
            bucket = value[len("s3://"):].split("/", 1)[0]
            if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
                raise ValueError(f"{value!r}: the bucket name {bucket!r} is not a valid S3 bucket name "
                                 "(3-63 characters: lowercase letters, digits, '.', '-')")
        elif scheme == "file":
            if not value.startswith("file:///"):
                raise ValueError(f"{value!r}: a file URL must name an absolute path (file:///abs/path)")
        elif scheme:
            raise ValueError(f"{value!r}: unknown scheme {scheme!r}; use an absolute path, file:///abs/path "
                             "or s3://bucket/prefix")
        elif not Path(value).expanduser().is_absolute():
            raise ValueError(f"{value!r}: a directory must be an absolute path (or file:///abs/path, s3://bucket)")
        else:
            value = str(Path(value).expanduser())
        return value

    @field_validator("result_store_endpoint")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        if value and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
            raise ValueError(f"{value!r} must be an http:// or https:// URL (e.g. http://minio:9000)")
        return value or None

    def result_store_url(self) -> str:
        """Where finished images go, as a URL: `result_store` (a plain path as file:///...), or the data
        directory's `results` folder when none is set."""
        if self.result_store is None:
            return (self.data_dir.expanduser() / "results").absolute().as_uri()
        if self.result_store.startswith(("s3://", "file://")):
            return self.result_store
        return Path(self.result_store).as_uri()

    def result_store_options(self) -> dict[str, str]:
        """Keyword options for `cluster.blobs.open_blob_store` (the S3 endpoint and region, when set)."""
        return {k: v for k, v in (("endpoint_url", self.result_store_endpoint),
                                  ("region", self.result_store_region)) if v}

    @field_validator("data_dir", "cache_dir", "models_file", "nodes_file", "lora_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> Settings:
        data: dict[str, Any] = {}
        if path:
            loaded = _read_yaml(Path(path))
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: expected a mapping of settings")
            data.update(loaded or {})
        for name in cls.model_fields:
            env = os.environ.get(ENV_PREFIX + name.upper())
            if env not in (None, ""):
                data[name] = env
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"invalid settings{f' in {path}' if path else ''}: {_describe(exc)}") from None


# What every process of a farm must agree on: the head publishes these in Redis, and a machine that joins
# (`renderfarm worker`) takes them over its own settings file.
FARM_WIDE = ("max_attempts", "lease_seconds", "job_timeout_base_s", "job_timeout_s_per_megapixel_step",
             "drain_after_failures", "max_batch", "worker_queue_depth", "result_ttl_seconds", "heartbeat_seconds",
             "dead_after_seconds", "result_store", "result_store_endpoint", "result_store_region",
             "webhook_allow_private", "webhook_retry_s", "webhook_timeout_s", "input_ttl_seconds", "input_max_bytes",
             "input_max_pixels")


def farm_wide(settings: Settings) -> dict[str, Any]:
    """The FARM_WIDE settings: what every node runs with (its record shows them)."""
    return {name: getattr(settings, name) for name in FARM_WIDE}


def head_published(settings: Settings) -> dict[str, Any]:
    """What the head publishes: the FARM_WIDE settings, and where inputs are uploaded to (`input_store_url`: the
    result store's resolved URL, which a client cannot work out for itself when `result_store` is None: <the head's
    data_dir>/results). A joining node takes the settings, not the URL: it reads each input by its record's URL."""
    return {**farm_wide(settings), "input_store_url": settings.result_store_url()}


def with_farm_wide(settings: Settings, published: dict[str, Any]) -> Settings:
    """`settings` with the farm-wide values the head published (unknown keys ignored, each one validated)."""
    update = {k: v for k, v in published.items() if k in FARM_WIDE}
    try:
        return Settings.model_validate({**settings.model_dump(), **update})
    except ValidationError as exc:
        raise ConfigError(f"the farm's published settings are invalid: {_describe(exc)}") from None


class NodeDeclaration(BaseModel):
    """A node as declared in a nodes file: what a simulated (or overridden) card claims to be."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    # A simulated node's card. For a real GPU (named <host>-gpu<i>) the card describes itself: an entry of
    # that name only carries the overrides below.
    vram_gib: float | None = Field(default=None, gt=0, le=1024)
    compute_capability: str = Field(default="8.6", pattern=r"^\d+\.\d+$")
    gpu: str | None = None
    # The machine's RAM in GiB: offloaded weights live there. A real node measures its own; a simulated one
    # plans against this (None: host memory is not planned against).
    ram_gib: float | None = Field(default=None, gt=0, le=65536)
    # Overrides: VRAM kept free for other uses (a display, another app), models never sent here, and the
    # most images in one pipeline call on this node.
    reserve_gib: float = Field(default=0.0, ge=0, le=1024)
    forbid_models: tuple[str, ...] = ()
    max_batch: int | None = Field(default=None, ge=1, le=64)
    # This node's LoRA library, where it differs from the farm's `lora_dir` (a share mounted elsewhere, a local
    # folder of its own): a node publishes what it holds, and LoRA jobs go only to nodes holding their LoRAs.
    lora_dir: Path | None = None

    @model_validator(mode="after")
    def _reserve_below_vram(self) -> NodeDeclaration:
        if self.vram_gib is not None and self.reserve_gib >= self.vram_gib:
            raise ValueError(f"reserve_gib={self.reserve_gib:g} leaves nothing of vram_gib={self.vram_gib:g}")
        return self

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value


def two_card_nodes(big: str = "quadro-24g", small: str = "rtx-8g") -> list[NodeDeclaration]:
    """The farm the demo, the chaos bench and the tests simulate (the seed studio's room): a 24 GiB Turing
    Quadro beside an 8 GiB Ampere RTX."""
    return [
        NodeDeclaration(name=big, gpu="Quadro RTX 6000", vram_gib=24, compute_capability="7.5"),
        NodeDeclaration(name=small, gpu="GeForce RTX 3070", vram_gib=8, compute_capability="8.6"),
    ]


def load_nodes(path: str | Path | None = None) -> list[NodeDeclaration]:
    path = Path(path) if path else DEFAULT_NODES_FILE
    data = _read_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
        raise ConfigError(f"{path}: expected `nodes:` with a list of nodes")
    nodes = []
    for i, raw in enumerate(data["nodes"]):
        try:
            nodes.append(NodeDeclaration.model_validate(raw))
        except ValidationError as exc:
            raise ConfigError(f"{path}: nodes[{i}]: {_describe(exc)}") from None
    names = [n.name for n in nodes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: node names must be unique, got {names}")
    return nodes
