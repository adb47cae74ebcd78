"""Every claim of the project, checked against an independent reference, in the order of the files
under test: anyres, the model's parity with transformers, todre, checkpoint, ToDRE in the model,
the command line, the benchmark, the README. Fixtures and references live in conftest.py.
"""

import errno
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer

import anyres
import checkpoint
import conftest
import generate
import media
import model as llava
import picture
import prompt
import reference
import todre
from conftest import (
    FAMILIES,
    GREEDY,
    HERE,
    PINPOINTS,
    QUESTION,
    causal,
    cli_args,
    cli_process,
    cls_per_crop_reference,
    dense_forward,
    greedy_matrix,
    hf_cls_attention,
    hf_embeddings,
    hf_logits,
    hf_packed_features,
    hf_runtime_state,
    k_center_radius,
    noise_image,
    one_line_error,
    ratios_dense,
    resave,
    run_cli,
)

# ---------------------------------------------------------------------------------------------
# anyres.py: AnyRes geometry and pixels equal transformers'
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# clip.py, llama.py, model.py: LLaVA-NeXT equals transformers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(672, 672), (517, 301), (600, 1000), (20, 20), (30, 900)])
def test_packed_features_and_logits_match_hf(ckpt, size):
    image = noise_image(*size, seed=1)
    ref = ckpt.hf_inputs(image)
    with torch.inference_mode():
        visual = ckpt.model.encode_image(image)
        torch.testing.assert_close(visual.tokens, hf_packed_features(ckpt, ref), atol=1e-5, rtol=0)
        expected = ckpt.hf(**ref).logits[0]
    ids = ckpt.prompt(len(visual.tokens))
    assert torch.equal(ids, ref["input_ids"][0])
    ours, _, _ = ckpt.prefill(ids, visual.tokens)
    assert expected.std() > 0.5  # the check below is meaningful: logits are O(1)
    assert (ours - expected).abs().max() < 1e-4


@pytest.mark.parametrize("size", [(500, 375), (400, 300), (1200, 900), (1080, 1920), (4032, 3024)])
def test_logits_match_hf_on_real_world_sizes(mha, size):
    """500x375, 1200x900 and 400x300 are where HF's scale-first rounding gives one more pixel row or column."""
    image = noise_image(*size, seed=7)
    ref = mha.hf_inputs(image)
    with torch.inference_mode():
        visual = mha.model.encode_image(image)
        expected = mha.hf(**ref).logits[0]
    ids = mha.prompt(len(visual.tokens))
    assert torch.equal(ids, ref["input_ids"][0])
    assert (mha.prefill(ids, visual.tokens)[0] - expected).abs().max() < 1e-4


def test_image_changes_logits(ckpt):
    """Guard against a model that ignores its image: two images must give clearly different logits."""
    logits = []
    for seed in (1, 2):
        with torch.inference_mode():
            visual = ckpt.model.encode_image(noise_image(336, 336, seed))
        logits.append(ckpt.prefill(ckpt.prompt(len(visual.tokens)), visual.tokens)[0])
    assert (logits[0] - logits[1]).abs().max() > 0.1


def test_text_only_logits_match_hf(ckpt):
    question = "Tell me about the quick brown fox."
    ref = ckpt.hf_inputs(None, question)
    ids = ckpt.prompt(None, question)
    assert torch.equal(ids, ref["input_ids"][0])
    with torch.inference_mode():
        expected = ckpt.hf(**ref).logits[0]
    assert (ckpt.prefill(ids, None)[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_generation_matches_hf(ckpt, with_image):
    """Token for token; our generator stops before EOS, where transformers' includes it."""
    image = noise_image(517, 301, seed=0) if with_image else None
    ref = ckpt.hf_inputs(image)
    with torch.inference_mode():
        expected = ckpt.hf.generate(**ref, max_new_tokens=16, do_sample=False)[0, ref["input_ids"].shape[1] :].tolist()
        visual = ckpt.model.encode_image(image).tokens if with_image else None
    expected = expected[: expected.index(2)] if 2 in expected else expected
    ours = llava.generate(
        ckpt.model, ckpt.prompt(len(visual) if with_image else None), visual, todre.NO_PRUNING, 16
    ).token_ids
    assert ours == expected
    assert len(set(ours)) > 3  # a varied sequence, not one token repeated


def test_sampled_generation_is_seeded_and_tends_to_greedy_as_temperature_falls(ckpt):
    image = noise_image(336, 336, seed=26)
    with torch.inference_mode():
        visual = ckpt.model.encode_image(image).tokens
        ids = ckpt.prompt(len(visual))

        def sample(temperature, seed):
            generator = torch.Generator().manual_seed(seed)
            return llava.generate(ckpt.model, ids, visual, todre.NO_PRUNING, 12, temperature, generator).token_ids

        greedy = llava.generate(ckpt.model, ids, visual, todre.NO_PRUNING, 12).token_ids
        assert sample(1e-4, 0) == greedy  # logits / 1e-4: all the probability on the argmax
        assert sample(5.0, 1) == sample(5.0, 1)  # same seed, same tokens
        assert len({tuple(sample(5.0, seed)) for seed in range(4)}) > 1  # a hot distribution really samples


def test_temperature_near_zero_samples_the_greedy_token(mha):
    with torch.inference_mode():
        ids = mha.prompt(None)
        greedy = llava.generate(mha.model, ids, None, todre.NO_PRUNING, 6).token_ids
        assert llava.generate(mha.model, ids, None, todre.NO_PRUNING, 6, temperature=1e-300).token_ids == greedy


# ---------------------------------------------------------------------------------------------
# todre.py: settings, Stage 1 selectors, Stage 2 ratios
# ---------------------------------------------------------------------------------------------


def test_token_budget_is_a_fraction_or_an_explicit_count():
    assert todre.token_budget(2880, 0.10) == 288 and todre.token_budget(2880, 0.25) == 720
    assert todre.token_budget(2880, 1.0) == 2880 and todre.token_budget(2880, 1) == 2880  # 1 and 1.0: all
    assert todre.token_budget(5, 0.01) == 1
    assert todre.token_budget(2880, keep_tokens=64) == 64 and todre.token_budget(50, keep_tokens=100) == 50
    for bad in (0, 0.0, -0.1, 1.5, True, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            todre.token_budget(10, bad)
    with pytest.raises(ValueError, match="for a token count use keep_tokens=64"):
        todre.token_budget(2880, 64)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="keep_tokens must be a positive integer"):
            todre.token_budget(10, keep_tokens=bad)


def test_settings_variants_and_overrides():
    v1, v2 = todre.variant("v1"), todre.variant("v2")
    assert (v1.select, v1.tau, v1.probes(32)) == ("kcenter", 0.03, [15, 19, 23, 27]) and v1 == todre.Settings()
    assert (v2.select, v2.tau, v2.probes(32)) == ("maxsum", 0.10, [27])
    tuned = todre.variant("v2", tau=0.2, probe_layers=[5, 3], retain=0.25, select=None)
    assert (tuned.select, tuned.tau, tuned.probes(32), tuned.retain) == ("maxsum", 0.2, [3, 5], 0.25)
    assert not todre.NO_PRUNING.stage1 and todre.NO_PRUNING.probes(32) == []
    assert todre.Settings(retain=1.0, keep_tokens=64).stage1 and not todre.Settings(retain=1).stage1
    for bad, message in [
        (dict(retain=64), "for a token count use keep_tokens=64"),
        (dict(keep_tokens=0), "keep_tokens"),
        (dict(select="random"), "unknown selector 'random'"),
        (dict(newlines="some"), "newlines"),
        (dict(tau=float("nan")), "tau must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=message):
            todre.Settings(**bad)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("full", todre.NO_PRUNING),
        ("stage2", todre.Settings(retain=1.0)),
        ("stage1-0.25", todre.Settings(retain=0.25, tau=0.0)),
        ("todre-0.10", todre.Settings(retain=0.10)),
        ("todre-0.10-v2", todre.Settings(retain=0.10, select="maxsum", tau=0.10, probe_fractions=todre.V2_PROBES)),
        ("cls-0.10", todre.Settings(retain=0.10, select="cls", tau=0.0)),
        ("cls-global-0.25", todre.Settings(retain=0.25, select="cls-global", tau=0.0)),
        ("keep-64", todre.Settings(retain=1.0, keep_tokens=64)),
        ("stage1-keep-192", todre.Settings(retain=1.0, keep_tokens=192, tau=0.0)),
        (
            "cls-keep-128-v2",
            todre.Settings(retain=1.0, keep_tokens=128, select="cls", tau=0.0, probe_fractions=todre.V2_PROBES),
        ),
    ],
)
def test_configuration_names_parse_to_settings(name, expected):
    assert todre.parse_config(name) == expected


@pytest.mark.parametrize(
    "name, message",
    [
        ("bogus", "unknown configuration 'bogus'"),
        ("todre-64", "write todre-keep-64"),
        ("todre-1.5", "retain is a fraction"),
        ("keep-x", "configuration 'keep-x'"),
        ("stage1-nan", "retain is a fraction"),
        ("full-v2", "unknown configuration"),
    ],
)
def test_unknown_configuration_names_are_a_clear_error_listing_the_grammar(name, message):
    with pytest.raises(ValueError, match=message) as error:
        todre.parse_config(name)
    assert "keep-N" in str(error.value)  # the message lists the names there are


def test_select_pivot_in_all_three_cases():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.1], [0.9, 0.0, 0.0, 0.0], [0.0, 0.0, 0.95, 0.0]])
    assert todre.select_pivot(scores, anyres=True) == 1  # AnyRes: the thumbnail's best, even if a crop scores higher
    assert todre.select_pivot(scores[:1], anyres=False) == 1  # one image without AnyRes: argmax over its tokens
    f, t = scores.shape  # video: argmax over (frame, token) -> a * t + b
    a, b = max(((i, j) for i in range(f) for j in range(t)), key=lambda ij: scores[ij])
    assert todre.select_pivot(scores, anyres=False) == a * t + b == 10


@pytest.mark.parametrize("selector", list(GREEDY))
@pytest.mark.parametrize(
    "n, d, k, pivot, seed", [(40, 8, 12, 0, 0), (57, 5, 20, 31, 1), (30, 64, 30, 7, 2), (25, 3, 1, 24, 3)]
)
def test_greedy_selectors_match_bruteforce(selector, n, d, k, pivot, seed):
    greedy, literal = GREEDY[selector]
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    chosen = greedy(x, k, pivot)
    assert chosen.tolist() == literal(x, k, pivot)
    assert chosen[0] == pivot and len(set(chosen.tolist())) == k


