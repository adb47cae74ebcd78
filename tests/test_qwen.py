"""qwen.py: Qwen2.5-VL's decoder with M-RoPE and the vision tower together equal transformers'
Qwen2_5_VLForConditionalGeneration (float32 logits at every position, greedy decoding), and Stage 2
on it equals a run that masks the visual keys from the layer after the eviction."""

import pytest
import torch

import qwen
import qwen_vision
import todre
from conftest import noise_image
from llama import KVCache, LlamaConfig
from model import Placement

IMAGE, START, END = 90, 88, 89  # <|image_pad|>, <|vision_start|>, <|vision_end|> of the tiny vocabulary
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=48)
VISION.update(fullatt_block_indexes=[1], window_size=112)
TEXT = dict(vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4)
TEXT.update(num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, rope_theta=10000.0)
SECTION = [2, 3, 1]  # a head_dim of 12: 6 rotary frequencies, split unevenly to catch a wrong split


@pytest.fixture(scope="module")
def pair():
    """transformers' tiny random Qwen2.5-VL, and ours with its weights."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        vision_config=VISION,
        text_config={
            **TEXT,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": SECTION},
        },
        image_token_id=IMAGE,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    for parameter in hf.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    ours = qwen.QwenVL(
        qwen.QwenVLConfig(LlamaConfig(**TEXT, qkv_bias=True), qwen_vision.QwenVisionConfig(**VISION), IMAGE, SECTION)
    )
    state = {}
    for key, value in hf.state_dict().items():
        key = key.replace("model.visual.", "visual.").replace("model.language_model.", "language_model.")
        key = key.replace("lm_head.", "language_model.lm_head.")
        state[key] = value
    ours.load_state_dict(state, strict=True)
    return hf, ours.eval()


def hf_inputs(ids, pixel_values, grid) -> dict:
    """What transformers' processor hands the model: the token types make it use M-RoPE positions."""
    return dict(
        input_ids=ids[None],
        pixel_values=pixel_values,
        image_grid_thw=torch.tensor([grid]),
        mm_token_type_ids=(ids == IMAGE).int()[None],
    )


