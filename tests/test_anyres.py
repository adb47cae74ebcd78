"""anyres.py: AnyRes geometry, pixel values and square crops equal transformers' own helpers and processors."""

import numpy as np
import pytest
import torch

import anyres
import picture
from conftest import (
    FRAME_SIZES,
    PINPOINTS,
    noise_image,
)
from evaluation import reference


def test_geometry_matches_hf_helpers_on_a_dense_grid_of_sizes(mha):
    """Every (W, H) in 1..1400 step 7: best resolution, resized size, unpadded mosaic and token count
    equal transformers' own helpers (select_best_resolution, get_patch_output_size, the model's
    unpad_image and the processor's token count)."""
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    checked = 0
    for width in range(1, 1401, 7):
        for height in range(1, 1401, 7):
            best = anyres.select_best_resolution(height, width, PINPOINTS)
            assert best == select_best_resolution((height, width), PINPOINTS), (width, height)
            pixels = np.broadcast_to(np.zeros((), np.uint8), (3, height, width))  # no memory: only the shape is read
            assert anyres.resized_size(height, width, *best) == tuple(
                get_patch_output_size(pixels, best, ChannelDimension.FIRST)
            ), (width, height)
            lay = anyres.layout((height, width), PINPOINTS)
            mosaic = unpad_image(torch.empty(1, 24 * lay.grid[0], 24 * lay.grid[1]), (height, width))
            assert (lay.rows[1] - lay.rows[0], lay.cols[1] - lay.cols[0]) == tuple(mosaic.shape[1:]), (width, height)
            assert lay.num_tokens == mha.processor._get_number_of_features(height, width, 336, 336) - 1, (width, height)
            checked += 1
    assert checked == 200 * 200


# (width, height) -> packed visual tokens, measured with transformers 5.23's processor when first written.
KNOWN_TOKEN_COUNTS = {
    (672, 672): 2928,
    (1000, 600): 1948,
    (600, 1000): 1968,
    (517, 301): 1608,
    (20, 20): 1176,
    (30, 900): 792,
}


@pytest.mark.parametrize("size", list(KNOWN_TOKEN_COUNTS))
def test_pixel_values_and_token_count_match_hf_processor(mha, size):
    image = noise_image(*size)
    ref = mha.hf_inputs(image)
    pixel_values, (h, w) = anyres.preprocess(image, PINPOINTS)
    assert (h, w) == (size[1], size[0])
    torch.testing.assert_close(pixel_values, ref["pixel_values"][0], atol=1e-6, rtol=0)
    hf_count = int((ref["input_ids"] == mha.image_token).sum())
    assert anyres.layout((h, w), PINPOINTS).num_tokens == hf_count == KNOWN_TOKEN_COUNTS[size]


# Real-world sizes (width, height): camera and COCO photos, both orientations, screens, odd crops.
REAL_WORLD_SIZES = [
    (500, 375),
    (375, 500),
    (640, 480),
    (480, 640),
    (640, 427),
    (427, 640),
    (500, 333),
    (333, 500),
    (1024, 768),
    (1920, 1080),
    (1080, 1920),
    (4032, 3024),
    (800, 600),
    (612, 612),
    (1200, 900),
    (400, 300),
    (300, 400),
    (640, 360),
    (1280, 720),
    (3000, 2000),
    (2000, 3000),
    (1600, 1200),
    (640, 640),
    (512, 384),
    (1000, 1000),
    (350, 262),
    (2048, 1536),
    (720, 1280),
    (336, 336),
    (1366, 768),
]


@pytest.mark.parametrize("size", REAL_WORLD_SIZES, ids=[f"{w}x{h}" for w, h in REAL_WORLD_SIZES])
def test_pixel_values_match_hf_on_real_world_sizes(image_processor, size):
    image = noise_image(*size, seed=size[0] + size[1])
    ours, (h, w) = anyres.preprocess(image, PINPOINTS)
    expected = image_processor(image, return_tensors="pt")
    assert (h, w) == tuple(expected["image_sizes"][0].tolist()) == (size[1], size[0])
    assert ours.shape == expected["pixel_values"][0].shape
    torch.testing.assert_close(ours, expected["pixel_values"][0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", FRAME_SIZES, ids=[f"{w}x{h}" for w, h in FRAME_SIZES])
def test_frame_pixels_match_clip_image_processor(size):
    """Shortest edge to 336, the long edge truncated (352x288 -> 410x336), then a centre crop."""
    frame = noise_image(*size, seed=size[0])
    pixels, framing = anyres.preprocess_square(frame, 336, 336)
    expected = reference.clip_image_processor(336)(frame, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    assert anyres.shortest_edge_size(288, 352, 336) == (336, 410)
    boxes = picture.patch_boxes(framing, torch.arange(576), 24)  # the crop, mapped back onto the frame
    assert (boxes[:, 2] > boxes[:, 0]).all() and boxes[:, 2].max() <= size[0] and boxes[:, 3].max() <= size[1]
