"""CLIP ViT vision tower (transformers' CLIPVisionModel), run only up to the layer whose output LLaVA uses.

Module names follow the Hub's `vision_model.*` weights so loading is a prefix strip.
Besides the features, `forward` can return the [CLS] -> patch attention of the feature layer,
averaged over heads: ToDRE's pivot score (paper eq. 3).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CLIPVisionConfig:
    # Defaults are transformers' CLIPVisionConfig defaults: the Hub's config.json omits some of them.
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPVisionConfig":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
}


def layers_to_run(feature_layer: int, num_layers: int) -> int:
    """How many encoder layers produce hidden state `feature_layer` (HF indexing: 0 = embeddings)."""
    n = feature_layer + num_layers + 1 if feature_layer < 0 else feature_layer
    if not 1 <= n <= num_layers:
        raise ValueError(f"vision_feature_layer {feature_layer} is not the output of an encoder layer")
    return n


class Attention(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.heads = cfg.num_attention_heads
        d = cfg.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):
        b, n, d = x.shape
        # (b, n, d) -> (b, heads, n, head_dim) each
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, n, head_dim)
        cls_attn = None
        if return_cls_attn:
            # ToDRE's pivot score (paper eq. 3). The paper says "the [CLS] attention from the last layer
            # of the vision encoder"; we take the layer LLaVA takes its features from (the penultimate
            # for the Hub checkpoints, FasterVLM's choice too), which is the last layer LLaVA runs.
            # Only the [CLS] query row needs explicit probabilities: one extra (1 x n) row per head.
            scores = (q[:, :, :1].float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5  # (b, heads, 1, n)
            cls_attn = scores.softmax(dim=-1).mean(dim=1)[:, 0, 1:]  # (b, n - 1): CLS -> patches
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), cls_attn  # (b, n, d) again


class EncoderLayer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.mlp.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor, return_cls_attn: bool = False):
        h, cls_attn = self.self_attn(self.layer_norm1(x), return_cls_attn)
        x = x + h
        x = x + self.mlp.fc2(self.act(self.mlp.fc1(self.layer_norm2(x))))
        return x, cls_attn


class VisionTower(nn.Module):
    """CLIP ViT with only the first `num_layers` encoder layers (the rest never influence LLaVA)."""

    def __init__(self, cfg: CLIPVisionConfig, num_layers: int):
        super().__init__()
        d, n_patches = cfg.hidden_size, (cfg.image_size // cfg.patch_size) ** 2
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(cfg.num_channels, d, cfg.patch_size, cfg.patch_size, bias=False)
        self.embeddings.class_embedding = nn.Parameter(torch.zeros(d))
        self.embeddings.position_embedding = nn.Embedding(n_patches + 1, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)  # sic: the Hub's spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(num_layers))

    def forward(self, pixel_values: torch.Tensor, return_cls_attn: bool = False):
        """pixel_values (crops, 3, S, S) -> features (crops, 1 + patches, d) of the last layer run,
        and that layer's head-averaged [CLS] -> patch attention (crops, patches), or None."""
        emb = self.embeddings
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype))  # (crops, d, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (crops, patches, d), row-major
        cls = emb.class_embedding.expand(patches.shape[0], 1, -1)  # (crops, 1, d)
        x = torch.cat([cls, patches], dim=1) + emb.position_embedding.weight
        x = self.pre_layrnorm(x)
        last = len(self.encoder.layers) - 1
        cls_attn = None
        for i, layer in enumerate(self.encoder.layers):
            x, cls_attn = layer(x, return_cls_attn and i == last)
        return x, cls_attn
