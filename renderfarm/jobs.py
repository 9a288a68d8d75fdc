"""What a user asks for (JobSpec), what the farm knows about it (Job), and the legal state moves.

This module sits at the bottom of the import graph: it knows nothing of models, Redis or Ray.
Family rules (size multiples, known model names) come in through pydantic's validation context
from whoever holds the catalog (`planning.catalog.Catalog`), see `JobSpec.validate_for`.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
import uuid
from enum import Enum
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from renderfarm.errors import shown
from renderfarm.webhook_urls import WebhookRules, webhook_refusal

MAX_PROMPT_CHARS = 4000
MAX_STEPS = 200
MAX_IMAGES_PER_JOB = 16
MAX_SIDE = 8192
MAX_TAGS = 32
MAX_TAG_CHARS = 64
SEED_MAX = 2**32 - 1
MAX_ERRORS_SHOWN = 5  # per spec: a dict with thousands of unknown keys still gives one short line
MAX_LORAS = 8  # per job: each unmerged LoRA costs every step, each fused one a re-patch of the weights
MAX_LORA_WEIGHT = 5.0  # |weight|: A1111 users stay within 0..2; "slider" LoRAs go negative and a little further
LORA_NAME = r"[^:<>\s][^:<>]*"  # a library name (the file's stem): no ':', '<' or '>', which the prompt syntax uses
# A1111's prompt syntax: <lora:name> or <lora:name:weight> (the weight 1 when left out).
LORA_TAG = re.compile(r"<lora:([^>]*)>")


class JobState(str, Enum):
    QUEUED = "queued"
    LEASED = "leased"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    WAITING = "waiting"  # held until the jobs it runs `after` are done (renderfarm/chains.py)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})

# Every legal move. `leased -> queued` and `running -> queued` are retries (worker died, lease expired,
# recoverable error); `failed -> queued` and `cancelled -> queued` are explicit retries by an operator
# (`renderfarm retry`), `-> waiting` when the job still has parents to wait for. A waiting job is queued when
# its parents are done, failed or cancelled with them (the store's scripts do both, chain.lua). Done is final.
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.LEASED, JobState.CANCELLED}),
    JobState.LEASED: frozenset({JobState.RUNNING, JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED, JobState.CANCELLED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.WAITING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.WAITING}),
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.FAILED, JobState.CANCELLED}),
}


class IllegalTransition(ValueError):
    def __init__(self, job_id: str, current: JobState | str, target: JobState | str):
        self.job_id, self.current, self.target = job_id, JobState(current), JobState(target)
        super().__init__(f"job {job_id}: illegal transition {self.current.value} -> {self.target.value}")


def check_transition(job_id: str, current: JobState | str, target: JobState | str) -> None:
    if JobState(target) not in TRANSITIONS[JobState(current)]:
        raise IllegalTransition(job_id, current, target)


def sources_of(target: JobState) -> frozenset[JobState]:
    """The states from which `target` may be entered."""
    return frozenset(s for s, nexts in TRANSITIONS.items() if target in nexts)


class ModelRules(Protocol):
    """What JobSpec needs to know of a model: `planning.catalog.Catalog` satisfies it."""

    def get(self, name: str) -> Any: ...  # returns an object with check_size(field, value)


NUL = "\x00"


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text (Redis, JSON, the PNG's parameters chunk), or None.

    Lone surrogates (half of a UTF-16 pair, e.g. from a badly decoded file) are not encodable as UTF-8,
    and a NUL ends the string for C code such as tokenizers."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"contains a lone surrogate {value[exc.start]!r} at position {exc.start} (not valid unicode)"
    if NUL in value:
        return f"contains a NUL character at position {value.index(NUL)}"
    return None


# Text fields take str only (no bytes, numbers or None); numbers are ints where the field is an int
# (512.0 is refused, like "512" and True), and guidance takes an int or a finite float.
StrictText = Annotated[str, Field(strict=True)]


def _storable(cls: Any, value: Any, info: ValidationInfo) -> Any:
    """A text field's check before pydantic's own str check, whose message for a lone surrogate does not say what
    is wrong (a validator of JobSpec and LoraRef)."""
    if isinstance(value, str) and (problem := text_problem(value)):
        raise ValueError(f"{info.field_name} {problem}")
    return value


def _finite(cls: Any, value: Any, info: ValidationInfo) -> Any:
    """A number field takes a finite int or float, never a boolean (a validator of JobSpec and LoraRef)."""
    if isinstance(value, bool):
        raise ValueError(f"{info.field_name} must be a number, not a boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{info.field_name} must be a finite number")
    return value


class LoraRules(Protocol):
    """What JobSpec needs to know of the farm's LoRAs (client.py's view of what its nodes hold)."""

    def resolve(self, name: str, sha256: str | None, family: str) -> str: ...  # the sha256 a job pins, or raises


class LoraRef(BaseModel):
    """One LoRA a job applies: its name in the farm's LoRA library, its weight, and the content hash (sha256 of
    the file) of the copy it was submitted against: filled in at submit (the job keeps it, so a render can be
    reproduced, and a node holding another copy of that name is treated as lacking it)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200, pattern=rf"^{LORA_NAME}$", strict=True)
    weight: float = Field(default=1.0, ge=-MAX_LORA_WEIGHT, le=MAX_LORA_WEIGHT, strict=True)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", strict=True)

    _storable_name = field_validator("name", mode="before")(_storable)
    _weight_finite = field_validator("weight", mode="before")(_finite)


