"""todre.py: the ToDRE functions against brute-force transcriptions of the paper's equations."""

import math

import pytest
import torch

import todre
from conftest import (
    GREEDY,
    cls_per_crop_reference,
    greedy_matrix,
    k_center_radius,
    ratios_dense,
)


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
    assert (v1.select, v1.tau, v1.layers_to_probe(32)) == ("kcenter", 0.03, [15, 19, 23, 27]) and v1 == todre.Settings()
    assert (v2.select, v2.tau, v2.layers_to_probe(32)) == ("maxsum", 0.10, [27])
    tuned = todre.variant("v2", tau=0.2, probe_layers=[5, 3], retain=0.25, select=None)
    assert (tuned.select, tuned.tau, tuned.layers_to_probe(32), tuned.retain) == ("maxsum", 0.2, [3, 5], 0.25)
    assert not todre.NO_PRUNING.stage1 and todre.NO_PRUNING.layers_to_probe(32) == []
    assert todre.Settings(retain=1.0, keep_tokens=64).stage1 and not todre.Settings(retain=1).stage1
    for bad, message in [
        (dict(retain=64), "for a token count use keep_tokens=64"),
        (dict(keep_tokens=0), "keep_tokens"),
        (dict(select="random"), "unknown selector 'random'"),
        (dict(newlines="some"), "newlines"),
        (dict(tau=float("nan")), "tau must be a finite number"),
        (dict(pivot="cls"), "pivot must be 'attention' or 'random'"),
        (dict(pivot="random", pivot_seed=-1), "pivot_seed must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            todre.Settings(**bad)


def test_random_pivot_is_seeded_uniform_and_in_range():
    draws = [todre.random_pivot(10, seed) for seed in range(2000)]
    assert draws[:50] == [todre.random_pivot(10, seed) for seed in range(50)]  # the same seed, the same pivot
    assert set(draws) == set(range(10)) and max(draws.count(i) for i in range(10)) < 260  # about 200 each
    assert todre.random_pivot(1, 7) == 0


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


def test_token_sets_are_the_image_and_the_text_after_it():
    is_visual = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0], dtype=torch.bool)
    visual, text = todre.token_sets(is_visual)
    assert visual.tolist() == [2, 3, 4] and text.tolist() == [5, 6, 7]  # S = 0, 1 is neither
    visual, text = todre.token_sets(torch.zeros(5, dtype=torch.bool))
    assert visual.tolist() == [] and text.tolist() == []


def random_layer_outputs(seed: int, layers: int, n: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, n, 8, generator=g), torch.randn(2, n, 8, generator=g)) for _ in range(layers)]


def test_stage2_measures_the_probe_layers_and_fires_once_at_the_first_below_tau():
    n, layers = 30, 8
    visual, text = torch.arange(4, 20), torch.arange(20, n)
    outputs = random_layer_outputs(0, layers, n)
    expected = {i: ratios_dense(q, k, visual, text) for i, (q, k) in enumerate(outputs)}
    tau = max(expected[4]) + 1e-6  # layer 3 (the first probe of 8 layers) may pass, layer 4 surely does
    settings = todre.Settings(tau=tau)
    stage2 = todre.Stage2(settings, layers, visual, text)
    kept = [stage2.after_layer(i, q, k) for i, (q, k) in enumerate(outputs)]
    first = 3 if max(expected[3]) < tau else 4
    assert stage2.evict_layer == first and [i for i, keep in enumerate(kept) if keep is not None] == [first]
    assert kept[first].tolist() == [*range(4), *range(20, n)]  # the positions of the sequence that stay
    assert list(stage2.ratios) == [p for p in todre.probe_layers(layers) if p <= first]  # nothing after firing
    for i, ratios in stage2.ratios.items():
        assert ratios == pytest.approx(expected[i], abs=1e-6)


