"""transformers as the independent reference: what the tests and bench.py both build from it.

Never imported by the library files (clip, anyres, llama, todre, checkpoint, model, generate):
transformers is a test and benchmark dependency only (requirements-dev.txt).
"""

import transformers as tf

from anyres import LLAVA_NEXT_PINPOINTS as PINPOINTS


def image_processor(pinpoints=PINPOINTS, crop: int = 336) -> tf.LlavaNextImageProcessorPil:
    """LLaVA-NeXT's image processor on its PIL path. (The default `LlavaNextImageProcessor` switches to
    a torchvision resize whenever torchvision is installed, which differs by a few 1/255 steps.)"""
    return tf.LlavaNextImageProcessorPil(
        size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop}, image_grid_pinpoints=pinpoints
    )


def llava_config(
    model_type: str,
    vision: dict,
    text: dict,
    image_token: int,
    video_token: int | None = None,
    vision_feature_layer: int = -2,
    text_model: str = "llama",
    pinpoints=PINPOINTS,
):
    """transformers' config for a LLaVA checkpoint from plain dicts of CLIP vision and text fields:
    llava (1.5: no AnyRes), llava_next, or llava_next_video (2x2 average pooling of every frame)."""
    vision_config = tf.CLIPVisionConfig(**vision, projection_dim=32)
    text_config = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig}[text_model](**text)
    common = dict(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token,
        vision_feature_layer=vision_feature_layer,
    )
    if model_type == "llava":
        return tf.LlavaConfig(**common)
    if model_type == "llava_next_video":
        return tf.LlavaNextVideoConfig(
            **common,
            image_grid_pinpoints=pinpoints,
            video_token_index=video_token,
            spatial_pool_mode="average",
            spatial_pool_stride=2,
        )
    return tf.LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)


def clip_image_processor(size: int = 336) -> tf.CLIPImageProcessorPil:
    """CLIP's image processor on its PIL path: shortest edge to `size`, centre crop size x size.
    (transformers' video processor does the same per frame but needs torchvision, which would
    switch every other image processor here to its torchvision backend.)"""
    return tf.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def transformers_name(name: str) -> str:
    """Our parameter name -> transformers 5's LlavaNextForConditionalGeneration name (the reverse
    of checkpoint.hub_key for that layout)."""
    return "lm_head.weight" if name == "language_model.lm_head.weight" else "model." + name


def hub_name(name: str) -> str:
    """transformers 5's name -> the name in the Hub's llava-hf checkpoints (saved by transformers 4)."""
    for new, old in [
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.", ""),
    ]:
        if name.startswith(new):
            return old + name[len(new) :]
    raise ValueError(f"not a transformers 5 LLaVA-NeXT name: {name}")
