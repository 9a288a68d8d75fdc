"""Image inputs (issue 19): an init image (img2img) and a mask (inpainting), checked, normalised and stored once.

    valid = check_image(data, "init_image")        # a real PNG/JPEG/WebP within the limits, as normalised PNG
    ref, valid = InputStore.for_settings(store, settings).put(data, "init_image")   # "sha256:<hex>"
    png = read_input(store, ref)                   # what a worker reads: the normalised PNG's bytes

What is accepted (docs/inputs.md says the same for users):
- PNG, JPEG or WebP only, identified by content (Pillow opens them with those three decoders and no other), at
  most `input_max_bytes` as sent. GIF, BMP, TIFF and everything else is refused, naming what it looks like.
- Width and height are read from the header BEFORE anything is decoded: each side 8..8192, and at most
  `input_max_pixels` in all; Pillow's own decompression-bomb warning is an error here too, so a small file that
  declares a huge image is refused without allocating it.
- One frame: an animated PNG or WebP is refused (which frame was meant cannot be guessed), not cut to its first.
- A truncated or corrupt file is refused (the decoder must read every pixel).
- Modes: 1, L, LA, P, PA, RGB, RGBA (palette and grey images are everyday PNGs: converted). CMYK is refused
  (converting it without its colour profile changes the colours: export it as RGB), and so are 16- and 32-bit
  modes (I;16, I, F: save as 8-bit), rather than silently clipped.
- The EXIF orientation is applied (what a viewer shows is what is rendered); metadata is not kept.
- An init image becomes RGB; transparency is flattened onto white (A1111's default img2img background).
- A mask becomes single-channel "L", white (255) repainted, black kept, grey in between. A mask with a real
  alpha channel (not fully opaque) is its alpha channel (A1111 reads RGBA masks so); else its luminance
  (ITU-R 601-2, Pillow's convert("L")). No threshold is applied.

Storage: the normalised image is encoded as PNG (fixed settings, no metadata), and its SHA-256 is its reference,
`sha256:<hex>`. The PNG goes to the farm's result store under `inputs/<hex>.png`; Redis keeps only a small JSON
record per input (`Keys.input(hex)`: width, height, mode, bytes, url, created) that expires. The same image
uploaded twice is stored once. Expiry: the record lives `ttl` from the upload that wrote the blob, `ttl` being
input_ttl_seconds but never more than result_ttl_seconds, since the result store's sweep deletes every blob
older than that: the record therefore expires no later than its blob (give or take the clocks of the Redis
host and the store). A submit that uses an input with less than half its lifetime left writes the blob again
and renews the record, so a job submitted with an input finds it for at least ttl/2 (3.5 days by default).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from renderfarm.cluster.blobs import BlobStore, is_missing, open_blob_store, open_result_store, store_for
from renderfarm.cluster.store import Store
from renderfarm.errors import BlobStoreError, RenderfarmError, SpecError

if TYPE_CHECKING:
    from renderfarm.config import Settings
    from renderfarm.jobs import JobSpec

__all__ = [
    "InputMissing", "InputStore", "InvalidImage", "SubmitInputs", "ValidImage", "check_image", "decode_base64_image",
    "image_bytes", "read_input",
]

WHATS = ("init_image", "mask")
MODE_OF = {"init_image": "RGB", "mask": "L"}  # what each becomes
FORMATS = ("PNG", "JPEG", "WEBP")
MIN_SIDE, MAX_SIDE = 8, 8192
DEFAULT_MAX_BYTES = 20 * 2**20  # config.Settings.input_max_bytes
DEFAULT_MAX_PIXELS = 8192 * 4096  # config.Settings.input_max_pixels
DEFAULT_TTL_S = 7 * 24 * 3600  # config.Settings.input_ttl_seconds
BLOB_PREFIX = "inputs/"
# zlib level 1: 1024x1024 encodes several times faster than the default 6 for a file some 10-20% larger (the
# benchmark, bench/input_upload.py). Fixed, so the same image always gets the same reference (with one Pillow).
PNG_COMPRESS_LEVEL = 1
_CONVERTED = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX"}
_REFUSED_MODES = {
    "CMYK": "CMYK is not converted (without its colour profile the colours would change): export it as RGB",
    "I;16": "16-bit grey is not converted (clipping it to 8 bits would be a guess): save it as 8-bit",
    "I": "32-bit integer pixels are not converted: save it as 8-bit",
    "F": "floating-point pixels are not converted: save it as 8-bit",
}
_LOOKS_LIKE = ((b"GIF8", "a GIF"), (b"BM", "a BMP"), (b"II*\x00", "a TIFF"), (b"MM\x00*", "a TIFF"),
               (b"%PDF", "a PDF"), (b"\x00\x00\x01\x00", "an ICO"), (b"8BPS", "a Photoshop file"),
               (b"\xff\x0a", "a JPEG XL"), (b"\x00\x00\x00\x0cJXL", "a JPEG XL"), (b"qoif", "a QOI image"))


class InvalidImage(RenderfarmError, ValueError):
    """An image input that is refused: the message names the field (`init_image` or `mask`) and the reason.
    `too_large`: refused for its size in bytes (the HTTP API answers 413 for it, 422 for the others)."""

    def __init__(self, what: str, reason: str, *, too_large: bool = False) -> None:
        super().__init__(f"{what}: {reason}")
        self.what = what
        self.reason = reason
        self.too_large = too_large


class InputMissing(RenderfarmError, LookupError):
    """No uploaded image under that reference: it expired, or was never uploaded (to this farm)."""


@dataclass(frozen=True)
class ValidImage:
    """A checked image, normalised: `png` holds it as PNG (mode RGB for an init image, L for a mask)."""

    what: str
    png: bytes
    width: int
    height: int
    mode: str
    source_format: str  # PNG, JPEG or WEBP
    source_bytes: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.png).hexdigest()

    @property
    def ref(self) -> str:
        return "sha256:" + self.sha256


def _looks_like(data: bytes) -> str:
    for magic, name in _LOOKS_LIKE:
        if data.startswith(magic):
            return f"it looks like {name}"
    if data[4:8] == b"ftyp":
        return "it looks like an HEIC/AVIF/MP4 file"
    if data.lstrip()[:1] == b"<":
        return "it looks like text: SVG or HTML?"
    return "its first bytes match no image format"


def check_image(data: bytes, what: str, *, max_bytes: int = DEFAULT_MAX_BYTES,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> ValidImage:
    """`data` checked as an image input for `what` ("init_image" or "mask") and normalised (the module docstring
    says what is accepted and how it is converted). Raises InvalidImage naming `what` and the reason, and
    nothing else for any bytes."""
    if what not in WHATS:
        raise ValueError(f"what={what!r}: expected one of {', '.join(WHATS)}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise InvalidImage(what, f"expected the image's bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise InvalidImage(what, "empty: no image data")
    if len(data) > max_bytes:
        raise InvalidImage(what, f"{len(data)} bytes is more than the farm's cap of {max_bytes} bytes per image "
                           "(input_max_bytes)", too_large=True)
    from PIL import Image, UnidentifiedImageError

    with warnings.catch_warnings():
        # Pillow warns past MAX_IMAGE_PIXELS and raises past twice that: both are refusals here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=list(FORMATS))
        except UnidentifiedImageError:
            raise InvalidImage(what, f"not a PNG, JPEG or WebP image ({_looks_like(data)}): "
                               "convert it to PNG") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InvalidImage(what, f"declares too many pixels (a decompression bomb?): {exc}") from None
        except Exception as exc:  # any decoder's complaint about a header is this image's fault
            raise InvalidImage(what, f"an unreadable image header: {type(exc).__name__}: {exc}") from None
        with image:
            fmt = image.format or "image"
            width, height = image.size  # from the header: nothing is decoded yet
            if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
                raise InvalidImage(what, f"{width}x{height}: each side must be {MIN_SIDE}..{MAX_SIDE} pixels")
            if width * height > max_pixels:
                raise InvalidImage(what, f"{width}x{height} is {width * height} pixels, more than the farm's "
                                   f"cap of {max_pixels} (input_max_pixels)")
            if image.mode in _REFUSED_MODES or image.mode.startswith("I;16"):
                raise InvalidImage(what, f"mode {image.mode}: {_REFUSED_MODES.get(image.mode, _REFUSED_MODES['I;16'])}")
            try:
                frames = int(getattr(image, "n_frames", 1))
            except Exception as exc:
                raise InvalidImage(what, f"a corrupt {fmt}: {type(exc).__name__}: {exc}") from None
            if frames > 1:
                raise InvalidImage(what, f"an animated {fmt} of {frames} frames: give one still image (which "
                                   "frame was meant cannot be guessed)")
            try:
                image.load()  # every pixel: a truncated file fails here
                out = _normalised(image, what)
            except InvalidImage:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise InvalidImage(what, f"declares too many pixels (a decompression bomb?): {exc}") from None
            except Exception as exc:
                raise InvalidImage(what, f"a truncated or corrupt {fmt}: {type(exc).__name__}: {exc}") from None
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return ValidImage(what=what, png=buffer.getvalue(), width=out.width, height=out.height, mode=out.mode,
                      source_format=fmt, source_bytes=len(data))


def _normalised(image: Any, what: str) -> Any:
    """A loaded image, EXIF orientation applied, converted for `what` (see the module docstring)."""
    from PIL import Image, ImageOps

    if image.mode not in _CONVERTED:
        raise InvalidImage(what, f"mode {image.mode} is not converted: save it as RGB, RGBA or greyscale")
    image = ImageOps.exif_transpose(image) or image
    alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    if what == "init_image":
        if not alpha:
            return image.convert("RGB")
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if alpha:
        channel = image.convert("RGBA").getchannel("A")
        if channel.getextrema() != (255, 255):  # a real alpha channel: it is the mask
            return channel
    return image.convert("L")


def image_bytes(value: Any, what: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image given as bytes, a pathlib.Path (read here) or a PIL image (encoded as PNG, losslessly);
    InvalidImage naming `what` otherwise (a file that cannot be read, one past `max_bytes`)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, Path):
        try:
            size = value.stat().st_size
            if size > max_bytes:
                raise InvalidImage(what, f"{value}: {size} bytes is more than the farm's cap of {max_bytes} bytes "
                                   "per image (input_max_bytes)", too_large=True)
            return value.read_bytes()
        except OSError as exc:
            raise InvalidImage(what, f"cannot read {value}: {exc.strerror or exc}") from None
    if is_pil_image(value):
        buffer = io.BytesIO()
        try:
            value.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        except Exception as exc:  # a mode PNG cannot hold (CMYK, ...), an image already closed
            raise InvalidImage(what, f"this PIL image (mode {getattr(value, 'mode', '?')}) cannot be encoded "
                               f"as PNG: {type(exc).__name__}: {exc}") from None
        return buffer.getvalue()
    raise InvalidImage(what, f"expected a 'sha256:<hex>' reference, image bytes, a pathlib.Path or a PIL image, "
                       f"got {type(value).__name__}")


def decode_base64_image(text: Any, what: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image sent as base64 text, bare (A1111's init_images) or as a `data:image/...;base64,` URL;
    InvalidImage naming `what` when it is not base64, or decodes past `max_bytes` (checked before decoding)."""
    if not isinstance(text, str):
        raise InvalidImage(what, f"expected base64 image text, got {type(text).__name__}")
    body = text.strip()
    if body.startswith("data:"):
        header, comma, body = body.partition(",")
        if not comma or not header.endswith(";base64") or not header.startswith("data:image/"):
            raise InvalidImage(what, "a data URL must read data:image/<png|jpeg|webp>;base64,<data>")
    if len(body) * 3 // 4 > max_bytes + 3:
        raise InvalidImage(what, f"about {len(body) * 3 // 4} bytes is more than the farm's cap of {max_bytes} bytes "
                           "per image (input_max_bytes)", too_large=True)
    import base64
    import binascii

    try:
        return base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(what, f"not valid base64: {exc}") from None


