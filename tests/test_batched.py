"""evaluation/batched.py: questions about one image answered together on one shared prefix give,
row for row, what each question gets alone with its prefix recomputed (model.generate): the same
tokens, eviction layers and eq. 7 ratios, logits within 1e-4, in float32, on every family."""

import pytest
import torch

import model
import todre
from conftest import noise_image
from evaluation import batched, configs

QUESTIONS = [
    "What is in the image?",
    "Is there a dog here? Answer yes or no, please.",
    "Colour?",
    "How many people are standing near the red car in the picture on the left side?",
    "Describe the picture.",
]
CONFIGS = ["full", "stage2", "todre-0.25", "todre-0.10", "cls-0.10"]


@torch.inference_mode()
def alone(ckpt, prompts, embeds, settings, max_new_tokens, where=None):
    """Each prompt answered on its own (model.generate), with the logits of its every step (before
    any repetition penalty)."""
    out = []
    for ids in prompts:
        generation = model.generate(ckpt.model, ids, embeds, settings, max_new_tokens, placement=where)
        cache = ckpt.model.new_kv_cache(max_new_tokens)
        logits, info = ckpt.model.prefill(ids, embeds, settings, cache, placement=where)
        steps = [logits[0, -1]]
        for step, token in enumerate(generation.token_ids[:-1]):
            steps.append(ckpt.model.decode_step(token, info.next_position + step, cache))
        out.append((generation, steps))
    return out


def assert_rows_equal_alone(ckpt, visual, settings, questions, video=False, max_new_tokens=6, batch_size=None):
    kept = ckpt.model.select(visual, settings)
    embeds = visual.tokens[kept]
    prompts = [model.prompt_ids(ckpt.tokenizer, q, len(kept), video) for q in questions]
    p = batched.shared_prefix(prompts, ckpt.model.is_visual)
    assert p is not None
    where = model.placement([visual], [kept])
    prefix = batched.prefill_prefix(ckpt.model, prompts[0][:p], embeds, where)
    rows = []
    for first in range(0, len(prompts), batch_size or len(prompts)):
        chunk = prompts[first : first + (batch_size or len(prompts))]
        rows += batched.answer_batch(ckpt.model, chunk, p, prefix, settings, max_new_tokens, True, where)
    expected = alone(ckpt, prompts, embeds, settings, max_new_tokens, where)
    for row, (generation, steps) in zip(rows, expected, strict=True):
        assert row.token_ids == generation.token_ids
        assert row.info.evict_layer == generation.info.evict_layer
        assert row.info.ratios.keys() == generation.info.ratios.keys()
        for layer, ratios in generation.info.ratios.items():
            assert row.info.ratios[layer] == pytest.approx(ratios, abs=1e-5)
        for ours, theirs in zip(row.logits, steps, strict=False):
            assert (ours - theirs).abs().max() < 1e-4
    return rows


@pytest.mark.parametrize("config", CONFIGS)
def test_qwen_batches_to_the_same_answers_with_its_positions_and_repetition_penalty(qwen_ckpt, config):
    """Qwen2.5-VL: the rows' own tokens at the M-RoPE positions after the kept tokens' image, its
    checkpoint's repetition penalty (1.3) over each row's own prompt and answer."""
    visual = qwen_ckpt.model.encode_image(noise_image(300, 200, seed=3))
    assert qwen_ckpt.model.repetition_penalty == 1.3
    assert_rows_equal_alone(qwen_ckpt, visual, configs.parse_config(config), QUESTIONS, max_new_tokens=8)


@pytest.mark.parametrize("config", CONFIGS)
def test_a_batch_equals_each_question_alone(gqa, config):
    visual = gqa.model.encode_image(noise_image(300, 200, seed=3))
    assert_rows_equal_alone(gqa, visual, configs.parse_config(config), QUESTIONS)


def test_rows_that_evict_at_different_layers_or_never_equal_each_alone(gqa):
    """tau between the questions' own eq. 7 ratios: some rows evict at the first probe, some later,
    one never; each row of one batch follows its own decision."""
    visual = gqa.model.encode_image(noise_image(300, 200, seed=3))
    measuring = todre.Settings(retain=0.1, tau=1e-9)
    kept = gqa.model.select(visual, measuring)
    first_probe = []
    for q in QUESTIONS:
        ids = model.prompt_ids(gqa.tokenizer, q, len(kept))
        first_probe.append(model.generate(gqa.model, ids, visual.tokens[kept], measuring, 1).info.ratios)
    a_tv = sorted(r[3][0] for r in first_probe)
    settings = todre.Settings(retain=0.1, tau=(a_tv[1] + a_tv[2]) / 2)  # two rows evict at layer 3
    rows = assert_rows_equal_alone(gqa, visual, settings, QUESTIONS)
    layers = [row.info.evict_layer for row in rows]
    assert layers.count(3) == 2 and len(set(layers)) >= 2, layers  # different layers in one batch


def test_rows_that_stop_at_different_steps_equal_each_alone(gqa, monkeypatch):
    visual = gqa.model.encode_image(noise_image(300, 200, seed=4))
    settings = todre.Settings(retain=0.25)
    kept = gqa.model.select(visual, settings)
    ids = model.prompt_ids(gqa.tokenizer, QUESTIONS[0], len(kept))
    greedy = model.generate(gqa.model, ids, visual.tokens[kept], settings, 8).token_ids
    monkeypatch.setattr(gqa.model, "stop_ids", gqa.model.stop_ids | {greedy[2]})  # the first row stops at step 2
    rows = assert_rows_equal_alone(gqa, visual, settings, QUESTIONS, max_new_tokens=8)
    assert len({len(row.token_ids) for row in rows}) >= 2  # rows end at different steps


@pytest.mark.parametrize("config", CONFIGS)
def test_every_family_batches_to_the_same_answers(family, config):
    visual = family.model.encode_image(noise_image(250, 180, seed=5))
    assert_rows_equal_alone(family, visual, configs.parse_config(config), QUESTIONS[:3], batch_size=2)


@pytest.mark.parametrize("config", CONFIGS)
def test_video_questions_batch_to_the_same_answers(video_ckpt, config):
    frames = [noise_image(64, 48, seed=s) for s in range(3)]
    visual = video_ckpt.model.encode_video(frames)
    assert_rows_equal_alone(video_ckpt, visual, configs.parse_config(config), QUESTIONS[:3], video=True)


def test_prompts_that_differ_before_the_image_share_no_prefix(gqa):
    image = gqa.model.config.image_token_index
    same = [torch.tensor([1, 5, image, image, 7, 8]), torch.tensor([1, 5, image, image, 9])]
    assert batched.shared_prefix(same, gqa.model.is_visual) == 4
    text_first = [torch.tensor([1, 5, image, 7]), torch.tensor([1, 6, image, 7])]
    assert batched.shared_prefix(text_first, gqa.model.is_visual) is None
    assert batched.shared_prefix([torch.tensor([1, 5, image])], gqa.model.is_visual) is None  # no text after it
