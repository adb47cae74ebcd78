"""Qwen2.5-VL's vision side, as transformers' Qwen2-VL image processor prepares images: the size
(`smart_resize`), and the pixels cut into the flat patch rows the vision tower takes.

Qwen2.5-VL keeps an image near its native resolution: both sides are rounded to multiples of 28
(a 14-pixel patch times the 2x2 PatchMerger), within a pixel budget (min/max_pixels from the
checkpoint's preprocessor_config.json), and every 2x2 block of patches becomes one LLM token.
The vision tower (window attention, 2-D rotary positions, the PatchMerger) is not here yet.
"""

import math

import torch
from PIL import Image

from anyres import CLIP_MEAN, CLIP_STD, normalize, to_rgb

MIN_PIXELS = 56 * 56  # transformers' Qwen2VLImageProcessor defaults (size shortest_edge, longest_edge)
MAX_PIXELS = 28 * 28 * 1280
MAX_ASPECT_RATIO = 200  # transformers refuses a longer side over 200 times the shorter


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(h, w) the image is resized to, as transformers' smart_resize: each side rounded to a
    multiple of `factor`; if that has more than max_pixels (or fewer than min_pixels) pixels, both
    sides scaled by one factor and floored (ceiled) to multiples instead, so the aspect ratio stays
    as close as it can. ValueError for an aspect ratio over 200."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"a {width}x{height} image is more than {MAX_ASPECT_RATIO} times longer than it is wide, "
            "which Qwen2.5-VL's processor refuses"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(
    image: Image.Image,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Image -> (pixel_values (grid_h * grid_w, 3 * temporal * patch^2), grid (t, grid_h, grid_w)).

    As transformers' Qwen2VLImageProcessor: RGB, bicubic resize to smart_resize's size, x/255,
    (x - mean) / std, then patches in the order the PatchMerger reads them (each 2x2 block of
    patches consecutive), each patch repeated over the temporal_patch_size frames of an image.
    """
    image = to_rgb(image)
    width, height = image.size
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    x = normalize(image.resize((w, h), Image.Resampling.BICUBIC), mean, std)  # (3, h, w)
    grid_h, grid_w = h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = x.reshape(3, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, 3, p, p)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], temporal_patch_size, p, p)  # one image: the same patch twice
    return x.reshape(grid_h * grid_w, 3 * temporal_patch_size * p * p), (1, grid_h, grid_w)
