"""picture.py: the selection picture maps every kept token back onto the pixels it came from."""

import numpy as np
import pytest
import torch
from PIL import Image

import anyres
import picture
from conftest import (
    PINPOINTS,
)


@pytest.mark.parametrize("size", [(517, 301), (301, 517), (672, 672), (1000, 340)])
def test_token_boxes_cover_the_pixels_that_produced_them(size):
    """A black image with one white square: a token whose patch (in the preprocessed crops) has
    white pixels must have its box on the square, and a token whose box lies on the square must
    have white pixels. The margin allows for bicubic resampling's few-pixel spread."""
    width, height = size
    square = (width // 3, height // 3, width // 3 + 60, height // 3 + 60)  # x0, y0, x1, y1
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[square[1] : square[3], square[0] : square[2]] = 255
    pixel_values, _ = anyres.preprocess(Image.fromarray(pixels), PINPOINTS)
    raw = pixel_values * torch.tensor(anyres.CLIP_STD)[:, None, None] + torch.tensor(anyres.CLIP_MEAN)[:, None, None]
    lay = anyres.layout((height, width), PINPOINTS)
    sources = anyres.token_sources(lay)
    boxes = picture.token_boxes(lay, sources)
    assert torch.isnan(boxes[sources == anyres.NEWLINE]).all()

    def overlaps(box, grow):
        return (
            box[0] < square[2] + grow
            and box[2] > square[0] - grow
            and box[1] < square[3] + grow
            and box[3] > square[1] - grow
        )

    bright = {"thumbnail": 0, "crops": 0}
    for source, box in zip(sources.tolist(), boxes.tolist(), strict=True):
        if source == anyres.NEWLINE:
            continue
        crop, within = divmod(source, 576)
        r, c = divmod(within, 24)
        is_bright = bool(raw[crop, :, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].max() > 0.5)
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
        if is_bright:
            assert overlaps(box, grow=5), (crop, r, c, box)
            bright["thumbnail" if crop == 0 else "crops"] += 1
        if overlaps(box, grow=-5):
            assert is_bright, (crop, r, c, box)
    assert bright["thumbnail"] >= 4 and bright["crops"] >= 4


def test_selection_panel_keeps_chosen_tokens_bright_and_dims_the_rest():
    image = Image.new("RGB", (100, 50), (200, 200, 200))
    boxes = torch.tensor([[0.0, 0, 50, 50], [50, 0, 100, 50]], dtype=torch.float64)
    panel = picture.selection_panel(image, boxes, torch.tensor([True, False]), "test", size=100)
    assert panel.getpixel((25, 16 + 25)) == (200, 200, 200)  # kept (below the 16-pixel title strip)
    assert panel.getpixel((75, 16 + 25))[0] == 50  # dimmed to a quarter