def test_max_sum_differs_from_k_center():
    """The two objectives are not the same algorithm: on random data their orders part early."""
    x = torch.randn(60, 6, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    assert todre.greedy_k_center(x, 20, 0).tolist() != todre.greedy_max_sum(x, 20, 0).tolist()


@pytest.mark.parametrize("selector", list(GREEDY))
def test_greedy_selectors_break_exact_ties_by_the_lowest_index(selector):
    """A row and its duplicate, and zero rows, tie exactly; the lowest index must win. (Up to k = 15,
    the 12 distinct rows + 3 zero rows: past that every remaining row is a duplicate whose similarity
    is 1 up to rounding, and only the set taken is meaningful.)"""
    greedy, literal = GREEDY[selector]
    g = torch.Generator().manual_seed(5)
    base = torch.randint(-3, 4, (12, 4), generator=g).double()
    x = torch.cat([base, base[:5], torch.zeros(3, 4), base[3:9]])  # duplicates and zero rows
    for k, pivot in [(10, 0), (15, 13), (15, 17), (15, 22)]:
        assert greedy(x, k, pivot).tolist() == literal(x, k, pivot)


def test_kcenter_takes_a_zero_row_once_everything_else_looks_closer():
    """A zero row is similar to nothing (cosine 0)."""
    assert todre.greedy_k_center(torch.tensor([[1.0, 0], [0, 0], [0.9, 0.1]]), 2, 0).tolist() == [0, 1]


def test_kcenter_picks_one_token_per_cluster():
    g = torch.Generator().manual_seed(6)
    centres = torch.linalg.qr(torch.randn(16, 5, generator=g))[0].T  # 5 orthonormal directions
    x = centres.repeat_interleave(20, dim=0) + 0.01 * torch.randn(100, 16, generator=g)
    x = x[torch.randperm(100, generator=g)]
    cluster = (x @ centres.T).argmax(dim=1)
    chosen = todre.greedy_k_center(x, 5, pivot=0)
    assert sorted(cluster[chosen].tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("selector", list(GREEDY))
def test_greedy_selectors_never_build_the_n_by_n_matrix(selector):
    """n = 200k: an n x n similarity matrix would need 160 GB; the greedy pass needs O(n * d)."""
    x = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    chosen = GREEDY[selector][0](x, 4, pivot=3)
    assert chosen[0] == 3 and len(set(chosen.tolist())) == 4


@pytest.mark.parametrize("selector", list(GREEDY))
def test_greedy_selectors_accept_features_that_require_grad(selector):
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(10), requires_grad=True)
    assert GREEDY[selector][0](x, 5, 0).tolist() == GREEDY[selector][1](x.detach(), 5, 0)


def test_kcenter_on_16_bit_features_equals_the_full_matrix_reference():
    small = torch.randn(50, 8, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    assert todre.greedy_k_center(small, 10, 0).tolist() == greedy_matrix(small.float(), 10, 0)


@pytest.mark.parametrize("selector", list(GREEDY))
def test_greedy_selectors_take_everything_at_k_n_and_reject_bad_k(selector):
    greedy = GREEDY[selector][0]
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(9))
    assert sorted(greedy(x, 9, 4).tolist()) == list(range(9))
    assert greedy(x, 1, 4).tolist() == [4]
    for k, pivot in ((0, 0), (10, 0), (3, 9), (3, -1)):
        with pytest.raises(ValueError):
            greedy(x, k, pivot)


def clusters(num: int, per: int, dim: int, norms, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`num` well-separated directions, `per` noisy tokens around each, scaled to the given norms."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.linalg.qr(torch.randn(dim, num, generator=g))[0].T  # orthonormal
    x = centres.repeat_interleave(per, dim=0) + 0.02 * torch.randn(num * per, dim, generator=g)
    scale = torch.tensor(norms, dtype=torch.float32)[torch.randint(len(norms), (num * per, 1), generator=g)]
    x = x / x.norm(dim=1, keepdim=True) * scale
    return x, (x @ centres.T).argmax(dim=1)


@pytest.mark.parametrize("selector", list(GREEDY))
@pytest.mark.parametrize("norms", [[1.0], [300.0, 5000.0], [1e4]])
def test_float16_selects_one_token_per_cluster_like_float32_at_any_norm(selector, norms):
    """float16 tokens with norms in the thousands overflow a plain dot product to inf; with rows
    normalised first the selection equals float32's exactly."""
    greedy = GREEDY[selector][0]
    x, cluster = clusters(12, 30, 64, norms, seed=len(norms))
    half = x.half()
    assert torch.isfinite(half).all() and not torch.isfinite(half @ half[0]).all() or norms == [1.0]
    chosen16, chosen32 = greedy(half, 12, 5), greedy(half.float(), 12, 5)
    assert chosen16.tolist() == chosen32.tolist()
    assert sorted(cluster[chosen16].tolist()) == list(range(12))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_selection_on_random_tokens_is_valid_and_covers_like_float32(dtype):
    """Unstructured tokens have near-ties that may break differently in 16 bits; the selection must
    still be k distinct valid indices whose coverage is within 1% of float32's."""
    x = 40 * torch.randn(2880, 256, generator=torch.Generator().manual_seed(31))
    low = x.to(dtype)
    chosen = todre.greedy_k_center(low, 288, 0)
    assert len(set(chosen.tolist())) == 288 and 0 <= int(chosen.min()) and int(chosen.max()) < 2880
    in_float32 = todre.greedy_k_center(low.float(), 288, 0)
    assert k_center_radius(low, chosen) <= 1.01 * k_center_radius(low, in_float32)


@pytest.mark.parametrize("selector", list(GREEDY))
@pytest.mark.parametrize("case", ["identical", "zeros", "float16_max", "subnormal", "mixed"])
def test_selectors_never_return_a_duplicate_or_out_of_range_index(selector, case):
    greedy = GREEDY[selector][0]
    g = torch.Generator().manual_seed(32)
    n, d = 50, 16
    x = {
        "identical": torch.ones(n, d),
        "zeros": torch.zeros(n, d),
        "float16_max": torch.full((n, d), 65504.0) * torch.randn(n, d, generator=g).sign(),
        "subnormal": 1e-7 * torch.randn(n, d, generator=g),
        "mixed": torch.cat([torch.zeros(10, d), torch.ones(10, d), 1e4 * torch.randn(30, d, generator=g)]),
    }[case]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for k in (1, 7, n):
            chosen = greedy(x.to(dtype), k, 3).tolist()
            assert len(chosen) == len(set(chosen)) == k and all(0 <= i < n for i in chosen) and chosen[0] == 3


@pytest.mark.parametrize("selector", list(GREEDY))
def test_selectors_name_the_rows_that_hold_nan_or_inf(selector):
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(33))
    x[4, 1], x[11, 0], x[17, 3] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"3 row\(s\): 4, 11, 17"):
        GREEDY[selector][0](x, 5, 0)


def test_cls_top_k_is_a_stable_descending_sort():
    scores = torch.tensor([0.2, 0.9, 0.2, 0.5, 0.9])
    assert todre.cls_top_k(scores, 3).tolist() == [1, 4, 3]
    assert todre.cls_top_k(scores, 4).tolist() == [1, 4, 3, 0]


@pytest.mark.parametrize(
    "sizes, k",
    [
        ([576, 576, 576, 576, 576], 288),
        ([576, 500, 500], 157),
        ([576, 432, 432], 100),
        ([10, 3, 7], 5),
        ([5, 5, 5], 2),
        ([4, 4], 8),
        ([9], 3),
        ([1, 1, 1, 97], 3),
    ],
)
def test_cls_top_k_per_crop_matches_a_literal_reading(sizes, k):
    g = torch.Generator().manual_seed(sum(sizes) + k)
    crops = torch.cat([torch.full((s,), c) for c, s in enumerate(sizes)])
    scores = torch.rand(len(crops), generator=g).round(decimals=2)  # rounded: many exact ties
    chosen = todre.cls_top_k_per_crop(scores, crops, k)
    assert chosen.tolist() == cls_per_crop_reference(scores.tolist(), crops.tolist(), k)
    assert len(chosen) == k


def test_cls_per_crop_differs_from_global_top_k_when_one_crop_dominates():
    scores = torch.cat([torch.full((10,), 0.9), torch.full((10,), 0.1)])
    crops = torch.tensor([0] * 10 + [1] * 10)
    assert todre.cls_top_k(scores, 4).tolist() == [0, 1, 2, 3]
    assert todre.cls_top_k_per_crop(scores, crops, 4).tolist() == [0, 1, 10, 11]


@pytest.mark.parametrize("layers", [2, 8, 16, 24, 32, 40, 48, 60, 80])
def test_probe_layers_are_the_papers_1_based_layers_as_0_based_indices(layers):
    """Paper layer f*L, counted from 1, is index f*L - 1: 32 -> 15, 19, 23, 27; 40 -> 19, 24, 29, 34."""

    def paper_layer(fraction):  # the paper's 1-based layer number, rounded down, at least layer 1
        return max(1, math.floor(fraction * layers))

    assert todre.probe_layers(layers) == sorted({paper_layer(f) - 1 for f in (0.5, 0.625, 0.75, 0.875)})
    assert todre.probe_layers(layers, todre.V2_PROBES) == [paper_layer(0.875) - 1]


def test_probe_layers_for_the_papers_models():
    assert todre.probe_layers(32) == [15, 19, 23, 27] and todre.probe_layers(32, todre.V2_PROBES) == [27]
    assert todre.probe_layers(40) == [19, 24, 29, 34]
    assert todre.probe_layers(8) == [3, 4, 5, 6]


@pytest.mark.parametrize("order", ["image_then_text", "text_then_image", "interleaved"])
def test_cross_modal_ratios_match_dense_attention(order):
    g = torch.Generator().manual_seed(13)
    n = 40
    q, k = torch.randn(6, n, 8, generator=g), torch.randn(2, n, 8, generator=g)  # GQA: 3 query heads per kv head
    positions = torch.arange(n)
    if order == "image_then_text":
        visual, text = positions[5:30], positions[30:]
    elif order == "text_then_image":
        visual, text = positions[20:], positions[5:20]
    else:
        visual, text = positions[5::2], positions[6::2]
    ours = todre.cross_modal_ratios(q, k, visual, text, chunk=7)
    assert ours == pytest.approx(ratios_dense(q, k, visual, text), abs=1e-6)
    if order == "image_then_text":
        assert ours[1] == 0.0  # causal: an image before the text can never attend to it
    else:
        assert ours[1] > 0.01


# ---------------------------------------------------------------------------------------------
# checkpoint.py: loading, and clear errors for broken checkpoints
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "transformers5": lambda k: k,
    "transformers5_vision_model": lambda k: k.replace("model.vision_tower.", "model.vision_tower.vision_model."),
    "hub": reference.hub_name,
}


@pytest.mark.parametrize("layout", [*LAYOUTS, "hub_fp16"])
def test_loader_accepts_every_key_layout(ckpt, tmp_path, layout):
    """Each key layout loads to the same weights (the fixture itself loaded save_pretrained's layout)."""
    rename = LAYOUTS[layout.removesuffix("_fp16")]
    state = {rename(k): v.half() if layout.endswith("fp16") else v for k, v in hf_runtime_state(ckpt).items()}
    model, _ = llava.load(str(resave(ckpt, tmp_path / layout, state)))
    ours = model.state_dict()
    for name, tensor in ckpt.model.state_dict().items():
        expected = tensor.half().float() if layout.endswith("fp16") else tensor
        assert ours[name].dtype == torch.float32  # fp16 weights are cast to the requested dtype
        assert torch.equal(ours[name], expected), name


