"""Checkpoints: find one (local directory or Hub id), read and check its configs, load its weights.

Everything that knows the files of a Hugging Face LLaVA checkpoint lives here: `config.json`,
`preprocessor_config.json`, `tokenizer.json`, the safetensors shards and their key layouts.
A checkpoint that cannot be used is a `CheckpointError` naming the file and the field.
Weights are only ever read from safetensors: never pickles, never code from the checkpoint.
"""

import math
import types
from dataclasses import fields
from pathlib import Path

import torch

import anyres
import files
import prompt
from clip import ACTIVATIONS, CLIPVisionConfig, layers_to_run
from files import FileProblem, os_error_text, read_file
from llama import LlamaConfig
from todre import is_count

DEFAULT_MODEL = "llava-hf/llava-v1.6-vicuna-7b-hf"
# Only configs, tokenizer files and safetensors are ever downloaded or read: never pickles.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.*", "*.jinja"]  # .jinja: chat templates, rendered in a sandbox


# The checkpoint families this project runs (config.json's model_type): LLaVA here and in model.py,
# Qwen2.5-VL in qwen.py.
LLAVA_TYPES = ("llava", "llava_next", "llava_next_video")
MODEL_TYPES = (*LLAVA_TYPES, "qwen2_5_vl")


class CheckpointError(Exception):
    """The checkpoint cannot be found or does not match this model; the message says what to do."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def read_config(directory: Path) -> dict:
    """The settings of the checkpoint in `directory` (config.json and preprocessor_config.json), as
    the keyword arguments of model.LlavaConfig: first parsed, then checked rule by rule, each
    failure a CheckpointError naming the file and the field."""
    path = directory / "config.json"
    cfg = read_json(path)
    pre_path, pre = preprocessor_config(directory)
    check_architecture(cfg, directory)
    vision, text = vision_config(cfg, path), text_config(cfg, path)
    check_shapes(vision, text, section(cfg, "text_config", path), path)
    settings = dict(
        text=text,
        vision=vision,
        model_type=cfg["model_type"],
        vision_feature_layer=feature_layer(cfg, vision, path),
        projector_bias=cfg.get("multimodal_projector_bias", True),
        image_token_index=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
        video_token_index=cfg.get("video_token_index", cfg.get("video_token_id", 32000))
        if "video" in cfg["model_type"]
        else None,
        spatial_pool_mode=cfg.get("spatial_pool_mode", "average"),
        spatial_pool_stride=cfg.get("spatial_pool_stride", 2),
        image_grid_pinpoints=None,  # LLaVA-1.5: one square crop
        **image_processing(pre, vision, pre_path),
    )
    require(
        isinstance(settings["projector_bias"], bool),
        path,
        f"multimodal_projector_bias must be true or false, got {settings['projector_bias']!r}",
    )
    check_placeholders(settings, text, path)
    check_pooling(settings, vision, path)
    if settings["model_type"] != "llava":  # LLaVA-NeXT tiles images onto these canvases
        settings["image_grid_pinpoints"] = cfg.get("image_grid_pinpoints") or pre.get("image_grid_pinpoints")
        check_pinpoints(settings["image_grid_pinpoints"], settings["crop_size"], path)
    return settings


def peek_model_type(model: str) -> str | None:
    """The model_type of a local directory or of a Hub id already in the local cache, from its
    config.json alone, without touching the network or the weights; None where it cannot be known
    that way (the full load then finds out)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            return model_type(path)
        if model.startswith((".", "/", "~")) or model.count("/") != 1:
            return None
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id=model, filename="config.json")
        return model_type(Path(cached).parent) if isinstance(cached, str) else None
    except Exception:  # a bad id or file: load() reports it properly
        return None


def model_type(directory: Path) -> str:
    """config.json's model_type: which file builds the model (model.load dispatches on it)."""
    found = read_json(directory / "config.json").get("model_type")
    return found if isinstance(found, str) else repr(found)


