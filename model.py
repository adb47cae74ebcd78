"""LLaVA-NeXT with ToDRE: the vision -> projector -> packing path, and the prefill/decode loop in
which both pruning stages happen in plain code.

This is the only file that knows CLIP, AnyRes, Llama and ToDRE together. Checkpoint files are
read by checkpoint.py. The model computes; callers (generate.py, evaluate.py, bench.py) time and
measure, through `ask` (one question, start to end) or `generate` (prompt ids in, tokens out).
Qwen2.5-VL (qwen.py) offers the same methods as Llava, so `ask`, `generate` and the programs drive
either; `load` hands its checkpoints to qwen.py.
Batch size is 1 throughout: one image or video and one prompt per call, so sequences are
(n, d) tensors and get a leading batch axis of 1 only where the decoder layers want one.
"""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import anyres
import prompt
import todre
from checkpoint import (
    DEFAULT_MODEL,
    load_tokenizer,
    model_type,
    read_config,
    read_weights,
    repetition_penalty,
    resolve_checkpoint,
    stop_ids,
    unused_key,
)
from clip import CLIPVisionConfig, VisionTower, layers_to_run
from llama import KVCache, Llama, LlamaConfig

FRAMES_PER_BATCH = 16  # video frames through the vision tower at once


class InputError(ValueError):
    """A user input (prompt, image, setting) cannot be used; the message says why."""


class ContextError(InputError):
    """The prompt, its visual tokens and the answer's room do not fit the model's context."""

    def __init__(self, message: str, visual: bool):
        super().__init__(message)
        self.visual = visual  # whether pruning more would help


@dataclass
class VisualTokens:
    """Visual tokens in LLM embedding space, with where each came from."""

    tokens: torch.Tensor  # (n, d) packed tokens, in sequence order
    sources: torch.Tensor  # (n,) index into cls_attn.flatten() (crop * t + patch), or anyres.NEWLINE
    cls_attn: torch.Tensor  # (crops or frames, t) [CLS] -> patch attention of the feature layer
    # (Qwen2.5-VL, which has no [CLS]: (1, t) the attention each merged token receives, the pivot score)
    layout: anyres.Layout | None  # AnyRes packing geometry; None for square crops (video frames)
    framings: list[anyres.Framing] | None = None  # how each square crop was cut from its image or frame
    grid: tuple[int, int, int] | None = None  # Qwen2.5-VL: (frames, rows, columns) of LLM tokens; tokens row-major

    def __post_init__(self):
        # Checked where visual tokens are made, so every configuration (Stage 1 on or off) sees it:
        # a NaN or inf would otherwise silently become an empty or meaningless answer.
        finite = torch.isfinite(self.tokens).all(dim=-1)
        if not finite.all():
            raise InputError(
                f"{int((~finite).sum())} of {len(self.tokens)} visual tokens hold NaN or inf: the vision tower "
                "overflowed in this dtype, or the checkpoint is damaged (float32 avoids an overflow)"
            )


@dataclass
class Placement:
    """Where each visual token of a prompt sits on its image's grid: what Qwen2.5-VL's M-RoPE needs
    to give the tokens Stage 1 kept their original 3-D positions. LLaVA needs none: its positions
    count 0..n-1 over the prompt as built, pruned or not."""

    grids: list[tuple[int, int, int]]  # each image's (frames, rows, columns) of LLM tokens, in prompt order
    cells: torch.Tensor  # (m,) each visual token's row-major index into its image's grid, in prompt order


def placement(visuals: list[VisualTokens], kept: list[torch.Tensor]) -> Placement | None:
    """The Placement of the tokens `kept` (one index tensor per image, from select) of `visuals`,
    or None for visual tokens without a grid (LLaVA)."""
    if not visuals or visuals[0].grid is None:
        return None
    return Placement([visual.grid for visual in visuals], torch.cat(list(kept)))