def lora_tags(prompt: str) -> tuple[str, list[dict[str, Any]]]:
    """Take A1111's `<lora:name:weight>` tags out of a prompt: (the prompt without them, the LoRAs they name, in
    order, as LoraRef fields). A tag it cannot read (no name, a weight that is not a number, A1111's separate
    text-encoder/UNet weights) raises ValueError naming it."""
    found: list[dict[str, Any]] = []

    def take(match: re.Match[str]) -> str:
        parts = match.group(1).split(":")
        name = parts[0].strip()
        if not name or len(parts) > 2:
            raise ValueError(f"prompt tag {shown(match.group(0))}: expected <lora:name> or <lora:name:weight>")
        weight: float = 1.0
        if len(parts) == 2:
            try:
                weight = float(parts[1])
            except ValueError:
                raise ValueError(f"prompt tag {shown(match.group(0))}: weight {parts[1]!r} is not a number") from None
        found.append({"name": name, "weight": weight})
        return " "

    stripped = LORA_TAG.sub(take, prompt)
    if not found:
        return prompt, []
    rest = re.sub(r"[ \t]{2,}", " ", stripped).strip()
    if not rest:
        raise ValueError("prompt holds nothing but <lora:...> tags: the model needs words to render")
    return rest, found


JOB_REF = r"(#[0-9]{1,5}|[A-Za-z0-9_-]{1,80})"  # a job's id, or "#N": the Nth spec of the same batch (0-based)
MAX_PARENTS = 32
INPUT_REF = r"^sha256:[0-9a-f]{64}$"  # an uploaded image, by the SHA-256 of its stored bytes (renderfarm/inputs.py)
DEFAULT_STRENGTH = 0.75  # A1111's "Denoising strength" default for img2img


def image_task(init_image: Any, mask: Any) -> str:
    """"txt2img", "img2img" (an init image) or "inpaint" (an init image and a mask): of a spec or a render request."""
    return "inpaint" if mask is not None else "img2img" if init_image is not None else "txt2img"


def strength_used(init_image: Any, strength: float | None) -> float | None:
    """The strength a render uses: None for text-to-image, DEFAULT_STRENGTH when an init image has none given."""
    if init_image is None:
        return None
    return DEFAULT_STRENGTH if strength is None else strength


