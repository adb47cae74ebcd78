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
                with pytest.raises(ValueError, match="has one side more than 200 times the other"):
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


def tiny_vision_pair(seed: int = 0):
    """transformers' Qwen2.5-VL vision tower, tiny and random, and ours with its weights."""
    import torch
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    fields = dict(depth=4, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=40)
    fields.update(fullatt_block_indexes=[1, 3], window_size=112)
    torch.manual_seed(seed)
    hf_tower = Qwen2_5_VisionTransformerPretrainedModel._from_config(
        Qwen2_5_VLVisionConfig(**fields), attn_implementation="eager"
    ).eval()
    for parameter in hf_tower.parameters():  # random, not the init's zeros and ones
        torch.nn.init.normal_(parameter, std=0.2)
    ours = qwen_vision.VisionTower(qwen_vision.QwenVisionConfig(**fields))
    ours.load_state_dict(hf_tower.state_dict(), strict=True)
    return hf_tower, ours.eval()


@pytest.mark.parametrize("size", [(28, 28), (112, 112), (500, 375), (375, 500), (300, 90), (700, 200)])
def test_vision_tower_equals_transformers_with_windows_that_really_window(size):
    """112-pixel windows: every size but the smallest spans several windows, some cut short."""
    import torch

    hf_tower, ours = tiny_vision_pair()
    pixel_values, grid = qwen_vision.preprocess(noise_image(*size), max_pixels=600 * 600)
    with torch.inference_mode():
        expected = hf_tower(pixel_values, grid_thw=torch.tensor([grid])).pooler_output
        got, _ = ours(pixel_values, grid)
    assert got.shape == expected.shape == (grid[1] * grid[2] // 4, 40)
    assert (got - expected).abs().max() < 1e-5
    per_side = 112 // 2 // 14
    assert max(size) <= 112 or len(qwen_vision.windows(grid[1], grid[2], 2, per_side)[1]) > 1


@pytest.mark.parametrize("size", [(112, 112), (500, 375), (90, 300)])
@pytest.mark.parametrize("full_attention", [[1, 3], [1], []])
def test_received_attention_equals_transformers_attention_weights(size, full_attention, monkeypatch):
    """Stage 1's pivot score: the attention each merged token's 4 patches receive in the last
    full-attention block (the last block without one), averaged over heads and queries, read from
    the weights transformers' eager attention computes, mapped back through its window index."""
    import torch
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf_model

    hf_tower, ours = tiny_vision_pair()
    hf_tower.fullatt_block_indexes = ours.config.fullatt_block_indexes = full_attention
    recorded = []
    original = hf_model.eager_attention_forward

    def recording(module, *args, **kwargs):
        out, weights = original(module, *args, **kwargs)
        recorded.append((module, weights[0]))  # (heads, span, span)
        return out, weights

    monkeypatch.setattr(hf_model, "eager_attention_forward", recording)
    pixel_values, grid = qwen_vision.preprocess(noise_image(*size), max_pixels=600 * 600)
    with torch.inference_mode():
        hf_tower(pixel_values, grid_thw=torch.tensor([grid]))
        _, received = ours(pixel_values, grid)
    block = hf_tower.blocks[max(full_attention, default=3)].attn
    spans = [w for module, w in recorded if module is block]  # one per window, or one for the whole image
    assert len(spans) == (1 if full_attention else len(qwen_vision.windows(grid[1], grid[2], 2, 4)[1]))
    per_patch = torch.cat([w.mean(dim=0).sum(dim=0) / w.shape[1] for w in spans])  # mean over heads, queries
    window_index, _ = hf_model.get_vision_window_index(torch.tensor([grid]), 2, 112, 14)
    expected = per_patch.reshape(-1, 4).sum(dim=1)[torch.argsort(window_index)]
    assert received.shape == (grid[1] * grid[2] // 4,)
    assert (received - expected).abs().max() < 1e-6
