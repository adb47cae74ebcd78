"""Images -> crops for CLIP, and crop features -> one packed token sequence, with where each token
comes from (ToDRE's pivot, its candidates and the selection picture need that).

Two ways of framing an image:
- LLaVA-NeXT's AnyRes (transformers' `LlavaNextImageProcessorPil` and
  `LlavaNextModel.pack_image_features`): a squashed thumbnail plus high-resolution crops, packed
  with one `image_newline` token ending each row of the unpadded crop mosaic.
- One square crop (transformers' `CLIPImageProcessorPil`): the shortest edge resized, then a
  centre crop; LLaVA-1.5 images and video frames, with optional newlines per row for video.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NEWLINE = -1  # source index of an `image_newline` token in `pack`'s output
# The AnyRes canvases (h, w) of the llava-v1.6 checkpoints (their config.json's image_grid_pinpoints).
LLAVA_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """The pinpoint (h, w) that keeps the most image pixels, then wastes the fewest; the first wins
    ties (transformers' select_best_resolution)."""
    best, best_effective, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (h, w), effective, waste
    return best


def resized_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size (h, w) of the image scaled to fit inside the target, aspect ratio kept (HF get_patch_output_size).

    The float order is HF's (and the original LLaVA code's): the scale is computed first, then
    multiplied. It matters: for 500x375 into 672 wide, 375 * (672 / 500) = 504.00000000000006,
    which rounds up to 505 rows, where the exact 375 * 672 / 500 = 504.
    """
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as LLaVA's training and evaluation code read images (`Image.open(path).convert('RGB')`):
    a transparent pixel keeps the colour stored under it, whatever the kind of transparency (an
    alpha channel, a palette's transparent index, an RGB colour key). transformers' processors
    composite transparency onto white instead; media.on_white does that, for those who want it."""
    return image.convert("RGB")


def normalize(image: Image.Image, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """uint8 HWC -> float32 CHW, x/255 in float64 then (x - mean) / std in float32, like HF."""
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (H, W, 3) -> (3, H, W)


def preprocess(image: Image.Image, pinpoints, crop_size: int = 336, mean=CLIP_MEAN, std=CLIP_STD):
    """Image -> (pixel_values (1 + crops, 3, crop_size, crop_size), (H, W) of the RGB original).

    Order: the thumbnail (the whole image squashed to crop_size x crop_size, aspect ratio NOT kept),
    then the crops of the best-resolution canvas row-major (transformers' get_image_patches).
    """
    image = to_rgb(image)
    width, height = image.size
    best_h, best_w = select_best_resolution(height, width, pinpoints)
    new_h, new_w = resized_size(height, width, best_h, best_w)
    resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    canvas = np.zeros((best_h, best_w, 3), dtype=np.uint8)  # centred black padding
    top, left = (best_h - new_h) // 2, (best_w - new_w) // 2
    canvas[top : top + new_h, left : left + new_w] = resized
    thumbnail = image.resize((crop_size, crop_size), Image.Resampling.BICUBIC)
    crops = [thumbnail] + [
        canvas[y : y + crop_size, x : x + crop_size]
        for y in range(0, best_h, crop_size)
        for x in range(0, best_w, crop_size)
    ]
    return torch.stack([normalize(c, mean, std) for c in crops]), (height, width)


@dataclass(frozen=True)
class Layout:
    """Where the packed tokens of one image come from.

    The crops' patch grids are laid side by side into a mosaic of (side*grid_h, side*grid_w) tokens;
    `unpad` keeps mosaic rows [row0, row1) and columns [col0, col1), which undoes the black padding.
    """

    image_size: tuple[int, int]  # (H, W) of the original image
    best_resolution: tuple[int, int]  # (h, w) pinpoint the image was fitted into
    grid: tuple[int, int]  # crops per column and per row of the canvas
    crop_size: int  # pixels per crop side (336)
    side: int  # patch tokens per crop side (24 for CLIP-L/14 at 336)
    rows: tuple[int, int]  # kept mosaic rows [row0, row1)
    cols: tuple[int, int]  # kept mosaic columns [col0, col1)

    @property
    def num_tokens(self) -> int:
        """Packed length: thumbnail tokens + kept mosaic rows, each with one newline token."""
        return self.side**2 + (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0] + 1)