class HiresFix(BaseModel):
    """A1111's "Hires. fix": a second, img2img pass at `scale` times the size (the first pass's images resized
    with Lanczos), `strength` its denoising strength, `steps` its steps (0: the first pass's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: float = Field(default=2.0, gt=1.0, le=4.0, strict=True)
    strength: float = Field(default=0.7, ge=0.0, le=1.0, strict=True)
    steps: int = Field(default=0, ge=0, le=MAX_STEPS, strict=True)

    _finite_numbers = field_validator("scale", "strength", mode="before")(_finite)


class JobSpec(BaseModel):
    """One image request: text-to-image, or with image inputs img2img and inpainting. Unknown fields are errors,
    not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=False)

    model: str = Field(min_length=1, max_length=200, strict=True)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS, strict=True)
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS, strict=True)
    width: int = Field(default=512, ge=8, le=MAX_SIDE, strict=True)
    height: int = Field(default=512, ge=8, le=MAX_SIDE, strict=True)
    steps: int = Field(default=20, ge=1, le=MAX_STEPS, strict=True)
    guidance: float = Field(default=5.0, ge=0.0, le=50.0, strict=True)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX, strict=True)
    num_images: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_JOB, strict=True)
    priority: int = Field(default=0, ge=-100, le=100, strict=True)
    team: str = Field(default="default", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                      strict=True)
    tags: tuple[StrictText, ...] = Field(default=(), max_length=MAX_TAGS)
    # LoRAs applied on the base model, each at its weight; `<lora:name:weight>` in the prompt means the same.
    loras: tuple[LoraRef, ...] = Field(default=(), max_length=MAX_LORAS)
    # The copy of the model the job renders with (actors/model_assets.py fingerprint), pinned at submit to the one
    # most nodes hold (or the one named): a node holding another copy is treated as lacking the model.
    model_fingerprint: str | None = Field(default=None, min_length=1, max_length=80, pattern=r"^[0-9A-Za-z]+$",
                                          strict=True)
    # Where the farm POSTs a signed JSON body when the job reaches done, failed or cancelled (renderfarm/webhooks).
    webhook: str | None = Field(default=None, strict=True)
    # The sampler by its A1111 name and the schedule type (renderfarm/samplers.py); None: the model's own scheduler.
    sampler: str | None = Field(default=None, min_length=1, max_length=40, strict=True)
    schedule: str | None = Field(default=None, min_length=1, max_length=40, strict=True)
    # Chains (renderfarm/chains.py): the jobs this one waits for (ids, or "#N" for the batch's Nth spec); it is
    # queued when all are done, and failed or cancelled with the first that fails or is cancelled. `init_from`:
    # an earlier job's output as the init image ("JOB": its image k for this job's image k; "JOB:i": its image
    # i for all), which implies waiting for it. `hires`: a high-resolution pass after this text-to-image job
    # (the client builds the two-job chain); on a job with `init_from` it marks the hires pass itself.
    after: tuple[Annotated[str, Field(pattern=rf"^{JOB_REF}$", strict=True)], ...] = Field(
        default=(), max_length=MAX_PARENTS)
    init_from: str | None = Field(default=None, pattern=rf"^{JOB_REF}(:[0-9]{{1,2}})?$", strict=True)
    # Image inputs (img2img, inpainting): references to uploaded images, content-addressed ("sha256:<hex>"), which
    # the client makes when it uploads them (renderfarm/inputs.py); `mask` needs `init_image`. `strength`: how much
    # of the init image is repainted (0: kept, 1: ignored; None: 0.75 with an init image); `mask_blur`: pixels of
    # the mask's edge blurred (A1111's "Mask blur"); `resize_mode`: how an init image of another size is fitted
    # ("none": it must be the job's size already, "resize", "crop" and resize, resize and "fill").
    init_image: str | None = Field(default=None, pattern=INPUT_REF, strict=True)
    mask: str | None = Field(default=None, pattern=INPUT_REF, strict=True)
    strength: float | None = Field(default=None, ge=0.0, le=1.0, strict=True)
    mask_blur: int = Field(default=4, ge=0, le=64, strict=True)
    resize_mode: Literal["none", "resize", "crop", "fill"] = "none"
    # Inpainting's area (A1111's "Inpaint area"): "whole" picture, or "masked" only: the mask's bounding box grown
    # by `mask_padding` pixels is cut out, rendered at the job's size, and pasted back ("Only masked padding").
    inpaint_area: Literal["whole", "masked"] = "whole"
    mask_padding: int = Field(default=32, ge=0, le=256, strict=True)
    hires: HiresFix | None = None

    @model_validator(mode="before")
    @classmethod
    def _loras_from_prompt(cls, data: Any) -> Any:
        """A1111's `<lora:name:weight>` tags in the prompt become `loras` (after any given there) and leave the
        prompt text: that is how artists write them, and what the model should never read as words."""
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or "<lora:" not in data["prompt"]:
            return data
        prompt, found = lora_tags(data["prompt"])
        given = data.get("loras", ())
        if not isinstance(given, (list, tuple)):
            return data  # the field's own check says what is wrong
        return {**data, "prompt": prompt, "loras": [*given, *found]}

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_a_list(cls, value: Any) -> Any:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"loras must be a list of {{name, weight}}, not {type(value).__name__}")
        return value

    @field_validator("loras")
    @classmethod
    def _loras_known(cls, value: tuple[LoraRef, ...], info: ValidationInfo) -> tuple[LoraRef, ...]:
        names = [lora.name for lora in value]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"LoRA {twice[0]!r} is given twice (in loras or as a <lora:...> tag in the prompt)")
        context = info.context or {}
        rules, catalog = context.get("loras"), context.get("catalog")
        if rules is None or catalog is None or "model" not in info.data or not value:
            return value
        family = catalog.get(info.data["model"]).family.name
        # The hash each LoRA is pinned to (the copy the farm holds now, or the one asked for): a ValueError names it.
        return tuple(lora.model_copy(update={"sha256": rules.resolve(lora.name, lora.sha256, family)})
                     for lora in value)

    _storable_text = field_validator("model", "prompt", "negative_prompt", "team", mode="before")(_storable)

    @field_validator("webhook")
    @classmethod
    def _webhook_valid(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and (problem := webhook_refusal(value, (info.context or {}).get("webhooks"))):
            raise ValueError(problem)
        return value

    @field_validator("sampler")
    @classmethod
    def _sampler_suits_model(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A sampler the farm knows (renderfarm/samplers.py) that can render the model's family (with the catalog)."""
        from renderfarm.samplers import check

        catalog = (info.context or {}).get("catalog")
        family = catalog.get(info.data["model"]).family if catalog is not None and "model" in info.data else None
        problem = check(value, None, flow=bool(family and family.flow_matching), family=family.name if family else "")
        if problem and (family is not None or problem.startswith("unknown")):  # without a catalog: the name only
            raise ValueError(problem)
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule_suits_sampler(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A schedule type that the job's sampler takes (none without a sampler, but Automatic)."""
        from renderfarm.samplers import SAMPLERS, SCHEDULES

        if value is None or value == "Automatic":
            return value
        if value not in SCHEDULES:
            raise ValueError(f"unknown schedule type {value!r}; known: {', '.join(SCHEDULES)}")
        sampler = info.data.get("sampler")
        if sampler is None:
            if "sampler" in info.data:  # (an invalid sampler has already said what is wrong)
                raise ValueError(f"the {value} schedule needs a sampler to go with it (sampler)")
            return value
        if all(value not in variant.schedules for variant in SAMPLERS.get(sampler, ())):
            raise ValueError(f"sampler {sampler!r} has no {value} schedule")
        return value

    _strength_finite = field_validator("strength", mode="before")(_finite)

    @field_validator("after")
    @classmethod
    def _parents_once(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError(f"{sorted({p for p in value if value.count(p) > 1})[0]!r} is named twice")
        return value

    @field_validator("init_image")
    @classmethod
    def _one_init_image(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("init_from") is not None:
            raise ValueError("a job takes its init image from init_image or from an earlier job (init_from), not both")
        return value

    @field_validator("mask", "strength")
    @classmethod
    def _needs_init_image(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and "init_image" in info.data and info.data.get("init_image") is None \
                and info.data.get("init_from") is None:
            what = "inpainting needs the image to paint in" if info.field_name == "mask" else "only an image input has one"
            raise ValueError(f"{what}: give init_image (or init_from) too")
        return value

    @field_validator("hires")
    @classmethod
    def _hires_after_txt2img(cls, value: HiresFix | None, info: ValidationInfo) -> HiresFix | None:
        if value is not None and info.data.get("init_from") is None and (
                info.data.get("init_image") is not None or info.data.get("mask") is not None):
            raise ValueError("a hires fix follows a text-to-image pass, and this job has an init image")
        return value

    @property
    def task(self) -> str:
        return image_task(self.init_image or self.init_from, self.mask)

    @property
    def effective_strength(self) -> float | None:
        return strength_used(self.init_image or self.init_from, self.strength)

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is blank")
        return value

    _guidance_finite = field_validator("guidance", mode="before")(_finite)

    @field_validator("tags", mode="before")
    @classmethod
    def _tags_a_list(cls, value: Any) -> Any:
        # A str would not pass as a tuple anyway; a set would, in no stable order.
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"tags must be a list of strings, not {type(value).__name__}")
        return value

    @field_validator("tags")
    @classmethod
    def _tags_valid(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, tag in enumerate(value):
            if problem := text_problem(tag):
                raise ValueError(f"tag {i} {problem}")
            if not 1 <= len(tag) <= MAX_TAG_CHARS or not tag.strip():
                raise ValueError(f"tag {i} {shown(tag)} must be 1..{MAX_TAG_CHARS} characters, not blank")
            if any(unicodedata.category(ch) == "Cc" for ch in tag):
                raise ValueError(f"tag {i} {shown(tag)} contains a control character")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str, info: ValidationInfo) -> str:
        catalog = (info.context or {}).get("catalog")
        if catalog is not None:
            catalog.get(value)  # UnknownModelError lists the known models
        return value

    @field_validator("width", "height")
    @classmethod
    def _size_suits_family(cls, value: int, info: ValidationInfo) -> int:
        if value % 8:
            raise ValueError(f"{info.field_name}={value} must be a multiple of 8")
        catalog = (info.context or {}).get("catalog")
        if catalog is not None and "model" in info.data:  # absent when the model itself was invalid
            catalog.get(info.data["model"]).check_size(info.field_name, value)
        return value

    @classmethod
    def validate_for(
        cls, data: Any, catalog: ModelRules, loras: LoraRules | None = None, webhooks: WebhookRules | None = None,
    ) -> JobSpec:
        """Validate user input (a dict or a JobSpec) against the catalog's family rules and, with `loras`, the
        farm's LoRAs (each known, made for the model's family, and pinned to the hash of the copy it will get);
        with `webhooks`, a webhook to a loopback or private address as written is refused unless the farm
        allows those."""
        if isinstance(data, JobSpec):
            data = data.model_dump()
        return cls.model_validate(data, context={"catalog": catalog, "loras": loras, "webhooks": webhooks})

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def lora_set(self) -> tuple[tuple[str, str | None, float], ...]:
        """The LoRAs as a pipeline applies them, (name, sha256, weight) in name order: the order they are given
        in does not change the image (their deltas add up), so jobs listing them differently share a batch."""
        return tuple(sorted((lora.name, lora.sha256, lora.weight) for lora in self.loras))

    def batch_key(self) -> tuple[Any, ...]:
        """Jobs with the same key can share one pipeline call: the same model, size, steps, guidance, LoRAs,
        sampler, and task with its strength, mask blur, resize mode and inpaint area (their images may differ)."""
        key = (self.model, self.width, self.height, self.steps, self.guidance, self.lora_set(), self.sampler,
               self.schedule)
        if self.task == "txt2img":
            return key
        key = (*key, self.task, self.effective_strength, self.mask_blur, self.resize_mode)
        return key if self.mask is None else (*key, self.inpaint_area, self.mask_padding)


def _loc_part(part: int | str) -> str:
    text = str(part)
    # An unknown field's name is user input: keep the line short, on one line and readable.
    return text if len(text) <= 40 and text.isprintable() and text.strip() == text and text else shown(text)


def describe_validation_error(exc: ValidationError) -> str:
    """One short line for all problems, each naming the field: `width: must be a multiple of 16 ...`."""
    lines = []
    errors = exc.errors(include_url=False, include_input=False)
    for err in errors[:MAX_ERRORS_SHOWN]:
        loc = ".".join(_loc_part(part) for part in err["loc"]) or "spec"
        msg = " ".join(err["msg"].removeprefix("Value error, ").splitlines())
        lines.append(f"{loc}: {msg}")
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"and {len(errors) - MAX_ERRORS_SHOWN} more problems")
    return "; ".join(lines)


def new_job_id() -> str:
    return uuid.uuid4().hex[:16]


class Job(BaseModel):
    """What the farm knows about one job; stored as a Redis hash (see cluster.store)."""

    model_config = ConfigDict(extra="ignore")

    id: str
    spec: JobSpec
    state: JobState = JobState.QUEUED
    attempts: int = 0
    node: str | None = None
    batch_id: str | None = None
    created_at: float = Field(default_factory=time.time)
    updated_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    peak_memory_mb: float | None = None
    images: int = 0
    profile: str | None = None  # the profile the node rendered it with
    escalations: list[str] = Field(default_factory=list)  # out-of-memory retries: "from -> to"
    blocked_by: str | None = None  # the parent whose failure or cancel ended this job (chains)

    def transition(self, target: JobState) -> None:
        """Change state in memory, refusing illegal moves (the store does the same in Redis)."""
        check_transition(self.id, self.state, target)
        self.state = target
