"""checkpoint.py: every key layout loads, every family matches transformers, and every broken
checkpoint is one line naming the file and the field."""

import json
import os
import shutil

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer

import anyres
import checkpoint
import model
import picture
import todre
from conftest import (
    PINPOINTS,
    cli_args,
    greedy_matrix,
    hf_cls_attention,
    hf_runtime_state,
    noise_image,
    one_line_error,
    resave,
)
from evaluation import reference

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
    loaded, _ = model.load(str(resave(ckpt, tmp_path / layout, state)))
    ours = loaded.state_dict()
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
        model.load(str(resave(ckpt, tmp_path / "missing", state)))
    state = hf_runtime_state(ckpt)
    state["model.image_newlines"] = state.pop("model.image_newline")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"missing \(1\): image_newline; unexpected \(1\): model\.image_newlines"
    ):
        model.load(str(resave(ckpt, tmp_path / "renamed", state)))
    state = hf_runtime_state(ckpt)
    state["model.image_newline"] = torch.zeros(3)
    with pytest.raises(checkpoint.CheckpointError, match=r"wrong shape \(1\): model\.image_newline \(3,\)"):
        model.load(str(resave(ckpt, tmp_path / "misshaped", state)))


def test_loader_never_reads_pickles(ckpt, tmp_path):
    directory = tmp_path / "pickled"
    directory.mkdir()
    for f in ckpt.directory.glob("*.json"):
        shutil.copy(f, directory)
    torch.save(ckpt.hf.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(checkpoint.CheckpointError, match="no \\*.safetensors"):
        model.load(str(directory))
    assert not any(p.endswith((".bin", ".pt", ".pth", ".pkl")) or p == "*" for p in checkpoint.HUB_FILES)


def test_hub_id_is_downloaded_with_safe_patterns_only(ckpt, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(ckpt.directory)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded, _ = model.load("someone/tiny-llava-next")
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
    ours = model.LlavaConfig(**checkpoint.read_config(tmp_path))
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
    with pytest.raises(checkpoint.CheckpointError, match="supported: llava, llava_next, llava_next_video, qwen2_5_vl"):
        model.LlavaConfig(**checkpoint.read_config(tmp_path))
    with pytest.raises(checkpoint.CheckpointError, match="config.json is missing"):
        checkpoint.read_config(tmp_path / "nowhere")


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


def replace_with_fifo(name):
    def apply(directory):
        (directory / name).unlink()
        os.mkfifo(directory / name)

    return apply


def write_file(name, content):
    def apply(directory):
        path = directory / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)

    return apply


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
        "config.json: text_config: rope_scaling (or rope_parameters) must be an object",
    ),
    "rope_type_unsupported": (
        break_config("text_config.rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
        "config.json: text_config: RoPE scaling 'yarn' is not supported (supported: default, linear, dynamic)",
    ),
    "rope_theta_negative": (
        break_config("text_config.rope_parameters", {"rope_type": "default", "rope_theta": -5}),
        "config.json: text_config: RoPE rope_theta must be a positive number, got -5",
    ),
    "rope_factor_below_one": (
        break_config("text_config.rope_scaling", {"type": "linear", "factor": 0.5}),
        "config.json: text_config: RoPE scaling factor must be at least 1, got 0.5",
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
    "layers_beyond_any_checkpoint": (
        break_config("text_config.num_hidden_layers", 10**9),
        "text_config.num_hidden_layers is 1000000000, beyond any LLaVA checkpoint (at most 1024)",
    ),
    "projector_bias_not_a_bool": (
        break_config("multimodal_projector_bias", "yes"),
        "config.json: multimodal_projector_bias must be true or false, got 'yes'",
    ),
    "sliding_window_negative": (
        break_config("text_config.sliding_window", -1),
        "text_config.sliding_window must be positive, got -1",
    ),
    "max_position_zero": (
        break_config("text_config.max_position_embeddings", 0),
        "text_config.max_position_embeddings must be positive, got 0",
    ),
    "config_is_a_fifo": (replace_with_fifo("config.json"), "config.json is not a regular file"),
    "weights_are_a_fifo": (replace_with_fifo("model.safetensors"), "model.safetensors is not a regular file"),
    "config_nested_too_deep": (write_file("config.json", "[" * 100000), "cannot read"),
    # hostile templates ([INST]: a Mistral-style one, so it is used), each failing at the first prompt
    "template_repeats_a_string_10_billion_times": (
        write_file("chat_template.jinja", "{{ 'x' * 10**10 }}[INST]"),
        "chat_template.jinja cannot be rendered (SecurityError: repeats something 10000000000 times)",
    ),
    "template_raises_a_huge_power": (
        write_file("chat_template.jinja", "[INST] {{ 7 ** 10000000000 }}"),
        "chat_template.jinja cannot be rendered (SecurityError: computes 7 ** 10000000000)",
    ),
    "template_loops_for_ever": (
        write_file(
            "chat_template.jinja",
            "[INST] {% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        ),
        "chat_template.jinja cannot be rendered (SecurityError: loops more than 100000 times)",
    ),
    "template_divides_by_zero": (
        write_file("chat_template.jinja", "[INST] {{ 1 / 0 }}"),
        "chat_template.jinja cannot be rendered (ZeroDivisionError",
    ),
    "template_not_utf8": (write_file("chat_template.jinja", b"\xff\xfe{{"), "chat_template.jinja is not UTF-8 text"),
}


@pytest.mark.parametrize("case", list(BROKEN_CHECKPOINTS))
def test_broken_checkpoints_are_one_line_naming_file_and_field(mha, tmp_path, capsys, case):
    breaks, message = BROKEN_CHECKPOINTS[case]
    directory = tmp_path / case
    shutil.copytree(mha.directory, directory)
    breaks(directory)
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), message)


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
    assert model.generate(family.model, ids, visual, todre.NO_PRUNING, 12).token_ids == expected


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
    with pytest.raises(model.InputError, match="pad_to_square applies to checkpoints without AnyRes"):
        mha.model.encode_image(image, pad_to_square=True)