@dataclass
class PrefillInfo:
    """What Stage 2 did during one prefill."""

    ratios: dict = field(default_factory=dict)  # probe layer -> (a_tv, a_vt), eq. 7
    evict_layer: int | None = None  # layer after which the visual tokens were removed
    positions: torch.Tensor | None = None  # positions of the tokens left at the end of prefill
    next_position: int | None = None  # where decoding continues: the prompt's length (M-RoPE: its largest position + 1)


@dataclass
class LlavaConfig:
    """One LLaVA checkpoint's settings (checkpoint.read_config reads them from its config.json and
    preprocessor_config.json), with the Hub's field names where there are some."""

    text: LlamaConfig
    vision: CLIPVisionConfig
    image_grid_pinpoints: list | None  # [[h, w], ...] canvases AnyRes may fit an image into; None: no AnyRes
    image_token_index: int  # the id of the <image> placeholder token
    vision_feature_layer: int = -2
    projector_bias: bool = True
    crop_size: int = 336  # from preprocessor_config.json
    image_mean: tuple = anyres.CLIP_MEAN
    image_std: tuple = anyres.CLIP_STD
    model_type: str = "llava_next"
    resize_shortest_edge: int = 336  # without AnyRes: the shortest edge is resized to this, then cropped
    # Video (llava_next_video checkpoints set these; image checkpoints take video the same way,
    # through their <image> placeholder, as lmms-eval's llava_vid does).
    video_token_index: int | None = None  # the id of the <video> placeholder; None: the image one
    spatial_pool_mode: str = "average"  # how each frame's patch grid is pooled before the projector
    spatial_pool_stride: int = 2  # 24x24 -> 12x12 tokens per frame

    def __post_init__(self):
        if self.video_token_index is None:
            self.video_token_index = self.image_token_index

    def placeholder(self, video: bool) -> tuple[str, int]:
        """The prompt text and token id that stand for the visual tokens of an image or a video."""
        if video and self.video_token_index != self.image_token_index:
            return "<video>", self.video_token_index
        return "<image>", self.image_token_index

    @property
    def anyres(self) -> bool:
        """LLaVA-NeXT tiles images (AnyRes); LLaVA-1.5 takes one square crop."""
        return self.image_grid_pinpoints is not None

    @property
    def has_image_newline(self) -> bool:
        """Whether the checkpoint has the learned image_newline vector (LLaVA-NeXT does, 1.5 not)."""
        return self.model_type != "llava"


