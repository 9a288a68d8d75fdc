"""Image inputs checked and normalised (renderfarm/inputs.py check_image, image_bytes), without Redis: what is
accepted and how it is converted, and a hypothesis fuzz of bad files (truncated, huge declared dimensions,
decompression bombs, wrong modes, garbage, other formats), each refused with InvalidImage naming the field."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from renderfarm.inputs import InvalidImage, ValidImage, check_image, image_bytes

WHATS = ("init_image", "mask")


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_claiming(width: int, height: int, color_type: int = 2, data: bytes = b"\x00" * 16) -> bytes:
    """A PNG whose header declares width x height, followed by a few bytes of image data: a bomb's shape."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(data)) + chunk(b"IEND", b"")


def decoded(valid: ValidImage) -> Image.Image:
    image = Image.open(io.BytesIO(valid.png))
    image.load()
    return image


def refused(data, what="init_image", **limits) -> InvalidImage:
    with pytest.raises(InvalidImage) as caught:
        check_image(data, what, **limits)
    assert str(caught.value).startswith(f"{what}: "), caught.value
    return caught.value


# --- what is accepted, and how it is converted ------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_png_jpeg_and_webp_are_accepted_and_stored_as_png(fmt):
    valid = check_image(encoded(Image.new("RGB", (64, 48), (10, 200, 30)), fmt), "init_image")
    assert (valid.width, valid.height, valid.mode, valid.source_format) == (64, 48, "RGB", fmt)
    image = decoded(valid)
    assert image.format == "PNG" and image.size == (64, 48) and image.mode == "RGB"
    assert valid.ref == "sha256:" + valid.sha256 and len(valid.sha256) == 64


def test_the_same_image_gets_the_same_reference_and_another_one_another():
    one = encoded(Image.new("RGB", (32, 32), "red"))
    assert check_image(one, "init_image").ref == check_image(one, "init_image").ref
    assert check_image(one, "init_image").ref != check_image(encoded(Image.new("RGB", (32, 32), "blue")),
                                                             "init_image").ref
    assert check_image(one, "init_image").ref != check_image(one, "mask").ref  # RGB and L differ


def test_an_init_image_with_transparency_is_flattened_onto_white():
    image = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    out = decoded(check_image(encoded(image), "init_image"))
    assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)


def test_palette_grey_and_grey_alpha_images_are_converted():
    palette = Image.new("P", (16, 16), 3)
    assert decoded(check_image(encoded(palette), "init_image")).mode == "RGB"
    assert decoded(check_image(encoded(Image.new("LA", (16, 16), (80, 255))), "init_image")).getpixel((1, 1)) == (
        80, 80, 80)
    assert decoded(check_image(encoded(Image.new("1", (16, 16), 1)), "mask")).getpixel((1, 1)) == 255


def test_a_mask_is_single_channel_by_luminance_or_by_its_alpha():
    rgb = check_image(encoded(Image.new("RGB", (16, 16), (255, 255, 255))), "mask")
    assert rgb.mode == "L" and decoded(rgb).getpixel((0, 0)) == 255
    red = decoded(check_image(encoded(Image.new("RGB", (16, 16), (255, 0, 0))), "mask"))
    assert red.getpixel((0, 0)) == 76  # ITU-R 601-2 luminance of pure red
    alpha = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    alpha.putpixel((3, 3), (0, 0, 0, 255))
    out = decoded(check_image(encoded(alpha), "mask"))
    assert out.getpixel((3, 3)) == 255 and out.getpixel((0, 0)) == 0  # painted (opaque) is repainted
    opaque = decoded(check_image(encoded(Image.new("RGBA", (16, 16), (0, 0, 0, 255))), "mask"))
    assert opaque.getpixel((0, 0)) == 0  # fully opaque: its luminance, not its alpha


def test_the_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to show
    valid = check_image(encoded(image, "JPEG", exif=exif), "init_image")
    assert (valid.width, valid.height) == (20, 40)


def test_image_bytes_takes_bytes_a_path_and_a_pil_image(tmp_path):
    image = Image.new("RGB", (16, 16), "green")
    path = tmp_path / "a.png"
    image.save(path)
    refs = {check_image(image_bytes(v, "init_image"), "init_image").ref
            for v in (path.read_bytes(), bytearray(path.read_bytes()), path, image)}
    assert len(refs) == 1
    assert "cannot read" in str(pytest.raises(InvalidImage, image_bytes, tmp_path / "nope.png", "mask").value)
    assert "expected" in str(pytest.raises(InvalidImage, image_bytes, 42, "mask").value)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x00" * 2048)
    error = pytest.raises(InvalidImage, image_bytes, big, "mask", max_bytes=1024).value
    assert error.too_large and str(error).startswith("mask: ")


# --- what is refused --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,looks", [("GIF", "GIF"), ("BMP", "BMP"), ("TIFF", "TIFF")])
def test_other_formats_are_refused_naming_what_they_look_like(fmt, looks):
    error = refused(encoded(Image.new("RGB", (16, 16)), fmt), "mask")
    assert "not a PNG, JPEG or WebP" in str(error) and looks in str(error)


