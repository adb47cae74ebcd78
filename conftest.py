"""What the tests share: tiny random checkpoints, images, the command line, and the independent
references every claim is checked against.

References: Hugging Face transformers (LlavaNext, its PIL image processor and processor, in eager
attention mode), brute-force transcriptions of the paper's equations, and a dense masked forward
built from transformers' own layers. The checkpoints are tiny random LLaVA-NeXTs made here, once
per test session.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import generate
import model
import prompt
import todre
from evaluation import reference
from llama import KVCache

HERE = Path(__file__).parent
PINPOINTS = reference.PINPOINTS
QUESTION = "What is in the image?"

# Two decoder shapes: multi-head with 2 layers and vision feature layer -2 (the Hub's), grouped-query
# with 8 layers (probe layers 3..6) and feature layer -1 (all vision layers run).
SHAPES = {
    "mha": dict(hidden=64, heads=4, kv_heads=4, layers=2, v_hidden=32, v_heads=4, v_layers=3, feature_layer=-2),
    "gqa": dict(hidden=96, heads=6, kv_heads=2, layers=8, v_hidden=48, v_heads=4, v_layers=2, feature_layer=-1),
}


# ---------------------------------------------------------------------------------------------
# Tiny checkpoints
# ---------------------------------------------------------------------------------------------

# Chat templates in the style of the llava-hf checkpoints', rendering the formats transformers'
# LLaVA-NeXT documentation gives for each family. (Test data: the loader must take them as they come.)
IMAGES_THEN_TEXT = (
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif c['type'] == 'video' %}{{ '<video>\\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
)
TEMPLATES = {
    "vicuna": "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ message['content'][0]['text'] + ' ' }}{% else %}{{ message['role'].upper() + ': ' }}"
    + IMAGES_THEN_TEXT
    + "{{ ' ' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}",
    "mistral": "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    + IMAGES_THEN_TEXT
    + "{{ ' [/INST]' }}{% endif %}{% endfor %}",
    "chatml": "{{ '<|im_start|>system\\nAnswer the questions.<|im_end|>' }}{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    + IMAGES_THEN_TEXT
    + "{{ '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    + IMAGES_THEN_TEXT
    + "{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
}
# Special tokens beside the placeholders, the BOS and the end-of-generation ids, per family.
FAMILY_TOKENS = {
    "vicuna": ([], "<s>", ["</s>"]),
    "mistral": ([], "<s>", ["</s>"]),
    "chatml": (["<|im_start|>", "<|im_end|>"], "<s>", ["</s>"]),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        "<|begin_of_text|>",
        ["<|end_of_text|>", "<|eot_id|>"],
    ),
}
CORPUS = [
    prompt.VICUNA_SYSTEM + " USER: What is in the image? ASSISTANT: [INST] Answer the questions. [/INST]",
    "the quick brown fox jumps over the lazy dog 0123456789 .,;:!?'\n Tell me about it. What is in this picture?",
]


def sentencepiece_style_tokenizer(specials: list[str]) -> Tokenizer:
    """A SentencePiece-style BPE tokenizer.json, as the Llama-2, Mistral and Yi checkpoints ship:
    spaces as '▁', a '▁' prepended to every piece of text (the legacy normalizer, applied per
    segment between special tokens), byte fallback for any other character, <s> added as BOS."""
    trainer = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    trainer.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    learned = json.loads(trainer.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for token in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = trainer.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>", *specials])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    """A byte-level BPE tokenizer.json, as Llama 3's (no '▁', BOS <|begin_of_text|> by post-processor)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        CORPUS * 3, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet, special_tokens=specials)
    )
    bos = specials[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every part of the model moves the logits by O(1), so a wrong detail
    cannot hide under 1e-4. Vision and projector matrices ~ N(0, 1/fan_in) keep the visual features
    O(1), so 1e-5 on them is a real bound. Decoder matrices are 2x that (1.5x for queries and keys) so
    greedy decoding does not collapse into one repeated token; sharper attention than that only
    amplifies float32 rounding (eager vs fused softmax) past 1e-4 without testing anything more."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                scale = 1.0
                if "language_model" in name:
                    scale = 1.5 if name.endswith(("q_proj.weight", "k_proj.weight")) else 2.0
                p.copy_(scale * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)


class Checkpoint:
    """A tiny random LLaVA checkpoint saved by transformers (model, processor, tokenizer, chat
    template), with HF's model/processor and ours loaded from it, and short helpers for the chains
    the tests repeat (prompt ids, prefill, prune).

    model_type: llava (1.5), llava_next or llava_next_video; family: the conversation format and
    tokenizer (vicuna, mistral, chatml: SentencePiece-style; llama3: byte-level); text: the
    transformers text config class (llama or mistral) with any overrides.
    """

    def __init__(
        self,
        directory: Path,
        shape: str,
        seed: int,
        model_type: str = "llava_next",
        family: str = "vicuna",
        text_model: str = "llama",
        **text_overrides,
    ):
        s = SHAPES[shape]
        directory.mkdir(parents=True, exist_ok=True)
        extra, bos, eos = FAMILY_TOKENS[family]
        placeholders = ["<image>", "<video>"] if model_type == "llava_next_video" else ["<image>"]
        build = byte_level_tokenizer if family == "llama3" else sentencepiece_style_tokenizer
        tokenizer = build([*extra, *placeholders])
        tokenizer.save(str(directory / "tokenizer.json"))
        image_token, video_token = tokenizer.token_to_id("<image>"), tokenizer.token_to_id("<video>")
        eos_ids = [tokenizer.token_to_id(t) for t in eos]
        vision = dict(
            hidden_size=s["v_hidden"],
            intermediate_size=2 * s["v_hidden"],
            num_hidden_layers=s["v_layers"],
            num_attention_heads=s["v_heads"],
            image_size=336,
            patch_size=14,
        )
        text = dict(
            vocab_size=tokenizer.get_vocab_size() + 16,
            hidden_size=s["hidden"],
            intermediate_size=2 * s["hidden"],
            num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"],
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            bos_token_id=tokenizer.token_to_id(bos),
            eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0],
            pad_token_id=0,
            **text_overrides,
        )
        config = reference.llava_config(
            model_type, vision, text, image_token, video_token, s["feature_layer"], text_model
        )
        model_class = {
            "llava": tf.LlavaForConditionalGeneration,
            "llava_next": tf.LlavaNextForConditionalGeneration,
            "llava_next_video": tf.LlavaNextVideoForConditionalGeneration,
        }[model_type]
        self.hf = model_class._from_config(config, attn_implementation="eager").eval()
        randomize(self.hf, seed)
        self.hf.save_pretrained(directory)
        if model_type == "llava":
            self.image_processor = reference.clip_image_processor(336)
        else:
            self.image_processor = reference.image_processor(PINPOINTS)
        hf_tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_file=str(directory / "tokenizer.json"),
            bos_token=bos,
            eos_token=eos[0],
            unk_token="<unk>" if family != "llama3" else None,
        )
        processor_class = tf.LlavaProcessor if model_type == "llava" else tf.LlavaNextProcessor
        self.processor = processor_class(
            image_processor=self.image_processor,
            tokenizer=hf_tokenizer,
            chat_template=TEMPLATES[family],
            patch_size=14,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
        self.processor.save_pretrained(directory)  # tokenizer_config.json, chat_template.jinja, processor_config.json
        self.image_processor.save_pretrained(directory)  # preprocessor_config.json, as the Hub's llava-hf checkpoints
        self.directory, self.shape, self.layers, self.family = directory, shape, s["layers"], family
        self.model, self.tokenizer = model.load(str(directory))
        self.image_token = self.model.config.image_token_index

    def hf_text(self, question=QUESTION, media: str | None = "image") -> str:
        """transformers' apply_chat_template on the conversation (media: "image", "video" or None);
        for Vicuna with LLaVA's system prompt as a system message, as LLaVA's evaluation prompted it."""
        content = ([{"type": media}] if media else []) + [{"type": "text", "text": question}]
        conversation = [{"role": "user", "content": content}]
        if self.family == "vicuna":
            conversation.insert(0, {"role": "system", "content": [{"type": "text", "text": prompt.VICUNA_SYSTEM}]})
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    def hf_inputs(self, image=None, question=QUESTION):
        text = self.hf_text(question, "image" if image is not None else None)
        return self.processor(images=image, text=text, return_tensors="pt")

    def prompt(self, num_visual: int | None, question: str = QUESTION, video: bool = False) -> torch.Tensor:
        """Our prompt ids with num_visual image (or video) tokens (None: text only)."""
        return model.prompt_ids(self.tokenizer, question, num_visual, video)

    @torch.inference_mode()
    def prefill(self, ids, visual_embeds, settings=todre.NO_PRUNING, room: int = 0):
        """Our prefill on a fresh cache: (logits (n', vocab) of every remaining token, info, cache)."""
        kv_cache = self.model.new_kv_cache(room) if room else KVCache(self.layers, room=0)
        logits, info = self.model.prefill(ids, visual_embeds, settings, kv_cache, all_logits=True)
        return logits[0], info, kv_cache

    @torch.inference_mode()
    def pruned(self, image, settings):
        """Encode `image`, run Stage 1: (visual tokens, kept indices, prompt ids for the kept tokens)."""
        visual = self.model.encode_image(image)
        kept = self.model.select(visual, settings)
        return visual, kept, self.prompt(len(kept))


@pytest.fixture(scope="session")
def mha(tmp_path_factory):
    return Checkpoint(tmp_path_factory.mktemp("mha"), "mha", seed=3)


@pytest.fixture(scope="session")
def gqa(tmp_path_factory):
    return Checkpoint(tmp_path_factory.mktemp("gqa"), "gqa", seed=5)


@pytest.fixture(scope="session")
def video_ckpt(tmp_path_factory):
    """A tiny llava_next_video checkpoint (transformers' LlavaNextVideoForConditionalGeneration)."""
    return Checkpoint(tmp_path_factory.mktemp("video"), "mha", seed=4, model_type="llava_next_video")


@pytest.fixture(params=list(SHAPES))
def ckpt(request):
    """Each of the two tiny checkpoints in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def image_processor():
    return reference.image_processor(PINPOINTS)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def resave(ckpt: Checkpoint, directory: Path, state: dict) -> Path:
    """A copy of the checkpoint's JSON files with `state` as its only weights file."""
    directory.mkdir()
    for f in ckpt.directory.glob("*.json"):
        shutil.copy(f, directory)
    save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory


def hf_runtime_state(ckpt: Checkpoint) -> dict:
    """transformers 5's own parameter names: model.vision_tower.*, model.language_model.*, lm_head.weight."""
    return {k: v.detach().clone() for k, v in ckpt.hf.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    """generate.py's main in this process: (exit code, stdout, stderr)."""
    code = generate.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def cli_args(ckpt, *extra):
    return ["--model", str(ckpt.directory), "--prompt", QUESTION, "--device", "cpu", "--dtype", "float32", *extra]


def one_line_error(capsys, argv, message, code=2):
    returned, out, err = run_cli(capsys, *argv)
    assert returned == code and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def cli_process(ckpt, tmp_path, *extra, **popen):
    """generate.py in a subprocess on a small image, as a shell would start it."""
    noise_image(120, 90, seed=40).save(tmp_path / "photo.png")
    argv = [sys.executable, str(HERE / "generate.py"), *cli_args(ckpt, "--image", str(tmp_path / "photo.png"), *extra)]
    return subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, **popen
    )


# ---------------------------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------------------------


def hf_packed_features(ckpt: Checkpoint, inputs) -> torch.Tensor:
    return ckpt.hf.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]


