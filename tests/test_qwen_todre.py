"""Qwen2.5-VL through the project's own path (model.load on a checkpoint directory, the chat
template, model.ask, generate.py): equal to transformers unpruned, and ToDRE on it keeps every
token's original M-RoPE position."""

import pytest
import torch

import model
import todre
from conftest import QUESTION, noise_image, one_line_error, run_cli

# (width, height): square, wide, tall, tiny (scaled up to the minimum), large (scaled down to the maximum)
SIZES = [(224, 224), (500, 300), (300, 500), (20, 12), (1600, 1200)]


@pytest.mark.parametrize("size", SIZES)
def test_ask_unpruned_equals_transformers_greedy_generation(qwen_ckpt, size):
    """The whole way from a PIL image: prompt ids from the checkpoint's chat template, pixels,
    positions, logits at every position (1e-4) and 8 greedy tokens, equal to transformers'."""
    c = qwen_ckpt
    image = noise_image(*size)
    inputs = c.hf_inputs(image)
    with torch.inference_mode():
        expected_logits = c.hf(**inputs).logits[0]
        expected = c.hf.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=None)
        visual = c.model.encode_image(image)
        reply = model.ask(c.model, c.tokenizer, QUESTION, visual, todre.NO_PRUNING, max_new_tokens=8)
        logits, _ = c.model.prefill(
            reply.prompt_ids, visual.tokens, todre.NO_PRUNING, c.model.new_kv_cache(0), True,
            placement=model.placement([visual], [reply.kept]),
        )  # fmt: skip
    assert reply.prompt_ids.tolist() == inputs["input_ids"][0].tolist()
    assert (logits[0] - expected_logits).abs().max() < 1e-4
    generated = expected[0, len(reply.prompt_ids) :].tolist()
    stop = next((i for i, t in enumerate(generated) if t in c.model.stop_ids), len(generated))
    assert reply.token_ids == generated[:stop] and len(set(generated)) > 2