def test_garbage_empty_and_oversized_are_refused():
    assert "match no image format" in str(refused(b"hello world" * 10))
    assert "empty" in str(refused(b""))
    assert "expected the image's bytes" in str(refused("sha256:abc"))
    error = refused(encoded(Image.effect_noise((64, 64), 50)), max_bytes=100)
    assert error.too_large and "cap of 100 bytes" in str(error)


def test_huge_declared_dimensions_are_refused_before_decoding():
    # past twice Pillow's own limit, Image.open itself refuses (DecompressionBombError): said as a bomb
    assert "decompression bomb" in str(refused(png_claiming(100_000, 100_000)))
    assert "100000x16" in str(refused(png_claiming(100_000, 16)))
    assert "each side" in str(refused(png_claiming(9000, 16)))
    assert "each side" in str(refused(png_claiming(4, 64)))
    error = refused(png_claiming(8192, 8192))  # 67 MP, past the default 33.5 MP cap
    assert "pixels, more than the farm's cap" in str(error)
    assert "cap of 4096" in str(refused(png_claiming(128, 128), max_pixels=4096))


def test_pillows_own_decompression_bomb_limit_is_a_refusal(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 is then past Pillow's warning (and its error)
    for size in (40, 64):
        assert "decompression bomb" in str(refused(encoded(Image.new("L", (size, size))), max_pixels=10**6))


def test_a_real_bomb_is_refused_without_being_decoded():
    # 8192 x 8192 of zeros: 64 MB of pixels in a few tens of KB of PNG
    bomb = png_claiming(8192, 8192, color_type=0, data=b"\x00" * (8193 * 64))
    assert len(bomb) < 10_000
    assert "more than the farm's cap" in str(refused(bomb))


def test_truncated_files_are_refused():
    for fmt in ("PNG", "JPEG", "WEBP"):
        data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), fmt)
        for cut in (len(data) * 2 // 3, len(data) // 2):
            error = str(refused(data[:cut]))
            assert "truncated or corrupt" in error or "unreadable image header" in error, error


def test_animated_images_are_refused_not_cut_to_their_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    for fmt in ("PNG", "WEBP"):
        data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:])
        assert "animated" in str(refused(data)) and "2 frames" in str(refused(data))


@pytest.mark.parametrize("mode,why", [("CMYK", "CMYK"), ("I;16", "16-bit"), ("I", "32-bit"), ("F", "floating")])
def test_modes_that_cannot_be_converted_faithfully_are_refused(mode, why):
    fmt = "JPEG" if mode == "CMYK" else "TIFF" if mode in ("F", "I") else "PNG"
    data = encoded(Image.new(mode, (16, 16)), fmt)
    error = refused(data)
    assert why in str(error) or "not a PNG" in str(error)  # I and F go in a TIFF only, refused as such


# --- fuzz ---------------------------------------------------------------------------------------------------

def _sample_images() -> list[bytes]:
    noise = Image.effect_noise((24, 20), 60)
    out = []
    for mode in ("RGB", "RGBA", "L", "LA", "P", "1"):
        out.append(encoded(noise.convert(mode)))
    out += [encoded(noise.convert("RGB"), "JPEG"), encoded(noise.convert("RGB"), "WEBP"),
            encoded(noise.convert("RGBA"), "WEBP", lossless=True), encoded(noise.convert("CMYK"), "JPEG"),
            encoded(Image.new("I;16", (20, 20)), "PNG")]
    return out


SAMPLES = _sample_images()
OTHER_FORMATS = [encoded(Image.new("RGB", (16, 16)), fmt) for fmt in ("GIF", "BMP", "TIFF", "ICO", "PPM")]


@st.composite
def bad_or_odd_images(draw) -> bytes:
    kind = draw(st.sampled_from(["truncated", "flipped", "garbage", "claimed", "other", "sample", "spliced"]))
    if kind == "truncated":
        data = draw(st.sampled_from(SAMPLES))
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "flipped":
        data = bytearray(draw(st.sampled_from(SAMPLES)))
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    if kind == "garbage":
        return draw(st.binary(max_size=400))
    if kind == "claimed":
        return png_claiming(draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)),
                            draw(st.sampled_from([0, 2, 3, 4, 6])), draw(st.binary(max_size=64)))
    if kind == "other":
        return draw(st.sampled_from(OTHER_FORMATS))
    if kind == "spliced":  # a real header, then anything
        return draw(st.sampled_from(SAMPLES))[:draw(st.integers(8, 60))] + draw(st.binary(max_size=200))
    return draw(st.sampled_from(SAMPLES))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=bad_or_odd_images(), what=st.sampled_from(WHATS))
def test_fuzz_every_input_is_accepted_whole_or_refused_naming_the_field(data, what):
    try:
        valid = check_image(data, what, max_pixels=4096 * 4096)
    except InvalidImage as exc:
        assert str(exc).startswith(f"{what}: ") and exc.what == what and exc.reason
        return
    image = decoded(valid)  # accepted: a whole PNG of the right mode and size
    assert image.mode == valid.mode == ("RGB" if what == "init_image" else "L")
    assert image.size == (valid.width, valid.height) and 8 <= valid.width <= 8192 and 8 <= valid.height <= 8192


def test_no_file_is_left_behind(tmp_path: Path):
    """check_image reads bytes only: nothing is written anywhere."""
    check_image(SAMPLES[0], "init_image")
    assert not list(tmp_path.iterdir())
