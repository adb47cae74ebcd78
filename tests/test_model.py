"""model.py: logits and generations equal transformers', both stages in the model equal masked
references, the video path, the Python API's checks, and the README's Python snippets as written."""

import re

import pytest
import torch
from PIL import Image

import anyres
import model
import todre
from conftest import (
    FRAME_SIZES,
    HERE,
    PINPOINTS,
    QUESTION,
    causal,
    dense_forward,
    greedy_matrix,
    hf_cls_attention,
    hf_embeddings,
    hf_logits,
    hf_packed_features,
    noise_image,
)
from evaluation import reference


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
    ours = model.generate(
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
            return model.generate(ckpt.model, ids, visual, todre.NO_PRUNING, 12, temperature, generator).token_ids

        greedy = model.generate(ckpt.model, ids, visual, todre.NO_PRUNING, 12).token_ids
        assert sample(1e-4, 0) == greedy  # logits / 1e-4: all the probability on the argmax
        assert sample(5.0, 1) == sample(5.0, 1)  # same seed, same tokens
        assert len({tuple(sample(5.0, seed)) for seed in range(4)}) > 1  # a hot distribution really samples


def test_temperature_near_zero_samples_the_greedy_token(mha):
    with torch.inference_mode():
        ids = mha.prompt(None)
        greedy = model.generate(mha.model, ids, None, todre.NO_PRUNING, 6).token_ids
        assert model.generate(mha.model, ids, None, todre.NO_PRUNING, 6, temperature=1e-300).token_ids == greedy


def test_mistral_sliding_window_is_checked_not_silently_ignored(families):
    mistral = families("mistral")
    assert mistral.model.config.text.sliding_window == mistral.hf.config.text_config.sliding_window == 4096
    ids = mistral.prompt(None)
    model.check_generation(mistral.model, ids, None, 100, 0.0)
    with pytest.raises(model.InputError, match="sliding window of this Mistral model"):
        model.check_generation(mistral.model, ids, None, 4096 - len(ids) + 1, 0.0)


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
    project = model.Llava.project

    def overflowing(self, features):
        tokens = project(self, features)
        tokens.view(-1, tokens.shape[-1])[100, 3] = float("inf")  # token 100 of the packed sequence
        return tokens

    monkeypatch.setattr(model.Llava, "project", overflowing)
    with pytest.raises(model.InputError, match="1 of 1176 visual tokens hold NaN or inf"):
        model.ask(mha.model, mha.tokenizer, QUESTION, mha.model.encode_image(noise_image(336, 336)), settings, 2)


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


def test_a_random_pivot_starts_the_selection_from_the_seeded_candidate(gqa):
    visual, _, _ = gqa.pruned(noise_image(517, 301, seed=13), todre.Settings(keep_tokens=64))
    candidates = (visual.sources != anyres.NEWLINE).nonzero()[:, 0]
    for seed in (0, 5):
        settings = todre.Settings(keep_tokens=64, pivot="random", pivot_seed=seed)
        pivot = todre.random_pivot(len(candidates), seed)
        expected = candidates[sorted(greedy_matrix(visual.tokens[candidates], 64, pivot))]
        assert gqa.model.select(visual, settings).tolist() == expected.tolist()


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
    ours = model.generate(gqa.model, ids, tokens, settings, max_new_tokens=20).token_ids
    assert ours == expected and len(ours) == 20 and len(set(ours)) > 3


def test_python_api_validates_at_the_entry_point(mha):
    ids = mha.prompt(None)
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(model.InputError, match="max_new_tokens must be a positive integer"):
            model.generate(mha.model, ids, None, todre.NO_PRUNING, bad)
    with pytest.raises(model.InputError, match="temperature must be a finite number"):
        model.generate(mha.model, ids, None, todre.NO_PRUNING, 4, temperature=float("nan"))
    with pytest.raises(model.InputError, match="at least one frame"):
        mha.model.encode_video([])
    with pytest.raises(model.InputError, match="video newlines must be 'grid' or 'none'"):
        mha.model.encode_video([noise_image(40, 30)], newlines="row")
    for bad_ids, shown in ((ids[None], "shape (1, "), (ids.float(), "torch.float32"), ([1, 2], "list")):
        with pytest.raises(
            model.InputError, match=rf"input_ids must be a 1-D tensor of token ids, got .*{re.escape(shown)}"
        ):
            model.generate(mha.model, bad_ids, None, todre.NO_PRUNING, 4)
    with pytest.raises(model.InputError, match=r"visual_embeds must be a \(tokens, 64\) tensor"):
        model.generate(mha.model, mha.prompt(3), torch.zeros(3, 65), todre.NO_PRUNING, 4)
    with pytest.raises(model.InputError, match=r"Stage 2 layers \[5\] must be below 2"):
        model.generate(mha.model, mha.prompt(3), torch.zeros(3, 64), todre.Settings(probe_layers=(5,)), 4)
    for bad in (dict(probe_layers=(-1,)), dict(probe_layers=3), dict(evict_layer=1.5), dict(probe_fractions=(2.0,))):
        with pytest.raises(ValueError, match="probe_layers|evict_layer|probe_fractions"):
            todre.Settings(**bad)
    with pytest.raises(
        model.InputError, match="dtype must be one of auto, float16, bfloat16, float32, float64, got 'float8'"
    ):
        model.load(str(mha.directory), "cpu", "float8")
    with pytest.raises(
        model.InputError, match="encode_image takes a PIL image, got str: open files with media.open_image"
    ):
        mha.model.encode_image("photo.jpg")
    with pytest.raises(model.InputError, match="encode_video takes a list of PIL images"):
        mha.model.encode_video(["a.png"])
    visual = mha.model.encode_image(noise_image(40, 30))
    with pytest.raises(model.InputError, match="settings must be a todre.Settings, got str: evaluation.configs"):
        mha.model.select(visual, "todre-0.10")
    with pytest.raises(model.InputError, match="select takes the VisualTokens of encode_image"):
        mha.model.select(visual.tokens, todre.Settings())


def test_a_kv_cache_is_used_once_and_never_written_past_its_room(mha):
    """Reusing a cache would append a second question to the first conversation; writing past its
    room would silently drop keys. Both are refused."""
    ids = mha.prompt(None)
    kv_cache = mha.model.new_kv_cache(2)
    with torch.inference_mode():
        logits, _ = mha.model.prefill(ids, None, todre.NO_PRUNING, kv_cache)
        with pytest.raises(model.InputError, match=rf"the KV cache already holds {len(ids)} tokens of another prompt"):
            mha.model.prefill(ids, None, todre.NO_PRUNING, kv_cache)
        for step in range(2):
            mha.model.decode_step(5, len(ids) + step, kv_cache)
        with pytest.raises(
            ValueError, match=rf"layer 0's KV cache has room for {len(ids) + 2} tokens, not {len(ids) + 3}"
        ):
            mha.model.decode_step(5, len(ids) + 2, kv_cache)


def test_video_frames_go_through_the_vision_tower_in_bounded_batches(mha, monkeypatch):
    frames = [noise_image(50, 40, seed=i) for i in range(5)]
    with torch.inference_mode():
        whole = mha.model.encode_video(frames)
        monkeypatch.setattr(model, "FRAMES_PER_BATCH", 2)
        batches = []
        tower = mha.model.vision_tower.forward
        monkeypatch.setattr(mha.model.vision_tower, "forward", lambda x, **k: batches.append(len(x)) or tower(x, **k))
        chunked = mha.model.encode_video(frames)
    assert batches == [2, 2, 1]
    torch.testing.assert_close(chunked.tokens, whole.tokens, atol=1e-5, rtol=0)
    assert torch.equal(chunked.sources, whole.sources) and len(chunked.framings) == 5


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


def readme_python_blocks(section: str) -> list[str]:
    text = (HERE / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [block.split("```", 1)[0] for block in body.split("```python\n")[1:]]


def test_readme_use_it_from_python_runs_as_written(mha, tmp_path, monkeypatch, capsys):
    """The snippets exactly as the README prints them; the Hub download answers with the tiny
    checkpoint, and photo.jpg is a file in the working directory."""
    import huggingface_hub

    load_model, load_todre_alone, stage2_in_a_host = readme_python_blocks("Use it from Python")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, allow_patterns: str(mha.directory))
    monkeypatch.chdir(tmp_path)
    noise_image(517, 301, seed=50).save(tmp_path / "photo.jpg", quality=95)
    exec(compile(load_model, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    settings = todre.Settings(retain=0.1)
    loaded, tokenizer = model.load(str(mha.directory), "cpu", torch.bfloat16)
    visual = loaded.encode_image(Image.open(tmp_path / "photo.jpg"))
    kept = loaded.select(visual, settings)
    ids = model.prompt_ids(tokenizer, "What is in this picture?", len(kept))
    generation = model.generate(loaded, ids, visual.tokens[kept], settings, max_new_tokens=64)
    expected = tokenizer.decode(generation.token_ids)
    assert expected.strip()
    assert printed == f"{expected} {len(kept)} {generation.info.evict_layer} {generation.info.ratios}\n"

    namespace = {}
    exec(compile(load_todre_alone, "README.md", "exec"), namespace)
    assert namespace["pruned"].shape == (288, 4096)
    exec(compile(stage2_in_a_host, "README.md", "exec"), namespace)
    assert capsys.readouterr().out == "15 100 [15]\n"  # fired at the first probe: 200 visual tokens gone