def test_text_only_and_two_images_equal_transformers(qwen_ckpt):
    """Text only: prompt ids and greedy tokens. Two images in one user turn: prompt ids, logits at
    every position and 8 greedy tokens, each image's text positions counting on after its grid."""
    c = qwen_ckpt
    with torch.inference_mode():
        inputs = c.hf_inputs(None)
        reply = model.ask(c.model, c.tokenizer, QUESTION, None, todre.NO_PRUNING, max_new_tokens=6)
        expected = c.hf.generate(**inputs, max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert reply.prompt_ids.tolist() == inputs["input_ids"][0].tolist()
        generated = expected[0, len(reply.prompt_ids) :].tolist()
        stop = next((i for i, t in enumerate(generated) if t in c.model.stop_ids), len(generated))
        assert reply.token_ids == generated[:stop]

        images = [noise_image(200, 120, seed=1), noise_image(90, 260, seed=2)]
        visuals = [c.model.encode_image(image) for image in images]
        kept = [torch.arange(len(v.tokens)) for v in visuals]
        ids = model.prompt_ids(c.tokenizer, QUESTION, [len(v.tokens) for v in visuals])
        logits, _ = c.model.prefill(
            ids, torch.cat([v.tokens for v in visuals]), todre.NO_PRUNING, c.model.new_kv_cache(0), True,
            placement=model.placement(visuals, kept),
        )  # fmt: skip
        hf = two_image_inputs(c, images)
        assert ids.tolist() == hf["input_ids"][0].tolist()
        assert (logits[0] - c.hf(**hf).logits[0]).abs().max() < 1e-4
        ours = model.generate(
            c.model, ids, torch.cat([v.tokens for v in visuals]), todre.NO_PRUNING, 8,
            placement=model.placement(visuals, kept),
        )  # fmt: skip
        theirs = c.hf.generate(**hf, max_new_tokens=8, do_sample=False, eos_token_id=None)[0, len(ids) :].tolist()
        stop = next((i for i, t in enumerate(theirs) if t in c.model.stop_ids), len(theirs))
        assert ours.token_ids == theirs[:stop] and len(theirs) == 8


def two_image_inputs(c, images) -> dict:
    """transformers' processor steps for one user turn holding two images then the question."""
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": QUESTION}]
    text = c.hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    pixels = c.image_processor(images, return_tensors="pt")
    pieces = text.split("<|image_pad|>")
    counts = [int(grid.prod()) // 4 for grid in pixels["image_grid_thw"]]
    text = pieces[0] + "".join("<|image_pad|>" * n + piece for n, piece in zip(counts, pieces[1:], strict=True))
    ids = c.hf_tokenizer(text, return_tensors="pt")["input_ids"]
    return dict(
        input_ids=ids,
        pixel_values=pixels["pixel_values"],
        image_grid_thw=pixels["image_grid_thw"],
        mm_token_type_ids=(ids == c.ids["image_pad"]).int(),
    )


@pytest.mark.parametrize("settings", [todre.Settings(retain=0.25, tau=0.0), todre.variant("v2", retain=0.1, tau=0.0)])
def test_stage1_keeps_k_tokens_at_their_original_positions(qwen_ckpt, settings):
    """Stage 1 keeps exactly k merged tokens; the pruned prompt's logits equal transformers' decoder
    on the same embeddings at the positions get_rope_index gives those tokens in the unpruned
    prompt; decoding continues at the unpruned prompt's largest position + 1 (its rope_deltas)."""
    c = qwen_ckpt
    image = noise_image(500, 300)
    full = c.hf_inputs(image)
    with torch.inference_mode():
        position_ids, delta = c.hf.model.get_rope_index(
            full["input_ids"], full["mm_token_type_ids"], image_grid_thw=full["image_grid_thw"]
        )
        visual = c.model.encode_image(image)
        kept = c.model.select(visual, settings)
        ids = model.prompt_ids(c.tokenizer, QUESTION, len(kept))
        logits, info = c.model.prefill(
            ids, visual.tokens[kept], settings, c.model.new_kv_cache(0), True,
            placement=model.placement([visual], [kept]),
        )  # fmt: skip
        # The same tokens in transformers: drop the unkept image rows of the unpruned prompt.
        is_image = full["input_ids"][0] == c.ids["image_pad"]
        stays = torch.ones(len(is_image), dtype=torch.bool)
        dropped = torch.ones(len(visual.tokens), dtype=torch.bool)
        dropped[kept] = False
        stays[is_image.nonzero()[:, 0][dropped]] = False
        embeds = c.hf.model.get_input_embeddings()(ids[None]).clone()
        embeds[0, ids == c.ids["image_pad"]] = visual.tokens[kept]
        expected = c.hf(inputs_embeds=embeds, position_ids=position_ids[:, :, stays]).logits[0]
    assert len(kept) == todre.token_budget(len(visual.tokens), settings.retain) and len(kept.unique()) == len(kept)
    assert torch.equal(info.positions, position_ids[:, 0, stays])
    assert info.next_position == len(full["input_ids"][0]) + int(delta)
    assert (logits[0] - expected).abs().max() < 1e-4


def test_the_pivot_is_the_most_attended_token_or_a_seeded_random_one(qwen_ckpt):
    c = qwen_ckpt
    visual = c.model.encode_image(noise_image(400, 300))
    first = {}
    for pivot, seed in (("attention", 0), ("random", 0), ("random", 1), ("random", 0)):
        settings = todre.Settings(keep_tokens=1, pivot=pivot, pivot_seed=seed)
        first[(pivot, seed)] = int(c.model.select(visual, settings)[0])
    assert first[("attention", 0)] == int(visual.cls_attn.argmax())
    assert (
        first[("random", 0)] == todre.random_pivot(len(visual.tokens), 0) != todre.random_pivot(len(visual.tokens), 1)
    )
    assert first[("random", 1)] == todre.random_pivot(len(visual.tokens), 1)


def test_stage2_evicts_on_qwen_and_the_answer_is_the_masked_runs(qwen_ckpt):
    """Stage 1 at 50%, Stage 2 forced after layer 3, through model.ask: the generated tokens equal
    greedy decoding by brute force, a whole-sequence run per token in which the text stops seeing
    the image from layer 4 on and each generated token from layer 3 on, at the unpruned prompt's
    3-D positions, with the checkpoint's repetition penalty."""
    from test_qwen import masked_layer

    c = qwen_ckpt
    visual = c.model.encode_image(noise_image(300, 300))
    settings = todre.Settings(retain=0.5, tau=0.0, evict_layer=3)
    with torch.inference_mode():
        reply = model.ask(c.model, c.tokenizer, QUESTION, visual, settings, max_new_tokens=6)
        ids, where = reply.prompt_ids, model.placement([visual], [reply.kept])
        lm, n = c.model.language_model, len(reply.prompt_ids)
        is_image = c.model.is_visual(ids)
        prompt_positions = c.model.positions(ids, where)
        expected, seen = [], set(ids.tolist())
        for _ in range(6):
            all_ids = torch.cat([ids, torch.tensor(expected, dtype=torch.long)])
            after = torch.arange(len(expected)) + int(prompt_positions.max()) + 1
            cos, sin = c.model.rope(torch.cat([prompt_positions, after.expand(3, -1)], dim=1), torch.float32)
            x = lm.embed_tokens(all_ids)
            x[:n][is_image] = visual.tokens[reply.kept]
            image_key = torch.cat([is_image, torch.zeros(len(expected), dtype=torch.bool)])
            for i, layer in enumerate(lm.layers):
                blocked = torch.zeros(len(all_ids), dtype=torch.bool)
                blocked[:n] = ~is_image if i > 3 else False  # the prompt's text: from the layer after the eviction
                blocked[n:] = i >= 3  # generated tokens: from the evicting layer on
                mask = torch.ones(len(all_ids), len(all_ids), dtype=torch.bool).tril()
                x = masked_layer(layer, x, cos, sin, mask & ~(blocked[:, None] & image_key[None, :]))
            logits = model.penalize(lm.logits(x[-1:][None])[0, -1], seen, c.model.repetition_penalty)
            token = int(logits.argmax())
            if token in c.model.stop_ids:
                break
            expected.append(token)
            seen.add(token)
    assert reply.info.evict_layer == 3 and len(reply.kept) == todre.token_budget(len(visual.tokens), 0.5)
    assert reply.token_ids == expected and len(expected) > 1
    assert reply.info.positions.shape[1] == len(reply.prompt_ids) - len(reply.kept)


def test_generate_cli_runs_qwen_with_stats_and_a_selection_picture(qwen_ckpt, tmp_path, capsys):
    c = qwen_ckpt
    image = tmp_path / "photo.png"
    noise_image(500, 300).save(image)
    picture = tmp_path / "selection.png"
    args = ["--model", str(c.directory), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "4"]
    code, out, err = run_cli(capsys, *args, "--stats", "--retain", "0.25", "--save-selection", str(picture))
    assert code == 0 and out.strip(), err
    assert "visual tokens: 60 merged (6x10) -> 15 after Stage 1 (kcenter, attention pivot)" in err
    assert "prompt format: chatml (chat template)" in err
    from PIL import Image

    assert Image.open(picture).size[0] >= 160
    for flags in (
        ["--variant", "v2", "--keep-tokens", "7"],
        ["--pivot", "random", "--pivot-seed", "3"],
        ["--no-todre"],
    ):
        code, out, err = run_cli(capsys, *args, "--stats", *flags)
        assert code == 0 and out.strip(), (flags, err)


def test_qwen_refuses_video_and_llava_only_flags_in_one_line(qwen_ckpt, tmp_path, capsys):
    c = qwen_ckpt
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(2):
        noise_image(64, 48, seed=i).save(frames / f"{i}.png")
    image = tmp_path / "photo.png"
    noise_image(64, 48).save(image)
    base = ["--model", str(c.directory), "--prompt", QUESTION]
    with pytest.MonkeyPatch.context() as patch:  # refused from config.json alone, before the weights load
        patch.setattr("generate.load", lambda *a, **k: pytest.fail("loaded the model"))
        one_line_error(capsys, [*base, "--video", str(frames)], "video on Qwen2.5-VL is not supported yet")
    one_line_error(capsys, [*base, "--image", str(image), "--pad-to-square"], "pad_to_square applies to LLaVA-1.5")
    one_line_error(capsys, [*base, "--image", str(image), "--max-new-tokens", "5000"], "4096-token context")
    one_line_error(capsys, [*base, "--image", str(image), "--pivot-seed", "2"], "--pivot-seed seeds a random pivot")
    sliver = tmp_path / "sliver.png"
    noise_image(1000, 4).save(sliver)
    one_line_error(capsys, [*base, "--image", str(sliver)], "has one side more than 200 times the other")


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen3_vl", "idefics3"])
def test_unsupported_architectures_get_one_line_naming_the_supported_ones(tmp_path, capsys, model_type):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    image = tmp_path / "photo.png"
    noise_image(64, 48).save(image)
    one_line_error(
        capsys,
        ["--model", str(tmp_path), "--image", str(image), "--prompt", "hi"],
        "supported: llava, llava_next, llava_next_video, qwen2_5_vl",
    )


def test_evaluate_runs_pope_on_qwen_with_the_answers_ask_gives(qwen_ckpt, tmp_path, capsys, monkeypatch):
    """evaluate.py --model on a Qwen2.5-VL checkpoint: the checkpoint's chat template with LLaVA's
    POPE question, every stored answer what model.ask answers for that question alone, whether the
    questions about an image are answered one at a time or together on one shared prefix."""
    import json

    from test_evaluate import make_pope, pope

    import evaluate
    from evaluation import batched
    from media import open_image

    batches = []
    answer_batch = batched.answer_batch
    monkeypatch.setattr(batched, "answer_batch", lambda *a, **k: batches.append(len(a[1])) or answer_batch(*a, **k))
    c = qwen_ckpt
    data, images = make_pope(tmp_path, questions=2)
    flags = ["--model", str(c.directory), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "3"]
    for out, batch in (("one", "1"), ("four", "4")):
        argv = [
            *pope(data, images),
            "--configs",
            "full,todre-0.10",
            "--batch-size",
            batch,
            "--out",
            str(tmp_path / out),
        ]
        code = evaluate.main([*argv, *flags])
        _, err = capsys.readouterr()
        assert code == 0, err
        assert batches == ([] if batch == "1" else [3] * 4)  # 2 images x 2 configurations, 3 questions each
        batches.clear()
    for config, settings in (("full", todre.NO_PRUNING), ("todre-0.10", todre.Settings(retain=0.1))):
        records = [
            json.loads(line) for line in (tmp_path / "one" / config / "predictions.jsonl").read_text().splitlines()
        ]
        again = (tmp_path / "four" / config / "predictions.jsonl").read_text().splitlines()
        assert [r["answer"] for r in records] == [json.loads(line)["answer"] for line in again]
        assert len(records) == 6 and "<|vision_start|><|image_pad|><|vision_end|>" in records[0]["prompt"]
        for r in records[:3]:
            visual = c.model.encode_image(open_image(str(images / r["image"])))
            reply = model.ask(c.model, c.tokenizer, r["question"], visual, settings, max_new_tokens=3)
            assert r["answer"] == reply.text.strip() and r["visual_tokens"] == len(reply.kept)


def test_a_hub_id_downloads_only_safe_files_and_loads_qwen(qwen_ckpt, tmp_path, monkeypatch):
    """model.load("Qwen/Qwen2.5-VL-7B-Instruct") goes through the Hub download (configs, tokenizer,
    templates and safetensors only) and builds Qwen2.5-VL from what it got."""
    import shutil

    from conftest import fake_hub
    from qwen import QwenVL

    shutil.copytree(qwen_ckpt.directory, tmp_path / "Qwen_Qwen2.5-VL-7B-Instruct")
    calls = fake_hub(monkeypatch, tmp_path)
    loaded, tokenizer = model.load("Qwen/Qwen2.5-VL-7B-Instruct")
    assert isinstance(loaded, QwenVL) and calls[0]["repo_id"] == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert set(calls[0]["allow_patterns"]) == {"*.json", "*.safetensors", "tokenizer.*", "*.jinja"}
    assert loaded.stop_ids == qwen_ckpt.model.stop_ids == {qwen_ckpt.ids["im_end"]}
    assert tokenizer.format.name == "chatml (chat template)"


def test_evaluate_runs_every_table1_benchmark_on_qwen(qwen_ckpt, tmp_path, capsys):
    """All 8 of Table 1's benchmarks (their readers, LLaVA's instruction suffixes, the scorers) on a
    Qwen2.5-VL checkpoint, two questions each: every benchmark answered and scored."""
    import json

    import evaluate
    from conftest import make_llava_eval

    data = make_llava_eval(tmp_path / "data")
    argv = ["--benchmark", "table1", "--data", str(data), "--configs", "todre-0.10", "--limit", "2"]
    argv += ["--out", str(tmp_path / "out"), "--model", str(qwen_ckpt.directory), "--device", "cpu"]
    code = evaluate.main([*argv, "--dtype", "float32", "--max-new-tokens", "3"])
    _, err = capsys.readouterr()
    assert code == 0, err
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert len(table["columns"]) == 8
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "out").rglob("results.json")}
    assert len(results) == 8 and all(r["configs"]["todre-0.10"]["samples"] > 0 for r in results.values())


