"""Qwen2.5-VL with ToDRE's Stage 2: the vision tower (qwen_vision.py), the Qwen2 decoder (llama.py's
layers with biased q/k/v projections) and its multimodal RoPE (M-RoPE), as transformers'
Qwen2_5_VLForConditionalGeneration computes them.

M-RoPE gives every token three positions (time, row, column): text tokens the same number three
times, counting on; an image's merged tokens the position where the image starts plus (0, their
row, their column), after which the text counts on from the image's largest position + 1. The
head dimension's rotary frequencies are split into three sections (mrope_section), each rotated
by one of the three positions.

`load` reads a checkpoint directory (config.json and safetensors, both layouts). Not yet here: the
Hub download and chat template (checkpoint.py, prompt.py), Stage 1 on the merged tokens, and the
programs; the model computes what transformers does (tested on tiny random checkpoints).
"""

from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

import todre
from checkpoint import CheckpointError, read_json, read_weights
from llama import KVCache, Llama, LlamaConfig
from model import PrefillInfo
from qwen_vision import QwenVisionConfig, VisionTower


@dataclass
class QwenVLConfig:
    text: LlamaConfig
    vision: QwenVisionConfig
    image_token_id: int = 151655  # <|image_pad|>: one per merged visual token
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])  # rotary frequencies for (t, h, w)


class QwenVL(nn.Module):
    def __init__(self, cfg: QwenVLConfig):
        super().__init__()
        self.config = cfg
        self.visual = VisionTower(cfg.vision)
        self.language_model = Llama(cfg.text)

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def positions(self, input_ids: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """(3, n) M-RoPE positions (time, row, column) for a prompt whose images (in order, one run of
        image ids each, `grids` their patch grids) are its runs of image_token_id, as transformers'
        get_rope_index."""
        merge = self.config.vision.spatial_merge_size
        is_image = (input_ids == self.config.image_token_id).tolist()
        parts, start, i, images = [], 0, 0, iter(grids)
        while i < len(is_image):
            j = i
            while j < len(is_image) and is_image[j] == is_image[i]:
                j += 1
            if not is_image[i]:  # text: the same position three times, counting on
                parts.append(torch.arange(start, start + j - i).expand(3, -1))
                start += j - i
            else:  # an image: (start, start + row, start + column) over its merged grid
                _, grid_h, grid_w = next(images)
                h, w = grid_h // merge, grid_w // merge
                if h * w != j - i:
                    raise ValueError(f"{j - i} image tokens for a {h}x{w} grid of merged tokens")
                rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
                parts.append(
                    torch.stack([torch.zeros(h * w, dtype=torch.long), rows.flatten(), cols.flatten()]) + start
                )
                start += max(h, w)
            i = j
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
    def encode_image(self, pixel_values: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """Patch rows (qwen_vision.preprocess) -> (merged tokens, hidden_size) in the LLM's space."""
        return self.visual(pixel_values.to(self.device), grid)

    @torch.inference_mode()
    def prefill(
        self,
        input_ids: torch.Tensor,
        visual_embeds: torch.Tensor | None,
        grids: list[tuple[int, int, int]],
        settings: todre.Settings,
        kv_cache: KVCache,
        all_logits: bool = False,
    ) -> tuple[torch.Tensor, PrefillInfo]:
        """As model.Llava.prefill, with M-RoPE positions: the prompt through the decoder, Stage 2 in
        the layer loop; evicted visual tokens leave with their positions, the rest keep theirs."""
        lm = self.language_model
        x = lm.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        if visual_embeds is not None:
            x[is_image] = visual_embeds.to(x.dtype)
        x = x[None]
        positions = self.positions(input_ids, grids) if visual_embeds is not None else None
        if positions is None:
            positions = torch.arange(len(input_ids), device=input_ids.device).expand(3, -1)
        cos, sin = self.rope(positions, x.dtype)
        next_position = int(positions.max()) + 1  # where decoding continues (transformers' rope_deltas)
        visual, text = todre.token_sets(is_image)
        stage2 = todre.Stage2(settings, len(lm.layers), visual, text)
        for i, layer in enumerate(lm.layers):
            x, q = layer(x, cos, sin, kv_cache, i)
            keep = stage2.after_layer(i, q[0], kv_cache.get(i)[0][0])
            if keep is not None:  # the image leaves; every other token keeps its 3-D position (paper §4.2)
                x, cos, sin, positions = x[:, keep], cos[keep], sin[keep], positions[:, keep]
                kv_cache.keep(i, keep)
        info = PrefillInfo(stage2.ratios, stage2.evict_layer, positions)
        info.next_position = next_position
        return lm.logits(x if all_logits else x[:, -1:]), info

    @torch.inference_mode()
    def decode_step(self, token: int, position: int, kv_cache: KVCache) -> torch.Tensor:
        """One generated token at text `position` (the same number three times) -> logits (vocab,)."""
        x = self.language_model.embed_tokens(torch.tensor([[token]], device=self.device))
        cos, sin = self.rope(torch.tensor([position], device=self.device).expand(3, -1), x.dtype)
        for i, layer in enumerate(self.language_model.layers):
            x, _ = layer(x, cos, sin, kv_cache, i)
        return self.language_model.logits(x)[0, -1]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def read_config(directory: Path) -> QwenVLConfig:
    """A Qwen2.5-VL config.json: the text fields at the top level (Qwen's own release) or under
    text_config (transformers 5), rope_theta and mrope_section under rope_scaling or rope_parameters."""
    path = directory / "config.json"
    cfg = read_json(path)
    if cfg.get("model_type") != "qwen2_5_vl":
        raise CheckpointError(
            f"{path}: model_type {cfg.get('model_type')!r} is not Qwen2.5-VL (qwen2_5_vl); "
            "Qwen2-VL and Qwen3-VL are not supported"
        )
    text = {**cfg, **cfg.get("text_config", {})}
    rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
    names = {f.name for f in fields(LlamaConfig)}
    text_fields = {k: v for k, v in text.items() if k in names and v is not None}
    text_fields.update(rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1000000.0))), qkv_bias=True)
    text_fields.setdefault("rms_norm_eps", 1e-6)
    vision_names = {f.name for f in fields(QwenVisionConfig)}
    vision = {k: v for k, v in cfg.get("vision_config", {}).items() if k in vision_names}
    vision.setdefault("out_hidden_size", text_fields.get("hidden_size"))
    try:
        return QwenVLConfig(
            LlamaConfig(**text_fields),
            QwenVisionConfig(**vision),
            cfg.get("image_token_id", text.get("image_token_id", 151655)),
            list(rope.get("mrope_section", [16, 24, 24])),
        )
    except TypeError as e:  # a required field missing
        raise CheckpointError(f"{path}: {e}") from None


def qwen_key(key: str) -> str:
    """A checkpoint tensor name -> ours. Qwen's release: visual.*, model.* (the decoder), lm_head;
    transformers 5: model.visual.*, model.language_model.*, lm_head."""
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    key = key.removeprefix("model.")
    return key if key.startswith(("visual.", "language_model.")) else "language_model." + key


def load(directory, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> QwenVL:
    """A Qwen2.5-VL model from a local checkpoint directory (config.json, *.safetensors)."""
    directory = Path(directory)
    cfg = read_config(directory)
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