class VisionLanguageModel(nn.Module):
    """What both model families (Llava here, qwen.QwenVL) share around their `language_model`: where
    it lives, a fresh KV cache, and the decoding loop over the family's own decode_step. Each sets
    stop_ids and repetition_penalty (load() fills them from the checkpoint)."""

    language_model: Llama
    stop_ids: set[int]
    repetition_penalty: float

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    def new_kv_cache(self, max_new_tokens: int) -> KVCache:
        """An empty cache for one prefill and up to max_new_tokens decoded tokens."""
        return KVCache(len(self.language_model.layers), room=max_new_tokens)

    def embed(self, input_ids: torch.Tensor, visual_embeds: torch.Tensor | None) -> torch.Tensor:
        """(n,) ids -> (1, n, d) embeddings with the visual tokens scattered into the image positions."""
        x = self.language_model.embed_tokens(input_ids)
        is_visual = self.is_visual(input_ids)
        count = 0 if visual_embeds is None else len(visual_embeds)
        if int(is_visual.sum()) != count:
            raise InputError(f"the prompt has {int(is_visual.sum())} image tokens for {count} visual tokens")
        if visual_embeds is not None:
            x[is_visual] = visual_embeds.to(x.dtype)
        return x[None]

    def decoder_with_stage2(self, x, cos, sin, positions, input_ids, settings, kv_cache: KVCache, every_layer_ratios):
        """The prompt's embeddings x (1, n, d) through every decoder layer, filling kv_cache, with
        ToDRE Stage 2 after each layer. positions (n,) or (3, n) (M-RoPE), cos/sin their rotations.
        Returns (x, positions, stage2) for the tokens still there after the last layer."""
        lm = self.language_model
        visual, text = todre.token_sets(self.is_visual(input_ids))  # eq. 7's V and T
        stage2 = todre.Stage2(settings, len(lm.layers), visual, text, every_layer=every_layer_ratios)
        for i, layer in enumerate(lm.layers):
            x, q = layer(x, cos, sin, kv_cache, i)
            keep = stage2.after_layer(i, q[0], kv_cache.get(i)[0][0])
            if keep is not None:
                # The visual tokens leave the residual stream and this layer's cache; later layers
                # never see them. The rest keep their original positions (paper §4.2).
                x, cos, sin, positions = x[:, keep], cos[keep], sin[keep], positions[..., keep]
                kv_cache.keep(i, keep)
        return x, positions, stage2

    @torch.inference_mode()
    def decode(
        self,
        logits: torch.Tensor,
        position: int,
        kv_cache: KVCache,
        max_new_tokens: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        prompt_ids: torch.Tensor | None = None,
    ) -> Iterator[int]:
        """Yield up to max_new_tokens ids, the first picked from the prefill's last `logits`, stopping
        before a stop id (which is not yielded). `position`: where the first new token goes (the
        prefill length: evicted visual tokens keep their positions). Greedy when temperature == 0.
        With the checkpoint's repetition_penalty (generation_config.json; Qwen2.5-VL's is 1.05) every
        token of prompt_ids and of the answer so far is penalised first, as transformers' generate does."""
        seen = set(prompt_ids.tolist()) if prompt_ids is not None else set()
        for step in range(max_new_tokens):
            if self.repetition_penalty != 1.0 and seen:
                logits = penalize(logits, seen, self.repetition_penalty)
            token = sample(logits, temperature, generator)
            if token in self.stop_ids:
                return
            seen.add(token)
            yield token
            if step < max_new_tokens - 1:
                logits = self.decode_step(token, position + step, kv_cache)


