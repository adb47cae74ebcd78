"""LLaVA-NeXT with ToDRE: checkpoint loading, the vision -> projector -> packing path, and the
prefill/decode loop in which both pruning stages happen in plain code.

This is the only file that knows CLIP, AnyRes, Llama and ToDRE together.
"""
import math
import resource
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import anyres
import todre
from checkpoint import (DEFAULT_MODEL, HUB_FILES, CheckpointError, LlavaNextConfig, load_tokenizer,  # noqa: F401
                        load_weights, resolve_checkpoint)
from clip import VisionTower, layers_to_run
from llama import KVCache, Llama

# Vicuna v1.5 conversation template, one line (SPEC §7).
SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")
IMAGE_PROMPT = SYSTEM + " USER: <image>\n{} ASSISTANT:"
TEXT_PROMPT = SYSTEM + " USER: {} ASSISTANT:"


class InputError(ValueError):
    """A user input (prompt, image, setting) cannot be used; the message says why."""


@dataclass
class ToDRE:
    """Pruning settings; the defaults are the paper's v1. `ToDRE(retain=1.0, tau=0.0)` is the unpruned model."""
    retain: float | int = 0.1         # Stage 1 budget: a float fraction of patch tokens (1.0 = Stage 1 off) or an int count
    select: str = "kcenter"           # Stage 1: "kcenter" (v1), "maxsum" (v2), "cls" (FasterVLM, per crop), "cls-global"
    newlines: str = "drop"            # Stage 1 and the image_newline tokens: "drop" them all, or "keep" them all
    tau: float = 0.03                 # Stage 2 threshold on both eq. 7 ratios; 0 = Stage 2 off
    probe_fractions: tuple = todre.V1_PROBES  # Stage 2 probe layers as fractions of the depth L
    probe_layers: list | None = None  # explicit probe layers (0-based), overriding probe_fractions
    evict_layer: int | None = None    # force Stage 2 after this layer, whatever the ratios (benchmarks only)


# The paper's two versions (SPEC §11): v1 is what this project implements and the default; its
# authors' later revision (v2) selects by max-sum diversity and probes once, at 7L/8, with tau 0.10.
VARIANTS = {
    "v1": ToDRE(),
    "v2": ToDRE(select="maxsum", tau=0.10, probe_fractions=todre.V2_PROBES),
}


def variant(name: str, **overrides) -> ToDRE:
    """The settings of paper version `name` ("v1" or "v2"), with any non-None override applied."""
    return replace(VARIANTS[name], **{key: value for key, value in overrides.items() if value is not None})


NO_PRUNING = ToDRE(retain=1.0, tau=0.0)

# Stage 1 selectors by name: the paper's two diversity selections, and the [CLS] baseline of
# FasterVLM (a Table 1 peer) per crop as FasterVLM does, or as one global top-k.
SELECTORS = {"kcenter": todre.greedy_k_center, "maxsum": todre.greedy_max_sum,
             "cls": todre.cls_top_k_per_crop, "cls-global": todre.cls_top_k}


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

@dataclass
class VisualTokens:
    """Visual tokens in LLM embedding space, with where each came from."""
    tokens: torch.Tensor          # (n, d) packed tokens, in sequence order
    sources: torch.Tensor         # (n,) index into cls_attn.flatten() (crop * t + patch), or anyres.NEWLINE
    cls_attn: torch.Tensor        # (crops or frames, t) [CLS] -> patch attention of the feature layer
    layout: anyres.Layout | None  # AnyRes packing geometry; None for video frames