def is_pil_image(value: Any) -> bool:
    """Whether `value` is a PIL image (without importing Pillow when it cannot be one)."""
    return type(value).__module__.startswith("PIL.") and hasattr(value, "save") and hasattr(value, "mode")


def is_image_object(value: Any) -> bool:
    """What a submit uploads for the caller: bytes, a Path or a PIL image (a string is a reference)."""
    return isinstance(value, (bytes, bytearray, memoryview, Path)) or is_pil_image(value)


def _hex_of(ref: Any) -> str | None:
    if isinstance(ref, str) and ref.startswith("sha256:") and len(ref) == 71:
        hexpart = ref[7:]
        if all(c in "0123456789abcdef" for c in hexpart):
            return hexpart
    return None


def _missing(ref: str, ttl_s: int | None = None) -> InputMissing:
    kept = f" (inputs are kept {ttl_s} s after their upload)" if ttl_s else ""
    return InputMissing(f"no uploaded image {ref}: expired or never uploaded{kept}; upload it again")


def lifetime(values: Mapping[str, Any]) -> int:
    """How long an input is kept, from settings (or the values the head published): input_ttl_seconds, never
    more than result_ttl_seconds (the result store's sweep deletes older blobs)."""
    def number(name: str, default: int) -> int:
        value = values.get(name)
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default

    return min(number("input_ttl_seconds", DEFAULT_TTL_S), number("result_ttl_seconds", DEFAULT_TTL_S))


