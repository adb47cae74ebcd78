"""Qwen2.5-VL's vision side, as transformers' Qwen2-VL image processor prepares images: the size
(`smart_resize`), and the pixels cut into the flat patch rows the vision tower takes.

Qwen2.5-VL keeps an image near its native resolution: both sides are rounded to multiples of 28
(a 14-pixel patch times the 2x2 PatchMerger), within a pixel budget (min/max_pixels from the
checkpoint's preprocessor_config.json), and every 2x2 block of patches becomes one LLM token.
Then the vision tower, as transformers' Qwen2_5_VisionTransformerPretrainedModel: a linear patch
embedding, blocks of RMSNorm, attention with 2-D rotary positions (within windows of 112 x 112
pixels, except the full-attention blocks of `fullatt_block_indexes`) and a SwiGLU MLP, and the
PatchMerger, which turns each 2x2 block of patches into one token in the LLM's width. Module names
follow the Hub's `visual.*` weights.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from anyres import CLIP_MEAN, CLIP_STD, normalize, to_rgb
from llama import RMSNorm, apply_rope

MIN_PIXELS = 56 * 56  # transformers' Qwen2VLImageProcessor defaults (size shortest_edge, longest_edge)
MAX_PIXELS = 28 * 28 * 1280
MAX_SIDE_RATIO = 200  # transformers refuses a longer side over 200 times the shorter


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(h, w) the image is resized to, as transformers' smart_resize: each side rounded to a
    multiple of `factor`; if that has more than max_pixels (or fewer than min_pixels) pixels, both
    sides scaled by one factor and floored (ceiled) to multiples instead, so the aspect ratio stays
    as close as it can. ValueError for an aspect ratio over 200."""
    if max(height, width) / min(height, width) > MAX_SIDE_RATIO:
        raise ValueError(
            f"a {width}x{height} image has one side more than {MAX_SIDE_RATIO} times the other, "
            "which Qwen2.5-VL's processor refuses"
        )
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def preprocess(
    image: Image.Image,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    mean=CLIP_MEAN,
    std=CLIP_STD,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Image -> (pixel_values (grid_h * grid_w, 3 * temporal * patch^2), grid (t, grid_h, grid_w)).

    As transformers' Qwen2VLImageProcessor: RGB, bicubic resize to smart_resize's size, x/255,
    (x - mean) / std, then patches in the order the PatchMerger reads them (each 2x2 block of
    patches consecutive), each patch repeated over the temporal_patch_size frames of an image.
    """
    image = to_rgb(image)
    width, height = image.size
    h, w = smart_resize(height, width, patch_size * merge_size, min_pixels, max_pixels)
    x = normalize(image.resize((w, h), Image.Resampling.BICUBIC), mean, std)  # (3, h, w)
    grid_h, grid_w = h // patch_size, w // patch_size
    m, p = merge_size, patch_size
    x = x.reshape(3, grid_h // m, m, p, grid_w // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)  # (gh, gw, mh, mw, 3, p, p)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], temporal_patch_size, p, p)  # one image: the same patch twice
    return x.reshape(grid_h * grid_w, 3 * temporal_patch_size * p * p), (1, grid_h, grid_w)


# ---------------------------------------------------------------------------------------------
# The vision tower
# ---------------------------------------------------------------------------------------------


@dataclass
class QwenVisionConfig:
    """The `vision_config` of a Qwen2.5-VL config.json, with the Hub's field names and defaults."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584  # the LLM's width
    hidden_act: str = "silu"
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels per window side
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    rope_theta: float = 10000.0


def patch_positions(grid_h: int, grid_w: int, merge: int) -> torch.Tensor:
    """(grid_h * grid_w, 2) (row, column) of each patch, in preprocess's order: 2x2 blocks
    row-major, the patches of a block row-major within it."""
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    blocks = (grid_h // merge, merge, grid_w // merge, merge)
    return torch.stack([x.reshape(blocks).transpose(1, 2).flatten() for x in (rows, cols)], dim=-1)


def windows(grid_h: int, grid_w: int, merge: int, per_side: int) -> tuple[torch.Tensor, list[int]]:
    """The merged tokens (2x2 blocks) reordered window by window (windows of per_side x per_side
    merged tokens, row-major over the grid, the last row and column of windows cut short), and each
    window's number of merged tokens, as transformers' get_vision_window_index."""
    h, w = grid_h // merge, grid_w // merge
    order, sizes = [], []
    for top in range(0, h, per_side):
        for left in range(0, w, per_side):
            block = torch.arange(h * w).reshape(h, w)[top : top + per_side, left : left + per_side].flatten()
            order.append(block)
            sizes.append(len(block))
    return torch.cat(order), sizes


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spans: list[int], received: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (n, d) -> (n, d), each token attending within its span (consecutive runs of `spans`
        tokens); with received=True also the attention each token receives, averaged over heads and
        over the queries of its span (n,), else None."""
        n, d = x.shape
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, d // self.heads).permute(1, 2, 0, 3)  # (heads, n, hd) each
        dtype = q.dtype
        q, k = apply_rope(q.float(), cos, sin).to(dtype), apply_rope(k.float(), cos, sin).to(dtype)  # in float32, as HF
        out = attend_within(q, k, v, spans)  # (heads, n, hd)
        attention = None
        if received:
            pairs = zip(q.split(spans, 1), k.split(spans, 1), strict=True)
            attention = torch.cat([received_attention(q_, k_) for q_, k_ in pairs])
        return self.proj(out.transpose(0, 1).reshape(n, d)), attention


def attend_within(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[int]) -> torch.Tensor:
    """Attention (heads, n, head_dim) with each token seeing only its own span (consecutive runs of
    `spans` tokens). Spans of one length go through one batched call: an image's windows are all
    the same size but for its last row and column, so a block takes a few calls, not one a window."""
    heads, n, head_dim = q.shape
    out = torch.empty_like(q)
    starts = torch.tensor([0, *spans[:-1]]).cumsum(0).tolist()
    by_length: dict[int, list[int]] = {}
    for start, length in zip(starts, spans, strict=True):
        by_length.setdefault(length, []).append(start)
    for length, firsts in by_length.items():
        index = (torch.tensor(firsts)[:, None] + torch.arange(length)).flatten().to(q.device)  # (g * length,)
        # (heads, g * length, hd) -> (g, heads, length, hd): the windows of this length side by side
        q_, k_, v_ = (x[:, index].unflatten(1, (len(firsts), length)).transpose(0, 1) for x in (q, k, v))
        attended = F.scaled_dot_product_attention(q_, k_, v_)  # (g, heads, length, hd)
        out[:, index] = attended.transpose(0, 1).flatten(1, 2)
    return out


def received_attention(q: torch.Tensor, k: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(n,) the attention each key receives: softmax(q k^T / sqrt(head_dim)) averaged over heads and
    queries, in float32, `chunk` queries at a time (never the whole n x n matrix of a large image)."""
    heads, n, head_dim = q.shape
    total = torch.zeros(n, device=q.device)
    for part in q.float().split(chunk, dim=1):
        total += ((part @ k.float().transpose(1, 2)) * head_dim**-0.5).softmax(-1).sum(dim=(0, 1))
    return total / (heads * n)


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, 1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = F.silu if cfg.hidden_act == "silu" else F.gelu

    def forward(self, x, cos, sin, spans, received: bool = False):
        attended, attention = self.attn(self.norm1(x), cos, sin, spans, received)
        x = x + attended
        h = self.norm2(x)
        return x + self.mlp.down_proj(self.act(self.mlp.gate_proj(h)) * self.mlp.up_proj(h)), attention


class VisionTower(nn.Module):
    """Qwen2.5-VL's vision transformer and PatchMerger: patch rows (preprocess) -> LLM tokens."""

    def __init__(self, cfg: QwenVisionConfig):
        super().__init__()
        self.config = cfg
        self.patch_embed = nn.Module()  # a Conv3d with kernel = stride: a linear map of each flattened patch
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.patch_embed.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        merged = cfg.hidden_size * cfg.spatial_merge_size**2
        self.merger = nn.Module()
        self.merger.ln_q = RMSNorm(cfg.hidden_size, 1e-6)
        self.merger.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, head_dim) for (n, 2) patch (row, column) positions: a quarter of the
        frequencies of a head_dim / 2 rotation for the row, the same for the column, then repeated
        (the half-split layout), as transformers' Qwen2_5_VLVisionRotaryEmbedding."""
        head_dim = self.config.hidden_size // self.config.num_heads
        quarter = torch.arange(0, head_dim // 2, 2, device=positions.device).float() / (head_dim // 2)
        inv_freq = 1.0 / self.config.rope_theta**quarter  # (head_dim / 4,)
        freqs = (positions[..., None].float() * inv_freq).flatten(1)  # (n, head_dim / 2): rows', then columns'
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos()[None], emb.sin()[None]  # (1, n, head_dim), for every head

    def pivot_block(self) -> int:
        """The block whose attention picks Stage 1's pivot: the last full-attention block (the last
        block when the config names none)."""
        return max(self.config.fullatt_block_indexes, default=self.config.depth - 1)

    def forward(self, pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """pixel_values (grid_h * grid_w, patch_dim) of one image, grid (1, grid_h, grid_w) ->
        (tokens (grid_h * grid_w / 4, out_hidden_size), received (grid_h * grid_w / 4,)), row-major
        over the merged grid. `received`: the attention each merged token's 4 patches receive in
        pivot_block, averaged over heads and queries, summed over the 4 (Stage 1's pivot score)."""
        cfg = self.config
        _, grid_h, grid_w = grid
        merge, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        weight = self.patch_embed.proj.weight  # (hidden, 3, temporal, patch, patch)
        x = F.linear(pixel_values.to(weight.dtype), weight.flatten(1))  # (n, hidden): the Conv3d, patch by patch
        order, sizes = windows(grid_h, grid_w, merge, cfg.window_size // merge // cfg.patch_size)
        # Window attention needs each window's tokens consecutive: the 2x2 blocks are reordered window by
        # window (each block's 4 patches stay together), and put back after the merger.
        x = x.reshape(-1, unit, x.shape[-1])[order].flatten(0, 1)
        positions = patch_positions(grid_h, grid_w, merge).to(x.device)
        positions = positions.reshape(-1, unit, 2)[order].flatten(0, 1)
        cos, sin = self.rope(positions, x.dtype)
        window_spans, whole = [size * unit for size in sizes], [len(x)]
        received = None
        for i, block in enumerate(self.blocks):
            spans = whole if i in cfg.fullatt_block_indexes else window_spans
            x, attention = block(x, cos, sin, spans, received=i == self.pivot_block())
            received = attention if attention is not None else received
        merged = self.merger.mlp(self.merger.ln_q(x).reshape(-1, unit * x.shape[-1]))  # (n / 4, out)
        back = torch.argsort(order.to(x.device))
        return merged[back], received.reshape(-1, unit).sum(dim=1)[back]
