"""Qwen2.5-VL with ToDRE: the vision tower (qwen_vision.py), the Qwen2 decoder (llama.py's layers
with biased q/k/v projections) and its multimodal RoPE (M-RoPE), as transformers'
Qwen2_5_VLForConditionalGeneration computes them, with both pruning stages in plain code.

M-RoPE gives every token three positions (time, row, column): text tokens the same number three
times, counting on; an image's merged tokens the position where the image starts plus (0, their
row, their column), after which the text counts on from the image's largest position + 1. The
head dimension's rotary frequencies are split into three sections (mrope_section), each rotated
by one of the three positions.

Pruning keeps positions: the tokens Stage 1 keeps enter the decoder at the 3-D positions they
have in the unpruned prompt (model.Placement says where each sits on its image), the text after
an image counts on from where it would without pruning, and Stage 2's eviction removes tokens
with their positions. So decoding continues where transformers' would (its rope_deltas).

The model offers what model.Llava offers (encode_image, select, prefill, decode), so model.ask,
model.generate and the programs drive either. Video is not supported on Qwen2.5-VL yet.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from PIL import Image

import anyres
import prompt
import qwen_vision
import todre
from checkpoint import (
    MODEL_TYPES,
    CheckpointError,
    build,
    is_count,
    is_number,
    load_tokenizer,
    preprocessor_config,
    read_json,
    read_weights,
    repetition_penalty,
    require,
    section,
    stop_ids,
)
from llama import KVCache, Llama, LlamaConfig
from model import InputError, Placement, PrefillInfo, VisionLanguageModel, VisualTokens, check_prefill, describe
from qwen_vision import QwenVisionConfig, VisionTower


@dataclass
class QwenVLConfig:
    text: LlamaConfig
    vision: QwenVisionConfig
    image_token_id: int = 151655  # <|image_pad|>: one per merged visual token
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # rotary frequencies for (t, h, w)
    video_token_id: int = 151656  # <|video_pad|>
    # preprocessor_config.json: the pixel budget smart_resize keeps an image within, and normalisation
    min_pixels: int = qwen_vision.MIN_PIXELS
    max_pixels: int = qwen_vision.MAX_PIXELS
    image_mean: tuple = anyres.CLIP_MEAN
    image_std: tuple = anyres.CLIP_STD
    model_type: str = "qwen2_5_vl"

    def placeholder(self, video: bool) -> tuple[str, int]:
        """The prompt text and token id that stand for the visual tokens of an image or a video."""
        return ("<|video_pad|>", self.video_token_id) if video else ("<|image_pad|>", self.image_token_id)


class QwenVL(VisionLanguageModel):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg.vision)
        self.language_model = Llama(cfg.text)
        self.stop_ids = set(cfg.text.eos_token_ids)  # load() adds generation_config.json's and <|im_end|>
        self.repetition_penalty = 1.0  # load() reads generation_config.json's (1.05 in Qwen's releases)

    # -- vision ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_pixels(
        self, pixel_values: torch.Tensor, grid: tuple[int, int, int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch rows (qwen_vision.preprocess) -> (tokens (merged, hidden_size) in the LLM's space,
        the attention each receives in the tower's last full-attention block (merged,))."""
        return self.visual(pixel_values.to(self.device), grid)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, pad_to_square: bool = False) -> VisualTokens:
        """An image -> its merged tokens, row-major over the grid, the way transformers' Qwen2-VL
        processor and model prepare it (smart_resize within the checkpoint's pixel budget)."""
        cfg = self.config
        if not isinstance(image, Image.Image):
            raise InputError(f"encode_image takes a PIL image, got {describe(image)}: open files with media.open_image")
        if pad_to_square:
            raise InputError("pad_to_square applies to LLaVA-1.5; Qwen2.5-VL keeps the image's own shape")
        v = cfg.vision
        try:
            pixel_values, grid = qwen_vision.preprocess(
                image, cfg.min_pixels, cfg.max_pixels, v.patch_size, v.spatial_merge_size, v.temporal_patch_size,
                cfg.image_mean, cfg.image_std,
            )  # fmt: skip
        except ValueError as e:  # an aspect ratio over 200, which the processor refuses
            raise InputError(str(e)) from None
        tokens, received = self.encode_pixels(pixel_values, grid)
        frames, rows, cols = grid[0], grid[1] // v.spatial_merge_size, grid[2] // v.spatial_merge_size
        sources = torch.arange(len(tokens), device=tokens.device)
        return VisualTokens(tokens, sources, received[None], None, None, grid=(frames, rows, cols))

    def set_pixel_budget(self, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        """The pixel range smart_resize keeps images within, in place of the checkpoint's (what
        transformers' processor takes as min_pixels and max_pixels; None keeps the current one)."""
        low = self.config.min_pixels if min_pixels is None else min_pixels
        high = self.config.max_pixels if max_pixels is None else max_pixels
        if not (todre.is_count(low) and todre.is_count(high) and 0 < low <= high):
            raise InputError(f"the pixel budget needs 0 < min_pixels <= max_pixels, got {low!r} and {high!r}")
        self.config.min_pixels, self.config.max_pixels = low, high

    def encode_video(self, frames, newlines=None) -> VisualTokens:
        raise InputError(VIDEO_REFUSAL)

    def video_tokens(self, frames: int, newlines=None) -> tuple[int, int]:
        raise InputError(VIDEO_REFUSAL)

    # -- Stage 1 --------------------------------------------------------------------------------

    @torch.inference_mode()
    def select(self, visual: VisualTokens, settings: todre.Settings) -> torch.Tensor:
        """ToDRE Stage 1 on the merged tokens, in the LLM's space: indices into visual.tokens to
        keep, in order. Qwen2.5-VL's tower has no [CLS] token, so the pivot is the token that
        receives the most attention in its last full-attention block (summed over its 4 patches),
        or a seeded random one (settings.pivot); the greedy selection is the paper's."""
        if not isinstance(settings, todre.Settings):
            raise InputError(f"settings must be a todre.Settings, got {describe(settings)}")
        if not isinstance(visual, VisualTokens) or visual.grid is None:
            raise InputError(f"select takes the VisualTokens of encode_image, got {describe(visual)}")
        n = len(visual.tokens)
        if not settings.stage1:
            return torch.arange(n, device=visual.tokens.device)
        scores = visual.cls_attn.flatten()
        pivot = int(scores.argmax()) if settings.pivot == "attention" else todre.random_pivot(n, settings.pivot_seed)
        chosen = todre.SELECTORS[settings.select](
            todre.Candidates(visual.tokens, scores, torch.zeros(n, dtype=torch.long, device=scores.device), pivot),
            todre.token_budget(n, settings.retain, settings.keep_tokens),
        )
        return chosen.sort().values  # kept tokens enter the LLM in their original order

    # -- the language model, with Stage 2 ---------------------------------------------------------

    def is_visual(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)

    def positions(self, input_ids: torch.Tensor, placement: Placement | None) -> torch.Tensor:
        """(3, n) M-RoPE positions (time, row, column) of a prompt whose images are its runs of
        image ids, placed by `placement` (one grid per run, one cell per image token), as
        transformers' get_rope_index computes them for the unpruned prompt, restricted to the
        tokens kept. Text counts on from an image's start + max(rows, columns)."""
        is_image = self.is_visual(input_ids).tolist()
        grids = iter(placement.grids if placement is not None else [])
        cells = placement.cells.cpu() if placement is not None else None
        parts, start, used, i = [], 0, 0, 0
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:  # text: the same position three times, counting on
                parts.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
            else:  # an image: (start, start + row, start + column) of each kept cell
                frames, rows, cols = next(grids, (1, 0, 0))
                mine = cells[used : used + j - i] if cells is not None else torch.arange(0)
                if len(mine) != j - i or frames != 1 or (len(mine) and int(mine.max()) >= rows * cols):
                    raise InputError(f"{j - i} image tokens do not fit the placement of their image")
                parts.append(torch.stack([torch.zeros_like(mine), mine // cols, mine % cols]) + start)
                start, used = start + max(rows, cols), used + j - i
            i = j
        if placement is not None and (next(grids, None) is not None or used != len(cells)):
            raise InputError("the placement holds more images or tokens than the prompt")
        return torch.cat(parts, dim=1).to(input_ids.device)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, head_dim) for (3, n) positions: frequency k of the half-split rotation turns
        with the time, row or column position, by mrope_section (transformers'
        Qwen2_5_VLRotaryEmbedding)."""
        cfg = self.config.text
        dim = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
        freqs = positions[..., None].float() * inv_freq  # (3, n, dim / 2)
        which = torch.cat([torch.full((s,), i % 3) for i, s in enumerate(self.config.mrope_section)])  # (dim / 2,)
        freqs = freqs.gather(0, which.to(positions.device)[None, None].expand(1, freqs.shape[1], -1))[0]
        emb = torch.cat([freqs, freqs], dim=-1)  # (n, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor | None,
        settings: todre.Settings,
        kv_cache: KVCache,
        all_logits: bool = False,
        every_layer_ratios: bool = False,
        placement: Placement | None = None,
    ) -> tuple[torch.Tensor, PrefillInfo]:
        """As model.Llava.prefill, with M-RoPE positions from `placement` (model.placement of the
        images and the tokens Stage 1 kept): Stage 2 in the layer loop; evicted visual tokens leave
        with their positions, the rest keep theirs."""
        check_prefill(self, input_ids, visual_embeds, settings, kv_cache)
        x = self.embed(input_ids, visual_embeds)
        if visual_embeds is not None and placement is None:
            raise InputError("Qwen2.5-VL's prefill needs the placement of its visual tokens (model.placement)")
        positions = self.positions(input_ids, placement)
        cos, sin = self.rope(positions, x.dtype)
        next_position = int(positions.max()) + 1  # where decoding continues (transformers' rope_deltas)
        # Evicted visual tokens leave with their positions; every other token keeps its 3-D one.
        x, positions, stage2 = self.decoder_with_stage2(
            x, cos, sin, positions, input_ids, settings, kv_cache, every_layer_ratios
        )
        info = PrefillInfo(stage2.ratios, stage2.evict_layer, positions, next_position)
        return self.language_model.logits(x if all_logits else x[:, -1:]), info

    @torch.inference_mode()
    def decode_step(self, token: int, position: int, kv_cache: KVCache) -> torch.Tensor:
        """One generated token at text `position` (the same number three times) -> logits (vocab,)."""
        x = self.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
        cos, sin = self.rope(torch.tensor([position], device=self.device).expand(3, -1), x.dtype)
        for i, layer in enumerate(self.language_model.layers):
            x, _ = layer(x, cos, sin, kv_cache, i)
        return self.language_model.logits(x)[0, -1]


VIDEO_REFUSAL = "video on Qwen2.5-VL is not supported yet: give it an image, or use a LLaVA-NeXT checkpoint for video"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_config(directory: Path) -> QwenVLConfig:
    """A Qwen2.5-VL checkpoint's settings: config.json with the text fields at the top level (Qwen's
    own release) or under text_config (transformers 5), rope_theta and mrope_section under
    rope_scaling or rope_parameters; the pixel budget and normalisation from the image processor's
    config. Each problem is a CheckpointError naming the file and the field."""
    path = directory / "config.json"
    cfg = read_json(path)
    if cfg.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(
            f"{path}: model_type {cfg.get('model_type')!r} is not Qwen2.5-VL (qwen2_5_vl); supported: "
            f"{', '.join(MODEL_TYPES)} (Qwen2-VL and Qwen3-VL are not)"
        )
    text = {**cfg, **section(cfg, "text_config", path)}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"{path}: rope_scaling must be an object, got {rope!r}")
    names = {f.name for f in fields(LlamaConfig)} - {"rope_type", "rope_factor"}
    values = {k: v for k, v in text.items() if k in names and v is not None}
    values.update(model_type="llama", rope_theta=rope.get("rope_theta", text.get("rope_theta", 1000000.0)))
    values.update(qkv_bias=True, rms_norm_eps=values.get("rms_norm_eps", 1e-6))
    values.setdefault("max_position_embeddings", 128000)
    if not text.get("use_sliding_window"):  # Qwen's configs name a window they do not use (use_sliding_window false)
        values.pop("sliding_window", None)
    text_config = build(LlamaConfig, values, f"{path}: text")
    vision_dict = section(cfg, "vision_config", path)
    vision = {f.name: vision_dict[f.name] for f in fields(QwenVisionConfig) if vision_dict.get(f.name) is not None}
    vision.setdefault("out_hidden_size", text_config.hidden_size)
    for name, value in vision.items():
        if name not in ("hidden_act", "fullatt_block_indexes", "rope_theta") and not (is_count(value) and value > 0):
            raise CheckpointError(f"{path}: vision_config.{name} must be a positive integer, got {value!r}")
    vision_config = QwenVisionConfig(**vision)
    require(
        vision_config.hidden_size % vision_config.num_heads == 0,
        path,
        "vision_config: hidden_size must be a multiple of num_heads",
    )
    require(
        vision_config.out_hidden_size == text_config.hidden_size,
        path,
        "vision_config.out_hidden_size must equal the text hidden_size",
    )
    section_sizes = rope.get("mrope_section", [16, 24, 24])
    half = text_config.head_dim // 2
    counts = isinstance(section_sizes, list) and all(is_count(s) and s >= 0 for s in section_sizes)
    require(
        counts and sum(section_sizes) == half,
        path,
        f"mrope_section must be counts that add up to head_dim / 2 ({half}), got {section_sizes!r}",
    )
    pre_path, pre = preprocessor_config(directory)
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    min_pixels = pre.get("min_pixels", size.get("shortest_edge", qwen_vision.MIN_PIXELS))
    max_pixels = pre.get("max_pixels", size.get("longest_edge", qwen_vision.MAX_PIXELS))
    require(
        is_count(min_pixels) and is_count(max_pixels) and 0 < min_pixels <= max_pixels,
        pre_path, f"min_pixels and max_pixels must be counts with 0 < min <= max, got {min_pixels!r}, {max_pixels!r}",
    )  # fmt: skip
    mean, std = pre.get("image_mean", anyres.CLIP_MEAN), pre.get("image_std", anyres.CLIP_STD)
    for name, numbers in (("image_mean", mean), ("image_std", std)):
        ok = isinstance(numbers, (list, tuple)) and len(numbers) == 3 and all(map(is_number, numbers))
        require(
            ok and (name == "image_mean" or min(numbers) > 0), pre_path, f"{name} must be 3 numbers, got {numbers!r}"
        )
    ids = {}
    for name, default in (("image_token_id", 151655), ("video_token_id", 151656)):
        ids[name] = cfg.get(name, text.get(name, default))
        require(is_count(ids[name]) and ids[name] >= 0, path, f"{name} must be a token id, got {ids[name]!r}")
    require(ids["image_token_id"] < text_config.vocab_size, path, "image_token_id must be below vocab_size")
    return QwenVLConfig(
        text_config, vision_config, ids["image_token_id"], list(section_sizes), ids["video_token_id"],
        min_pixels, max_pixels, tuple(mean), tuple(std),
    )  # fmt: skip


def qwen_key(key: str) -> str:
    """A checkpoint tensor name -> ours. Qwen's release: visual.*, model.* (the decoder), lm_head;
    transformers 5: model.visual.*, model.language_model.*, lm_head."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    key = key.removeprefix("model.")
    return key if key.startswith(("visual.", "language_model.")) else "language_model." + key


def load(
    directory, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, cfg: QwenVLConfig | None = None
) -> QwenVL:
    """A Qwen2.5-VL model from a local checkpoint directory (config.json, *.safetensors; cfg: its
    read_config, if already read); the programs load through model.load, which adds the tokenizer."""
    directory = Path(directory)
    cfg = cfg or read_config(directory)
    with torch.device("meta"):
        model = QwenVL(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = (
        {"language_model.lm_head.weight": "language_model.embed_tokens.weight"} if cfg.text.tie_word_embeddings else {}
    )

    def skip(name: str) -> bool:  # buffers some exports saved
        return name.endswith(".inv_freq")

    state = read_weights(directory, expected, torch.device(device), dtype, skip, tied, rename=qwen_key)
    model.load_state_dict(state, assign=True)
    return model.eval()


def load_with_tokenizer(directory: Path, device, dtype: torch.dtype) -> tuple[QwenVL, "prompt.PromptTokenizer"]:
    """(model, tokenizer) from a checkpoint directory, as model.load returns them for LLaVA: the
    tokenizer.json checked against the config, the chat template, the stop ids."""
    cfg = read_config(directory)
    tokenizer = load_tokenizer(directory, cfg)
    model = load(directory, device, dtype, cfg)
    model.stop_ids = stop_ids(directory, cfg, tokenizer)
    model.repetition_penalty = repetition_penalty(directory)
    return model, tokenizer


def set_pixel_budget(model, min_pixels: int | None, max_pixels: int | None) -> None:
    """The programs' --min-pixels/--max-pixels: QwenVL.set_pixel_budget when either is given; an
    InputError for a LLaVA checkpoint, whose image sizes are fixed by its crops."""
    if min_pixels is None and max_pixels is None:
        return
    if not isinstance(model, QwenVL):
        raise InputError("min_pixels and max_pixels apply to Qwen2.5-VL checkpoints; LLaVA's crops are fixed")
    model.set_pixel_budget(min_pixels, max_pixels)