class InputStore:
    """Image inputs of one farm: the PNGs in `blobs` (under inputs/), a small record per input in Redis."""

    def __init__(self, store: Store, blobs: BlobStore, ttl_s: int = DEFAULT_TTL_S, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.store = store
        self.blobs = blobs
        self.ttl_s = int(ttl_s)
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    @classmethod
    def for_settings(cls, store: Store, settings: Settings) -> InputStore:
        """The inputs of the farm these settings describe (the head, a worker, the API with its settings)."""
        return cls(store, open_result_store(settings), lifetime(settings.model_dump()),
                   max_bytes=settings.input_max_bytes, max_pixels=settings.input_max_pixels)

    @classmethod
    def for_farm(cls, store: Store, blob_options: Mapping[str, Any] | None = None) -> InputStore:
        """The inputs of the farm on `store`, as its head published them (where, how long, the caps); a farm that
        published nothing yet: this process's settings (RENDERFARM_* environment). `blob_options`: how to reach
        an S3 store (cluster/blobs); None: the endpoint and region the farm published."""
        from renderfarm.cluster.blobs import options_from_published
        from renderfarm.config import Settings

        published = store.published_settings()
        options = dict(blob_options) if blob_options is not None else options_from_published(published)
        url = published.get("input_store_url")
        if not isinstance(url, str) or not url:
            settings = Settings.load()
            url, options = settings.result_store_url(), {**settings.result_store_options(), **options}
            published = {**settings.model_dump(), **published}

        def cap(name: str, default: int) -> int:
            value = published.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default

        return cls(store, open_blob_store(url, **options), lifetime(published),
                   max_bytes=cap("input_max_bytes", DEFAULT_MAX_BYTES), max_pixels=cap("input_max_pixels",
                                                                                      DEFAULT_MAX_PIXELS))

    def check(self, data: bytes, what: str) -> ValidImage:
        return check_image(data, what, max_bytes=self.max_bytes, max_pixels=self.max_pixels)

    def put(self, data: bytes, what: str) -> tuple[str, ValidImage]:
        """Check `data` as `what`, store it (once: the same image again only renews it when half its life is
        gone), and return its reference with the checked image. InvalidImage for a bad image."""
        valid = self.check(data, what)
        return self.keep(valid), valid

    def keep(self, valid: ValidImage) -> str:
        """Store a checked image (idempotent); its reference."""
        key = self.store.keys.input(valid.sha256)
        if self._remaining_ms(key) >= self.ttl_s * 500:
            return valid.ref
        self._write(valid.sha256, valid.png, {"width": valid.width, "height": valid.height, "mode": valid.mode})
        return valid.ref

    def renew(self, ref: str) -> dict[str, Any]:
        """An uploaded input named by reference, renewed (blob written again, record reset) when less than half
        its lifetime is left; its record. InputMissing when there is none."""
        record = self.describe(ref)
        if record is None:
            raise _missing(ref, self.ttl_s)
        hexpart = ref[7:]
        if self._remaining_ms(self.store.keys.input(hexpart)) < self.ttl_s * 500:
            record = self._write(hexpart, self.get(ref), {k: record[k] for k in ("width", "height", "mode")})
        return record

    def _remaining_ms(self, key: str) -> int:
        remaining = self.store.redis.pttl(key)
        return remaining if remaining >= 0 else -1  # -2: no record; -1 (no expiry) cannot happen: rewritten

    def _write(self, hexpart: str, png: bytes, about: dict[str, Any]) -> dict[str, Any]:
        """The blob first, then its record, expiring `ttl_s` after the moment before the blob was written: the
        record never outlives its blob (swept `result_ttl_seconds` >= ttl_s after its write)."""
        started = time.time()
        url = self.blobs.put(f"{BLOB_PREFIX}{hexpart}.png", png)
        record = {"ref": "sha256:" + hexpart, **about, "bytes": len(png), "url": url, "created": started,
                  "expires": started + self.ttl_s}
        self.store.redis.set(self.store.keys.input(hexpart), json.dumps(record),
                             pxat=int((started + self.ttl_s) * 1000))
        return record

    def describe(self, ref: str) -> dict[str, Any] | None:
        """The record of an uploaded input (ref, width, height, mode, bytes, url, created, expires: epoch
        seconds), or None when there is none (expired, never uploaded, not a reference, or unreadable)."""
        hexpart = _hex_of(ref)
        if hexpart is None:
            return None
        raw = self.store.redis.get(self.store.keys.input(hexpart))
        return _parsed(raw)

    def get(self, ref: str) -> bytes:
        """The normalised PNG of an uploaded input; InputMissing when it expired or was never uploaded."""
        record = self.describe(ref)
        if record is None:
            raise _missing(ref, self.ttl_s)
        try:
            return self.blobs.get(record["url"])
        except BlobStoreError as exc:
            if is_missing(exc):
                raise InputMissing(f"uploaded image {ref}: its file is gone from the store ({exc})") from exc
            raise


def _parsed(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    fields_ok = isinstance(record, dict) and isinstance(record.get("url"), str) and all(
        isinstance(record.get(k), int) for k in ("width", "height")) and record.get("mode") in ("RGB", "L")
    return record if fields_ok else None


def read_input(store: Store, ref: str, blob_options: Mapping[str, Any] | None = None) -> bytes:
    """The normalised PNG of the uploaded input `ref` (mode RGB for an init image, L for a mask), read by the URL
    its record holds: what a worker needs, given the farm's Store. `blob_options`: how to reach an S3 store
    (None: the endpoint and region the farm published; credentials from the AWS_* environment). InputMissing
    when it expired or was never uploaded; BlobStoreError when the store cannot be reached."""
    from renderfarm.cluster.blobs import options_from_published

    hexpart = _hex_of(ref)
    record = _parsed(store.redis.get(store.keys.input(hexpart))) if hexpart else None
    if record is None:
        raise _missing(ref)
    options = dict(blob_options) if blob_options is not None else options_from_published(store.published_settings())
    try:
        return store_for(record["url"], **options).get(record["url"])
    except BlobStoreError as exc:
        if is_missing(exc):
            raise InputMissing(f"uploaded image {ref}: its file is gone from the store ({exc})") from exc
        raise


class SubmitInputs:
    """The image inputs of one batch as FarmClient.submit_batch handles them: images given as objects are checked
    and replaced by their references (`take`), every reference is checked against Redis and against its job
    (`check`), and only then is anything written (`upload`: each distinct image once)."""

    def __init__(self, inputs: Callable[[], InputStore]):
        self._make = inputs
        self._inputs: InputStore | None = None
        self.pending: dict[str, ValidImage] = {}  # ref -> checked image, not uploaded yet
        self._seen: dict[tuple[str, Any], ValidImage] = {}  # the same object (or bytes) in many specs: checked once
        self.named: dict[str, dict[str, Any] | None] = {}  # ref given directly -> its record (None: missing)

    @property
    def inputs(self) -> InputStore:
        if self._inputs is None:
            self._inputs = self._make()
        return self._inputs

    def take(self, spec: Any, where: str) -> Any:
        """`spec` with its init_image and mask given as bytes, Path or PIL image replaced by their references
        (checked here, uploaded later); SpecError naming `where` and the field for a bad image. Anything else
        (a JobSpec, a reference, a wrong type) passes unchanged, for the spec's own validation."""
        if not isinstance(spec, Mapping) or not any(is_image_object(spec.get(what)) for what in WHATS):
            return spec
        spec = dict(spec)
        for what in WHATS:
            value = spec.get(what)
            if is_image_object(value):
                value = bytes(value) if isinstance(value, (bytearray, memoryview)) else value
                seen = (what, value if isinstance(value, (bytes, Path)) else id(value))
                try:
                    valid = self._seen.get(seen) or self.inputs.check(
                        image_bytes(value, what, max_bytes=self.inputs.max_bytes), what)
                except InvalidImage as exc:
                    raise SpecError(f"{where}: {exc}") from None
                self._seen[seen] = valid
                self.pending.setdefault(valid.ref, valid)
                spec[what] = valid.ref
        return spec

    def _about(self, ref: str) -> dict[str, Any] | None:
        if ref in self.pending:
            image = self.pending[ref]
            return {"width": image.width, "height": image.height, "mode": image.mode}
        if ref not in self.named:
            self.named[ref] = self.inputs.describe(ref)
        return self.named[ref]

    def check(self, specs: list[JobSpec]) -> list[str]:
        """One error per problem with the specs' inputs: a reference with no upload behind it, an init image used
        as a mask (or the reverse), an init image not of the job's size while resize_mode is "none", a mask not
        of its init image's size."""
        errors = []
        for i, spec in enumerate(specs):
            sizes = {}
            for what in WHATS:
                ref = getattr(spec, what)
                if ref is None:
                    continue
                about = self._about(ref)
                if about is None:
                    errors.append(f"jobs[{i}]: {what}: {_missing(ref, self.inputs.ttl_s)}")
                    continue
                if about["mode"] != MODE_OF[what]:
                    other = "an init image (RGB)" if about["mode"] == "RGB" else "a mask (L)"
                    errors.append(f"jobs[{i}]: {what}: {ref} was uploaded as {other}, not as {what} "
                                  f"({MODE_OF[what]}): upload it as {what}")
                    continue
                sizes[what] = (about["width"], about["height"])
            init, mask = sizes.get("init_image"), sizes.get("mask")
            if init and spec.resize_mode == "none" and init != (spec.width, spec.height):
                errors.append(f"jobs[{i}]: init_image: {init[0]}x{init[1]} is not the job's size "
                              f"{spec.width}x{spec.height}: resize it, or set resize_mode (resize, crop or fill) "
                              "to have the farm fit it")
            if init and mask and init != mask:
                errors.append(f"jobs[{i}]: mask: {mask[0]}x{mask[1]} is not the init image's size "
                              f"{init[0]}x{init[1]}")
        return errors

    def upload(self) -> None:
        """Store every image taken (each distinct one once) and renew the references given directly."""
        for valid in self.pending.values():
            self.inputs.keep(valid)
        for ref, record in self.named.items():
            if record is not None and ref not in self.pending:
                try:
                    self.inputs.renew(ref)
                except InputMissing as exc:  # expired since `check`: the batch is refused, nothing is enqueued
                    raise SpecError(f"{exc}; nothing was enqueued") from None