def whole(grid) -> Placement:
    """Every merged token of one image with patch grid `grid`, in order: the unpruned placement."""
    _, h, w = grid
    return Placement([(1, h // 2, w // 2)], torch.arange(h * w // 4))


def prompt(tokens: int) -> torch.Tensor:
    """Chat-shaped ids: some text, <|vision_start|>, the image's tokens, <|vision_end|>, the question."""
    return torch.tensor([5, 17, 3, START, *[IMAGE] * tokens, END, 44, 12, 61, 7, 30])


@pytest.mark.parametrize("size", [(28, 28), (500, 375), (375, 500), (300, 90), (90, 300), (700, 200)])
def test_logits_equal_transformers_at_every_position(pair, size):
    hf, ours = pair
    pixel_values, grid = qwen_vision.preprocess(noise_image(*size), max_pixels=400 * 400)
    ids = prompt(grid[1] * grid[2] // 4)
    with torch.inference_mode():
        expected = hf(**hf_inputs(ids, pixel_values, grid)).logits[0]
        tokens, _ = ours.encode_pixels(pixel_values, grid)
        logits, _ = ours.prefill(ids, tokens, todre.NO_PRUNING, KVCache(4, room=0), True, placement=whole(grid))
    assert (logits[0] - expected).abs().max() < 1e-4


def test_text_only_logits_equal_transformers(pair):
    hf, ours = pair
    ids = torch.tensor([5, 17, 3, 44, 12, 61, 7, 30])
    with torch.inference_mode():
        expected = hf(input_ids=ids[None]).logits[0]
        logits, _ = ours.prefill(ids, None, todre.NO_PRUNING, KVCache(4, room=0), all_logits=True)
    assert (logits[0] - expected).abs().max() < 1e-4


def test_positions_equal_transformers_get_rope_index(pair):
    hf, ours = pair
    for size in [(500, 375), (90, 300)]:
        _, grid = qwen_vision.preprocess(noise_image(*size), max_pixels=400 * 400)
        ids = prompt(grid[1] * grid[2] // 4)
        types = (ids == IMAGE).int()
        expected, delta = hf.model.get_rope_index(ids[None], types[None], image_grid_thw=torch.tensor([grid]))
        positions = ours.positions(ids, whole(grid))
        assert torch.equal(positions, expected[:, 0]) and int(positions.max()) + 1 - len(ids) == int(delta)


def test_greedy_decoding_equals_transformers_generate(pair):
    hf, ours = pair
    pixel_values, grid = qwen_vision.preprocess(noise_image(500, 375), max_pixels=400 * 400)
    ids = prompt(grid[1] * grid[2] // 4)
    with torch.inference_mode():
        expected = hf.generate(
            **hf_inputs(ids, pixel_values, grid), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
        cache = KVCache(4, room=6)
        logits, info = ours.prefill(
            ids, ours.encode_pixels(pixel_values, grid)[0], todre.NO_PRUNING, cache, placement=whole(grid)
        )
        tokens = [int(logits[0, -1].argmax())]
        for step in range(5):
            tokens.append(int(ours.decode_step(tokens[-1], info.next_position + step, cache).argmax()))
    assert tokens == expected


def test_stage2_eviction_keeps_every_other_tokens_3d_position(pair):
    """Forced after layer 1: the logits of the text after the image equal a run of transformers'
    layers in which the text stops seeing the image from layer 2 on, all positions unchanged."""
    hf, ours = pair
    pixel_values, grid = qwen_vision.preprocess(noise_image(300, 200), max_pixels=400 * 400)
    ids = prompt(grid[1] * grid[2] // 4)
    with torch.inference_mode():
        tokens, _ = ours.encode_pixels(pixel_values, grid)
        settings = todre.Settings(retain=1.0, tau=0.0, evict_layer=1)
        logits, info = ours.prefill(ids, tokens, settings, KVCache(4, room=0), True, placement=whole(grid))
        # Brute force with our own layers' weights, attention masked by hand.
        lm = ours.language_model
        positions = ours.positions(ids, whole(grid))
        cos, sin = ours.rope(positions, torch.float32)
        x = lm.embed_tokens(ids)
        is_image = ids == IMAGE
        x[is_image] = tokens
        n = len(ids)
        for i, layer in enumerate(lm.layers):
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            if i >= 2:
                mask &= ~is_image[None, :]
            x = masked_layer(layer, x, cos, sin, mask)
        expected = lm.logits(x[~is_image][None])[0]
    assert info.evict_layer == 1 and torch.equal(info.positions, positions[:, ~is_image])
    assert (logits[0] - expected).abs().max() < 1e-4


def masked_layer(layer, x, cos, sin, mask):
    from llama import apply_rope

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    n = len(x)
    q = attn.q_proj(h).view(n, attn.heads, attn.head_dim).transpose(0, 1)
    k = attn.k_proj(h).view(n, attn.kv_heads, attn.head_dim).transpose(0, 1)
    v = attn.v_proj(h).view(n, attn.kv_heads, attn.head_dim).transpose(0, 1)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k, v = (t.repeat_interleave(attn.heads // attn.kv_heads, dim=0) for t in (k, v))
    scores = (q @ k.transpose(1, 2)) / attn.head_dim**0.5
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    x = x + attn.o_proj(out.transpose(0, 1).reshape(n, -1))
    h = layer.post_attention_layernorm(x)
    return x + layer.mlp.down_proj(torch.nn.functional.silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h))


def test_a_saved_checkpoint_loads_in_both_key_layouts_and_equals_transformers(pair, tmp_path):
    """save_pretrained's layout (model.visual.*, model.language_model.*) and Qwen's own release
    (visual.*, model.layers.*, a flat config.json with rope_scaling): the same logits."""
    import json

    from safetensors.torch import save_file

    hf, _ = pair
    hf.save_pretrained(tmp_path / "v5")
    release = tmp_path / "release"
    release.mkdir()
    config = json.loads((tmp_path / "v5" / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **text, "model_type": "qwen2_5_vl", "rope_theta": rope["rope_theta"]}
    flat["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    flat.update(sliding_window=32768, use_sliding_window=False)  # as Qwen's releases: a window named, not used
    (release / "config.json").write_text(json.dumps(flat))
    renamed = {
        k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v.contiguous()
        for k, v in hf.state_dict().items()
    }
    save_file(renamed, str(release / "model.safetensors"))
    pixel_values, grid = qwen_vision.preprocess(noise_image(300, 200), max_pixels=400 * 400)
    ids = prompt(grid[1] * grid[2] // 4)
    with torch.inference_mode():
        expected = hf(**hf_inputs(ids, pixel_values, grid)).logits[0]
        for directory in (tmp_path / "v5", release):
            ours = qwen.load(directory)
            tokens, _ = ours.encode_pixels(pixel_values, grid)
            logits, _ = ours.prefill(ids, tokens, todre.NO_PRUNING, KVCache(4, room=0), True, placement=whole(grid))
            assert (logits[0] - expected).abs().max() < 1e-4, directory.name
            assert ours.config.text.sliding_window is None


def test_other_architectures_are_refused_in_one_line(tmp_path):
    import json

    from checkpoint import CheckpointError

    for model_type in ("qwen2_vl", "qwen3_vl", "llava"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(CheckpointError, match=f"model_type '{model_type}' is not Qwen2.5-VL"):
            qwen.load(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, p: c["text_config"]["rope_parameters"].update(mrope_section=[2, 2]), "mrope_section must be counts"),
        (lambda c, p: c["vision_config"].update(depth="32"), "vision_config.depth must be a positive integer"),
        (lambda c, p: c["text_config"].update(hidden_size=-4), "hidden_size must be positive"),
        (lambda c, p: c.update(image_token_id=10**6), "image_token_id must be below vocab_size"),
        (lambda c, p: p.update(min_pixels=0), "min_pixels and max_pixels must be counts"),
        (lambda c, p: p.update(image_std=[0.5, 0, 0.5]), "image_std must be 3 numbers"),
    ],
)
def test_a_damaged_config_is_one_checkpoint_error_naming_the_field(pair, tmp_path, change, message):
    import json

    from checkpoint import CheckpointError

    hf, _ = pair
    hf.config.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    pre = {"min_pixels": 3136, "max_pixels": 12845056, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    change(config, pre)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(pre))
    with pytest.raises(CheckpointError, match=message):
        qwen.read_config(tmp_path)


RELEASE_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct's config.json, as Qwen released it (flat, rope_scaling "mrope")
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "vision_start_token_id": 151652,
    "vision_end_token_id": 151653,
    "vision_token_id": 151654,
    "image_token_id": 151655,
    "video_token_id": 151656,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 128000,
    "max_window_layers": 28,
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "use_sliding_window": False,
    "vision_config": {
        "depth": 32,
        "hidden_act": "silu",
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "in_chans": 3,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "spatial_patch_size": 14,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2,
        "temporal_patch_size": 2,
    },
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vocab_size": 152064,
}


@pytest.mark.parametrize("size", ["7B", "3B"])
def test_the_released_configs_build_every_tensor_transformers_builds(tmp_path, size):
    """Qwen's own 7B config.json (and the 3B's: 36 layers, tied embeddings) read by read_config give
    a model whose every tensor has the name (after qwen_key) and shape of transformers' model built
    from the same file, on the meta device: 8.29B parameters for the 7B."""
    import json

    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = dict(RELEASE_7B)
    if size == "3B":
        config.update(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16)
        config.update(num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, max_window_layers=70)
        config["vision_config"] = {**config["vision_config"], "out_hidden_size": 2048}
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = qwen.read_config(tmp_path)
    assert (cfg.text.sliding_window, cfg.text.rope_theta, cfg.mrope_section) == (None, 1e6, [16, 24, 24])
    with torch.device("meta"):
        ours = qwen.QwenVL(cfg)
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_pretrained(tmp_path))
    expected = {qwen.qwen_key(k): tuple(v.shape) for k, v in hf.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        expected.pop("language_model.lm_head.weight")  # read from the embeddings (checkpoint.read_weights' tied)
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items() if k != "language_model.lm_head.weight"}
    else:
        ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == expected
    if size == "7B":
        assert round(sum(v.numel() for v in ours.parameters()) / 1e9, 2) == 8.29
        assert todre.probe_layers(cfg.text.num_hidden_layers) == [13, 16, 20, 23]