class LlavaNext(nn.Module):
    def __init__(self, cfg: LlavaNextConfig):
        super().__init__()
        self.config = cfg
        d_vision, d = cfg.vision.hidden_size, cfg.text.hidden_size
        self.vision_tower = VisionTower(cfg.vision, layers_to_run(cfg.vision_feature_layer, cfg.vision.num_hidden_layers))
        self.multi_modal_projector = nn.Module()
        self.multi_modal_projector.linear_1 = nn.Linear(d_vision, d, bias=cfg.projector_bias)
        self.multi_modal_projector.linear_2 = nn.Linear(d, d, bias=cfg.projector_bias)
        self.image_newline = nn.Parameter(torch.zeros(d))
        self.language_model = Llama(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        return self.image_newline.dtype

    def project(self, pixel_values: torch.Tensor):
        """(crops, 3, S, S) -> patch tokens in LLM space (crops, t, d) and [CLS] attention (crops, t)."""
        features, cls_attn = self.vision_tower(pixel_values.to(self.device), return_cls_attn=True)
        p = self.multi_modal_projector
        # 'default' feature strategy: drop [CLS] (SPEC §3); projector = linear_2(gelu(linear_1(x))) (SPEC §4).
        return p.linear_2(F.gelu(p.linear_1(features[:, 1:]))), cls_attn

    def encode_image(self, image: Image.Image) -> VisualTokens:
        """An image -> AnyRes packed tokens: 576 thumbnail tokens, then the unpadded crop mosaic
        with one image_newline token ending each row (SPEC §2, §4)."""
        cfg = self.config
        pixel_values, size = anyres.preprocess(image, cfg.image_grid_pinpoints, cfg.crop_size, cfg.image_mean, cfg.image_std)
        features, cls_attn = self.project(pixel_values)
        lay = anyres.layout(size, cfg.image_grid_pinpoints, cfg.crop_size, cfg.vision.patch_size)
        sources = anyres.token_sources(lay).to(self.device)
        return VisualTokens(anyres.pack(features, sources, self.image_newline), sources, cls_attn, lay)

    def encode_frames(self, frames: list[Image.Image]) -> VisualTokens:
        """Video frames -> each one 336x336 image without AnyRes, tokens frame after frame, no newlines."""
        cfg = self.config
        if not frames:
            raise InputError("a video needs at least one frame")
        pixel_values = torch.stack([
            anyres.normalize(anyres.to_rgb(f).resize((cfg.crop_size, cfg.crop_size), Image.Resampling.BICUBIC),
                             cfg.image_mean, cfg.image_std)
            for f in frames])
        features, cls_attn = self.project(pixel_values)  # (frames, t, d)
        sources = torch.arange(cls_attn.numel(), device=self.device)
        return VisualTokens(features.flatten(0, 1), sources, cls_attn, None)

    def select(self, visual: VisualTokens, settings: ToDRE) -> torch.Tensor:
        """ToDRE Stage 1: indices into visual.tokens to keep, in sequence order (paper §4.1).

        Candidates are the patch tokens only: image_newline tokens are one repeated vector that
        carries no image content, so they are never candidates. The paper does not say what
        becomes of them; `settings.newlines` drops them all (default) or keeps them all in place
        (what GlobalCom2, a baseline of the paper's Table 1, does). k counts patch tokens only.
        """
        all_tokens = torch.arange(len(visual.sources), device=visual.sources.device)
        if isinstance(settings.retain, float) and settings.retain == 1.0:  # Stage 1 off: newlines included
            return all_tokens
        if settings.select not in SELECTORS:
            raise InputError(f"unknown selector {settings.select!r}: use {', '.join(map(repr, SELECTORS))}")
        if settings.newlines not in ("drop", "keep"):
            raise InputError(f"newlines must be 'drop' or 'keep', got {settings.newlines!r}")
        if not torch.isfinite(visual.tokens).all():
            bad = int((~torch.isfinite(visual.tokens)).any(dim=-1).sum())
            raise InputError(f"{bad} of {len(visual.tokens)} visual tokens hold NaN or inf: the vision tower "
                             "overflowed in this dtype, or the checkpoint is damaged (try --dtype float32)")
        is_newline = visual.sources == anyres.NEWLINE
        candidates = all_tokens[~is_newline]
        k = todre.token_budget(len(candidates), settings.retain)
        candidate_sources = visual.sources[candidates]
        if settings.select in ("kcenter", "maxsum"):
            pivot_source = todre.select_pivot(visual.cls_attn, anyres=visual.layout is not None)
            pivot = int((candidate_sources == pivot_source).nonzero()[0, 0])
            order = SELECTORS[settings.select](visual.tokens[candidates], k, pivot)
        elif settings.select == "cls":
            per_crop = visual.cls_attn.shape[1]
            crops = candidate_sources.div(per_crop, rounding_mode="floor")
            order = todre.cls_top_k_per_crop(visual.cls_attn.flatten()[candidate_sources], crops, k)
        else:
            order = todre.cls_top_k(visual.cls_attn.flatten()[candidate_sources], k)
        kept = candidates[order]
        if settings.newlines == "keep":
            kept = torch.cat([kept, all_tokens[is_newline]])
        return kept.sort().values  # kept tokens enter the LLM in their original order

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        """(n,) ids -> (1, n, d) embeddings with the visual tokens scattered into the image positions."""
        x = self.language_model.embed_tokens(input_ids)
        is_visual = input_ids == self.config.image_token_index
        if int(is_visual.sum()) != (0 if visual is None else len(visual)):
            raise InputError(f"the prompt has {int(is_visual.sum())} image tokens for "
                             f"{0 if visual is None else len(visual)} visual tokens")
        if visual is not None:
            x[is_visual] = visual.to(x.dtype)
        return x[None]

    def prefill(self, input_ids: torch.Tensor, visual: torch.Tensor | None, settings: ToDRE,
                kv_cache: KVCache, all_logits: bool = False):
        """Run the prompt through the decoder, filling kv_cache; ToDRE Stage 2 happens in this loop.

        input_ids (n,) with one image token per row of `visual` (m, d). Returns (logits, info):
        logits (1, t, vocab) for every remaining token if all_logits, else for the last one only.
        """
        lm, cfg = self.language_model, self.config
        x = self.embed(input_ids, visual)
        positions = torch.arange(len(input_ids), device=input_ids.device)
        cos, sin = lm.rope(positions, x.dtype)
        is_visual = input_ids == cfg.image_token_index
        visual_pos = positions[is_visual]
        # S = the tokens before the image, V = the image, T = the text after it (SPEC §9).
        text_pos = positions[positions > visual_pos.max()] if len(visual_pos) else positions[:0]
        stage2 = len(visual_pos) > 0 and (settings.tau > 0 or settings.evict_layer is not None)
        probes = []
        if stage2 and settings.tau > 0:
            probes = settings.probe_layers or todre.probe_layers(len(lm.layers), settings.probe_fractions)
        info = PrefillInfo(prompt_len=len(input_ids))

        for i, layer in enumerate(lm.layers):
            x, q = layer(x, cos, sin, kv_cache, i)
            if not stage2 or info.evict_layer is not None:
                continue
            if i in probes:
                keys, _ = kv_cache.get(i)
                start = now(x.device)
                info.ratios[i] = todre.cross_modal_ratios(q[0], keys[0], visual_pos, text_pos)  # eq. 7
                info.probe_s += now(x.device) - start
            if i == settings.evict_layer or (i in info.ratios and all(r < settings.tau for r in info.ratios[i])):
                # Both a_tv and a_vt < tau: visual tokens leave the residual stream and this layer's
                # cache; later layers never see them. The rest keep their original positions.
                keep = ~is_visual
                x, cos, sin, positions = x[:, keep], cos[keep], sin[keep], positions[keep]
                kv_cache.keep(i, positions)
                info.evict_layer = i
        info.positions = positions
        return lm.logits(x if all_logits else x[:, -1:]), info

    def decode_step(self, token: int, position: int, kv_cache: KVCache) -> torch.Tensor:
        """One generated token at `position` -> next-token logits (vocab,)."""
        x = self.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
        return self.language_model(x, torch.tensor([position], device=self.device), kv_cache)[0, -1]

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, visual: torch.Tensor | None, settings: ToDRE,
                 max_new_tokens: int, temperature: float = 0.0, generator: torch.Generator | None = None,
                 stats: "Stats | None" = None) -> Iterator[int]:
        """Yield up to max_new_tokens token ids, stopping after EOS. Greedy when temperature == 0."""
        stats = stats if stats is not None else Stats()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
        max_len = self.config.text.max_position_embeddings
        if len(input_ids) + max_new_tokens > max_len:
            if visual is None:
                raise InputError(f"the prompt ({len(input_ids)} tokens) plus {max_new_tokens} new tokens exceeds the "
                                 f"model's {max_len}-token context: shorten the prompt or lower --max-new-tokens")
            raise InputError(f"the prompt ({len(input_ids)} tokens, {len(visual)} of them visual) plus {max_new_tokens} "
                             f"new tokens exceeds the model's {max_len}-token context: lower --max-new-tokens, "
                             "or prune more (--retain)")
        kv_cache = KVCache(len(self.language_model.layers), room=max_new_tokens)
        start = now(self.device)
        logits, stats.prefill = self.prefill(input_ids, visual, settings, kv_cache)
        logits = logits[0, -1]
        stats.prefill_s = now(self.device) - start
        position = len(input_ids)  # decoding continues at n, the prefill length, evicted tokens included
        start = now(self.device)
        for step in range(max_new_tokens):
            if temperature > 0:
                # In float64 (a temperature like 1e-300 is 0 in float32) and shifted by the maximum, so
                # a tiny temperature only sends the other tokens to -inf: it samples the argmax.
                probs = ((logits.double() - logits.max()) / temperature).softmax(-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits.argmax())
            stats.new_tokens = step + 1
            yield token
            if token == self.config.text.eos_token_id or step == max_new_tokens - 1:
                break
            logits = self.decode_step(token, position, kv_cache)
            position += 1
        stats.decode_s = now(self.device) - start
        stats.kv_cache_bytes = kv_cache.nbytes()