def test_the_pixel_budget_flags_resize_qwen_images_and_are_refused_elsewhere(qwen_ckpt, mha, tmp_path, capsys):
    """--max-pixels / --min-pixels set Qwen2.5-VL's smart_resize range (transformers' processor's
    min_pixels/max_pixels); LLaVA refuses them; evaluate.py records the range in the fingerprint."""
    import json

    from test_evaluate import make_pope, pope

    import evaluate
    from conftest import QWEN_PIXELS

    image = tmp_path / "photo.png"
    noise_image(500, 300).save(image)
    args = ["--model", str(qwen_ckpt.directory), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "2"]
    code, _, err = run_cli(capsys, *args, "--stats", "--max-pixels", str(28 * 28 * 16), "--no-todre")
    assert code == 0 and "visual tokens: 15 merged (3x5)" in err, err  # smart_resize(300, 500) within 16 tokens
    one_line_error(capsys, [*args, "--min-pixels", "5000", "--max-pixels", "4000"], "0 < min_pixels <= max_pixels")
    llava = ["--model", str(mha.directory), "--image", str(image), "--prompt", QUESTION, "--max-pixels", "9000"]
    one_line_error(capsys, llava, "min_pixels and max_pixels apply to Qwen2.5-VL checkpoints")

    data, images = make_pope(tmp_path, questions=1)
    flags = ["--model", str(qwen_ckpt.directory), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2"]
    out = tmp_path / "out"
    argv = [*pope(data, images), "--configs", "full", "--out", str(out), *flags]
    assert evaluate.main([*argv, "--max-pixels", "20000"]) == 0
    fingerprint = json.loads((out / "full" / "fingerprint.json").read_text())
    assert fingerprint["pixels"] == [QWEN_PIXELS[0], 20000]
    assert evaluate.main([*argv, "--max-pixels", "30000"]) == 2  # another image size: not the same answers
    assert "pixels" in capsys.readouterr().err


def test_auto_dtype_is_bfloat16_for_qwen_on_a_gpu_where_float16_overflows(qwen_ckpt, monkeypatch):
    """--dtype auto: bfloat16 on a CPU; on a GPU float16 for LLaVA and bfloat16 for Qwen2.5-VL (its
    float16 activations overflow), float16 where the GPU has no bfloat16."""
    cuda, mps, cpu = torch.device("cuda"), torch.device("mps"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert model.auto_dtype(cpu, "qwen2_5_vl") == model.auto_dtype(cpu, "llava_next") == torch.bfloat16
    assert model.auto_dtype(cuda, "llava_next") == model.auto_dtype(mps, "llava") == torch.float16
    assert model.auto_dtype(cuda, "qwen2_5_vl") == model.auto_dtype(mps, "qwen2_5_vl") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert model.auto_dtype(cuda, "qwen2_5_vl") == torch.float16
    loaded, _ = model.load(str(qwen_ckpt.directory), "cpu", "auto")
    assert loaded.dtype == torch.bfloat16
