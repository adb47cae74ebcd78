"""Llama decoder with a hand-written KV cache, as transformers' LlamaModel. Knows nothing of images.

Module names follow the Hub's `model.*` weights so loading is a prefix strip. The caller drives
the layer loop (model.py does, to run ToDRE's Stage 2 between layers); `Llama.forward` is the
plain loop for everything else.
"""

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

# transformers' defaults per text model_type: the Hub's LLaVA config.json omits most of them.
DEFAULTS = {
    "llama": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "mistral": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096 * 32,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        sliding_window=4096,
    ),
}


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    num_key_value_heads: int | None = None  # None = num_attention_heads (no GQA)
    head_dim: int | None = None  # None = hidden_size // num_attention_heads
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 decoders (Qwen2.5-VL) add a bias to the q, k and v projections
    bos_token_id: int = 1
    eos_token_id: int | list = 2  # Llama 3 lists several ids that end generation
    # Mistral's sliding-window attention: this implementation attends to the whole sequence, which
    # is the same thing as long as the sequence is no longer than the window (model.py checks).
    sliding_window: int | None = None
    # RoPE scaling (transformers' rope_type): "default", "linear" (positions divided by the factor)
    # or "dynamic" (NTK: the base grows once the sequence passes max_position_embeddings).
    rope_type: str = "default"
    rope_factor: float = 1.0

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else (self.eos_token_id,)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in DEFAULTS:
            raise ValueError(f"text model type {model_type!r} is not a Llama-architecture model (llama, mistral)")
        d = {**DEFAULTS[model_type], **d}
        d.update(rope_parameters(d))
        return cls(**{f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None})


ROPE_TYPES = ("default", "linear", "dynamic")


def rope_parameters(d: dict) -> dict:
    """rope_theta, rope_type and rope_factor as transformers reads them: `rope_scaling` (transformers
    4's key) wins over `rope_parameters` (transformers 5's), a rope_theta inside them over the
    top-level one, and "rope_type" over the older "type" (PreTrainedConfig.convert_rope_params_to_dict)."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling (or rope_parameters) must be an object, got {rope!r}")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"RoPE scaling {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    theta, factor = rope.get("rope_theta", d.get("rope_theta")), rope.get("factor", 1.0)
    for name, value in (("rope_theta", theta), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"RoPE {name} must be a positive number, got {value!r}")
    if rope_type != "default" and factor < 1:
        raise ValueError(f"RoPE scaling factor must be at least 1, got {factor!r}")
    return {"rope_theta": float(theta), "rope_type": rope_type, "rope_factor": float(factor)}


class KVCache:
    """Keys and values per layer, each layer with its own length.

    A layer's buffers are allocated at its first `update`, sized for that prefill plus `room` decoded
    tokens, so layers that never see the evicted visual tokens (ToDRE Stage 2) hold smaller buffers.
    """

    def __init__(self, num_layers: int, *, room: int):
        self.room = room
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append k, v (batch, kv_heads, t, head_dim) to `layer`; return all its keys and values so far."""
        if self.k[layer] is None:
            b, h, t, d = k.shape
            self.k[layer] = k.new_empty(b, h, t + self.room, d)
            self.v[layer] = v.new_empty(b, h, t + self.room, d)
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        if end > self.k[layer].shape[2]:  # writing past the buffer would silently drop keys
            raise ValueError(
                f"layer {layer}'s KV cache has room for {self.k[layer].shape[2]} tokens, not {end}: "
                "make the cache with room for every token to be decoded"
            )
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.lengths[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def get(self, layer: int):
        """All keys and values of `layer` so far, (batch, kv_heads, length, head_dim) each."""
        n = self.lengths[layer]
        return self.k[layer][:, :, :n], self.v[layer][:, :, :n]

    def keep(self, layer: int, index: torch.Tensor):
        """Keep only the entries at `index` (sequence positions) of `layer`, in a right-sized buffer."""
        for buffers in (self.k, self.v):
            kept = buffers[layer][:, :, index]
            buffers[layer] = torch.cat([kept, kept.new_empty(*kept.shape[:2], self.room, kept.shape[3])], dim=2)
        self.lengths[layer] = len(index)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)


def rope(positions: torch.Tensor, cfg: LlamaConfig, dtype: torch.dtype):
    """cos, sin (t, head_dim) for integer positions (t,), computed in float32 as transformers' Llama.

    Scaling as transformers' rope functions: "linear" divides the inverse frequencies (so the
    positions) by the factor; "dynamic" (NTK) raises the base once the sequence, up to the highest
    position asked for, is longer than max_position_embeddings. transformers keeps the dynamic
    frequencies of the longest sequence seen so far; computed per call, as here, they are the same
    for a prefill followed by decoding, where the sequence only grows.
    """
    dim, theta = cfg.head_dim, cfg.rope_theta
    if cfg.rope_type == "dynamic":
        seq_len = max(int(positions.max()) + 1 if len(positions) else 0, cfg.max_position_embeddings)
        grown = cfg.rope_factor * seq_len / cfg.max_position_embeddings - (cfg.rope_factor - 1)
        theta = theta * grown ** (dim / (dim - 2))
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)  # (dim / 2,)
    if cfg.rope_type == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (t, dim / 2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (t, dim): the half-split layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE with HF's half-split rotate_half (not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)  # the two halves of the last axis, (..., head_dim / 2) each
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # variance in float32, as transformers' LlamaRMSNorm
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache, layer: int):
        """x (b, t, d) -> (out (b, t, d), queries (b, heads, t, head_dim) after RoPE).

        The queries are returned so a caller can probe this layer's attention (ToDRE eq. 7)
        from them and the cached keys, without recomputing anything.
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)  # (b, heads, t, head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (b, kv_heads, t, head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k, v = kv_cache.update(layer, k, v)
        # Prefill (t > 1) starts from an empty cache, so a causal mask over (t, t) is the whole story;
        # a decoded token (t == 1) sees every cached entry.
        out = F.scaled_dot_product_attention(q, k, v, is_causal=t > 1, enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), q  # (b, t, heads * head_dim) -> (b, t, d)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, kv_cache: KVCache, layer: int):
        """-> (x after this layer, this layer's queries)."""
        h, q = self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, layer)
        x = x + h
        h = self.post_attention_layernorm(x)
        x = x + self.mlp.down_proj(F.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h))
        return x, q


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope(positions, self.config, dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(x)).float()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: KVCache) -> torch.Tensor:
        """Embeddings (b, t, d) at positions (t,) -> logits (b, t, vocab); appends to kv_cache."""
        cos, sin = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x, _ = layer(x, cos, sin, kv_cache, i)
        return self.logits(x)