def check_architecture(cfg: dict, directory: Path) -> None:
    """A LLaVA of the kinds this project builds, with the feature strategy and projector it runs."""
    path = directory / "config.json"
    if cfg.get("model_type") not in LLAVA_TYPES:
        raise CheckpointError(
            f"{directory} holds a {cfg.get('model_type')!r} model; supported: {', '.join(MODEL_TYPES)}"
        )
    if cfg.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError(f"{path}: only vision_feature_select_strategy 'default' (drop [CLS]) is supported")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{path}: only a gelu projector (projector_hidden_act 'gelu') is supported")


def vision_config(cfg: dict, path: Path) -> CLIPVisionConfig:
    vision = build(CLIPVisionConfig, section(cfg, "vision_config", path), f"{path}: vision_config")
    if vision.hidden_act not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: vision_config.hidden_act {vision.hidden_act!r} is not supported "
            f"(supported: {', '.join(ACTIVATIONS)})"
        )
    return vision


def text_config(cfg: dict, path: Path) -> LlamaConfig:
    text = section(cfg, "text_config", path)
    tie = cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))  # transformers 5 keeps it on top
    return build(LlamaConfig, {**text, "tie_word_embeddings": tie}, f"{path}: text_config")


def check_shapes(vision: CLIPVisionConfig, text: LlamaConfig, text_dict: dict, path: Path) -> None:
    """Sizes that must divide one another for the model to be built at all."""
    require(
        vision.image_size % vision.patch_size == 0, path, "vision_config: image_size must be a multiple of patch_size"
    )
    require(
        vision.hidden_size % vision.num_attention_heads == 0,
        path,
        "vision_config: hidden_size must be a multiple of num_attention_heads",
    )
    require(
        text.num_attention_heads % text.num_key_value_heads == 0,
        path,
        "text_config: num_attention_heads must be a multiple of num_key_value_heads",
    )
    require(
        "head_dim" in text_dict or text.hidden_size % text.num_attention_heads == 0,
        path,
        "text_config: hidden_size must be a multiple of num_attention_heads",
    )


def feature_layer(cfg: dict, vision: CLIPVisionConfig, path: Path) -> int:
    layer = cfg.get("vision_feature_layer", -2)
    if not is_count(layer):
        raise CheckpointError(f"{path}: vision_feature_layer must be one integer, got {layer!r}")
    try:
        layers_to_run(layer, vision.num_hidden_layers)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return layer


def check_placeholders(settings: dict, text: LlamaConfig, path: Path) -> None:
    for name in ("image_token_index", "video_token_index"):
        token = settings[name]
        require(
            token is None or is_count(token) and 0 <= token < text.vocab_size,
            path,
            f"{name} must be an id below vocab_size {text.vocab_size}, got {token!r}",
        )


def check_pooling(settings: dict, vision: CLIPVisionConfig, path: Path) -> None:
    """Video: each frame's patch grid is pooled by a whole divisor of its side."""
    mode, stride = settings["spatial_pool_mode"], settings["spatial_pool_stride"]
    require(mode in ("average", "max"), path, f"spatial_pool_mode {mode!r} is not supported (supported: average, max)")
    grid = vision.image_size // vision.patch_size
    require(
        is_count(stride) and stride >= 1 and grid % stride == 0,
        path,
        f"spatial_pool_stride must be a whole divisor of the {grid}x{grid} patch grid, got {stride!r}",
    )


def image_processing(pre: dict, vision: CLIPVisionConfig, pre_path: Path) -> dict:
    """The image processor's crop, resize, mean and std (preprocessor_config.json)."""
    crop = pre.get("crop_size", vision.image_size)
    crop = crop.get("height") if isinstance(crop, dict) else crop
    if crop != vision.image_size:
        raise CheckpointError(
            f"{pre_path}: crop_size {crop!r} does not match the vision tower's image_size "
            f"{vision.image_size} in config.json"
        )
    size = pre.get("size", {"shortest_edge": crop})
    size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
    require(is_count(size) and size > 0, pre_path, f"size must give a positive shortest_edge, got {size!r}")
    mean, std = pre.get("image_mean", anyres.CLIP_MEAN), pre.get("image_std", anyres.CLIP_STD)
    for name, values in (("image_mean", mean), ("image_std", std)):
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(is_number(v) for v in values)):
            raise CheckpointError(f"{pre_path}: {name} must be 3 finite numbers, got {values!r}")
    if min(std) <= 0:
        raise CheckpointError(f"{pre_path}: image_std must be positive, got {std!r}")
    return dict(crop_size=crop, resize_shortest_edge=size, image_mean=tuple(mean), image_std=tuple(std))