@dataclass
class PrefillInfo:
    prompt_len: int
    ratios: dict = field(default_factory=dict)  # probe layer -> (a_tv, a_vt), eq. 7
    evict_layer: int | None = None               # layer after which the visual tokens were removed
    positions: torch.Tensor | None = None        # positions of the tokens left at the end of prefill
    probe_s: float = 0.0                         # time spent measuring eq. 7 at the probe layers


@dataclass
class Stats:
    prefill: PrefillInfo | None = None
    prefill_s: float = 0.0
    decode_s: float = 0.0
    new_tokens: int = 0
    kv_cache_bytes: int = 0


def now(device: torch.device) -> float:
    """Wall clock after the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held on the device; CPU: this process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------------
# Prompt
# ---------------------------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: str, image_token: int, num_visual: int | None) -> torch.Tensor:
    """Token ids of the Vicuna prompt (SPEC §7), its one <image> expanded to num_visual image tokens.

    num_visual None: a text-only prompt. BOS comes from the tokenizer's own post-processor.
    """
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, kept by Python's argv decoding
        raise InputError(f"the prompt is not valid UTF-8 text (undecodable byte at character {e.start}): "
                         "use a UTF-8 terminal or locale, or re-encode the text") from None
    text = TEXT_PROMPT.format(prompt) if num_visual is None else IMAGE_PROMPT.format(prompt)
    ids = tokenizer.encode(text).ids
    if ids.count(image_token) != (0 if num_visual is None else 1):
        raise InputError("the prompt must not contain the image placeholder '<image>' itself")
    if num_visual is not None:
        at = ids.index(image_token)
        ids = ids[:at] + [image_token] * num_visual + ids[at + 1:]
    return torch.tensor(ids)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load(model_id: str = DEFAULT_MODEL, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a Hub id or a local directory."""
    directory = resolve_checkpoint(model_id)
    cfg = LlavaNextConfig.from_dir(directory)
    tokenizer = load_tokenizer(directory, cfg)
    with torch.device("meta"):
        model = LlavaNext(cfg)
    load_weights(model, directory, torch.device(device), dtype)
    return model.eval(), tokenizer