@pytest.mark.parametrize(
    "name, stops", [("llama3", ["<|end_of_text|>", "<|eot_id|>"]), ("chatml", ["</s>", "<|im_end|>"])]
)
def test_generation_stops_at_every_end_of_turn_token(families, name, stops, monkeypatch):
    ckpt = families(name)
    stop_ids = {ckpt.tokenizer.tokenizer.token_to_id(t) for t in stops}
    assert ckpt.model.stop_ids == stop_ids
    real_decode_step = model.Llava.decode_step
    for stop in stop_ids:
        calls = []

        def ends_here(self, token, position, kv_cache, stop=stop, calls=calls):
            calls.append(token)
            logits = real_decode_step(self, token, position, kv_cache)
            return torch.where(torch.arange(len(logits)) == stop, 1e9, logits) if len(calls) == 2 else logits

        monkeypatch.setattr(model.Llava, "decode_step", ends_here)
        assert len(model.generate(ckpt.model, ckpt.prompt(None), None, todre.NO_PRUNING, 10).token_ids) == 2


def test_a_checkpoint_saved_with_processor_config_only_loads(mha, tmp_path):
    """transformers 5 writes the image processor's settings into processor_config.json."""
    directory = tmp_path / "t5"
    shutil.copytree(mha.directory, directory)
    (directory / "preprocessor_config.json").unlink()
    loaded, _ = model.load(str(directory))
    assert loaded.config.image_grid_pinpoints == PINPOINTS and loaded.config.crop_size == 336


def test_peek_model_type_reads_config_json_alone_or_says_nothing(tmp_path, monkeypatch):
    """What generate.py asks before loading: a directory's model_type, or a Hub id's when its
    config.json is already in the local cache; never the network: None otherwise."""
    import huggingface_hub

    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "config.json").write_text(json.dumps({"model_type": "qwen2_5_vl"}))
    assert checkpoint.peek_model_type(str(tmp_path / "local")) == "qwen2_5_vl"
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "config.json").write_text(json.dumps({"model_type": "llava_next"}))
    cached = {("org/model", "config.json"): str(tmp_path / "cache" / "config.json")}
    monkeypatch.setattr(
        huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: cached.get((repo_id, filename))
    )
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: pytest.fail("went to the network"))
    assert checkpoint.peek_model_type("org/model") == "llava_next"
    assert checkpoint.peek_model_type("org/other") is None  # not cached: no download
    assert checkpoint.peek_model_type(str(tmp_path / "missing" / "dir")) is None
    assert checkpoint.peek_model_type("a/b/c") is None
