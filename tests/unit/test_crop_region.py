"""Inpaint area "masked": the crop region as A1111 computes it (masking.get_crop_region_v2, expand_crop_region),
worked out by hand here, and what the infotext says of it."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from renderfarm.actors.tasks import crop_region, expand_crop_region, mask_box
from renderfarm.infotext import a1111_parameters, parse_a1111_parameters


def mask(width: int, height: int, *boxes: tuple[int, int, int, int], value: int = 255) -> Image.Image:
    array = np.zeros((height, width), np.uint8)
    for x1, y1, x2, y2 in boxes:
        array[y1:y2, x1:x2] = value
    return Image.fromarray(array, "L")


# --- the mask's box and its padding -------------------------------------------------------------------


def test_the_box_holds_every_nonzero_pixel_and_no_more():
    assert mask_box(mask(64, 64, (10, 20, 30, 25)), 0) == (10, 20, 30, 25)
    # Two strokes: one box around both; a faint grey pixel counts (the blur's tail is part of the mask).
    assert mask_box(mask(64, 64, (10, 20, 12, 22), (40, 5, 41, 50)), 0) == (10, 5, 41, 50)
    assert mask_box(mask(64, 64, (33, 33, 34, 34), value=1), 0) == (33, 33, 34, 34)


def test_padding_grows_every_side_and_stops_at_the_edges():
    assert mask_box(mask(64, 64, (10, 20, 30, 25)), 4) == (6, 16, 34, 29)
    assert mask_box(mask(64, 64, (2, 0, 62, 3)), 8) == (0, 0, 64, 11)
    assert mask_box(mask(64, 48, (0, 0, 64, 48)), 256) == (0, 0, 64, 48)


def test_an_all_black_mask_has_no_region():
    assert mask_box(mask(64, 64), 32) is None
    assert crop_region(mask(64, 64), 32, 64, 64) is None


# --- expanded to the job's aspect ratio ---------------------------------------------------------------


def test_a1111s_own_example_a_128x32_stroke_rendered_at_512x512_becomes_128x128():
    assert crop_region(mask(512, 512, (200, 100, 328, 132)), 0, 512, 512) == (200, 52, 328, 180)
    # Padded first (192x96), then expanded about its centre: 192x192.
    assert crop_region(mask(512, 512, (200, 100, 328, 132)), 32, 512, 512) == (168, 20, 360, 212)


def test_a_tall_stroke_for_a_wide_job_is_widened():
    assert crop_region(mask(128, 64, (50, 10, 66, 42)), 0, 128, 64) == (26, 10, 90, 42)  # 64x32: 2:1


def test_the_growth_is_truncated_and_split_as_a1111_splits_it():
    # 10x2 at 4:3: 7.5 rows wanted, int(5.5) = 5 more: 2 above, 3 below.
    assert expand_crop_region((20, 20, 30, 22), 64, 48, 64, 48) == (20, 18, 30, 25)
    # 5x2 at 1:1: 3 more rows, 1 above and 2 below.
    assert expand_crop_region((10, 10, 15, 12), 64, 64, 64, 64) == (10, 9, 15, 14)
    # Already the ratio: unchanged.
    assert expand_crop_region((8, 8, 40, 40), 64, 64, 64, 64) == (8, 8, 40, 40)


def test_at_an_edge_the_region_is_shifted_inside_not_cut():
    # A wide stroke along the bottom edge: 32x4 wants 28 more rows, 14 of them below the image: all go above.
    assert crop_region(mask(64, 64, (10, 60, 42, 64)), 0, 64, 64) == (10, 32, 42, 64)
    assert crop_region(mask(64, 64, (10, 0, 42, 4)), 0, 64, 64) == (10, 0, 42, 32)
    # A tall stroke along the right edge, likewise.
    assert crop_region(mask(64, 64, (60, 10, 64, 42)), 0, 64, 64) == (32, 10, 64, 42)
    assert crop_region(mask(64, 64, (0, 10, 4, 42)), 0, 64, 64) == (0, 10, 32, 42)


def test_an_image_too_small_for_the_ratio_clips_the_region_to_it():
    assert expand_crop_region((0, 0, 64, 8), 64, 64, 64, 16) == (0, 0, 64, 16)
    assert expand_crop_region((0, 4, 8, 12), 64, 64, 4, 16) == (0, 4, 4, 12)


@pytest.mark.parametrize("width,height", [(64, 64), (96, 64), (64, 112), (120, 40)])
def test_random_masks_give_a_region_inside_the_image_around_the_box_at_the_jobs_ratio(width, height):
    rng = np.random.default_rng(width * height)
    for _ in range(200):
        x1, x2 = sorted(rng.integers(0, width, 2))
        y1, y2 = sorted(rng.integers(0, height, 2))
        stroke = mask(width, height, (x1, y1, x2 + 1, y2 + 1))
        padding = int(rng.integers(0, 40))
        box = mask_box(stroke, padding)
        region = crop_region(stroke, padding, width, height)
        assert 0 <= region[0] <= box[0] and 0 <= region[1] <= box[1]
        assert box[2] <= region[2] <= width and box[3] <= region[3] <= height
        # The image has the job's ratio, so the region does too, up to the truncated pixel A1111 drops.
        region_w, region_h = region[2] - region[0], region[3] - region[1]
        assert abs(region_w - region_h * width / height) <= 1 + width / height
        assert abs(region_h - region_w * height / width) <= 1 + height / width


# --- the infotext ----------------------------------------------------------------------------------------

BASE = dict(prompt="a fox", steps=20, sampler="Euler", schedule_type="Normal", cfg_scale=7.0, seed=1, width=512,
            height=512, model="sd15", version="renderfarm test")


def test_only_masked_is_written_after_the_mask_blur_as_a1111_writes_it():
    text = a1111_parameters(**BASE, denoising_strength=0.75, mask_blur=4, masked_area_padding=32,
                            loras=(("ink", 0.8, "abcdef123456"),))
    parsed = parse_a1111_parameters(text)
    keys = [key for key in parsed if key not in ("prompt", "negative_prompt")]
    assert keys == ["Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size", "Model", "Denoising strength",
                    "Mask blur", "Inpaint area", "Masked area padding", "Lora hashes", "Version"]
    assert parsed["Inpaint area"] == "Only masked" and parsed["Masked area padding"] == "32"
    assert parse_a1111_parameters(a1111_parameters(**BASE, mask_blur=4, masked_area_padding=0))[
        "Masked area padding"] == "0"


def test_the_whole_picture_writes_no_inpaint_area():
    parsed = parse_a1111_parameters(a1111_parameters(**BASE, denoising_strength=0.75, mask_blur=4))
    assert "Inpaint area" not in parsed and "Masked area padding" not in parsed