class Llava(VisionLanguageModel):
    """LLaVA-1.5, LLaVA-NeXT and LLaVA-NeXT-Video: CLIP tower, projector, Llama-family decoder."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        d_vision, d = cfg.vision.hidden_size, cfg.text.hidden_size
        vision_layers = layers_to_run(cfg.vision_feature_layer, cfg.vision.num_hidden_layers)
        self.vision_tower = VisionTower(cfg.vision, vision_layers)
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(d_vision, d, bias=cfg.projector_bias)
        self.multi_modal_projector.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias)
        self.image_newline = nn.Parameter(torch.zeros(d)) if cfg.has_image_newline else None
        self.language_model = Llama(cfg.text)
        self.stop_ids = set(cfg.text.eos_token_ids)  # load() adds the checkpoint's end-of-turn token
        self.repetition_penalty = 1.0  # load() reads generation_config.json's

    # -- vision ---------------------------------------------------------------------------------

    def vision_features(self, pixel_values: torch.Tensor):
        """(crops, 3, S, S) -> the feature layer's patch features (crops, t, d_vision), [CLS]
        dropped (the 'default' feature strategy), and its [CLS] -> patch attention (crops, t)."""
        features, cls_attn = self.vision_tower(pixel_values.to(self.device), return_cls_attn=True)
        return features[:, 1:], cls_attn

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Vision features -> LLM embedding space: linear_2(gelu(linear_1(x))), as transformers'
        LlavaNextMultiModalProjector."""
        p = self.multi_modal_projector
        return p.linear_2(F.gelu(p.linear_1(features)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(frames, side * side, c) -> (frames, (side / stride)^2, c): each frame's patch grid pooled
        with kernel = stride (2: 24x24 -> 12x12), as transformers' LlavaNextVideoPooler."""
        cfg = self.config
        side, stride = cfg.vision.image_size // cfg.vision.patch_size, cfg.spatial_pool_stride
        grid = x.transpose(1, 2).unflatten(2, (side, side))  # (frames, c, side, side)
        pool = F.avg_pool2d if cfg.spatial_pool_mode == "average" else F.max_pool2d
        return pool(grid, stride, stride).flatten(2).transpose(1, 2)

    @torch.inference_mode()
    def encode_image(self, image: Image.Image, pad_to_square: bool = False) -> VisualTokens:
        """An image -> visual tokens in LLM space, the way the checkpoint's processor prepares it.

        LLaVA-NeXT (AnyRes): 576 thumbnail tokens, then the unpadded crop mosaic with one
        image_newline token ending each row (transformers' pack_image_features).
        LLaVA-1.5: one crop, the shortest edge resized then centre-cropped (its processor's
        default), or with pad_to_square the whole image centred on a square of the mean colour
        first, as LLaVA's own evaluation did: 576 tokens.
        """
        cfg = self.config
        if not isinstance(image, Image.Image):
            raise InputError(f"encode_image takes a PIL image, got {describe(image)}: open files with media.open_image")
        if not cfg.anyres:
            size, crop = cfg.resize_shortest_edge, cfg.crop_size
            pixel_values, framing = anyres.preprocess_square(
                image, size, crop, cfg.image_mean, cfg.image_std, pad_to_square
            )
            features, cls_attn = self.vision_features(pixel_values)  # (1, 576, d_vision), (1, 576)
            sources = torch.arange(cls_attn.numel(), device=self.device)
            return VisualTokens(self.project(features[0]), sources, cls_attn, None, [framing])
        if pad_to_square:
            raise InputError("pad_to_square applies to checkpoints without AnyRes (LLaVA-1.5); LLaVA-NeXT tiles")
        pixel_values, size = anyres.preprocess(
            image, cfg.image_grid_pinpoints, cfg.crop_size, cfg.image_mean, cfg.image_std
        )
        features, cls_attn = self.vision_features(pixel_values)
        lay = anyres.layout(size, cfg.image_grid_pinpoints, cfg.crop_size, cfg.vision.patch_size)
        sources = anyres.token_sources(lay).to(self.device)
        return VisualTokens(anyres.pack(self.project(features), sources, self.image_newline), sources, cls_attn, lay)

    @torch.inference_mode()
    def encode_video(self, frames: list[Image.Image], newlines: str | None = None) -> VisualTokens:
        """Video frames -> pooled tokens, the way lmms-eval's llava_vid feeds LLaVA-NeXT (the paper's
        Table 2 setting: 20 frames x 144 = 2880 tokens).

        Each frame is CLIP-preprocessed (shortest edge, centre crop), its 24x24 patch features are
        pooled 2x2 BEFORE the projector (transformers' LlavaNextVideoModel.get_video_features), and
        the frames follow one another. newlines "grid" ends every 12-token row of every frame with
        image_newline (llava_vid's default); "none" adds none (transformers' LlavaNextVideo). The
        default is grid for checkpoints that have an image_newline (LLaVA-NeXT), else none.
        The [CLS] attention is pooled the same way, so Algorithm 1's video pivot is its argmax
        over (frame, pooled token).
        """
        cfg = self.config
        if not frames:
            raise InputError("a video needs at least one frame")
        if not all(isinstance(frame, Image.Image) for frame in frames):
            raise InputError("encode_video takes a list of PIL images: open files with media.open_video")
        newlines = newlines or ("grid" if cfg.has_image_newline else "none")
        if newlines not in ("grid", "none"):
            raise InputError(f"video newlines must be 'grid' or 'none', got {newlines!r}")
        if newlines == "grid" and not cfg.has_image_newline:
            raise InputError("this checkpoint has no image_newline vector (LLaVA-1.5): use video newlines 'none'")
        pooled, attention, framings = [], [], []
        for start in range(0, len(frames), FRAMES_PER_BATCH):  # a bounded batch through CLIP at a time
            crops = [
                anyres.preprocess_square(f, cfg.crop_size, cfg.crop_size, cfg.image_mean, cfg.image_std)
                for f in frames[start : start + FRAMES_PER_BATCH]
            ]
            features, cls_attn = self.vision_features(torch.cat([pixels for pixels, _ in crops]))  # (f, 576, d_vision)
            pooled.append(self.project(self.pool(features)))  # (f, 144, d): pooled before the projector
            attention.append(self.pool(cls_attn[..., None])[..., 0])  # (f, 144)
            framings += [framing for _, framing in crops]
        side = cfg.vision.image_size // cfg.vision.patch_size // cfg.spatial_pool_stride
        sources = anyres.frame_sources(len(frames), side, newlines == "grid").to(self.device)
        tokens = anyres.pack(torch.cat(pooled), sources, self.image_newline)
        return VisualTokens(tokens, sources, torch.cat(attention), None, framings)

    def video_tokens(self, frames: int, newlines: str | None = None) -> tuple[int, int]:
        """(packed tokens, Stage 1 candidates) that `frames` video frames make, known before encoding."""
        cfg = self.config
        side = cfg.vision.image_size // cfg.vision.patch_size // cfg.spatial_pool_stride
        grid = (newlines or ("grid" if cfg.has_image_newline else "none")) == "grid"
        return frames * side * (side + grid), frames * side * side

    # -- Stage 1 --------------------------------------------------------------------------------

    @torch.inference_mode()
    def select(self, visual: VisualTokens, settings: todre.Settings) -> torch.Tensor:
        """ToDRE Stage 1: indices into visual.tokens to keep, in sequence order (paper §4.1).

        Candidates are the patch tokens only: image_newline tokens are one repeated vector that
        carries no image content, so they are never candidates. The paper does not say what
        becomes of them; `settings.newlines` drops them all (default) or keeps them all in place
        (README, "Choices the paper leaves open"). k counts patch tokens only.
        """
        if not isinstance(settings, todre.Settings):
            hint = (
                ": evaluation.configs.parse_config turns a configuration name into one"
                if isinstance(settings, str)
                else ""
            )
            raise InputError(f"settings must be a todre.Settings, got {describe(settings)}{hint}")
        if not isinstance(visual, VisualTokens):
            raise InputError(f"select takes the VisualTokens of encode_image or encode_video, got {describe(visual)}")
        all_tokens = torch.arange(len(visual.sources), device=visual.sources.device)
        if not settings.stage1:  # everything, newlines included
            return all_tokens
        is_newline = visual.sources == anyres.NEWLINE
        candidates = all_tokens[~is_newline]
        sources = visual.sources[candidates]
        per_crop = visual.cls_attn.shape[1]
        pivot_source = todre.select_pivot(visual.cls_attn, anyres=visual.layout is not None)
        if settings.pivot == "random":  # v2's ablation: any candidate, seeded
            pivot_source = int(sources[todre.random_pivot(len(candidates), settings.pivot_seed)])
        chosen = todre.SELECTORS[settings.select](
            todre.Candidates(
                features=visual.tokens[candidates],
                cls_scores=visual.cls_attn.flatten()[sources],
                crops=sources.div(per_crop, rounding_mode="floor"),
                pivot=int((sources == pivot_source).nonzero()[0, 0]),
            ),
            todre.token_budget(len(candidates), settings.retain, settings.keep_tokens),
        )
        kept = candidates[chosen]
        if settings.newlines == "keep":
            kept = torch.cat([kept, all_tokens[is_newline]])
        return kept.sort().values  # kept tokens enter the LLM in their original order

    # -- the language model, with Stage 2 ---------------------------------------------------------

    def is_visual(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(n,) bool: the positions of image or video placeholder tokens, where visual tokens go."""
        cfg = self.config
        return (input_ids == cfg.image_token_index) | (input_ids == cfg.video_token_index)

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
        """Run the prompt through the decoder, filling kv_cache; ToDRE Stage 2 happens in this loop.

        input_ids (n,) with one image token per row of visual_embeds (m, d). Returns (logits, info):
        logits (1, t, vocab) for every remaining token if all_logits, else for the last one only.
        every_layer_ratios: measure eq. 7 at every layer the visual tokens reach (the paper's
        Figure 2) as well, without changing what Stage 2 decides. placement: unused (LLaVA's
        positions are 0..n-1); taken so that one caller serves both model families.
        """
        lm = self.language_model
        check_prefill(self, input_ids, visual_embeds, settings, kv_cache)
        x = self.embed(input_ids, visual_embeds)
        positions = torch.arange(len(input_ids), device=input_ids.device)
        cos, sin = lm.rope(positions, x.dtype)
        x, positions, stage2 = self.decoder_with_stage2(
            x, cos, sin, positions, input_ids, settings, kv_cache, every_layer_ratios
        )
        info = PrefillInfo(stage2.ratios, stage2.evict_layer, positions, next_position=len(input_ids))
        return lm.logits(x if all_logits else x[:, -1:]), info

    def decode_step(self, token: int, position: int, kv_cache: KVCache) -> torch.Tensor:
        """One generated token at `position` -> next-token logits (vocab,)."""
        x = self.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
        return self.language_model(x, torch.tensor([position], device=self.device), kv_cache)[0, -1]


def penalize(logits: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: the logit of every token already seen is
    divided by the penalty where positive, multiplied where negative (both make it less likely)."""
    index = torch.tensor(sorted(seen), device=logits.device)
    score = logits[index]
    return logits.index_put((index,), torch.where(score < 0, score * penalty, score / penalty))


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> int:
    """The next token from (vocab,) logits: the argmax when temperature is 0, else a draw from
    softmax(logits / temperature). In float64 and shifted by the maximum, so a temperature like
    1e-300 (0 in float32) only sends the other tokens to -inf: it samples the argmax."""
    if temperature == 0:
        return int(logits.argmax())
    probs = ((logits.double() - logits.max()) / temperature).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ---------------------------------------------------------------------------------------------
# One request, start to end
# ---------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """What generating from one prompt produced and took (times in seconds of the caller's clock)."""

    token_ids: list[int]  # the generated ids (the stop token excluded)
    info: PrefillInfo  # what Stage 2 measured and did
    kv_cache_bytes: int
    prefill_s: float
    decode_s: float


@torch.inference_mode()
def generate(
    model: Llava,
    input_ids: torch.Tensor,
    visual_embeds: torch.Tensor | None,
    settings: todre.Settings,
    max_new_tokens: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    every_layer_ratios: bool = False,
    on_token: Callable[[list[int]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    placement: Placement | None = None,
) -> Generation:
    """Prefill (with Stage 2) then decode, on a fresh KV cache: input_ids (n,) holding one
    placeholder id per row of visual_embeds (m, d). on_token(ids so far) is called after each new
    token (streaming). `clock` should wait for the device (the programs pass cli.now). placement:
    where the visual tokens sit on their images (Qwen2.5-VL needs it; see `placement`)."""
    check_generation(model, input_ids, visual_embeds, max_new_tokens, temperature)
    start = clock()
    kv_cache = model.new_kv_cache(max_new_tokens)
    logits, info = model.prefill(
        input_ids, visual_embeds, settings, kv_cache, every_layer_ratios=every_layer_ratios, placement=placement
    )
    prefilled = clock()
    token_ids = []
    tokens = model.decode(
        logits[0, -1], info.next_position, kv_cache, max_new_tokens, temperature, generator, input_ids
    )
    for token in tokens:
        token_ids.append(token)
        if on_token is not None:
            on_token(token_ids)
    return Generation(token_ids, info, kv_cache.nbytes(), prefilled - start, clock() - prefilled)


@dataclass
class Reply(Generation):
    """One answered question: the generation, its text, and what Stage 1 chose."""

    text: str = ""
    prompt_ids: torch.Tensor | None = None  # (n,) the whole prompt, one placeholder per visual token kept
    kept: torch.Tensor | None = None  # indices into visual.tokens that entered the LLM; None without media
    select_s: float = 0.0


@torch.inference_mode()
def ask(
    model: Llava,
    tokenizer: prompt.PromptTokenizer,
    question: str,
    visual: VisualTokens | None = None,
    settings: todre.Settings = todre.VARIANTS["v1"],
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    video: bool = False,
    kept: torch.Tensor | None = None,
    every_layer_ratios: bool = False,
    on_token: Callable[[list[int]], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Reply:
    """The whole way through for one question about `visual` (an encoded image or video; None:
    text only): Stage 1 (unless `kept` already holds its choice for this image and settings), the
    prompt in the checkpoint's conversation format, then `generate`."""
    start = clock()
    if visual is not None and kept is None:
        kept = model.select(visual, settings)
    select_s = clock() - start
    visual_embeds = visual.tokens[kept] if visual is not None else None
    input_ids = prompt_ids(tokenizer, question, None if visual is None else len(kept), video).to(model.device)
    generation = generate(
        model, input_ids, visual_embeds, settings, max_new_tokens, temperature, generator, every_layer_ratios,
        on_token, clock, placement([visual], [kept]) if visual is not None else None,
    )  # fmt: skip
    text = tokenizer.decode(generation.token_ids)
    return Reply(**vars(generation), text=text, prompt_ids=input_ids, kept=kept, select_s=select_s)


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------


def prompt_ids(
    tokenizer: prompt.PromptTokenizer,
    question: str,
    num_visual: int | list[int] | None = None,
    video: bool = False,
    inline: bool = False,
) -> torch.Tensor:
    """The checkpoint's prompt for `question`, in its own conversation format, with num_visual
    placeholder ids where the image (or video) goes (a list: one count per image, for several);
    None: a text-only prompt; inline: at the placeholders the question holds (prompt.py)."""
    try:
        return torch.tensor(tokenizer.prompt_ids(question, num_visual, video, inline))
    except prompt.PromptError as e:
        raise InputError(str(e)) from None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


FLOAT_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def load(model_id: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hub id or a local directory; dtype a torch dtype, its name, or
    "auto" (auto_dtype). A LLaVA checkpoint gives a Llava, a Qwen2.5-VL one (model_type qwen2_5_vl)
    a qwen.QwenVL."""
    if dtype != "auto":
        dtype = FLOAT_DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
        if dtype not in FLOAT_DTYPES.values():
            raise InputError(f"dtype must be one of auto, {', '.join(FLOAT_DTYPES)}, got {dtype!r}")
    directory = resolve_checkpoint(model_id)
    kind = model_type(directory)
    dtype = auto_dtype(torch.device(device), kind) if dtype == "auto" else dtype
    if kind == "qwen2_5_vl":
        import qwen  # Qwen2.5-VL is its own file beside this one and builds on its types, so it is imported here

        return qwen.load_with_tokenizer(directory, device, dtype)
    cfg = LlavaConfig(**read_config(directory))
    tokenizer = load_tokenizer(directory, cfg)
    with torch.device("meta"):
        model = Llava(cfg)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    vision_layers = len(model.vision_tower.encoder.layers)
    tied = (
        {"language_model.lm_head.weight": "language_model.embed_tokens.weight"} if cfg.text.tie_word_embeddings else {}
    )
    state = read_weights(
        directory, expected, torch.device(device), dtype, lambda name: unused_key(name, vision_layers), tied
    )
    model.load_state_dict(state, assign=True)
    model.stop_ids = stop_ids(directory, cfg, tokenizer)
    model.repetition_penalty = repetition_penalty(directory)
    return model.eval(), tokenizer


def auto_dtype(device: torch.device, checkpoint_type: str) -> torch.dtype:
    """What dtype "auto" runs in: bfloat16 on a CPU (fast on current CPUs; float16 arithmetic is slow
    or missing on many); on a GPU float16, except for Qwen2.5-VL: released in bfloat16, its
    activations overflow float16's range (transformers' and vLLM's trackers show the resulting NaN
    and "!!!!" answers), so it gets bfloat16 wherever the device has it."""
    if device.type == "cpu":
        return torch.bfloat16
    if checkpoint_type == "qwen2_5_vl" and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


# ---------------------------------------------------------------------------------------------
# Input checks: what the Python API's entry points accept (the story above assumes them)
# ---------------------------------------------------------------------------------------------


def check_video_budget(model: "Llava", frames: int, newlines, settings: todre.Settings, max_new_tokens: int) -> None:
    """ContextError before any frame is encoded if the visual tokens that would reach the LLM
    (after Stage 1) and the answer's room cannot fit the context, however short the question."""
    packed, candidates = model.video_tokens(frames, newlines)
    kept = packed
    if settings.stage1:
        kept = todre.token_budget(candidates, settings.retain, settings.keep_tokens)
        kept += (packed - candidates) if settings.newlines == "keep" else 0
    limit = model.config.text.max_position_embeddings
    if kept + max_new_tokens > limit:
        raise ContextError(
            f"{frames} frames make {kept} visual tokens for the LLM, which with {max_new_tokens} new tokens "
            f"exceeds the model's {limit}-token context: take fewer frames, allow fewer new tokens, or prune more",
            True,
        )


def check_prefill(model: "Llava", input_ids, visual_embeds, settings: todre.Settings, kv_cache: KVCache) -> None:
    """InputError unless the arguments are what prefill takes (the Python API's entry point)."""
    if not (isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1 and not input_ids.is_floating_point()):
        raise InputError(f"input_ids must be a 1-D tensor of token ids, got {describe(input_ids)}")
    if len(input_ids) == 0:
        raise InputError("input_ids is empty")
    d = model.config.text.hidden_size
    if visual_embeds is not None and not (
        isinstance(visual_embeds, torch.Tensor) and visual_embeds.dim() == 2 and visual_embeds.shape[1] == d
    ):
        raise InputError(f"visual_embeds must be a (tokens, {d}) tensor, got {describe(visual_embeds)}")
    if not isinstance(settings, todre.Settings):
        raise InputError(f"settings must be a todre.Settings, got {type(settings).__name__}")
    layers = len(model.language_model.layers)
    asked = [
        *settings.layers_to_probe(layers),
        *([settings.evict_layer] if settings.evict_layer is not None else []),
    ]
    if any(layer >= layers for layer in asked):
        raise InputError(f"Stage 2 layers {asked} must be below {layers}, the model's number of layers")
    if any(kv_cache.lengths):
        raise InputError(
            f"the KV cache already holds {max(kv_cache.lengths)} tokens of another prompt: "
            "prefill a fresh one (model.new_kv_cache)"
        )


def check_generation(model: "Llava", input_ids, visual_embeds, max_new_tokens, temperature) -> None:
    """InputError unless the request is one this model can generate for."""
    if not (todre.is_count(max_new_tokens) and max_new_tokens >= 1):
        raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
    max_len, window = model.config.text.max_position_embeddings, model.config.text.sliding_window
    total = len(input_ids) + max_new_tokens
    visual = "" if visual_embeds is None else f", {len(visual_embeds)} of them visual"
    if window and total > window:
        raise ContextError(
            f"the prompt ({len(input_ids)} tokens{visual}) plus {max_new_tokens} new tokens exceeds the "
            f"{window}-token sliding window of this Mistral model, which this implementation does not apply: "
            "allow fewer new tokens, or prune more",
            visual_embeds is not None,
        )
    if total > max_len:
        advice = "shorten the prompt or allow fewer new tokens"
        if visual_embeds is not None:
            advice = "allow fewer new tokens, or prune more"
        raise ContextError(
            f"the prompt ({len(input_ids)} tokens{visual}) plus {max_new_tokens} new tokens exceeds the "
            f"model's {max_len}-token context: {advice}",
            visual_embeds is not None,
        )


def describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__