def test_loader_names_missing_unexpected_and_misshaped_keys(ckpt, tmp_path):
    state = hf_runtime_state(ckpt)
    del state["model.language_model.layers.0.mlp.up_proj.weight"]
    with pytest.raises(
        checkpoint.CheckpointError, match=r"missing \(1\): language_model\.layers\.0\.mlp\.up_proj\.weight"
    ):
        llava.load(str(resave(ckpt, tmp_path / "missing", state)))
    state = hf_runtime_state(ckpt)
    state["model.image_newlines"] = state.pop("model.image_newline")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"missing \(1\): image_newline; unexpected \(1\): model\.image_newlines"
    ):
        llava.load(str(resave(ckpt, tmp_path / "renamed", state)))
    state = hf_runtime_state(ckpt)
    state["model.image_newline"] = torch.zeros(3)
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape \(1\): model\.image_newline \(3,\)"):
        llava.load(str(resave(ckpt, tmp_path / "misshaped", state)))


def test_loader_never_reads_pickles(ckpt, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    for f in ckpt.directory.glob("*.json"):
        shutil.copy(f, directory)
    torch.save(ckpt.hf.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match="no \\*.safetensors"):
        llava.load(str(directory))
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) or p == "*" for p in checkpoint.HUB_FILES)


def test_hub_id_is_downloaded_with_safe_patterns_only(ckpt, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(ckpt.directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = llava.load("someone/tiny-llava-next")
    assert calls == [("someone/tiny-llava-next", ["*.json", "*.safetensors", "tokenizer.*", "*.jinja"])]
    assert checkpoint.DEFAULT_MODEL == "llava-hf/llava-v1.6-vicuna-7b-hf"


def test_hub_config_defaults_match_transformers(tmp_path):
    """The Hub's 7B config.json omits most text/vision fields; ours must fill them as transformers does."""
    hub_config = {
        "architectures": ["LlavaNextForConditionalGeneration"],
        "image_grid_pinpoints": PINPOINTS,
        "image_token_index": 32000,
        "model_type": "llava_next",
        "projector_hidden_act": "gelu",
        "text_config": {
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "pad_token_id": 0,
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "use_image_newline_parameter": True,
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }
    (tmp_path / "config.json").write_text(json.dumps(hub_config))
    ours = checkpoint.LlavaConfig.from_dir(tmp_path)
    ref = tf.LlavaNextConfig(**{k: v for k, v in hub_config.items() if k != "model_type"})
    t, rt = ours.text, ref.text_config
    assert (
        (
            t.hidden_size,
            t.intermediate_size,
            t.num_hidden_layers,
            t.num_attention_heads,
            t.num_key_value_heads,
            t.vocab_size,
            t.rms_norm_eps,
            t.rope_theta,
            t.max_position_embeddings,
        )
        == (
            rt.hidden_size,
            rt.intermediate_size,
            rt.num_hidden_layers,
            rt.num_attention_heads,
            rt.num_key_value_heads,
            rt.vocab_size,
            rt.rms_norm_eps,
            rt.rope_parameters["rope_theta"],
            rt.max_position_embeddings,
        )
        == (4096, 11008, 32, 32, 32, 32064, 1e-5, 10000.0, 4096)
    )
    v, rv = ours.vision, ref.vision_config
    assert (
        v.hidden_size,
        v.intermediate_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.image_size,
        v.patch_size,
        v.hidden_act,
        v.layer_norm_eps,
    ) == (
        rv.hidden_size,
        rv.intermediate_size,
        rv.num_hidden_layers,
        rv.num_attention_heads,
        rv.image_size,
        rv.patch_size,
        rv.hidden_act,
        rv.layer_norm_eps,
    )
    assert ours.image_token_index == 32000 and ours.vision_feature_layer == -2


def test_not_llava_next_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(checkpoint.CheckpointError, match="not a LLaVA checkpoint"):
        checkpoint.LlavaConfig.from_dir(tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.LlavaConfig.from_dir(tmp_path / "nowhere")


DELETE = object()  # break_config's value that removes the key


def break_config(key, value):
    def apply(directory):
        config = json.loads((directory / "config.json").read_text())
        target = config
        *parents, last = key.split(".")
        for parent in parents:
            target = target[parent]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
        (directory / "config.json").write_text(json.dumps(config))

    return apply


def break_file(name, text):
    return lambda directory: (directory / name).write_text(text)


def break_preprocessor(key, value):
    def apply(directory):
        pre = json.loads((directory / "preprocessor_config.json").read_text())
        pre[key] = value
        (directory / "preprocessor_config.json").write_text(json.dumps(pre))

    return apply


def break_weights(change):
    def apply(directory):
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        assert (
            "image_newline" in state and "language_model.model.embed_tokens.weight" in state
        )  # save_pretrained's names
        extra = change(state)
        save_file(state, directory / "model.safetensors")
        if extra:
            save_file(extra, directory / "model-00002.safetensors")

    return apply


def break_tokenizer(extra_tokens=0, rename_image=False):
    def apply(directory):
        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        if rename_image:
            tokenizer = make_tokenizer_without_image(tokenizer)
        tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
        tokenizer.save(str(directory / "tokenizer.json"))

    return apply


def make_tokenizer_without_image(tokenizer):
    data = json.loads(tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<image>"]
    return Tokenizer.from_str(json.dumps(data))


DELETE = object()


BROKEN_CHECKPOINTS = {
    "config_not_an_object": (break_file("config.json", "[1, 2]"), "config.json must hold a JSON object, not a list"),
    "layers_as_string": (
        break_config("text_config.num_hidden_layers", "8"),
        "config.json: text_config.num_hidden_layers must be an integer, got '8'",
    ),
    "zero_heads": (
        break_config("vision_config.num_attention_heads", 0),
        "config.json: vision_config.num_attention_heads must be positive, got 0",
    ),
    "pinpoints_missing": (
        lambda d: (
            break_config("image_grid_pinpoints", DELETE)(d),
            break_preprocessor("image_grid_pinpoints", None)(d),
        ),
        "config.json: image_grid_pinpoints is missing or empty",
    ),
    "pinpoints_empty": (
        lambda d: (break_config("image_grid_pinpoints", [])(d), break_preprocessor("image_grid_pinpoints", [])(d)),
        "config.json: image_grid_pinpoints is missing or empty",
    ),
    "pinpoints_not_multiple": (
        break_config("image_grid_pinpoints", [[336, 500]]),
        "image_grid_pinpoints entry [336, 500] must be [height, width], each a positive multiple",
    ),
    "pinpoints_zero": (break_config("image_grid_pinpoints", [[0, 336]]), "image_grid_pinpoints entry [0, 336]"),
    "feature_layer_out_of_range": (
        break_config("vision_feature_layer", -7),
        "config.json: vision_feature_layer -7 is not the output of an encoder layer",
    ),
    "vision_act": (
        break_config("vision_config.hidden_act", "swish"),
        "config.json: vision_config.hidden_act 'swish' is not supported",
    ),
    "crop_mismatch": (
        break_preprocessor("crop_size", {"height": 224, "width": 224}),
        "preprocessor_config.json: crop_size 224 does not match the vision tower's image_size 336",
    ),
    "image_std_zero": (
        break_preprocessor("image_std", [0.0, 0.26, 0.27]),
        "preprocessor_config.json: image_std must be positive",
    ),
    "rope_not_an_object": (
        break_config("text_config.rope_parameters", "linear"),
        "config.json: text_config: rope_parameters (or rope_scaling) must be an object",
    ),
    "tokenizer_too_big": (break_tokenizer(extra_tokens=40), "token ids but the model embeds only vocab_size"),
    "image_token_mismatch": (
        break_tokenizer(rename_image=True),
        "tokenizer.json has no '<image>' token, but config.json's image_token_index is",
    ),
    "malformed_tensor_name": (
        break_weights(lambda s: s.update({"vision_tower.encoder.layers.foo.bar": torch.zeros(1)})),
        "unexpected (1): vision_tower.encoder.layers.foo.bar",
    ),
    "integer_weights": (
        break_weights(lambda s: s.update({"image_newline": s["image_newline"].long()})),
        "image_newline holds torch.int64 values where float weights belong",
    ),
    "tensor_in_two_shards": (
        break_weights(lambda s: {"image_newline": s["image_newline"].clone()}),
        "image_newline is in two weight files, model-00002.safetensors and model.safetensors",
    ),
    "nan_weights": (
        break_weights(lambda s: s["language_model.model.embed_tokens.weight"].__setitem__((3, 1), float("nan"))),
        "language_model.model.embed_tokens.weight holds NaN or inf values",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_broken_checkpoints_are_one_line_naming_file_and_field(mha, tmp_path, capsys, case):
    breaks, message = BROKEN_CHECKPOINTS[case]
    directory = tmp_path / case
    shutil.copytree(mha.directory, directory)
    breaks(directory)
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), message)


# ---------------------------------------------------------------------------------------------
# checkpoint.py, prompt.py: every LLaVA family people prune, in its own prompt format
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(672, 672), (500, 375), (30, 90)])
def test_every_family_matches_transformers(family, size):
    """Prompt ids equal transformers' processor on its apply_chat_template, and float32 logits its
    model's (LlavaForConditionalGeneration for 1.5, LlavaNextForConditionalGeneration otherwise)."""
    image = noise_image(*size, seed=size[0] % 97)
    ref = family.hf_inputs(image)
    with torch.inference_mode():
        visual = family.model.encode_image(image)
        expected = family.hf(**ref).logits[0]
    ids = family.prompt(len(visual.tokens))
    assert torch.equal(ids, ref["input_ids"][0])
    assert expected.std() > 0.5 and (family.prefill(ids, visual.tokens)[0] - expected).abs().max() < 1e-4


@pytest.mark.parametrize("with_image", [True, False])
def test_every_family_generates_what_transformers_generates(family, with_image):
    image = noise_image(336, 224, seed=90) if with_image else None
    ref = family.hf_inputs(image)
    with torch.inference_mode():
        visual = family.model.encode_image(image).tokens if with_image else None
        hf = family.hf.generate(**ref, max_new_tokens=12, do_sample=False, eos_token_id=sorted(family.model.stop_ids))
    expected = hf[0, ref["input_ids"].shape[1] :].tolist()
    expected = [t for t in expected[: next((i for i, t in enumerate(expected) if t in family.model.stop_ids), None)]]
    ids = family.prompt(len(visual) if with_image else None)
    assert torch.equal(ids, ref["input_ids"][0])
    assert llava.generate(family.model, ids, visual, todre.NO_PRUNING, 12).token_ids == expected


def test_every_family_runs_both_stages_and_clamps_token_counts(family):
    visual, kept, ids = family.pruned(noise_image(500, 375, seed=91), todre.Settings(keep_tokens=64))
    candidates = int((visual.sources != anyres.NEWLINE).sum())
    assert len(kept) == 64 and candidates == (576 if family.model.config.model_type == "llava" else 2304)
    _, info, _ = family.prefill(ids, visual.tokens[kept], todre.Settings(keep_tokens=64, tau=1.01))
    assert info.evict_layer == todre.probe_layers(family.layers)[0]  # tau above every ratio: the first probe
    everything = family.model.select(visual, todre.Settings(keep_tokens=100_000))
    assert len(everything) == candidates


def test_llava15_preprocesses_like_its_processor_and_pivots_over_all_576_tokens(families):
    """Pivot case (2) of Algorithm 1: an image without AnyRes pivots on its argmax over all tokens."""
    llava15 = families("llava15")
    image = noise_image(640, 427, seed=92)
    ref = llava15.hf_inputs(image)
    pixels, _ = anyres.preprocess_square(image, 336, 336)
    torch.testing.assert_close(pixels, ref["pixel_values"], atol=1e-6, rtol=0)
    with torch.inference_mode():
        cls_attn = hf_cls_attention(llava15, ref["pixel_values"])
    visual = llava15.model.encode_image(image)
    assert visual.layout is None and len(visual.tokens) == 576 and (visual.sources != anyres.NEWLINE).all()
    torch.testing.assert_close(visual.cls_attn, cls_attn, atol=1e-6, rtol=0)
    kept = llava15.model.select(visual, todre.Settings(retain=0.1))
    assert kept.tolist() == sorted(greedy_matrix(visual.tokens, 58, int(cls_attn.flatten().argmax())))


def test_pad_to_square_is_llavas_expand2square(families, mha):
    """LLaVA's evaluation centred the image on a square of the mean colour, then ran CLIP's processor."""
    llava15 = families("llava15")
    image = noise_image(500, 300, seed=93)
    square = Image.new("RGB", (500, 500), tuple(int(255 * m) for m in anyres.CLIP_MEAN))
    square.paste(image, (0, (500 - 300) // 2))  # expand2square, written out
    expected = reference.clip_image_processor(336)(square, return_tensors="pt")["pixel_values"]
    pixels, framing = anyres.preprocess_square(image, 336, 336, pad_to_square=True)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)
    boxes = picture.patch_boxes(framing, torch.arange(576), 24)
    assert boxes[:, 1].min() == 0 and boxes[:, 3].max() == 300  # the padding maps outside the image
    assert len(llava15.model.encode_image(image, pad_to_square=True).tokens) == 576
    with pytest.raises(llava.InputError, match="pad_to_square applies to checkpoints without AnyRes"):
        mha.model.encode_image(image, pad_to_square=True)


# The documented prompt of each family (transformers' LLaVA-NeXT model card), for "q" and an image.
DOCUMENTED_FORMATS = {
    "vicuna": prompt.VICUNA_SYSTEM + " USER: <image>\nq ASSISTANT:",
    "mistral": "[INST] <image>\nq [/INST]",
    "chatml": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nq<|im_end|>"
    "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\n" + prompt.LLAMA3_SYSTEM + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", ["mha", *FAMILIES])
def test_checkpoints_without_a_chat_template_fall_back_on_the_built_in_format(name, families, mha, tmp_path):
    ckpt = mha if name == "mha" else families(name)
    directory = tmp_path / name
    shutil.copytree(ckpt.directory, directory)
    (directory / "chat_template.jinja").unlink()
    _, tokenizer = llava.load(str(directory))
    assert tokenizer.format.family == ckpt.tokenizer.format.family and tokenizer.format.chat_template is None
    assert tokenizer.format.render("q", "<image>") == DOCUMENTED_FORMATS[ckpt.family]


def test_vicuna_gets_llavas_literal_system_prompt(mha):
    """The deliberate exception to transformers' rendering: LLaVA's evaluation prompted Vicuna with
    its system prompt, which llava-hf's template leaves out unless given as a system message."""
    ours = mha.tokenizer.format.render(QUESTION, "<image>")
    assert ours == DOCUMENTED_FORMATS["vicuna"].replace("q ASSISTANT", QUESTION + " ASSISTANT")
    without = mha.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    assert ours == prompt.VICUNA_SYSTEM + " " + without and mha.hf_text() == ours


def llama_style_tokenizer_dir(directory, legacy):
    """A Llama-2-style tokenizer saved with transformers' tokenizer_config.json `legacy` setting."""
    directory.mkdir()
    conftest.sentencepiece_style_tokenizer(["<image>"]).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config | ({"legacy": legacy} if legacy is not None else {}))
    )
    return tf.AutoTokenizer.from_pretrained(str(directory))


def test_sentencepiece_families_keep_the_piece_after_image_as_llava_trained(mha, tmp_path):
    """LLaVA's tokenizer_image_token tokenized each side of <image> alone, so the text after it
    starts with SentencePiece's '▁' again; transformers with legacy: true agrees, with legacy:
    false (or unset) drops exactly that one piece."""
    text = mha.tokenizer.format.render(QUESTION, "<image>")
    ours = prompt.encode(mha.tokenizer.tokenizer, text, "<image>", mha.image_token, 1)
    legacy = {setting: llama_style_tokenizer_dir(tmp_path / str(setting), setting) for setting in (True, False, None)}
    before, after = text.split("<image>")  # LLaVA's reading: chunks, BOS only on the first
    llava_reading = legacy[True](before)["input_ids"] + [mha.image_token] + legacy[True](after)["input_ids"][1:]
    assert ours == llava_reading == legacy[True](text)["input_ids"]
    at = ours.index(mha.image_token)
    assert mha.tokenizer.tokenizer.id_to_token(ours[at + 1]) == "▁"
    assert legacy[False](text)["input_ids"] == legacy[None](text)["input_ids"] == ours[: at + 1] + ours[at + 2 :]
    # A tokenizer.json saved the non-legacy way ('▁' prepended to the first piece only) still gives
    # LLaVA's ids: the text after the image is encoded on its own.
    non_legacy = legacy[False].backend_tokenizer
    assert non_legacy.encode(text).ids != ours
    assert prompt.encode(non_legacy, text, "<image>", mha.image_token, 1) == ours


def test_llama3_prompt_has_one_bos_and_no_piece_after_the_image(families):
    llama3 = families("llama3")
    ids = llama3.prompt(5).tolist()
    bos = llama3.tokenizer.tokenizer.token_to_id("<|begin_of_text|>")
    assert ids.count(bos) == 1 and ids[0] == bos
    assert llama3.tokenizer.tokenizer.id_to_token(ids[ids.index(llama3.image_token) + 5]) != "▁"


@pytest.mark.parametrize(
    "name, stops", [("llama3", ["<|end_of_text|>", "<|eot_id|>"]), ("chatml", ["</s>", "<|im_end|>"])]
)
def test_generation_stops_at_every_end_of_turn_token(families, name, stops, monkeypatch):
    ckpt = families(name)
    stop_ids = {ckpt.tokenizer.tokenizer.token_to_id(t) for t in stops}
    assert ckpt.model.stop_ids == stop_ids
    real_decode_step = llava.Llava.decode_step
    for stop in stop_ids:
        calls = []

        def ends_here(self, token, position, kv_cache, stop=stop, calls=calls):
            calls.append(token)
            logits = real_decode_step(self, token, position, kv_cache)
            return torch.where(torch.arange(len(logits)) == stop, 1e9, logits) if len(calls) == 2 else logits

        monkeypatch.setattr(llava.Llava, "decode_step", ends_here)
        assert len(llava.generate(ckpt.model, ckpt.prompt(None), None, todre.NO_PRUNING, 10).token_ids) == 2


def test_mistral_sliding_window_is_checked_not_silently_ignored(families):
    mistral = families("mistral")
    assert mistral.model.config.text.sliding_window == mistral.hf.config.text_config.sliding_window == 4096
    ids = mistral.prompt(None)
    mistral.model.check_generation(ids, None, 100, 0.0)
    with pytest.raises(llava.InputError, match="sliding window of this Mistral model"):
        mistral.model.check_generation(ids, None, 4096 - len(ids) + 1, 0.0)


def test_cli_names_the_prompt_format_and_reports_a_clamped_token_count(families, tmp_path, capsys):
    llava15 = families("llava15")
    noise_image(200, 150, seed=94).save(tmp_path / "photo.png")
    argv = cli_args(
        llava15,
        "--image",
        str(tmp_path / "photo.png"),
        "--keep-tokens",
        "1000",
        "--max-new-tokens",
        "2",
        "--stats",
        "--pad-to-square",
    )
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "Stage 1 budget: --keep-tokens 1000 clamped to the 576 candidates" in err
    assert (
        "visual tokens: 576 packed -> 576 after Stage 1" in err
        and "prompt format: vicuna (LLaVA's system prompt)" in err
    )


def test_streaming_prints_multibyte_characters_made_of_byte_fallback_tokens(mha, tmp_path, capsys, monkeypatch):
    text = "☃é"
    pieces = mha.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(pieces) == 6  # '▁', then 3 + 2 byte-fallback tokens
    monkeypatch.setattr(llava.Llava, "decode", lambda self, *args, **kwargs: iter(pieces))
    code, out, err = run_cli(capsys, *cli_args(mha, "--max-new-tokens", "6"))
    assert code == 0 and out == text + "\n", err


def test_a_checkpoint_saved_with_processor_config_only_loads(mha, tmp_path):
    """transformers 5 writes the image processor's settings into processor_config.json."""
    directory = tmp_path / "t5"
    shutil.copytree(mha.directory, directory)
    (directory / "preprocessor_config.json").unlink()
    model, _ = llava.load(str(directory))
    assert model.config.image_grid_pinpoints == PINPOINTS and model.config.crop_size == 336


# ---------------------------------------------------------------------------------------------
# model.py: ToDRE in the model (Stage 1 on real features, Stage 2 in the prefill loop)
# ---------------------------------------------------------------------------------------------


def test_stage1_picks_the_reference_tokens_and_equals_the_model_on_that_subset(ckpt):
    """Pivot from HF's own attention weights, k-center by the full-matrix reference, on HF's packed
    features; then the model run on exactly those tokens equals HF's language model on them."""
    image = noise_image(517, 301, seed=11)
    ref = ckpt.hf_inputs(image)
    settings = todre.Settings(retain=0.1, tau=0.0)
    with torch.inference_mode():
        packed = hf_packed_features(ckpt, ref)
        cls_attn = hf_cls_attention(ckpt, ref["pixel_values"][0])
    visual, kept, ids = ckpt.pruned(image, settings)
    torch.testing.assert_close(visual.cls_attn, cls_attn, atol=1e-6, rtol=0)
    sources = anyres.token_sources(anyres.layout((301, 517), PINPOINTS))
    candidates = (sources != anyres.NEWLINE).nonzero()[:, 0]
    pivot = int(cls_attn[0].argmax())  # thumbnail tokens come first, so candidate index = thumbnail index
    k = round(0.1 * len(candidates))
    expected = candidates[sorted(greedy_matrix(packed[candidates], k, pivot))]
    assert kept.tolist() == expected.tolist() and len(kept) == k == 158
    with torch.inference_mode():
        reference_logits = hf_logits(ckpt, ids, packed[expected])
    assert (ckpt.prefill(ids, visual.tokens[kept], settings)[0] - reference_logits).abs().max() < 1e-4


@pytest.mark.parametrize("settings", [todre.Settings(), todre.NO_PRUNING], ids=["todre", "full"])
def test_nan_visual_features_are_an_input_error_with_or_without_stage1(mha, monkeypatch, settings):
    """Checked where visual tokens are made, so the unpruned model (no Stage 1) refuses them too
    instead of answering nothing."""
    project = llava.Llava.project

    def overflowing(self, features):
        tokens = project(self, features)
        tokens.view(-1, tokens.shape[-1])[100, 3] = float("inf")  # token 100 of the packed sequence
        return tokens

    monkeypatch.setattr(llava.Llava, "project", overflowing)
    with pytest.raises(llava.InputError, match="1 of 1176 visual tokens hold NaN or inf"):
        llava.ask(mha.model, mha.tokenizer, QUESTION, mha.model.encode_image(noise_image(336, 336)), settings, 2)


@pytest.mark.parametrize("select", ["kcenter", "cls"])
def test_newlines_keep_puts_every_newline_back_in_place_and_drop_removes_them(mha, select):
    visual, dropped, _ = mha.pruned(noise_image(600, 1000, seed=27), todre.Settings(retain=0.1, select=select))
    kept = mha.model.select(visual, todre.Settings(retain=0.1, select=select, newlines="keep"))
    is_newline = visual.sources == anyres.NEWLINE
    assert not is_newline[dropped].any() and len(dropped) == round(0.1 * int((~is_newline).sum()))
    assert kept.tolist() == sorted(dropped.tolist() + is_newline.nonzero()[:, 0].tolist())  # k counts patch tokens only


def test_newlines_keep_with_every_patch_token_is_the_unpruned_model(mha):
    """retain 1.0 switches Stage 1 off; a budget of every candidate goes through the selection and,
    with the newlines kept, must give back the unpruned sequence and logits."""
    image = noise_image(517, 301, seed=28)
    with torch.inference_mode():
        visual = mha.model.encode_image(image)
        expected = mha.hf(**mha.hf_inputs(image)).logits[0]
    candidates = int((visual.sources != anyres.NEWLINE).sum())
    everything = torch.arange(len(visual.tokens))
    assert torch.equal(mha.model.select(visual, todre.Settings(retain=1.0, newlines="keep")), everything)
    kept = mha.model.select(visual, todre.Settings(keep_tokens=candidates, newlines="keep"))
    assert torch.equal(kept, everything)
    pruned, _, _ = mha.prefill(mha.prompt(len(kept)), visual.tokens[kept], todre.Settings(tau=0.0))
    assert (pruned - expected).abs().max() < 1e-4


def test_no_pruning_settings_reproduce_unpruned_logits_exactly(ckpt):
    visual, kept, ids = ckpt.pruned(noise_image(600, 1000, seed=12), todre.NO_PRUNING)
    assert torch.equal(kept, torch.arange(len(visual.tokens)))  # newlines included
    pruned, info, _ = ckpt.prefill(ids, visual.tokens[kept], todre.NO_PRUNING)
    with torch.inference_mode():
        plain = ckpt.model.language_model(
            ckpt.model.embed(ids, visual.tokens), torch.arange(len(ids)), ckpt.model.new_kv_cache(0)
        )[0]
    assert torch.equal(pruned, plain) and info.evict_layer is None and info.ratios == {}


def test_keep_tokens_budget_in_the_model(gqa):
    visual, kept, _ = gqa.pruned(noise_image(517, 301, seed=13), todre.Settings(keep_tokens=64))
    candidates = (visual.sources != anyres.NEWLINE).nonzero()[:, 0]
    pivot = int(visual.cls_attn[0].argmax())
    assert kept.tolist() == candidates[sorted(greedy_matrix(visual.tokens[candidates], 64, pivot))].tolist()
    all_of_them = gqa.model.select(visual, todre.Settings(keep_tokens=10**6))  # clamped to the candidates
    assert all_of_them.tolist() == candidates.tolist()


def test_v2_selects_by_max_sum_and_probes_only_at_7L_8(gqa):
    visual, kept, ids = gqa.pruned(noise_image(517, 301, seed=23), todre.variant("v2"))
    candidates = (visual.sources != anyres.NEWLINE).nonzero()[:, 0]
    pivot = int(visual.cls_attn[0].argmax())
    expected = sorted(greedy_matrix(visual.tokens[candidates], len(kept), pivot, lambda s: s.sum(dim=1)))
    assert kept.tolist() == candidates[expected].tolist()
    assert list(gqa.prefill(ids, visual.tokens[kept], todre.variant("v2", tau=1e-9))[1].ratios) == [6]
    tuned = todre.variant("v2", tau=1e-9, probe_layers=[2, 6])
    assert list(gqa.prefill(ids, visual.tokens[kept], tuned)[1].ratios) == [2, 6]


def test_ratios_in_the_model_equal_hf_attention_weights(gqa):
    """The ratios the prefill loop reports equal eq. 7 applied to transformers' eager attention weights."""
    settings = todre.Settings(retain=0.1, tau=1e-9)  # measure at every probe layer, never evict
    visual, kept, ids = gqa.pruned(noise_image(517, 301, seed=14), settings)
    _, info, _ = gqa.prefill(ids, visual.tokens[kept], settings)
    with torch.inference_mode():
        embeds = hf_embeddings(gqa, ids, visual.tokens[kept])
        out = gqa.hf.model.language_model(inputs_embeds=embeds, output_attentions=True)
    visual_pos = (ids == gqa.image_token).nonzero()[:, 0]
    text_pos = torch.arange(len(ids))[visual_pos.max() + 1 :]
    assert info.evict_layer is None and sorted(info.ratios) == [3, 4, 5, 6]
    for layer, (a_tv, a_vt) in info.ratios.items():
        attn = out.attentions[layer][0].mean(0)  # (n, n) averaged over heads
        assert a_tv == pytest.approx(float(attn[text_pos][:, visual_pos].sum() / attn[text_pos].sum()), abs=1e-5)
        assert a_vt == 0.0


def test_eviction_layer_is_the_first_probe_where_both_ratios_fall_below_tau(gqa):
    visual, kept, ids = gqa.pruned(noise_image(517, 301, seed=15), todre.Settings(retain=0.1))

    def prefill_info(tau):
        return gqa.prefill(ids, visual.tokens[kept], todre.Settings(retain=0.1, tau=tau))[1]

    ratios = prefill_info(1e-9).ratios
    for tau in sorted({tv for tv, _ in ratios.values()}) + [1.01]:
        expected = next((layer for layer, (tv, vt) in ratios.items() if tv < tau and vt < tau), None)
        assert prefill_info(tau).evict_layer == expected
    assert prefill_info(1.01).evict_layer == 3 and prefill_info(0.0).ratios == {}


@pytest.mark.parametrize(
    "settings",
    [
        todre.Settings(retain=0.1, tau=1.01),
        todre.Settings(retain=0.1, tau=0.0, evict_layer=2),
        todre.Settings(retain=1.0, tau=0.0, evict_layer=6),
    ],
    ids=["rule_at_layer_3", "forced_layer_2", "stage2_only_layer_6"],
)
def test_eviction_equals_masked_reference(gqa, settings):
    """Evicting after layer l == the unpruned model in which every query at layers > l, and at layer l
    while decoding, is masked from the visual keys (paper §4.2): logits, cache lengths, 20 tokens.
    (The reference recomputes the whole sequence for every token, so the unpruned case uses the
    smallest image there is, 1176 visual tokens.)"""
    image = noise_image(517, 301, seed=16) if settings.stage1 else noise_image(336, 336, seed=16)
    visual, kept, ids = gqa.pruned(image, settings)
    tokens = visual.tokens[kept]
    n, is_visual = len(ids), ids == gqa.image_token
    logits, info, cache = gqa.prefill(ids, tokens, settings, room=20)
    evicted = info.evict_layer
    assert evicted == (settings.evict_layer if settings.evict_layer is not None else 3)
    assert cache.lengths == [n] * evicted + [n - len(tokens)] * (8 - evicted)
    assert torch.equal(info.positions, torch.arange(n)[~is_visual])  # original positions kept

    def allowed(layer, length):
        mask = torch.ones(length, length, dtype=torch.bool).tril()
        visual_keys = torch.zeros(length, dtype=torch.bool)
        visual_keys[:n] = is_visual
        if layer > evicted:
            mask[:, visual_keys] = False
        elif layer == evicted:
            mask[n:, visual_keys] = False  # decoded queries only
        return mask

    with torch.inference_mode():
        prompt_embeds = hf_embeddings(gqa, ids, tokens)
        masked = dense_forward(gqa, prompt_embeds, allowed)[0]
        assert (logits - masked[~is_visual]).abs().max() < 1e-4
        assert (dense_forward(gqa, prompt_embeds, causal)[0] - masked).abs().max() > 1e-3  # eviction changes logits
        expected, embeds = [], prompt_embeds
        for _ in range(20):
            token = int(dense_forward(gqa, embeds, allowed)[0, -1].argmax())
            if token == 2:
                break
            expected.append(token)
            embeds = torch.cat([embeds, gqa.hf.model.language_model.embed_tokens(torch.tensor([[token]]))], dim=1)
    ours = llava.generate(gqa.model, ids, tokens, settings, max_new_tokens=20).token_ids
    assert ours == expected and len(ours) == 20 and len(set(ours)) > 3


def test_python_api_validates_at_the_entry_point(mha):
    ids = mha.prompt(None)
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(llava.InputError, match="max_new_tokens must be a positive integer"):
            llava.generate(mha.model, ids, None, todre.NO_PRUNING, bad)
    with pytest.raises(llava.InputError, match="temperature must be a finite number"):
        llava.generate(mha.model, ids, None, todre.NO_PRUNING, 4, temperature=float("nan"))
    with pytest.raises(llava.InputError, match="at least one frame"):
        mha.model.encode_video([])
    with pytest.raises(llava.InputError, match="video newlines must be 'grid' or 'none'"):
        mha.model.encode_video([noise_image(40, 30)], newlines="row")


# ---------------------------------------------------------------------------------------------
# media.py and video: sampling as lmms-eval's llava_vid, frames as CLIP's processor, pooled tokens
# ---------------------------------------------------------------------------------------------


def write_video(path, frames: int, fps: int, size=(64, 48)):
    """A synthetic video written with PyAV: frame i is a flat colour whose red channel is 4 * i."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = 4 * i, 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def llava_vid_indices(total: int, fps: float, max_frames: int) -> list[int]:
    """lmms-eval llava_vid's sampling, read literally: every round(fps)-th frame; if that is more
    than max_frames, np.linspace over the whole video cast to int."""
    indices = [i for i in range(0, total, round(fps))]
    if len(indices) > max_frames:
        indices = [int(x) for x in np.linspace(0, total - 1, max_frames)]
    return indices


@pytest.mark.parametrize("fps", [1, 2, 8, 24, 25, 29.97, 30, 60])
def test_frame_indices_follow_llava_vid_for_every_length(fps):
    for total in [1, 2, 5, 23, 24, 25, 59, 60, 61, 100, 599, 600, 601, 1799, 1800, 7213]:
        for max_frames in (1, 4, 20, 64):
            assert media.frame_indices(total, fps, max_frames) == llava_vid_indices(total, fps, max_frames)
    assert media.frame_indices(5, None, 20) == [0, 1, 2, 3, 4]  # no timing: uniform
    assert media.frame_indices(100, None, 4) == [0, 33, 66, 99]


@pytest.mark.parametrize(
    "frames, fps, max_frames, expected",
    [
        (35, 10, 20, [0, 10, 20, 30]),  # 1 fps
        (35, 10, 3, [0, 17, 34]),  # the uniform cap
        (6, 10, 20, [0]),
    ],
)  # shorter than 1 s
def test_video_files_are_sampled_at_one_frame_per_second(tmp_path, frames, fps, max_frames, expected):
    write_video(tmp_path / "clip.mp4", frames, fps)
    clip = media.open_video(str(tmp_path / "clip.mp4"), max_frames)
    assert clip.indices == expected and clip.total_frames == frames and clip.fps == fps
    assert clip.times == [i / fps for i in expected]
    reds = [np.asarray(f.convert("RGB"), dtype=float)[..., 0].mean() for f in clip.frames]
    assert all(abs(red - 4 * i) < 6 for red, i in zip(reds, expected, strict=True))  # the right frames, decoded


def test_video_file_without_pyav_is_one_line_saying_pip_install_av(tmp_path, capsys, monkeypatch, mha):
    write_video(tmp_path / "clip.mp4", 3, 1)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as if PyAV were not installed
    one_line_error(capsys, cli_args(mha, "--video", str(tmp_path / "clip.mp4")), "needs PyAV: pip install av")
    for i in range(2):  # frame directories keep working without it
        noise_image(40, 30, seed=i).save(tmp_path / f"{i}.png")
    assert len(media.open_video(str(tmp_path), 20).frames) == 2


def test_animated_gif_durations_give_its_frame_rate(tmp_path):
    frames = [Image.new("RGB", (40, 30), (i * 25, 0, 0)) for i in range(10)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=1000)  # 1 fps
    clip = media.open_video(str(tmp_path / "clip.gif"), 4)
    assert clip.fps == 1.0 and clip.indices == [0, 3, 6, 9]
    assert [f.convert("RGB").getpixel((0, 0))[0] for f in clip.frames] == [0, 75, 150, 225]
    assert media.open_video(str(tmp_path / "clip.gif"), 50).indices == list(range(10))


def test_animated_gif_decodes_only_the_sampled_frames(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (64, 48), (i * 4, 0, 0)) for i in range(60)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)  # 10 fps
    copies = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(1) or real_copy(self))
    clip = media.open_video(str(tmp_path / "clip.gif"), 20)
    assert [f.convert("RGB").getpixel((0, 0))[0] for f in clip.frames] == [0, 40, 80, 120, 160, 200]  # 1 per s
    assert len(copies) <= 2 * 6  # the sampled frames (and Pillow's own copies of them), not all 60


def test_frame_directory_skips_entries_that_are_not_files(tmp_path):
    (tmp_path / "sub.png").mkdir()  # a directory named like an image
    for i in range(3):
        noise_image(40, 30, seed=i).save(tmp_path / f"{i}.png")
    assert len(media.open_video(str(tmp_path), 8).frames) == 3


FRAME_SIZES = [(352, 288), (288, 352), (640, 480), (336, 336), (1920, 1080), (30, 20), (20, 300), (1000, 336)]


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


def hf_video_logits(ckpt, frames, question=QUESTION):
    """transformers' LlavaNextVideoForConditionalGeneration on frames preprocessed by CLIP's
    processor, with the <video> placeholder expanded as its processor does: (input_ids, logits)."""
    pixels = torch.cat([reference.clip_image_processor(336)(f, return_tensors="pt")["pixel_values"] for f in frames])
    tokenizer = ckpt.processor.tokenizer
    text = ckpt.hf_text(question, "video").replace("<video>", "<video>" * (len(frames) * 144))
    ids = torch.tensor(tokenizer(text)["input_ids"])
    with torch.inference_mode():
        return ids, ckpt.hf(input_ids=ids[None], pixel_values_videos=pixels[None]).logits[0]


@pytest.mark.parametrize("count", [3, 8])
def test_video_logits_match_llava_next_video(video_ckpt, count):
    frames = [noise_image(*FRAME_SIZES[(i + count) % len(FRAME_SIZES)], seed=60 + i) for i in range(count)]
    visual = video_ckpt.model.encode_video(frames, newlines="none")
    assert visual.tokens.shape[0] == count * 144 and (visual.sources != anyres.NEWLINE).all()
    ids = video_ckpt.prompt(len(visual.tokens), video=True)
    expected_ids, expected = hf_video_logits(video_ckpt, frames)
    assert torch.equal(ids, expected_ids)
    ours, _, _ = video_ckpt.prefill(ids, visual.tokens)
    assert expected.std() > 0.5 and (ours - expected).abs().max() < 1e-4


def test_images_on_the_video_checkpoint_still_match(video_ckpt):
    image = noise_image(500, 375, seed=62)
    ref = video_ckpt.hf_inputs(image)
    with torch.inference_mode():
        visual = video_ckpt.model.encode_image(image)
        expected = video_ckpt.hf(**ref).logits[0]
    ids = video_ckpt.prompt(len(visual.tokens))
    assert torch.equal(ids, ref["input_ids"][0])
    assert (video_ckpt.prefill(ids, visual.tokens)[0] - expected).abs().max() < 1e-4


def test_video_grid_puts_one_newline_after_every_row_of_every_frame(mha):
    frames = [noise_image(64 + 8 * i, 48, seed=63 + i) for i in range(3)]
    grid, none = mha.model.encode_video(frames), mha.model.encode_video(frames, newlines="none")
    assert len(grid.tokens) == 3 * 12 * 13 and len(none.tokens) == 3 * 144
    rows = grid.sources.view(3, 12, 13)  # frame, row, 12 tokens + 1 newline
    assert (rows[:, :, 12] == anyres.NEWLINE).all() and (rows[:, :, :12] != anyres.NEWLINE).all()
    assert torch.equal(rows[:, :, :12].flatten(), torch.arange(3 * 144))
    newline_rows = grid.tokens[grid.sources == anyres.NEWLINE]
    assert torch.equal(newline_rows, mha.model.image_newline.expand_as(newline_rows))
    assert torch.equal(grid.tokens[grid.sources != anyres.NEWLINE], none.tokens)


def test_video_pivot_is_the_argmax_of_the_pooled_cls_map(gqa):
    """Algorithm 1, video case: p = a * t + b at the argmax over (frame a, pooled token b) of each
    frame's [CLS] attention pooled 2x2 like the features; then k-center as the matrix reference."""
    frames = [noise_image(120 + 30 * i, 90, seed=70 + i) for i in range(4)]
    visual = gqa.model.encode_video(frames, newlines="none")
    pixels = torch.cat([anyres.preprocess_square(f, 336, 336)[0] for f in frames])
    with torch.inference_mode():
        cls = hf_cls_attention(gqa, pixels).view(4, 24, 24)  # (frames, 24, 24)
    pooled = torch.tensor(
        [
            [[float(cls[f, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2].mean()) for c in range(12)] for r in range(12)]
            for f in range(4)
        ]
    )  # 2x2 means, written out
    a, b = divmod(int(pooled.flatten().argmax()), 144)
    torch.testing.assert_close(visual.cls_attn, pooled.view(4, 144), atol=1e-6, rtol=0)
    kept = gqa.model.select(visual, todre.Settings(keep_tokens=30))
    assert a * 144 + b in kept.tolist()
    assert kept.tolist() == sorted(greedy_matrix(visual.tokens, 30, a * 144 + b))


def test_twenty_frames_give_the_papers_2880_candidates_and_288_kept(mha):
    frames = [noise_image(352, 288, seed=80 + i) for i in range(20)]
    visual = mha.model.encode_video(frames)  # grid newlines: 3120 packed, 2880 of them candidates
    kept = mha.model.select(visual, todre.Settings(retain=0.1))
    assert len(visual.tokens) == 3120 and int((visual.sources != anyres.NEWLINE).sum()) == 2880 and len(kept) == 288


def test_cli_answers_about_an_mp4(mha, tmp_path, capsys):
    write_video(tmp_path / "clip.mp4", 35, 10)
    picture = tmp_path / "kept.png"
    argv = cli_args(
        mha, "--video", str(tmp_path / "clip.mp4"), "--max-new-tokens", "3", "--stats", "--save-selection", str(picture)
    )
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.strip(), err
    assert "video frames: 4 of 35 (0.0, 1.0, 2.0, 3.0 s)" in err
    assert "visual tokens: 624 packed -> 58 after Stage 1 (kcenter, 0 of 48 newlines kept)" in err  # 4 x (144 + 12)
    with Image.open(picture) as saved:
        assert saved.width == 4 * 256 + 3 * 8


# ---------------------------------------------------------------------------------------------
# generate.py: the command line
# ---------------------------------------------------------------------------------------------


def test_cli_streams_exactly_the_answer_to_stdout(mha, tmp_path):
    image = tmp_path / "photo.png"
    noise_image(517, 301, seed=17).save(image)
    argv = cli_args(mha, "--image", str(image), "--max-new-tokens", "12", "--stats")
    done = subprocess.run(
        [sys.executable, str(HERE / "generate.py"), *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    settings = todre.Settings()
    visual, kept, ids = mha.pruned(Image.open(image), settings)
    answer = llava.generate(mha.model, ids, visual.tokens[kept], settings, 12).token_ids
    assert done.stdout == mha.tokenizer.decode(answer) + "\n"
    for fact in (
        "visual tokens: 1608 packed -> 158 after Stage 1 (kcenter, 0 of 24 newlines kept)",
        "attention ratios (eq. 7): layer 0: a_tv=",
        "eviction:",
        "prefill:",
        "decode:",
        "peak memory:",
    ):
        assert fact in done.stderr


def test_cli_stats_are_complete_when_generation_stops_at_eos(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 80).save(tmp_path / "photo.png")
    real_decode_step = llava.Llava.decode_step
    steps = []

    def eos_third(self, token, position, kv_cache):  # the model's own decoding, fed EOS as its third token
        steps.append(token)
        logits = real_decode_step(self, token, position, kv_cache)
        if len(steps) == 2:
            logits = torch.full_like(logits, -1e9)
            logits[self.config.text.eos_token_id] = 0
        return logits

    monkeypatch.setattr(llava.Llava, "decode_step", eos_third)
    argv = cli_args(mha, "--image", str(tmp_path / "photo.png"), "--max-new-tokens", "10", "--stats")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and len(mha.tokenizer.encode(out.strip(), add_special_tokens=False).ids) >= 1
    assert "for 2 tokens" in err and "decode: 0.000 s" not in err and "KV cache: 0.0 MiB" not in err


def test_cli_no_todre_equals_retain_1_tau_0(mha, tmp_path, capsys):
    image = tmp_path / "photo.png"
    noise_image(300, 500, seed=18).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "10")
    code1, out1, _ = run_cli(capsys, *common, "--no-todre")
    code2, out2, _ = run_cli(capsys, *common, "--retain", "1", "--tau", "0")
    assert code1 == code2 == 0 and out1 == out2 and out1.strip()


def test_cli_variant_and_overrides_reach_the_model(mha, tmp_path, capsys):
    image = tmp_path / "photo.png"
    noise_image(300, 500, seed=19).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--stats")
    _, _, err = run_cli(capsys, *common, "--variant", "v2", "--tau", "1e-9")
    assert "(maxsum," in err and "layer 0: a_tv" in err  # 7L/8 of 2 layers: paper layer 1 = index 0
    _, _, err = run_cli(capsys, *common, "--variant", "v2", "--probe-layers", "0", "--tau", "2")
    assert "layer 0: a_tv" in err and "eviction: after layer 0" in err
    code, _, err = run_cli(capsys, *common, "--probe-layers", "5")
    assert code == 2 and "--probe-layers must be below 2" in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1x1", "1x4000", "LA"])
def test_cli_accepts_odd_but_valid_images(mha, tmp_path, capsys, mode):
    rgb = noise_image(97, 61, seed=24)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    if mode == "1x1":
        rgb.resize((1, 1)).save(path)
    elif mode == "1x4000":
        rgb.resize((1, 4000)).save(path)
    elif mode == "I;16":
        Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(path)
    else:
        rgb.convert(mode).save(path)
    code, out, err = run_cli(capsys, *cli_args(mha, "--image", str(path), "--max-new-tokens", "2"))
    assert code == 0, err
    if mode in ("L", "RGBA", "P", "CMYK", "LA"):  # the same pixels as transformers' processor
        with Image.open(path) as opened:
            torch.testing.assert_close(
                anyres.preprocess(generate.open_image(str(path)), PINPOINTS)[0],
                mha.image_processor(opened, return_tensors="pt")["pixel_values"][0],
                atol=1e-6,
                rtol=0,
            )
    if mode == "I;16":  # 16-bit grey is scaled to 8 bits, not clipped to white
        assert (
            abs(
                np.asarray(generate.open_image(str(path)), dtype=float).mean()
                - np.asarray(rgb.convert("L"), dtype=float).mean()
            )
            < 1
        )


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image

    upright = noise_image(80, 50, seed=43)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; show rotated 90 degrees clockwise
    upright.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ours = generate.open_image(str(tmp_path / "phone.jpg"))
    assert ours.size == (50, 80)  # upright: taller than wide
    assert np.array_equal(np.asarray(ours), np.asarray(load_image(str(tmp_path / "phone.jpg"))))


@pytest.mark.parametrize(
    "mode, stored, shown",
    [("I", 200, 200), ("I", 51400, 200), ("I", 2**31 - 1, 127), ("I;16", 51400, 200), ("I;16", 200, 1)],
)
def test_integer_images_are_scaled_by_their_real_bit_depth(tmp_path, mode, stored, shown):
    values = np.full((20, 30), stored, dtype=np.int32 if mode == "I" else np.uint16)
    values[0, 0] = 0
    image = Image.fromarray(values, mode=mode) if mode == "I" else Image.fromarray(values)
    assert image.mode == mode
    image.save(tmp_path / "deep.png" if mode == "I;16" else tmp_path / "deep.tif")
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    pixels = np.asarray(generate.open_image(str(path)).convert("RGB"))
    assert pixels[5, 5].tolist() == [shown] * 3 and pixels[0, 0].tolist() == [0, 0, 0]


def test_cli_saves_the_selection_picture(mha, tmp_path, capsys):
    image, picture = tmp_path / "photo.png", tmp_path / "kept.png"
    noise_image(517, 301, seed=25).save(image)
    code, _, err = run_cli(
        capsys, *cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--save-selection", str(picture))
    )
    assert code == 0, err
    with Image.open(picture) as saved:
        assert saved.format == "PNG" and saved.width > 2 * 512  # thumbnail and crops side by side
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        noise_image(120, 90, seed=30 + i).save(frames / f"{i:03d}.png")
    argv = ["--video", str(frames), "--max-frames", "3", "--max-new-tokens", "2", "--save-selection", str(picture)]
    code, _, err = run_cli(capsys, *cli_args(mha, *argv, "--select", "cls", "--stats"))
    assert code == 0, err
    assert "video frames: 3 of 5 (no timing: spread evenly)" in err
    assert "visual tokens: 468 packed -> 43 after Stage 1 (cls, 0 of 36 newlines kept)" in err  # 3 x (144 + 12)
    with Image.open(picture) as saved:
        assert saved.width == 3 * 256 + 2 * 8  # one tile per frame


def test_selection_panel_keeps_chosen_tokens_bright_and_dims_the_rest():
    image = Image.new("RGB", (100, 50), (200, 200, 200))
    boxes = torch.tensor([[0.0, 0, 50, 50], [50, 0, 100, 50]], dtype=torch.float64)
    panel = picture.selection_panel(image, boxes, torch.tensor([True, False]), "test", size=100)
    assert panel.getpixel((25, 16 + 25)) == (200, 200, 200)  # kept (below the 16-pixel title strip)
    assert panel.getpixel((75, 16 + 25))[0] == 50  # dimmed to a quarter


def test_cli_newlines_flag_reaches_stats_and_picture(mha, tmp_path, capsys):
    image, picture = tmp_path / "photo.png", tmp_path / "kept.png"
    noise_image(517, 301, seed=29).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--stats")
    code, _, err = run_cli(capsys, *common, "--newlines", "keep", "--save-selection", str(picture))
    assert code == 0 and "1608 packed -> 182 after Stage 1 (kcenter, 24 of 24 newlines kept)" in err, err
    code, _, err = run_cli(capsys, *common)
    assert code == 0 and "1608 packed -> 158 after Stage 1 (kcenter, 0 of 24 newlines kept)" in err, err
    one_line_error(capsys, [*common, "--newlines", "some"], "argument --newlines: invalid choice: 'some'")


def bad_files(tmp):
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "loop.png").symlink_to(tmp / "loop.png")
    (tmp / "link.png").symlink_to(tmp / "whole.png")
    (tmp / "notes.txt").write_text("hello")
    (tmp / "notes.mp4").write_text("hello")
    noise_image(200, 200).save(tmp / "whole.png")
    (tmp / "truncated.png").write_bytes((tmp / "whole.png").read_bytes()[:3000])
    (tmp / "config_only").mkdir()
    (tmp / "config_only" / "config.json").write_text(json.dumps({"model_type": "llama"}))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "{tmp}/nope.png"], "image not found: "),
        (["--image", "{tmp}/empty.png"], "is not an image Pillow can read"),
        (["--image", "{tmp}/notes.txt"], "is not an image Pillow can read"),
        (["--image", "{tmp}/truncated.png"], "is damaged and cannot be decoded"),
        (["--image", "{tmp}"], "is a directory, not an image"),
        (["--retain", "0"], "--retain must be a finite number in (0, 1], got 0.0"),
        (["--retain", "1.5"], "--retain must be a finite number in (0, 1]"),
        (["--retain", "nan"], "--retain must be a finite number in (0, 1], got nan"),
        (["--tau", "-0.1"], "--tau must be a finite number in [0, inf)"),
        (["--tau", "nan"], "--tau must be a finite number in [0, inf), got nan"),
        (["--tau", "inf"], "--tau must be a finite number in [0, inf), got inf"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer in [1, inf)"),
        (["--temperature", "-1"], "--temperature must be a finite number in [0, inf)"),
        (["--temperature", "nan"], "--temperature must be a finite number in [0, inf), got nan"),
        (["--seed", str(2**64)], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--seed", "1" + "0" * 400], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--seed", "-1"], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--max-frames", "0"], "--max-frames must be an integer in [1, 10000]"),
        (["--frames", "0"], "--max-frames must be an integer in [1, 10000]"),
        (["--video", "{tmp}/notes.mp4"], "is not a video PyAV can read"),
        (["--video", "/dev/zero"], "/dev/zero is not a regular file"),
        (["--image", ""], "--image is empty (an unset shell variable?)"),
        (["--video", ""], "--video is empty (an unset shell variable?)"),
        (["--model", ""], "--model is empty"),
        (["--no-todre", "--retain", "0.5"], "--no-todre means no pruning: drop --retain/--keep-tokens/--tau"),
        (["--no-todre", "--keep-tokens", "64"], "--no-todre means no pruning"),
        (["--retain", "0.5", "--keep-tokens", "64"], "give --retain (a fraction) or --keep-tokens (a count), not both"),
        (["--keep-tokens", "0"], "--keep-tokens must be an integer in [1, inf)"),
        (["--no-todre", "--tau", "0.1"], "--no-todre means no pruning: drop --retain/--keep-tokens/--tau"),
        (["--image", "{tmp}/" + "a" * 300 + ".png"], "a name in the path is longer than the file system allows"),
        (["--video", "{tmp}/" + "a" * 300], "a name in the path is longer than the file system allows"),
        (["--model", "{tmp}/" + "a" * 300], "a name in the path is longer than the file system allows"),
        (
            ["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/" + "a" * 300 + ".png"],
            "a name in the path is longer than the file system allows",
        ),
        (["--image", "{tmp}/loop.png"], "the path is a loop of symbolic links"),
        (["--model", "{tmp}/loop.png"], "the path is a loop of symbolic links"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/whole.png"], "would overwrite the input itself"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/link.png"], "would overwrite the input itself"),
        (["--image", "{tmp}/whole.png", "--save-selection", "/proc/x.png"], "cannot create a file in /proc"),
        (["--image", "{tmp}/whole.png", "--save-selection", "/sys/x.png"], "cannot create a file in /sys"),
        (["--image", "/dev/zero"], "/dev/zero is a device, not an image file"),
        (["--probe-layers", "a,b"], "--probe-layers must be comma-separated"),
        (["--retain", "lots"], "invalid float value: 'lots'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--image", "{tmp}/whole.png", "--video", "{tmp}"], "give --image or --video, not both"),
        (["--video", "{tmp}/config_only"], "contains no image frames"),
        (["--save-selection", "{tmp}/kept.png"], "--save-selection needs --image or --video"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/no/such/dir/kept.png"], "does not exist"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/kept.jpg"], "ending in .png"),
        (["--model", "{tmp}/no_such_dir"], "is not a checkpoint directory"),
        (["--model", "{tmp}"], "config.json is missing"),
        (["--model", "{tmp}/config_only"], "holds a 'llama' model, not a LLaVA checkpoint"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    bad_files(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "--prompt", "hi", "--device", "cpu", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_rejects_a_decompression_bomb(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 100).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the same check Pillow makes at ~89 M pixels
    one_line_error(capsys, cli_args(mha, "--image", str(tmp_path / "big.png")), "decompression-bomb limit")


def test_cli_rejects_a_prompt_longer_than_the_context(mha, tmp_path, capsys):
    noise_image(672, 672).save(tmp_path / "big.png")  # 2928 visual tokens without pruning
    one_line_error(
        capsys,
        cli_args(mha, "--image", str(tmp_path / "big.png"), "--no-todre", "--max-new-tokens", "2000"),
        "exceeds the model's 4096-token context",
    )


def test_too_long_text_only_prompt_says_to_shorten_it(mha, capsys):
    one_line_error(
        capsys,
        cli_args(mha, "--max-new-tokens", "4090"),
        "plus 4090 new tokens exceeds the model's 4096-token context: shorten the prompt or allow fewer new tokens "
        "(--max-new-tokens)\n",
    )


def test_cli_refuses_a_prompt_that_is_not_utf8(mha, capsys):
    latin1_prompt = os.fsdecode(b"caf\xe9 ?")  # what Python makes of Latin-1 bytes in argv
    one_line_error(capsys, cli_args(mha, "--prompt", latin1_prompt), "--prompt is not valid UTF-8")
    with pytest.raises(llava.InputError, match="not valid UTF-8"):
        mha.prompt(None, latin1_prompt)


def test_cli_rejects_checkpoints_with_missing_or_misshaped_tensors(mha, tmp_path, capsys):
    state = hf_runtime_state(mha)
    del state["model.multi_modal_projector.linear_2.bias"]
    state["model.image_newline"] = torch.zeros(7)
    directory = resave(mha, tmp_path / "broken", state)
    (directory / "tokenizer.json").write_text((mha.directory / "tokenizer.json").read_text())
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), "missing (1): multi_modal_projector.linear_2.bias")
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), "wrong shape (1): model.image_newline (7,)")