def preprocessor_config(directory: Path) -> tuple[Path, dict]:
    """The image processor's settings: preprocessor_config.json (the Hub's llava-hf checkpoints),
    else the "image_processor" part of processor_config.json (what transformers 5 saves), else none."""
    path = directory / "preprocessor_config.json"
    if path.exists():
        return path, read_json(path)
    path = directory / "processor_config.json"
    if path.exists():
        section = read_json(path).get("image_processor", {})
        return path, section if isinstance(section, dict) else {}
    return directory / "preprocessor_config.json", {}


def require(ok: bool, path: Path, rule: str) -> None:
    if not ok:
        raise CheckpointError(f"{path}: {rule}")


MAX_CONFIG_BYTES = 64 << 20  # config, tokenizer and template files are kilobytes to a few MB


def read_json(path: Path) -> dict:
    """A JSON object from `path`, or a CheckpointError saying what is wrong with the file."""
    try:
        value = files.read_json(path, MAX_CONFIG_BYTES)
    except FileProblem as e:
        if e.missing:
            raise CheckpointError(f"{path} is missing: is {path.parent} a LLaVA checkpoint directory?") from None
        raise CheckpointError(str(e)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def section(cfg: dict, name: str, path: Path) -> dict:
    value = cfg.get(name, {})
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {name} must be a JSON object, got {value!r}")
    return value


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


FIELD_CHECKS = {
    int: (is_count, "an integer"),
    float: (is_number, "a finite number"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


# Sizes far beyond any real checkpoint, refused before a model of that size is built (a damaged or
# hostile config.json could otherwise ask for terabytes).
LARGEST = {
    "vocab_size": 1 << 21,
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1024,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 4096,
    "max_position_embeddings": 1 << 24,
    "sliding_window": 1 << 24,
    "image_size": 4096,
    "patch_size": 4096,
}


def build(config_class, values: dict, where: str):
    """config_class.from_dict(values), after checking every field's JSON type against the
    dataclass annotation and every size against zero; errors name the field."""
    for f in fields(config_class):
        value = values.get(f.name)
        if value is None:
            continue
        if f.name == "eos_token_id" and isinstance(value, list) and value and all(map(is_count, value)):
            continue  # Llama 3 lists several end-of-turn ids
        kinds = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
        checks = [FIELD_CHECKS[k] for k in kinds if k in FIELD_CHECKS]
        if checks and not any(check(value) for check, _ in checks):
            raise CheckpointError(f"{where}.{f.name} must be {checks[0][1]}, got {value!r}")
        positive = ("_size", "_layers", "_heads", "_eps", "head_dim", "rope_theta", "max_position_embeddings")
        if (f.name.endswith(positive) or f.name == "sliding_window") and value <= 0:
            raise CheckpointError(f"{where}.{f.name} must be positive, got {value!r}")
        if f.name in LARGEST and value > LARGEST[f.name]:
            raise CheckpointError(
                f"{where}.{f.name} is {value}, beyond any LLaVA checkpoint (at most {LARGEST[f.name]}): "
                "the config is damaged"
            )
    try:
        return config_class.from_dict(values)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None


def check_pinpoints(pinpoints, crop: int, path: Path) -> None:
    """AnyRes canvases [[h, w], ...]: at least one, each side a positive multiple of the crop size."""
    if not isinstance(pinpoints, list) or not pinpoints:
        raise CheckpointError(
            f"{path}: image_grid_pinpoints is missing or empty; LLaVA-NeXT needs its AnyRes "
            "canvases, e.g. [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"
        )
    for p in pinpoints:
        if not (
            isinstance(p, (list, tuple)) and len(p) == 2 and all(is_count(v) and v > 0 and v % crop == 0 for v in p)
        ):
            raise CheckpointError(
                f"{path}: image_grid_pinpoints entry {p!r} must be [height, width], "
                f"each a positive multiple of the crop size {crop}"
            )


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(model: str) -> Path:
    """A local directory as it is, or a Hub id downloaded (configs, tokenizer, safetensors only)."""
    if model == "":
        raise CheckpointError("the model is an empty path or id (an unset shell variable?)")
    path = Path(model).expanduser()
    try:
        is_dir = path.stat().st_mode & 0o170000 == 0o040000
    except FileNotFoundError:
        is_dir = None
    except OSError as e:
        raise CheckpointError(f"cannot open {model}: {os_error_text(e)}") from None
    if is_dir:
        return path
    if is_dir is False or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise CheckpointError(f"{model} is not a checkpoint directory")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=model, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise CheckpointError(f"{model} is neither a local directory nor a model on the Hugging Face Hub") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(
            f"cannot download {model} from the Hugging Face Hub ({type(e).__name__}); "
            "if you are offline, pass a local checkpoint directory with --model DIR"
        ) from None
    except HFValidationError:
        raise CheckpointError(f"{model} is neither a local directory nor a valid Hub model id") from None


def load_tokenizer(directory: Path, cfg) -> "prompt.PromptTokenizer":
    """The checkpoint's tokenizer.json, checked against the model config `cfg` (model.LlavaConfig:
    every id it can produce has an embedding; '<image>' is the config's image token), with its
    conversation format."""
    from tokenizers import Tokenizer

    path = directory / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_str(read_file(path, MAX_CONFIG_BYTES).decode("utf-8"))
    except Exception as e:  # the tokenizers library raises a bare Exception on a missing or bad file
        raise CheckpointError(f"cannot read {path} ({e})") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.text.vocab_size:
        raise CheckpointError(
            f"{path} has {size} token ids but the model embeds only vocab_size "
            f"{cfg.text.vocab_size} (config.json): the tokenizer belongs to another model"
        )
    for video in (False, True):
        text, expected = cfg.placeholder(video)
        found = tokenizer.token_to_id(text)
        if found != expected:
            what = f"has no {text!r} token" if found is None else f"maps {text!r} to id {found}"
            field = "video_token_index" if text == "<video>" else "image_token_index"
            raise CheckpointError(
                f"{path} {what}, but config.json's {field} is {expected}: "
                "the tokenizer and the config do not belong together"
            )
    text_model_type = read_json(directory / "config.json").get("text_config", {}).get("model_type", "llama")
    try:
        conversation = prompt.load_format(directory, text_model_type, tokenizer.get_vocab(with_added_tokens=True))
    except prompt.PromptError as e:
        raise CheckpointError(f"{directory}: {e}") from None
    return prompt.PromptTokenizer(tokenizer, conversation, cfg.placeholder)


def stop_ids(directory: Path, cfg, tokenizer: "prompt.PromptTokenizer") -> set[int]:
    """The ids that end an answer: config.json's EOS (Llama 3 lists several), generation_config.json's,
    and the token that ends the assistant's turn in the checkpoint's format (<|im_end|>, <|eot_id|>)."""
    ids = set(cfg.text.eos_token_ids)
    generation = directory / "generation_config.json"
    eos = read_json(generation).get("eos_token_id") if generation.exists() else None
    ids.update(eos if isinstance(eos, list) else [eos] if is_count(eos) else [])
    end_of_turn = tokenizer.end_of_turn_id()
    return ids | ({end_of_turn} if end_of_turn is not None else set())


def repetition_penalty(directory: Path) -> float:
    """generation_config.json's repetition_penalty (1.0 without one), which transformers' generate
    applies by default: Qwen2.5-VL's releases set 1.05; llava-hf's set none."""
    path = directory / "generation_config.json"
    penalty = read_json(path).get("repetition_penalty", 1.0) if path.exists() else 1.0
    if not (is_number(penalty) and penalty > 0):
        raise CheckpointError(f"{path}: repetition_penalty must be a positive number, got {penalty!r}")
    return float(penalty)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


def hub_key(key: str) -> str:
    """A checkpoint tensor name -> our module's parameter name. Every layout in one place:
    - Hub (transformers 4.x): vision_tower.vision_model.*, multi_modal_projector.*, image_newline,
      language_model.model.*, language_model.lm_head.weight
    - transformers 5.x: model.vision_tower[.vision_model].*, model.multi_modal_projector.*,
      model.image_newline, model.language_model.*, lm_head.weight
    """
    if key == "lm_head.weight":
        return "language_model.lm_head.weight"
    key = key.removeprefix("model.")
    key = key.replace("language_model.model.", "language_model.", 1)
    return key.replace("vision_tower.vision_model.", "vision_tower.", 1)


def unused_key(name: str, vision_layers_run: int) -> bool:
    """Checkpoint tensors we deliberately never load: vision layers after the feature layer and the
    post-LayerNorm (they never reach LLaVA), and buffers older checkpoints saved by mistake."""
    if name.startswith("vision_tower.post_layernorm.") or name.endswith((".position_ids", ".rotary_emb.inv_freq")):
        return True
    prefix = "vision_tower.encoder.layers."
    layer = name[len(prefix) :].split(".")[0] if name.startswith(prefix) else ""
    return layer.isdigit() and int(layer) >= vision_layers_run


def read_weights(
    directory: Path,
    expected: dict,
    device: torch.device,
    dtype: torch.dtype,
    skip,
    tied: dict | None = None,
    rename=hub_key,
) -> dict:
    """Every *.safetensors file in `directory` as {parameter name: tensor} on `device` in `dtype`.

    expected: {name: shape} of the model's parameters; skip(name): True for checkpoint tensors the
    model deliberately does not build; tied: {name: the name whose tensor it shares when the
    checkpoint omits it} (tie_word_embeddings); rename(key): a tensor's name -> our parameter's
    (hub_key: LLaVA's layouts). Refused, naming the tensor: a name in two shards,
    an integer tensor where a float weight belongs, a tensor holding NaN or inf, and any missing,
    unexpected or mis-shaped names.
    """
    from safetensors import SafetensorError, safe_open

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors weights (pickled .bin weights are never loaded)")
    # float64 sums see any NaN or inf and cannot overflow on finite weights; MPS has no float64.
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    state, source, unexpected, misshaped = {}, {}, [], []
    for file in files:
        if not file.is_file():  # a FIFO or device named *.safetensors would hang or never end
            raise CheckpointError(f"{file} is not a regular file")
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for key in f.keys():
                    name = rename(key)
                    if name not in expected:
                        if not skip(name):
                            unexpected.append(key)
                        continue
                    if name in source:
                        raise CheckpointError(
                            f"{key} is in two weight files, {source[name].name} and {file.name}: remove the stale one"
                        )
                    source[name] = file
                    tensor = f.get_tensor(key)
                    if not tensor.is_floating_point():
                        raise CheckpointError(f"{file}: {key} holds {tensor.dtype} values where float weights belong")
                    if tensor.shape != expected[name]:
                        misshaped.append(f"{key} {tuple(tensor.shape)} (expected {tuple(expected[name])})")
                    elif not torch.isfinite(tensor.sum(dtype=sum_dtype)):
                        raise CheckpointError(f"{file}: {key} holds NaN or inf values: the file is damaged")
                    state[name] = tensor.to(dtype)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file ({e})") from None
    for name, source_name in (tied or {}).items():
        if name not in state and source_name in state:
            state[name] = state[source_name]
    missing = sorted(set(expected) - set(state))
    problems = [
        f"{label} ({len(names)}): {', '.join(names[:5])}{', ...' if len(names) > 5 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if names
    ]
    if problems:
        raise CheckpointError(f"weights in {directory} do not match config.json: " + "; ".join(problems))
    return state