def layout(image_size, pinpoints, crop_size: int = 336, patch_size: int = 14) -> Layout:
    """Packing geometry of an image of size (H, W) (HF get_anyres_image_grid_shape + unpad_image)."""
    height, width = image_size
    best = select_best_resolution(height, width, pinpoints)
    grid = (best[0] // crop_size, best[1] // crop_size)
    side = crop_size // patch_size
    mosaic_h, mosaic_w = side * grid[0], side * grid[1]
    rows, cols = (0, mosaic_h), (0, mosaic_w)
    # Same float order as HF's unpad_image: scale first, then multiply.
    if width / height > mosaic_w / mosaic_h:  # image wider than the canvas: padding was top and bottom
        pad = (mosaic_h - int(round(height * (mosaic_w / width), 7))) // 2
        rows = (pad, mosaic_h - pad)
    else:
        pad = (mosaic_w - int(round(width * (mosaic_h / height), 7))) // 2
        cols = (pad, mosaic_w - pad)
    return Layout((height, width), best, grid, crop_size, side, rows, cols)


def token_sources(lay: Layout) -> torch.Tensor:
    """For each packed token, its index into the flattened (crops * side * side) features, or NEWLINE.

    The thumbnail (crop 0) comes first, unchanged; then the unpadded mosaic row by row, each row
    followed by one newline token (transformers' pack_image_features). Crop c >= 1 is the canvas
    cell (r, q) = divmod(c - 1, grid_w).
    """
    side, grid_w = lay.side, lay.grid[1]
    r = torch.arange(*lay.rows)[:, None]
    c = torch.arange(*lay.cols)[None, :]
    crop = 1 + (r // side) * grid_w + (c // side)
    mosaic = crop * side * side + (r % side) * side + (c % side)  # (rows, cols)
    newline = torch.full((mosaic.shape[0], 1), NEWLINE)  # (rows, 1)
    # thumbnail (side * side,), then the mosaic with its newline column, row-major (rows * (cols + 1),)
    return torch.cat([torch.arange(side * side), torch.cat([mosaic, newline], dim=1).flatten()])


def pack(features: torch.Tensor, sources: torch.Tensor, image_newline: torch.Tensor | None) -> torch.Tensor:
    """Crop features (crops, side*side, d) -> packed tokens (len(sources), d) in HF's order; NEWLINE
    sources become the image_newline vector (None: the sources have no newline)."""
    flat = features.reshape(-1, features.shape[-1])  # (crops * side * side, d)
    tokens = flat[sources.clamp(min=0)]
    if image_newline is None:
        return tokens
    return torch.where((sources == NEWLINE)[:, None], image_newline.to(tokens.dtype), tokens)


# ---------------------------------------------------------------------------------------------
# One square crop per image or video frame
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """How one square model input of crop x crop pixels was cut from an image of (H, W) pixels:
    the image was scaled to `scaled` (h, w) pixels, and the input is the crop x crop window whose
    top-left corner sits at `offset` (y, x) in those scaled pixels (negative: padding)."""

    image_size: tuple[int, int]
    scaled: tuple[float, float]
    offset: tuple[float, float]
    crop: int

    @classmethod
    def squashed(cls, image_size, crop: int) -> "Framing":
        """The whole image resized to crop x crop, aspect ratio not kept (AnyRes's thumbnail)."""
        return cls(tuple(image_size), (crop, crop), (0, 0), crop)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) with the shorter side `size` and the longer int(size * long / short), truncated, as
    transformers' get_resize_output_image_size(default_to_square=False): 352x288 -> 410x336."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def expand_to_square(image: Image.Image, mean=CLIP_MEAN) -> tuple[Image.Image, tuple[int, int]]:
    """The image centred on a square of its longer side, filled with the mean colour: LLaVA's own
    `expand2square`, which its evaluation (and the published LLaVA-1.5 numbers) used.
    Returns the square and where the image sits in it (y, x)."""
    width, height = image.size
    side = max(width, height)
    offset = ((side - height) // 2, (side - width) // 2)
    square = Image.new("RGB", (side, side), tuple(int(255 * m) for m in mean))
    square.paste(image, (offset[1], offset[0]))
    return square, offset


def preprocess_square(
    image: Image.Image, size: int, crop: int, mean=CLIP_MEAN, std=CLIP_STD, pad_to_square: bool = False
):
    """Image -> (pixel_values (1, 3, crop, crop), Framing), as transformers' CLIPImageProcessorPil:
    shortest edge resized to `size` (bicubic), then a centre crop of crop x crop (zero-padded
    where the image is smaller). With pad_to_square, the image is first centred on a square of
    its mean colour (`expand_to_square`), so nothing is cropped away."""
    image = to_rgb(image)
    height, width = image.height, image.width
    square_offset = (0, 0)
    if pad_to_square:
        image, square_offset = expand_to_square(image, mean)
    new_h, new_w = shortest_edge_size(image.height, image.width, size)
    pixels = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
    # transformers' center_crop: the window's corner in the resized image; negative: zero padding.
    top, left = (new_h - crop) // 2, (new_w - crop) // 2
    pad_y, pad_x = max(0, -top), max(0, -left)
    if pad_y or pad_x:
        pixels = np.pad(pixels, ((pad_y, max(0, crop - new_h - pad_y)), (pad_x, max(0, crop - new_w - pad_x)), (0, 0)))
    window = pixels[top + pad_y : top + pad_y + crop, left + pad_x : left + pad_x + crop]
    scale_y, scale_x = new_h / image.height, new_w / image.width  # the same for a square
    framing = Framing(
        (height, width),
        (height * scale_y, width * scale_x),
        (top - square_offset[0] * scale_y, left - square_offset[1] * scale_x),
        crop,
    )
    return normalize(Image.fromarray(np.ascontiguousarray(window)), mean, std)[None], framing


def frame_sources(frames: int, side: int, newlines: bool) -> torch.Tensor:
    """Packed order of `frames` square grids of side x side tokens, frame after frame: each token's
    index into the flattened (frames * side * side) features, and with `newlines` one NEWLINE
    after every row of every frame (lmms-eval llava_vid's "grid" placement)."""
    grid = torch.arange(frames * side * side).view(frames, side, side)  # (frames, side, side)
    if newlines:
        grid = torch.cat([grid, torch.full((frames, side, 1), NEWLINE)], dim=2)  # (frames, side, side + 1)
    return grid.flatten()  # (frames * side * (side + newlines),)