def test_cli_checks_the_picture_path_before_loading_the_model(tmp_path, capsys, monkeypatch):
    noise_image(50, 50).save(tmp_path / "photo.png")

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(llava, "load", no_load)
    (tmp_path / "taken.png").mkdir()
    one_line_error(
        capsys,
        [
            "--prompt",
            "hi",
            "--image",
            str(tmp_path / "photo.png"),
            "--save-selection",
            str(tmp_path / "photo.png" / "x.png"),
        ],
        "a part of the path is not a directory",
    )
    one_line_error(
        capsys,
        ["--prompt", "hi", "--image", str(tmp_path / "photo.png"), "--save-selection", str(tmp_path / "taken.png")],
        "it is a directory",
    )


def test_cli_offline_hub_says_how_to_use_a_local_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(HERE / "generate.py"), "--prompt", "hi", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "pass a local checkpoint directory with --model DIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_cuda_is_a_clear_error(capsys):
    one_line_error(capsys, ["--prompt", "hi", "--device", "cuda"], "no CUDA GPU is available")


def test_cli_image_from_a_pipe_works_and_a_fifo_without_writer_is_an_error(mha, tmp_path, capsys, monkeypatch):
    noise_image(97, 61, seed=41).save(tmp_path / "photo.png")
    png = (tmp_path / "photo.png").read_bytes()
    expected = np.asarray(Image.open(tmp_path / "photo.png"))
    read_end, write_end = os.pipe()  # what `--image <(cat photo.png)` passes: /dev/fd/N

    def write(fd, delay):
        time.sleep(delay)
        with os.fdopen(fd, "wb") as f:
            f.write(png)

    threading.Thread(target=write, args=(write_end, 0.2)).start()
    assert np.array_equal(np.asarray(generate.open_image(f"/dev/fd/{read_end}")), expected)
    os.close(read_end)

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    threading.Thread(target=lambda: write(os.open(fifo, os.O_WRONLY), 0)).start()  # a writer that comes late
    assert np.array_equal(np.asarray(generate.open_image(str(fifo))), expected)
    monkeypatch.setattr(media, "WAIT_FOR_WRITER_S", 0.3)
    started = time.monotonic()
    one_line_error(capsys, cli_args(mha, "--image", str(fifo)), f"nothing is writing to {fifo}")
    assert time.monotonic() - started < 10