def hf_cls_attention(ckpt: Checkpoint, pixel_values: torch.Tensor) -> torch.Tensor:
    """[CLS] -> patch attention of the feature layer, head-averaged, from HF's eager attention weights."""
    out = ckpt.hf.model.vision_tower(pixel_values, output_attentions=True)
    s = SHAPES[ckpt.shape]
    feature_layer_index = s["feature_layer"] % (s["v_layers"] + 1) - 1  # hidden_states[f] = output of layer f-1
    return out.attentions[feature_layer_index][:, :, 0, 1:].mean(dim=1)  # (crops, 576)


def hf_embeddings(ckpt: Checkpoint, input_ids: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    embeds = ckpt.hf.model.language_model.embed_tokens(input_ids[None]).clone()
    embeds[0, input_ids == ckpt.image_token] = visual_embeds
    return embeds


def hf_logits(ckpt: Checkpoint, input_ids: torch.Tensor, visual_embeds: torch.Tensor) -> torch.Tensor:
    """transformers' language model and head on our prompt with these visual tokens: (n, vocab)."""
    hidden = ckpt.hf.model.language_model(inputs_embeds=hf_embeddings(ckpt, input_ids, visual_embeds)).last_hidden_state
    return ckpt.hf.lm_head(hidden)[0]


def dense_forward(ckpt: Checkpoint, embeds: torch.Tensor, allowed) -> torch.Tensor:
    """Logits from transformers' own Llama layers with an explicit (n, n) attention mask per layer:
    `allowed(layer, n)` says which keys each query may see. Dense eager attention, no cache."""
    lm, n = ckpt.hf.model.language_model, embeds.shape[1]
    cos, sin = lm.rotary_emb(embeds, torch.arange(n)[None])
    x = embeds
    for i, layer in enumerate(lm.layers):
        a, h = layer.self_attn, layer.input_layernorm(x)
        shape = (1, n, -1, a.head_dim)
        q = a.q_proj(h).view(shape).transpose(1, 2)
        k = a.k_proj(h).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        v = a.v_proj(h).view(shape).transpose(1, 2)
        groups = q.shape[1] // k.shape[1]
        scores = q @ repeat_kv(k, groups).transpose(2, 3) / math.sqrt(a.head_dim)
        probs = scores.masked_fill(~allowed(i, n), float("-inf")).softmax(dim=-1)
        x = x + a.o_proj((probs @ repeat_kv(v, groups)).transpose(1, 2).reshape(1, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return ckpt.hf.lm_head(lm.norm(x))


def causal(layer, n):
    return torch.ones(n, n, dtype=torch.bool).tril()


def greedy_bruteforce(x: torch.Tensor, k: int, pivot: int, aggregate) -> list[int]:
    """The greedy selection transcribed literally from its equation: pairwise cosine similarities,
    an explicit aggregate over the chosen set (max: Algorithm 1 / eq. 4-5; sum: the paper's v2
    max-sum) and an explicit argmin."""
    x = x.double()

    def cos(a, b):
        na, nb = a.norm(), b.norm()
        return 0.0 if na == 0 or nb == 0 else float(a @ b / (na * nb))

    chosen = [pivot]
    while len(chosen) < k:
        best, best_value = None, math.inf
        for v in range(len(x)):
            if v not in chosen:
                value = aggregate(cos(x[v], x[c]) for c in chosen)
                if value < best_value:  # strict: the lowest index wins ties
                    best, best_value = v, value
        chosen.append(best)
    return chosen


def kcenter_bruteforce(x, k, pivot):
    return greedy_bruteforce(x, k, pivot, max)


def max_sum_bruteforce(x, k, pivot):
    return greedy_bruteforce(x, k, pivot, sum)


# Each diversity selector with its literal reference.
GREEDY = {"kcenter": (todre.greedy_k_center, kcenter_bruteforce), "maxsum": (todre.greedy_max_sum, max_sum_bruteforce)}


def greedy_matrix(x: torch.Tensor, k: int, pivot: int, aggregate=lambda s: s.max(dim=1).values) -> list[int]:
    """The same selection the DivPrune way, over the full n x n cosine matrix (for n in the
    thousands, fine as a test reference); aggregate over the chosen columns: max (k-center) or sum."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    sim = unit @ unit.T
    chosen = [pivot]
    while len(chosen) < k:
        score = aggregate(sim[:, chosen])
        score[chosen] = math.inf
        chosen.append(int(score.argmin()))
    return chosen


def k_center_radius(x: torch.Tensor, chosen: torch.Tensor) -> float:
    """The k-center objective, in float64: the largest cosine distance from any token to the chosen set."""
    unit = torch.nn.functional.normalize(x.double(), dim=-1)
    return float((1 - (unit @ unit[chosen].T).max(dim=1).values).max())


def cls_per_crop_reference(scores: list[float], crops: list[int], k: int) -> list[int]:
    """FasterVLM's per-crop [CLS] top-k read literally: each crop keeps round(k/n * its size) of its
    best tokens (ties: lowest index); then drop the worst kept, or add the best others, to reach k."""
    n = len(scores)
    kept = []
    for crop in sorted(set(crops)):
        mine = sorted((i for i in range(n) if crops[i] == crop), key=lambda i: (-scores[i], i))
        kept += mine[: round(k / n * len(mine))]
    by_score = sorted(range(n), key=lambda i: (-scores[i], i))
    while len(kept) > k:
        kept.remove(max(kept, key=lambda i: (-scores[i], i)))  # the worst kept token
    while len(kept) < k:
        kept.append(next(i for i in by_score if i not in kept))  # the best token not kept
    return sorted(kept)


def ratios_dense(q, k, visual, text):
    """Eq. 7 over the explicitly built (n, n) causal attention matrix averaged over heads."""
    heads, n, d = q.shape
    keys = k.repeat_interleave(heads // k.shape[0], dim=0)
    scores = (q @ keys.transpose(1, 2)) / math.sqrt(d)
    attn = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1).mean(0)
    a_tv = attn[text][:, visual].sum() / attn[text].sum()
    a_vt = attn[visual][:, text].sum() / attn[visual].sum()
    return float(a_tv), float(a_vt)


# The checkpoint families beside LLaVA-NeXT-Vicuna (mha, gqa): LLaVA-1.5, and LLaVA-NeXT with a
# Mistral decoder (GQA, sliding window), a Llama-3 decoder (rope_theta 500000, two EOS ids,
# byte-level tokenizer) and the 34B's ChatML format.
FAMILIES = {
    "llava15": dict(shape="mha", seed=6, model_type="llava"),
    "mistral": dict(shape="gqa", seed=7, family="mistral", text_model="mistral", sliding_window=4096),
    "llama3": dict(shape="mha", seed=8, family="llama3", rope_theta=500000.0),
    "chatml": dict(shape="mha", seed=9, family="chatml"),
}


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """Each family's tiny checkpoint, built on first use."""
    built = {}

    def get(name: str) -> Checkpoint:
        if name not in built:
            options = dict(FAMILIES[name])
            built[name] = Checkpoint(
                tmp_path_factory.mktemp(name), options.pop("shape"), options.pop("seed"), **options
            )
        return built[name]

    return get


@pytest.fixture(params=list(FAMILIES))
def family(request, families):
    """Each of the other checkpoint families in turn."""
    return families(request.param)


# Qwen2.5-VL's chat template as its checkpoints ship it (chat_template.json): a default system turn,
# each image as <|vision_start|><|image_pad|><|vision_end|> before the text of its message.
QWEN_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_SPECIALS += ["<|image_pad|>", "<|video_pad|>"]
QWEN_PIXELS = (28 * 28 * 4, 28 * 28 * 64)  # a small pixel budget: 4 to 64 merged tokens per image


class QwenCheckpoint:
    """A tiny random Qwen2.5-VL checkpoint saved by transformers (model, image processor, byte-level
    tokenizer with Qwen's special tokens, Qwen's chat template), with transformers' model and
    processor, and ours loaded from the directory through model.load."""

    def __init__(self, directory: Path, seed: int = 0):
        directory.mkdir(parents=True, exist_ok=True)
        tokenizer = byte_level_tokenizer(QWEN_SPECIALS)
        tokenizer.post_processor = None  # Qwen adds no BOS
        tokenizer.save(str(directory / "tokenizer.json"))
        ids = {name: tokenizer.token_to_id(f"<|{name}|>") for name in ("image_pad", "video_pad", "vision_start")}
        ids.update(vision_end=tokenizer.token_to_id("<|vision_end|>"), im_end=tokenizer.token_to_id("<|im_end|>"))
        vision = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=4, out_hidden_size=48)
        vision.update(fullatt_block_indexes=[1], window_size=112)
        text = dict(vocab_size=tokenizer.get_vocab_size() + 8, hidden_size=48, intermediate_size=96)
        text.update(num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
        text.update(rms_norm_eps=1e-6, eos_token_id=ids["im_end"], bos_token_id=ids["im_end"], pad_token_id=0)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}
        config = tf.Qwen2_5_VLConfig(
            vision_config=vision,
            text_config=text,
            image_token_id=ids["image_pad"],
            video_token_id=ids["video_pad"],
            vision_start_token_id=ids["vision_start"],
            vision_end_token_id=ids["vision_end"],
        )
        torch.manual_seed(seed)
        self.hf = tf.Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
        randomize(self.hf, seed)
        self.hf.generation_config.repetition_penalty = 1.3  # Qwen's releases set 1.05; larger, so it shows
        self.hf.save_pretrained(directory)
        low, high = QWEN_PIXELS
        self.image_processor = tf.Qwen2VLImageProcessorPil(size={"shortest_edge": low, "longest_edge": high})
        self.hf_tokenizer = tf.PreTrainedTokenizerFast(
            tokenizer_file=str(directory / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>"
        )
        self.hf_tokenizer.chat_template = QWEN_TEMPLATE
        self.hf_tokenizer.save_pretrained(directory)  # tokenizer_config.json, chat_template.jinja
        self.image_processor.save_pretrained(directory)  # preprocessor_config.json
        self.directory, self.ids, self.layers = directory, ids, 8
        self.model, self.tokenizer = model.load(str(directory))

    def hf_inputs(self, image=None, question=QUESTION) -> dict:
        """What transformers' Qwen2_5_VLProcessor hands the model (its video processor needs
        torchvision, so its two steps are taken here): the chat template applied, each
        <|image_pad|> repeated once per merged token, the image processor's pixels and grid."""
        content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": question}]
        conversation = [{"role": "user", "content": content}]
        text = self.hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        inputs = {}
        if image is not None:
            pixels = self.image_processor(image, return_tensors="pt")
            inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
            text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(pixels["image_grid_thw"][0].prod()) // 4))
        ids = self.hf_tokenizer(text, return_tensors="pt")["input_ids"]
        inputs.update(input_ids=ids, mm_token_type_ids=(ids == self.ids["image_pad"]).int())
        return inputs


@pytest.fixture(scope="session")
def qwen_ckpt(tmp_path_factory):
    return QwenCheckpoint(tmp_path_factory.mktemp("qwen"))


FRAME_SIZES = [
    (352, 288),
    (288, 352),
    (640, 480),
    (336, 336),
    (1920, 1080),
    (30, 20),
    (20, 300),
    (1000, 336),
]  # (width, height) of video frames


def write_video(path, frames: int, fps: int, size=(64, 48)):
    """A synthetic video written with PyAV: frame i is a flat colour whose red channel is 4 * i."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            pixels = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = 4 * i, 128
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# ---------------------------------------------------------------------------------------------
# Tiny benchmarks, in LLaVA's evaluation layout and as lmms-lab's parquet
# ---------------------------------------------------------------------------------------------

SHORT = "\nAnswer the question using a single word or phrase."
LETTER = "\nAnswer with the option's letter from the given choices directly."


def write_jsonl(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def save_image(path: Path, seed: int, size=(150, 110)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise_image(*size, seed=seed).save(path)


def image_base64(seed: int) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    noise_image(120, 100, seed=seed).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_llava_eval(root: Path) -> Path:
    """playground/data/eval as LLaVA's Evaluation.md lays it out, with a few questions of each of
    the 8 benchmarks (the file names and fields of eval.zip and of each benchmark's release)."""
    ev = root / "eval"
    # POPE: llava_pope_test.jsonl (adversarial, random, popular), labels in coco/, images in val2014/
    for i in range(2):
        save_image(ev / "pope" / "val2014" / f"COCO_val2014_{i:012d}.jpg", seed=i)
    questions = []
    for c, base in (("adversarial", 1), ("random", 10000001), ("popular", 20000001)):
        labels = [
            {
                "question_id": q + 1,
                "image": f"COCO_val2014_{q % 2:012d}.jpg",
                "text": f"Is there a {o} in the image?",
                "label": "yes" if q % 2 == 0 else "no",
            }
            for q, o in enumerate(["dog", "cat", "car"])
        ]
        write_jsonl(ev / "pope" / "coco" / f"coco_pope_{c}.json", labels)
        questions += [
            {**r, "question_id": base + i, "text": r["text"] + SHORT, "category": c} for i, r in enumerate(labels)
        ]
    write_jsonl(
        ev / "pope" / "llava_pope_test.jsonl", [{k: v for k, v in r.items() if k != "label"} for r in questions]
    )
    # MME: the release folder, one subtask of each kind
    release = ev / "MME" / "MME_Benchmark_release_version"
    save_image(release / "artwork" / "images" / "10002.jpg", seed=5)
    (release / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (release / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Titian? Please answer yes or no.\tYes\n"
        "Is this artwork created by Monet? Please answer yes or no.\tNo\n"
    )
    for name, seed in (("0001", 6), ("0002", 7)):
        save_image(release / "OCR" / f"{name}.png", seed=seed)
        (release / "OCR" / f"{name}.txt").write_text(
            'Is the word in the logo "hello"? Please answer yes or no.\tYes\r\n'
            'Is the word in the logo "bye"? Please answer yes or no.\tNo\r\n'
        )
    # ScienceQA: llava_test_CQM-A.json (two with an image, one text-only), images/test/<id>/image.png
    sqa = ev / "scienceqa"
    items = [
        {
            "id": "11",
            "image": "11/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is shown?\nA. Maryland\nB. Vermont"},
                {"from": "gpt", "value": "B"},
            ],
        },
        {
            "id": "26",
            "conversations": [
                {
                    "from": "human",
                    "value": "Context: Select the better estimate.\nHow long?\nA. 33 minutes\nB. 33 hours",
                },
                {"from": "gpt", "value": "A"},
            ],
        },
        {
            "id": "5",
            "image": "5/image.png",
            "conversations": [
                {"from": "human", "value": "<image>\nContext: A test.\nWhich?\nA. x\nB. y\nC. z"},
                {"from": "gpt", "value": "C"},
            ],
        },
    ]
    sqa.mkdir(parents=True)
    (sqa / "llava_test_CQM-A.json").write_text(json.dumps(items))
    (sqa / "problems.json").write_text(
        json.dumps(
            {
                "11": {"choices": ["Maryland", "Vermont"], "answer": 1},
                "26": {"choices": ["33 minutes", "33 hours"], "answer": 0},
                "5": {"choices": ["x", "y", "z"], "answer": 2},
            }
        )
    )
    for i, name in enumerate(("11", "5")):
        save_image(sqa / "images" / "test" / name / "image.png", seed=10 + i)
    # GQA: the question file, GQA's own testdev_balanced_questions.json, data/images
    gqa = ev / "gqa"
    rows = [
        ("201307251", "n1.jpg", "Is it overcast?", "no", "verify"),
        ("201640614", "n1.jpg", "Who is wearing the dress?", "woman", "query"),
        ("202000001", "n2.jpg", "What color is the car?", "red", "query"),
    ]
    write_jsonl(
        gqa / "llava_gqa_testdev_balanced.jsonl",
        [{"question_id": q, "image": im, "text": t + SHORT, "category": "default"} for q, im, t, _, _ in rows],
    )
    (gqa / "data").mkdir(parents=True, exist_ok=True)
    (gqa / "data" / "testdev_balanced_questions.json").write_text(
        json.dumps({q: {"answer": a, "types": {"structural": s}, "isBalanced": True} for q, _, _, a, s in rows})
    )
    for i, name in enumerate(("n1.jpg", "n2.jpg")):
        save_image(gqa / "data" / "images" / name, seed=20 + i)
    # MMBench (EN and CN): the TSV, circular copies as rows index + k * 1,000,000, base64 images
    for folder, tsv in (("mmbench", "mmbench_dev_20230712.tsv"), ("mmbench_cn", "mmbench_dev_cn_20231003.tsv")):
        header = [
            "index",
            "question",
            "hint",
            "A",
            "B",
            "C",
            "D",
            "answer",
            "category",
            "source",
            "image",
            "comment",
            "l2-category",
            "split",
        ]
        lines = ["\t".join(header)]
        options = [["rubber", "cotton", "nan", "nan"], ["red", "green", "blue", "black"]]
        answers = ["A", "C"]
        for q in range(2):
            n = sum(o != "nan" for o in options[q])
            for k in range(n):
                rotated = options[q][:n][k:] + options[q][:n][:k]
                answer = "ABCD"[(("AB" if n == 2 else "ABCD").index(answers[q]) - k) % n]
                cells = [
                    str(q + k * 1_000_000),
                    f"Which is it {q}?",
                    "A hint." if q == 0 else "nan",
                    *(rotated + ["nan"] * (4 - n)),
                    answer,
                    "attribute" if q else "material",
                    "src",
                    image_base64(30 + q),
                    "",
                    "l2",
                    "dev",
                ]
                lines.append("\t".join(cells))
        (ev / folder).mkdir(parents=True)
        (ev / folder / tsv).write_text("\n".join(lines) + "\n")
    # VizWiz test (LLaVA's llava_test.jsonl) and val (VizWiz's val.json with 10 answers each)
    viz = ev / "vizwiz"
    tail = "\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    write_jsonl(
        viz / "llava_test.jsonl",
        [
            {
                "question_id": i,
                "image": f"VizWiz_test_{i:08d}.jpg",
                "text": f"What is this {i}?" + tail,
                "category": "default",
            }
            for i in range(2)
        ],
    )
    for i in range(2):
        save_image(viz / "test" / f"VizWiz_test_{i:08d}.jpg", seed=40 + i)
        save_image(viz / "val" / f"VizWiz_val_{i:08d}.jpg", seed=42 + i)
    (viz / "val.json").write_text(
        json.dumps(
            [
                {
                    "image": f"VizWiz_val_{i:08d}.jpg",
                    "question": f"What is this {i}?",
                    "answers": [{"answer": a, "answer_confidence": "yes"} for a in (["dog"] * 4 + ["cat"] * 6)],
                }
                for i in range(2)
            ]
        )
    )
    # VQAv2 test-dev (LLaVA's question files) and val (the VQA API's questions and annotations)
    vqa = ev / "vqav2"
    dev = [
        {
            "question_id": 262144000 + i,
            "image": f"COCO_test2015_{262144 + i:012d}.jpg",
            "text": f"Is the ball {i} flying?" + SHORT,
            "category": "default",
        }
        for i in range(2)
    ]
    write_jsonl(vqa / "llava_vqav2_mscoco_test-dev2015.jsonl", dev)
    write_jsonl(vqa / "llava_vqav2_mscoco_test2015.jsonl", dev + [{**dev[0], "question_id": 262144999}])
    for i in range(2):
        save_image(vqa / "test2015" / f"COCO_test2015_{262144 + i:012d}.jpg", seed=50 + i)
        save_image(vqa / "val2014" / f"COCO_val2014_{i + 1:012d}.jpg", seed=52 + i)
    (vqa / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
        json.dumps(
            {"questions": [{"question_id": 10 + i, "image_id": i + 1, "question": f"How many {i}?"} for i in range(2)]}
        )
    )
    (vqa / "v2_mscoco_val2014_annotations.json").write_text(
        json.dumps(
            {
                "annotations": [
                    {
                        "question_id": 10 + i,
                        "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(["2"] * 3 + ["3"] * 7)],
                    }
                    for i in range(2)
                ]
            }
        )
    )
    return ev


def write_parquet(path: Path, rows: list[dict], row_group_size: int = 2) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def make_hub_copies(ev: Path, hub: Path) -> Path:
    """The same tiny questions in lmms-lab's parquet layouts (columns, configs, file names), images
    embedded, several row groups: hub/<owner>_<name>/<the repo's files>."""
    import base64

    def blob(path: Path) -> dict:
        return {"bytes": path.read_bytes(), "path": path.name}

    from evaluation.benchmarks import BENCHMARKS

    pope = BENCHMARKS["pope"].load(ev, None, None)
    write_parquet(
        hub / "lmms-lab_POPE" / "data" / "test-00000-of-00001.parquet",
        [
            {
                "id": str(i),
                "question_id": q.question_id,
                "question": q.text.removesuffix(SHORT),
                "answer": q.label,
                "image_source": Path(q.image).stem,
                "image": blob(Path(q.image)),
                "category": q.category,
            }
            for i, q in enumerate(pope)
        ],
    )
    release = ev / "MME" / "MME_Benchmark_release_version"
    rows = []
    for q in BENCHMARKS["mme"].load(ev, None, None):
        original = q.text.removesuffix(SHORT) + " Please answer yes or no."
        rows.append(
            {
                "question_id": f"{q.category}/{Path(q.image).name}",
                "image": blob(Path(q.image)),
                "question": original,
                "answer": q.label.capitalize(),
                "category": q.category,
            }
        )
    assert release.is_dir()
    write_parquet(hub / "lmms-lab_MME" / "data" / "test-00000-of-00001.parquet", rows)
    rows = []
    for q in BENCHMARKS["sqa"].load(ev, None, None):
        if q.image is None:
            continue  # ScienceQA-IMG holds the image questions only
        body = q.text.removesuffix(LETTER).split("\n")
        hint = body[0].removeprefix("Context: ") if body[0].startswith("Context: ") else None
        question = body[1] if hint else body[0]
        rows.append(
            {
                "question": question,
                "hint": hint or "",
                "choices": q.choices,
                "answer": "ABCDE".index(q.label),
                "image": blob(Path(q.image)),
            }
        )
    write_parquet(hub / "lmms-lab_ScienceQA" / "ScienceQA-IMG" / "test-00000-of-00001.parquet", rows)
    gqa = BENCHMARKS["gqa"].load(ev, None, None)
    write_parquet(
        hub / "lmms-lab_GQA" / "testdev_balanced_instructions" / "testdev-00000-of-00001.parquet",
        [
            {
                "id": q.question_id,
                "imageId": Path(q.image).stem,
                "question": q.text.removesuffix(SHORT),
                "answer": q.label,
                "types": {"structural": q.extra["structural"], "semantic": "x", "detailed": "y"},
            }
            for q in gqa
        ],
    )
    write_parquet(
        hub / "lmms-lab_GQA" / "testdev_balanced_images" / "testdev-00000-of-00001.parquet",
        [{"id": Path(p).stem, "image": blob(Path(p))} for p in sorted({q.image for q in gqa})],
    )
    for lang, tsv in (
        ("en", ev / "mmbench" / "mmbench_dev_20230712.tsv"),
        ("cn", ev / "mmbench_cn" / "mmbench_dev_cn_20231003.tsv"),
    ):
        lines = tsv.read_text().splitlines()
        header = lines[0].split("\t")
        rows = []
        for line in lines[1:]:
            r = dict(zip(header, line.split("\t"), strict=True))
            rows.append(
                {
                    "index": int(r["index"]),
                    "question": r["question"],
                    "hint": None if r["hint"] == "nan" else r["hint"],
                    **{c: None if r[c] == "nan" else r[c] for c in "ABCD"},
                    "answer": r["answer"],
                    "category": r["category"],
                    "L2-category": r["l2-category"],
                    "source": r["source"],
                    "split": "dev",
                    "image": {"bytes": base64.b64decode(r["image"]), "path": None},
                }
            )
        write_parquet(hub / "lmms-lab_MMBench" / lang / "dev-00000-of-00001.parquet", rows)
    viz = BENCHMARKS["vizwiz"].load(ev, None, "val")
    write_parquet(
        hub / "lmms-lab_VizWiz-VQA" / "data" / "val-00000-of-00001.parquet",
        [
            {
                "question_id": q.question_id,
                "image_id": q.question_id,
                "question": q.text.split("\n")[0],
                "answers": q.answers,
                "category": "other",
                "image": blob(Path(q.image)),
            }
            for q in viz
        ],
    )
    vqa = BENCHMARKS["vqav2"].load(ev, None, "val")
    write_parquet(
        hub / "lmms-lab_VQAv2" / "data" / "validation-00000-of-00001.parquet",
        [
            {
                "question_id": int(q.question_id),
                "question": q.text.removesuffix(SHORT),
                "image_id": int(Path(q.image).stem[-12:]),
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(q.answers)
                ],
                "image": blob(Path(q.image)),
            }
            for q in vqa
        ],
    )
    return hub


def fake_hub(monkeypatch, hub: Path) -> list:
    """huggingface_hub.snapshot_download answering from `hub`; returns the calls it got."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kwargs):
        calls.append({"repo_id": repo_id, "repo_type": repo_type, "allow_patterns": allow_patterns})
        return str(hub / repo_id.replace("/", "_"))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls
