"""qwen_vision.py: Qwen2.5-VL's image size and patches equal transformers' Qwen2-VL processor."""

import numpy as np
import pytest
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf

import qwen_vision
from conftest import noise_image

QWEN25_BUDGET = (3136, 12845056)  # Qwen2.5-VL-7B-Instruct's preprocessor_config.json min/max_pixels


@pytest.mark.parametrize(
    "budget", [(qwen_vision.MIN_PIXELS, qwen_vision.MAX_PIXELS), QWEN25_BUDGET, (256 * 28 * 28, 512 * 28 * 28)]
)
def test_smart_resize_equals_transformers_on_a_dense_sweep(budget):
    low, high = budget
    for height in range(1, 4001, 37):
        for width in range(1, 4001, 41):
            if max(height, width) / min(height, width) > 200:
                with pytest.raises(ValueError, match="more than 200 times longer"):
                    qwen_vision.smart_resize(height, width, 28, low, high)
                with pytest.raises(ValueError):
                    hf.smart_resize(height, width, 28, low, high)
                continue
            assert qwen_vision.smart_resize(height, width, 28, low, high) == hf.smart_resize(
                height, width, 28, low, high
            )


@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (640, 480), (1920, 1080), (4032, 3024), (30, 90), (28, 28), (1000, 20), (7, 5)]
)
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_pixel_values_and_grid_equal_the_processor(size, mode):
    image = noise_image(*size).convert(mode)
    processor = hf.Qwen2VLImageProcessorPil()
    expected = processor(image.convert("RGB"), return_tensors="pt")  # the stored colour under transparency
    pixel_values, grid = qwen_vision.preprocess(image)
    assert grid == tuple(expected["image_grid_thw"][0].tolist())
    assert np.array_equal(pixel_values.numpy(), expected["pixel_values"].numpy())


def test_the_checkpoints_pixel_budget_is_followed():
    image = Image.new("RGB", (4032, 3024))
    low, high = QWEN25_BUDGET
    pixel_values, (_, grid_h, grid_w) = qwen_vision.preprocess(image, min_pixels=low, max_pixels=high)
    assert (grid_h * 14) * (grid_w * 14) <= high and len(pixel_values) == grid_h * grid_w
    tiny, (_, h, w) = qwen_vision.preprocess(Image.new("RGB", (10, 10)), min_pixels=low, max_pixels=high)
    assert (h * 14) * (w * 14) >= low  # below the minimum: resized up into range