def test_cli_reads_the_image_from_dev_stdin(mha, tmp_path):
    noise_image(120, 90, seed=42).save(tmp_path / "photo.png")
    argv = [sys.executable, str(HERE / "generate.py"), *cli_args(mha, "--image", "/dev/stdin", "--max-new-tokens", "4")]
    with open(tmp_path / "photo.png", "rb") as png:
        through_pipe = subprocess.run(argv, input=png.read(), capture_output=True, timeout=300)
    direct = subprocess.run(
        argv[:-4] + ["--image", str(tmp_path / "photo.png"), "--max-new-tokens", "4"], capture_output=True, timeout=300
    )
    assert through_pipe.returncode == direct.returncode == 0, through_pipe.stderr
    assert through_pipe.stdout == direct.stdout and through_pipe.stdout.strip()


def test_cli_reader_that_goes_away_ends_quietly(mha, tmp_path):
    """`generate.py ... | head -c 1`: the pipe closes under the writer; like any Unix filter, no traceback."""
    process = cli_process(mha, tmp_path, "--max-new-tokens", "8", stdout=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first token
    _, err = process.communicate(timeout=300)
    assert process.returncode == 141 and err == ""


@pytest.mark.parametrize(
    "stdout, code, message",
    [
        ("closed", 2, "error: stdout is closed: the answer would have nowhere to go\n"),
        ("/dev/full", 1, "error: cannot write the answer to stdout: no space left on the device\n"),
    ],
)
def test_cli_stdout_that_cannot_be_written_is_one_error_line(mha, tmp_path, stdout, code, message):
    if stdout == "closed":  # `>&-` in a shell
        argv = " ".join(
            f"'{a}'" for a in [sys.executable, str(HERE / "generate.py"), *cli_args(mha, "--max-new-tokens", "4")]
        )
        done = subprocess.run(["bash", "-c", argv + " >&-"], capture_output=True, text=True, timeout=300)
        err, returncode = done.stderr, done.returncode
    else:
        with open(stdout, "w") as full:
            process = cli_process(mha, tmp_path, "--max-new-tokens", "4", stdout=full)
            _, err = process.communicate(timeout=300)
            returncode = process.returncode
    assert returncode == code and err == message


@pytest.mark.parametrize("after_s", [0.2, 1.5])
def test_cli_ctrl_c_during_start_up_is_quiet(mha, tmp_path, after_s):
    """Ctrl-C while torch imports or the model loads: no traceback, the shell sees 130 (SIGINT)."""
    process = cli_process(mha, tmp_path, "--max-new-tokens", "200", stdout=subprocess.PIPE)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode in (-signal.SIGINT, 130) and "Traceback" not in err and err.strip() == ""


def test_cli_ctrl_c_during_generation_exits_quietly_without_a_picture(mha, tmp_path, capsys, monkeypatch):
    noise_image(200, 150).save(tmp_path / "photo.png")
    real_decode = llava.Llava.decode

    def interrupted(self, *args, **kwargs):
        tokens = real_decode(self, *args, **kwargs)
        yield next(tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(llava.Llava, "decode", interrupted)
    argv = cli_args(mha, "--image", str(tmp_path / "photo.png"), "--save-selection", str(tmp_path / "kept.png"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "Traceback" not in err and err.strip() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # no picture, no temporary file


def test_cli_picture_that_cannot_be_written_is_one_line_after_the_answer(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 90, seed=45).save(tmp_path / "photo.png")

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, out, err = run_cli(
        capsys,
        *cli_args(
            mha,
            "--image",
            str(tmp_path / "photo.png"),
            "--max-new-tokens",
            "4",
            "--save-selection",
            str(tmp_path / "kept.png"),
        ),
    )
    assert code == 1 and out.strip()  # the answer stays printed
    assert err == f"error: cannot write {tmp_path / 'kept.png'}: no space left on the device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # no picture, no temporary file


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cli_picture_gets_the_usual_mode_of_a_new_file(mha, tmp_path, capsys, umask):
    noise_image(120, 90, seed=45).save(tmp_path / "photo.png")
    old = os.umask(umask)
    try:
        code, _, err = run_cli(
            capsys,
            *cli_args(
                mha,
                "--image",
                str(tmp_path / "photo.png"),
                "--max-new-tokens",
                "1",
                "--save-selection",
                str(tmp_path / "kept.png"),
            ),
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "kept.png").st_mode) == 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# bench.py
# ---------------------------------------------------------------------------------------------


def test_bench_tiny_preset_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--repeats", "1", "--new-tokens", "4", "--json", str(out)]
    done = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["preset"], result["device"], result["dtype"]) == ("tiny", "cpu", "bfloat16")  # generate.py's default
    runs = {r["name"]: r for r in result["runs"]}
    assert list(runs) == ["full", "stage1-0.10", "todre-0.25", "todre-0.10", "hf-full"]
    assert [runs[n]["visual_tokens"] for n in runs] == [2928, 288, 720, 288, 2928]
    fields = {
        "name",
        "vision_s",
        "select_s",
        "prefill_s",
        "decode_s",
        "total_s",
        "prefill_tflops",
        "prefill_tflops_exact",
        "peak_mem_mb",
        "visual_tokens",
        "kv_cache_mb",
        "decode_tflops",
    }
    assert all(set(r) >= fields for r in runs.values())
    assert runs["todre-0.10"]["evict_layer"] == 1 and runs["stage1-0.10"]["evict_layer"] is None
    assert runs["todre-0.10"]["kv_cache_mb"] < runs["stage1-0.10"]["kv_cache_mb"] < runs["full"]["kv_cache_mb"]
    assert runs["full"]["kv_cache_mb"] == pytest.approx(runs["hf-full"]["kv_cache_mb"], rel=0.02)
    assert runs["full"]["prefill_tflops"] > runs["stage1-0.10"]["prefill_tflops"] > runs["todre-0.10"]["prefill_tflops"]
    assert runs["todre-0.10"]["stage2_probe"]["layers"] == [1, 2] and runs["todre-0.10"]["stage2_probe"]["probe_s"] > 0
    assert "Stage 2 forced after layer 1" in done.stdout and "Stage-1 selection in todre-0.10" in done.stdout


@pytest.mark.parametrize("configs, message", [("todre-64", "write todre-keep-64"), ("bogus", "unknown configuration")])
def test_bench_refuses_unknown_configurations_before_running_any(configs, message):
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--configs", configs], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr


# ---------------------------------------------------------------------------------------------
# README.md: its Python snippets run as written
# ---------------------------------------------------------------------------------------------


def readme_python_blocks(section: str) -> list[str]:
    text = (HERE / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


def test_readme_use_it_from_python_runs_as_written(mha, tmp_path, monkeypatch, capsys):
    """The snippets exactly as the README prints them; the Hub download answers with the tiny
    checkpoint, and photo.jpg is a file in the working directory."""
    import huggingface_hub

    load_model, load_todre_alone = readme_python_blocks("Use it from Python")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(mha.directory))
    monkeypatch.chdir(tmp_path)
    noise_image(517, 301, seed=50).save(tmp_path / "photo.jpg", quality=95)
    exec(compile(load_model, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    settings = todre.Settings(retain=0.1)
    model, tokenizer = llava.load(str(mha.directory), "cpu", torch.bfloat16)
    visual = model.encode_image(Image.open(tmp_path / "photo.jpg"))
    kept = model.select(visual, settings)
    ids = llava.prompt_ids(tokenizer, "What is in this picture?", len(kept))
    generation = llava.generate(model, ids, visual.tokens[kept], settings, max_new_tokens=64)
    expected = tokenizer.decode(generation.token_ids)
    assert expected.strip()
    assert printed == f"{expected}\n{len(kept)} {generation.info.evict_layer} {generation.info.ratios}\n"

    namespace = {}
    exec(compile(load_todre_alone, "README.md", "exec"), namespace)
    assert namespace["pruned"].shape == (288, 4096)