@pytest.mark.parametrize(
    "settings, every_layer, fires, measured",
    [
        (todre.Settings(tau=0.0), False, None, []),  # Stage 2 off
        (todre.Settings(tau=0.0, evict_layer=2), False, 2, []),  # forced, without measuring
        (todre.Settings(tau=1e-9), False, None, [3, 4, 5, 6]),  # never below tau: measured, never fires
        (todre.Settings(tau=1e-9), True, None, list(range(8))),  # Figure 2: every layer, same decision
        (todre.Settings(tau=2.0), True, 3, [0, 1, 2, 3]),  # fires at the first probe; nothing measured after
        (todre.variant("v2", tau=1e-9), False, None, [6]),  # v2 probes once, at 7L/8
        (todre.Settings(tau=2.0, probe_layers=(1, 5)), False, 1, [1]),
    ],
)
def test_stage2_decides_when_to_measure_and_fire(settings, every_layer, fires, measured):
    n, layers = 24, 8
    visual, text = torch.arange(2, 14), torch.arange(14, n)
    stage2 = todre.Stage2(settings, layers, visual, text, every_layer=every_layer)
    for i, (q, k) in enumerate(random_layer_outputs(1, layers, n)):
        stage2.after_layer(i, q, k)
    assert stage2.evict_layer == fires and sorted(stage2.ratios) == measured


def test_stage2_never_fires_without_visual_tokens():
    stage2 = todre.Stage2(todre.Settings(tau=2.0, evict_layer=0), 4, torch.arange(0), torch.arange(0))
    for i, (q, k) in enumerate(random_layer_outputs(2, 4, 10)):
        assert stage2.after_layer(i, q, k) is None
    assert stage2.evict_layer is None and stage2.ratios == {}


def test_stage2_copied_into_a_host_loop_equals_masking_the_visual_keys():
    """The README's host loop, on a toy attention-only decoder: dropping what Stage 2 says from x and
    from the evicting layer's cache, then decoding at position n, equals running the whole sequence
    with the visual keys masked for every later layer (and for the evicting layer's decoding)."""
    g = torch.Generator().manual_seed(3)
    layers, heads, head_dim, d, n = 4, 2, 8, 16, 18
    weights = [[torch.randn(d, heads * head_dim, generator=g) / d**0.5 for _ in range(3)] for _ in range(layers)]
    visual, text = torch.arange(3, 11), torch.arange(11, n)
    x0 = torch.randn(n + 1, d, generator=g)  # the prompt, then one decoded token at position n

    def project(x, w):  # (t, d) -> (heads, t, head_dim)
        return (x @ w).unflatten(1, (heads, head_dim)).transpose(0, 1)

    def attend(q, k, v, mask):  # mask (t_q, t_k): True where a query may read a key
        scores = (q @ k.transpose(1, 2)) / head_dim**0.5
        return (scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v).transpose(0, 1).flatten(1)

    # The host, with Stage 2 forced after layer 1; positions are implicit in the causal order.
    stage2 = todre.Stage2(todre.Settings(tau=0.0, evict_layer=1), layers, visual, text)
    x, cache, kept = x0[:n], [], torch.arange(n)
    for i, (wq, wk, wv) in enumerate(weights):
        q, k, v = project(x, wq), project(x, wk), project(x, wv)
        x = x + attend(q, k, v, torch.ones(len(x), len(x), dtype=torch.bool).tril())
        cache.append((k, v))
        keep = stage2.after_layer(i, q, k)
        if keep is not None:
            x, kept = x[keep], kept[keep]
            cache[i] = (k[:, keep], v[:, keep])
    h = x0[n:]  # decoding the next token reads every layer's cache
    for i, (wq, wk, wv) in enumerate(weights):
        k, v = torch.cat([cache[i][0], project(h, wk)], 1), torch.cat([cache[i][1], project(h, wv)], 1)
        h = h + attend(project(h, wq), k, v, torch.ones(1, k.shape[1], dtype=torch.bool))

    # Brute force: the whole sequence, the visual keys masked from layer 2 on, and for the decoded
    # token from layer 1 on (the evicting layer's cache lost them too).
    is_visual = torch.zeros(n + 1, dtype=torch.bool)
    is_visual[visual] = True
    y = x0.clone()
    for i, (wq, wk, wv) in enumerate(weights):
        mask = torch.ones(n + 1, n + 1, dtype=torch.bool).tril()
        if i >= 2:
            mask &= ~is_visual[None, :]
        if i >= 1:
            mask[n] &= ~is_visual
        y = y + attend(project(y, wq), project(y, wk), project(y, wv), mask)
    assert kept.tolist() == [*range(3), *range(11, n)]
    assert torch.allclose(x, y[:n][kept], atol=1e-5) and torch.allclose(h, y[n:], atol=1e-5)
