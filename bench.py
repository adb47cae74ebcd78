"""Speed and memory of LLaVA-NeXT or Qwen2.5-VL with and without ToDRE, side by side, on random weights.

    python bench.py --preset small --json results.json
    python bench.py --preset qwen7b                          # Qwen2.5-VL-7B's shapes
    python bench.py --preset small --reuse --new-tokens 4   # evaluation: one encode per image vs one per question
    python bench.py --preset 1b --batch-size 18 --new-tokens 4  # evaluation: the prefix once, 18 questions together

Every configuration runs in a fresh subprocess (so CPU peak RSS is its own) on the same seeded
random weights and the same synthetic 672x672 image (LLaVA-NeXT: 2880 patch tokens; Qwen2.5-VL at
its native resolution: 576 merged tokens) and question.
Random weights give meaningless attention ratios, so Stage 2 is forced after the paper's layer
L/2 (index L/2 - 1, --evict-layer); everywhere else the real decision rule (eq. 7 < tau) is the default.
"""

import cli

CTRL_C_HANDLED = cli.quiet_ctrl_c(__name__)  # before the slow imports (torch)

import argparse
import importlib.util
import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import anyres
import todre
from clip import CLIPVisionConfig
from evaluation import configs, flops
from llama import LlamaConfig
from model import Llava, LlavaConfig, auto_dtype, generate, placement
from qwen import QwenVL, QwenVLConfig
from qwen_vision import QwenVisionConfig

CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
)
PRESETS = {
    "tiny": dict(
        vision=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=336,
            patch_size=14,
        ),
        text=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
        ),
    ),
    # the exact CLIP ViT-L/14-336 tower and a ~0.3B Llama
    "small": dict(
        vision=CLIP_L_336,
        text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16),
    ),
    # the exact CLIP ViT-L/14-336 tower and a TinyLlama-1.1B-shaped decoder (TinyLLaVA's smallest LLM)
    "1b": dict(
        vision=CLIP_L_336,
        text=dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        ),
    ),
    # the exact LLaVA-NeXT Vicuna-7B shapes
    "7b": dict(
        vision=CLIP_L_336,
        text=dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    ),
}
# Qwen2.5-VL presets: the vision tower's fields (vision_config) and the Qwen2 decoder's.
QWEN_PRESETS = {
    "qwen-tiny": dict(
        vision=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=4, fullatt_block_indexes=[1]),
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4),
        text_extra=dict(num_key_value_heads=2),
        mrope_section=[2, 3, 3],
    ),
    # the exact Qwen2.5-VL-7B-Instruct shapes (config.json)
    "qwen7b": dict(
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16),
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28),
        text_extra=dict(num_key_value_heads=4),
        mrope_section=[16, 24, 24],
    ),
}
PRESETS.update(QWEN_PRESETS)
TEXT_DEFAULTS = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
QWEN_TEXT_DEFAULTS = dict(vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, rope_theta=1e6)
PINPOINTS = anyres.LLAVA_NEXT_PINPOINTS
CONFIGS = ["full", "stage1-0.10", "todre-0.25", "todre-0.10", "hf-full"]
PREFIX_TOKENS, SUFFIX_TOKENS = 35, 12  # the Vicuna system prompt and "USER:"; a short question and " ASSISTANT:"
IMAGE_TOKEN = 32000


def model_config(preset: str) -> LlavaConfig | QwenVLConfig:
    p = PRESETS[preset]
    if preset in QWEN_PRESETS:
        text = {**p["text"], **p["text_extra"], **QWEN_TEXT_DEFAULTS, "eos_token_id": -1, "qkv_bias": True}
        vision = QwenVisionConfig(**p["vision"], out_hidden_size=p["text"]["hidden_size"])
        return QwenVLConfig(LlamaConfig.from_dict(text), vision, IMAGE_TOKEN, p["mrope_section"])
    # eos_token_id -1: random weights must not stop early; every configuration decodes --new-tokens tokens.
    text = LlamaConfig.from_dict({**p["text"], **TEXT_DEFAULTS, "eos_token_id": -1})
    return LlavaConfig(
        text=text,
        vision=CLIPVisionConfig.from_dict(p["vision"]),
        image_grid_pinpoints=PINPOINTS,
        image_token_index=IMAGE_TOKEN,
    )


def settings_for(name: str, evict_layer: int) -> todre.Settings:
    """A configuration name (todre.parse_config's grammar), with Stage 2 forced after evict_layer
    wherever it is on: random weights never bring the ratios below tau."""
    settings = configs.parse_config(name)
    return replace(settings, evict_layer=evict_layer) if settings.tau > 0 else settings


def build_model(cfg: LlavaConfig | QwenVLConfig, device, dtype, seed: int) -> Llava | QwenVL:
    """Seeded random weights, made directly on the device: N(0, 0.02) matrices, unit norms."""
    with torch.device("meta"):
        model = QwenVL(cfg) if isinstance(cfg, QwenVLConfig) else Llava(cfg)
    model = model.to(dtype).to_empty(device=device)  # memory for the weights in their final dtype only
    g = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight") or "layrnorm.weight" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    return model.eval()


def synthetic_image() -> Image.Image:
    y, x = np.mgrid[0:672, 0:672]
    rng = np.random.default_rng(0)
    rgb = np.stack([x * 255 // 671, y * 255 // 671, (x + y) * 255 // 1342], axis=-1)
    return Image.fromarray((rgb + rng.integers(0, 32, rgb.shape)).clip(0, 255).astype(np.uint8))


def synthetic_prompt_ids(num_visual: int, device) -> torch.Tensor:
    """BOS, a system prompt's worth of random text, the image tokens, a question's worth of text."""
    g = torch.Generator().manual_seed(1)
    text = torch.randint(3, 31000, (PREFIX_TOKENS + SUFFIX_TOKENS,), generator=g)
    ids = torch.cat(
        [torch.tensor([1]), text[:PREFIX_TOKENS], torch.full((num_visual,), IMAGE_TOKEN), text[PREFIX_TOKENS:]]
    )
    return ids.to(device)


def time_probes(model, ids, visual_embeds, settings, device, where) -> dict:
    """Stage 2's own cost: eq. 7 (todre.cross_modal_ratios) at every probe layer, timed alone, on
    that layer's real keys and queries of the same shape (its cost does not depend on their values)."""
    lm = model.language_model
    kv_cache = model.new_kv_cache(1)
    unpruned = replace(settings, tau=0.0, evict_layer=None)
    model.prefill(ids, visual_embeds, unpruned, kv_cache, placement=where)  # the keys of every layer
    visual_pos, text_pos = todre.token_sets(ids == IMAGE_TOKEN)
    layers = todre.probe_layers(len(lm.layers), settings.probe_fractions)
    attention = lm.layers[0].self_attn
    queries = torch.randn(attention.heads, len(ids), attention.head_dim, device=device, dtype=model.dtype)
    todre.cross_modal_ratios(queries, kv_cache.get(layers[0])[0][0], visual_pos, text_pos)  # warm-up: first-use costs
    start = cli.now(device)
    for layer in layers:
        keys, _ = kv_cache.get(layer)
        todre.cross_modal_ratios(queries, keys[0], visual_pos, text_pos)
    return {"layers": layers, "probe_s": cli.now(device) - start}


def run_ours(model, name, args, image, device):
    cfg = model.config
    settings = settings_for(name, args.evict_layer)
    times = []
    for _ in range(args.warmup + args.repeats):
        start = cli.now(device)
        visual = model.encode_image(image)
        vision_done = cli.now(device)
        kept = model.select(visual, settings)
        select_done = cli.now(device)
        ids = synthetic_prompt_ids(len(kept), device)
        where = placement([visual], [kept])  # Qwen2.5-VL: the kept tokens' places for M-RoPE; LLaVA: None
        generation = generate(
            model, ids, visual.tokens[kept], settings, args.new_tokens, clock=lambda: cli.now(device), placement=where
        )
        assert len(generation.token_ids) == args.new_tokens
        times.append(
            dict(
                vision_s=vision_done - start,
                select_s=select_done - vision_done,
                prefill_s=generation.prefill_s,
                decode_s=generation.decode_s,
            )
        )
    info = generation.info
    prefill_flops, decode_flops = flops.paper_flops(cfg.text, len(ids), len(kept), info.evict_layer, args.new_tokens)
    exact = flops.exact_prefill_flops(cfg.text, len(ids), len(kept), info.evict_layer)
    row = dict(
        visual_tokens=len(kept),
        kv_cache_mb=generation.kv_cache_bytes / 2**20,
        evict_layer=info.evict_layer,
        prefill_tflops=prefill_flops / 1e12,
        decode_tflops=decode_flops / 1e12,
        prefill_tflops_exact=exact / 1e12,
    )
    if settings.tau > 0:
        row["stage2_probe"] = time_probes(model, ids, visual.tokens[kept], settings, device, where)
    return times[args.warmup :], row


def run_hf(model, args, image, device):
    """transformers' LlavaNext on our exact weights: HF preprocessing, vision + packing, prefill, decode."""
    import transformers as tf

    from evaluation import reference

    cfg, dtype = model.config, model.dtype
    p = PRESETS[args.preset]
    hf_cfg = reference.llava_config("llava_next", p["vision"], {**p["text"], **TEXT_DEFAULTS}, IMAGE_TOKEN)
    with torch.device(device):
        hf = tf.LlavaNextForConditionalGeneration._from_config(hf_cfg, attn_implementation="sdpa", dtype=dtype).eval()
    ours = {reference.transformers_name(k): v for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert not unexpected and all("post_layernorm" in k or ".layers." in k and "vision" in k for k in missing), missing
    del model
    processor = reference.image_processor(PINPOINTS)
    times = []
    for _ in range(args.warmup + args.repeats):
        start = cli.now(device)
        pixels = processor(image, return_tensors="pt")
        packed = hf.model.get_image_features(
            pixels["pixel_values"].to(device, dtype), pixels["image_sizes"].to(device)
        ).pooler_output[0]
        vision_done = cli.now(device)
        ids = synthetic_prompt_ids(len(packed), device)
        embeds = hf.model.language_model.embed_tokens(ids[None])
        embeds[0, ids == IMAGE_TOKEN] = packed
        out = hf(inputs_embeds=embeds, use_cache=True)
        token = out.logits[0, -1].argmax()
        prefill_done = cli.now(device)
        cache = out.past_key_values
        for _ in range(args.new_tokens - 1):
            out = hf(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[0, -1].argmax()
        done = cli.now(device)
        times.append(
            dict(
                vision_s=vision_done - start,
                select_s=0.0,
                prefill_s=prefill_done - vision_done,
                decode_s=done - prefill_done,
            )
        )
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    prefill_flops, decode_flops = flops.paper_flops(cfg.text, len(ids), len(packed), None, args.new_tokens)
    exact = flops.exact_prefill_flops(cfg.text, len(ids), len(packed), None)
    return times[args.warmup :], dict(
        visual_tokens=len(packed),
        kv_cache_mb=kv_bytes / 2**20,
        evict_layer=None,
        prefill_tflops=prefill_flops / 1e12,
        decode_tflops=decode_flops / 1e12,
        prefill_tflops_exact=exact / 1e12,
    )


@torch.inference_mode()
def run_one(args) -> dict:
    """One configuration, in this process; returns its row of the results."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = build_model(model_config(args.preset), device, getattr(torch, args.dtype), seed=0)
    image = synthetic_image()
    if args.one == "hf-full":
        times, row = run_hf(model, args, image, device)
    else:
        times, row = run_ours(model, args.one, args, image, device)
    median = {key: statistics.median(t[key] for t in times) for key in times[0]}
    median["total_s"] = median["vision_s"] + median["select_s"] + median["prefill_s"] + median["decode_s"]
    return {"name": args.one, **row, **median, "peak_mem_mb": cli.peak_memory_mb(device)}


# ---------------------------------------------------------------------------------------------
# --reuse: evaluation time per question with and without one encode per image
# ---------------------------------------------------------------------------------------------


class SyntheticTokenizer:
    """What the evaluation runner needs of a tokenizer, for random weights: the same prompt ids as
    synthetic_prompt_ids, with the question's words mixed into the text part so every question
    differs."""

    class format:  # noqa: N801 (a stand-in for prompt.PromptFormat)
        name, chat_template = "synthetic", None

    def prompt_ids(self, question: str, num_visual: int | None = None, video: bool = False, inline=False) -> list[int]:
        ids = synthetic_prompt_ids(num_visual or 0, "cpu").tolist()
        return ids[:-1] + [3 + sum(map(ord, question)) % 31000, ids[-1]]

    def conversation(self, question: str, with_media: bool = True, video: bool = False) -> str:
        return ("<image>\n" if with_media else "") + question

    def decode(self, ids: list[int]) -> str:
        return " ".join(map(str, ids))


def synthetic_questions(folder, images: int, per_image: int) -> list:
    """A POPE-shaped set: `images` noisy copies of the synthetic image saved in folder, `per_image`
    questions about each (question ids "image-question")."""
    from evaluation.benchmarks import Question

    questions = []
    for i in range(images):
        path = folder / f"image{i}.png"
        noisy = np.asarray(synthetic_image()).astype(int) + np.random.default_rng(i).integers(-16, 16, (672, 672, 3))
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(path)
        for q in range(per_image):
            questions.append(Question(f"{i}-{q}", "random", f"Is there a thing {q} in the image?", str(path), "bench"))
    return questions


def run_reuse(args) -> dict:
    """A POPE-shaped set (--images images x --questions each) answered under each configuration
    with the runner evaluate.py uses: once with one encode and one Stage 1 per image, once encoding
    for every question (on the first --anew questions of each image, to bound the time). Reports
    wall time per question both ways and checks the answers are the same."""
    import tempfile
    from pathlib import Path

    from evaluation.runner import Answerer, Job, Predictions, image_groups

    device = torch.device(args.device)
    model = build_model(model_config(args.preset), device, getattr(torch, args.dtype), seed=0)
    folder = Path(tempfile.mkdtemp(prefix="bench-reuse-"))
    questions = synthetic_questions(folder, args.images, args.questions)
    anew = [q for q in questions if int(q.question_id.split("-")[1]) < args.anew]
    warm = Job({"full": todre.NO_PRUNING}, {"full": Predictions(folder / "warm-up")}, args.new_tokens)
    Answerer(model, SyntheticTokenizer(), warm).group(questions[:1])  # first-call costs out of the timings
    runs = []
    for name in [n for n in args.configs.split(",") if n and n != "hf-full"]:
        settings = settings_for(name, args.evict_layer)
        row = {"name": name}
        answers = {}
        modes = [("reuse", questions, True, 1)]
        if args.batch_size > 1:  # questions about one image together, on one shared prefix
            modes.append(("batched", questions, True, args.batch_size))
        if anew:
            modes.append(("anew", anew, False, 1))
        for mode, subset, reuse, batch_size in modes:
            predictions = Predictions(folder / mode / name)
            clock = lambda: cli.now(device)  # noqa: E731
            job = Job({name: settings}, {name: predictions}, args.new_tokens, clock=clock, reuse=reuse)
            job.batch_size, job.sample_alone_every = batch_size, 0  # the encode-once column is the alone time
            answerer = Answerer(model, SyntheticTokenizer(), job)
            print(f"{name}: {len(subset)} questions, {mode} ...", file=sys.stderr)
            start = cli.now(device)
            for group in image_groups(subset):  # as evaluate.py answers: one group per image
                answerer.group(group)
            row[f"{mode}_s_per_question"] = (cli.now(device) - start) / len(subset)
            row[f"{mode}_samples_per_s"] = 1 / row[f"{mode}_s_per_question"]
            answers[mode] = {(r["question_id"]): r["answer"] for r in predictions.records}
        if anew:
            row["ratio"] = row["reuse_s_per_question"] / row["anew_s_per_question"]
        if args.batch_size > 1:
            row["batched_ratio"] = row["batched_s_per_question"] / row["reuse_s_per_question"]
        for mode in answers:  # answers identical to encode-once, one at a time (float32: all; 16-bit: see docs)
            same = sum(answers["reuse"][k] == v for k, v in answers[mode].items())
            row[f"{mode}_same_answers"] = f"{same}/{len(answers[mode])}"
        row["same_answers"] = all(answers["reuse"][k] == v for mode in answers for k, v in answers[mode].items())
        if "batched" in answers and not row["same_answers"]:
            differing = {k for k, v in answers["batched"].items() if answers["reuse"][k] != v}
            ties = rounding_ties(model, questions, differing, settings, args)
            row["batched_differ_at_ties"] = f"{sum(tie for tie, _ in ties)}/{len(ties)}"
            row["batched_logit_steps"] = max(steps for _, steps in ties)  # how far apart, in rounding steps
        runs.append(row)
    return {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "images": args.images,
        "questions_per_image": args.questions,
        "anew_questions_per_image": args.anew,
        "batch_size": args.batch_size,
        "new_tokens": args.new_tokens,
        "runs": runs,
    }


@torch.inference_mode()
def rounding_ties(model, questions, differing: set[str], settings: todre.Settings, args) -> list[tuple[bool, float]]:
    """For each question (by id in `differing`) whose batched answer differs from its answer alone:
    (tie, steps). tie: the two parted at a rounding tie, i.e. at the first step where their tokens
    differ, the token chosen alone led the batched path's choice by no more than the largest
    difference between the two paths' logits at that step; steps: that largest difference in units
    of the model dtype's rounding step at the best logit's size (so a broken batch, whose logits are
    far off, shows as many steps rather than as ties). In 16 bits the two paths round differently
    (other kernels, other matrix shapes); on random weights the best two of 32k logits are often
    equal in bfloat16, so such ties decide answers there. The batch is re-run as the runner ran it
    (same chunks, so the same answers)."""
    from evaluation import batched
    from evaluation.runner import image_groups
    from media import open_image
    from model import prompt_ids

    tokenizer, verdicts = SyntheticTokenizer(), []
    for group in image_groups(questions):
        if not any(q.question_id in differing for q in group):
            continue
        visual = model.encode_image(open_image(group[0].image))
        kept = model.select(visual, settings)
        embeds = visual.tokens[kept]
        prompts = [prompt_ids(tokenizer, q.text, len(kept)).to(model.device) for q in group]
        p = batched.shared_prefix(prompts, model.is_visual)
        prefix = batched.prefill_prefix(model, prompts[0][:p], embeds)
        for first in range(0, len(group), args.batch_size):
            chunk = prompts[first : first + args.batch_size]
            rows = batched.answer_batch(model, chunk, p, prefix, settings, args.new_tokens, keep_logits=True)
            for q, ids, row in zip(group[first : first + args.batch_size], chunk, rows, strict=True):
                if q.question_id not in differing:
                    continue
                cache = model.new_kv_cache(args.new_tokens)
                logits, info = model.prefill(ids, embeds, settings, cache)
                logits, alone = logits[0, -1], []
                for step in range(args.new_tokens):  # greedy alone, as model.generate (no stop: eos is -1 here)
                    alone.append(int(logits.argmax()))
                    if step < len(row.token_ids) - 1 and alone[-1] == row.token_ids[step]:
                        logits = model.decode_step(alone[-1], info.next_position + step, cache)
                        continue
                    break
                step = len(alone) - 1
                if step >= len(row.token_ids) or alone[step] == row.token_ids[step]:
                    verdicts.append((False, 0.0))  # they do not part where this replay says: not a tie
                    continue
                lead = float(logits[alone[step]] - logits[row.token_ids[step]])
                apart = float((logits - row.logits[step]).abs().max())
                rounding_step = torch.finfo(model.dtype).eps * 2 ** math.floor(
                    math.log2(max(float(logits.abs().max()), 1e-30))
                )
                verdicts.append((lead <= apart, apart / rounding_step))
    return verdicts


def print_reuse(result: dict) -> None:
    batch = result["batch_size"]
    print(
        f"preset {result['preset']} on {result['device']}, {result['dtype']}: {result['images']} images x "
        f"{result['questions_per_image']} questions, {result['new_tokens']} new tokens; without reuse timed on "
        f"the first {result['anew_questions_per_image']} questions of each image"
    )
    header = f"{'config':<15} {'s/q, encode once':>17}"
    header += f" {f's/q, prefix + batch {batch}':>24} {'ratio':>6}" if batch > 1 else ""
    header += f" {'s/q, encode anew':>17} {'ratio':>6}" if result["anew_questions_per_image"] else ""
    same = [m for m in ("batched", "anew") if result["runs"] and f"{m}_same_answers" in result["runs"][0]]
    print(header + f"  same answers as encode once ({', '.join(same)})")
    for r in result["runs"]:
        line = f"{r['name']:<15} {r['reuse_s_per_question']:>17.3f}"
        if batch > 1:
            line += f" {r['batched_s_per_question']:>24.3f} {r['batched_ratio']:>6.2f}"
        if result["anew_questions_per_image"]:
            line += f" {r['anew_s_per_question']:>17.3f} {r['ratio']:>6.2f}"
        ties = ""
        if "batched_differ_at_ties" in r:
            ties = (
                f" ({r['batched_differ_at_ties']} of the differing ones part at a rounding tie; there the paths'"
                f" logits are up to {r['batched_logit_steps']:.1f} rounding steps apart)"
            )
        print(line + "  " + (", ".join(r[f"{m}_same_answers"] for m in same) or "-") + ties)


def parse_args(argv=None):
    p = cli.Parser(
        description=__doc__.split("\n")[0],
        epilog=configs.CONFIG_NAMES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: as generate.py, float16 on CUDA, bfloat16 on CPU",
    )
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--evict-layer",
        type=int,
        default=None,
        help="Stage 2 forced after this layer (default: the first probe layer, the paper's L/2)",
    )
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help="comma-separated configuration names, and hf-full for transformers (default: %(default)s)",
    )
    p.add_argument(
        "--variant",
        default="v1",
        help="paper version(s) for the pruned configurations: v1 (default), v2, or v1,v2 to time both side by side",
    )
    p.add_argument("--json", help="write the results here")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="time evaluation per question with one encode per image vs one per question (full, todre-0.25, "
        "todre-0.10 unless --configs says otherwise)",
    )
    p.add_argument("--images", type=int, default=2, help="--reuse: distinct images")
    p.add_argument("--questions", type=int, default=18, help="--reuse: questions per image (POPE has ~18)")
    p.add_argument("--anew", type=int, default=6, help="--reuse: questions per image timed without reuse (0: none)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="--reuse: also answer the questions about each image N at a time on one shared prefix (evaluate.py's way)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration in this process
    args = p.parse_args(argv)
    counts = [("--new-tokens", args.new_tokens, 1), ("--repeats", args.repeats, 1), ("--warmup", args.warmup, 0)]
    counts += [("--batch-size", args.batch_size, 1), ("--images", args.images, 1)]
    counts += [("--questions", args.questions, 1), ("--anew", args.anew, 0)]
    for flag, value, least in counts:
        cli.check_number(flag, value, least, math.inf)
    if args.json and not Path(args.json).resolve().parent.is_dir():  # found out now, not after the runs
        raise cli.UsageError(f"--json {args.json}: no such folder")
    if args.batch_size > 1 and not args.reuse:  # batches exist only in the evaluation mode
        print("--batch-size: timing evaluation per question (--reuse)", file=sys.stderr)
        args.reuse = True
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "auto":
        kind = "qwen2_5_vl" if args.preset in QWEN_PRESETS else "llava_next"  # as generate.py's auto
        args.dtype = str(auto_dtype(torch.device(args.device), kind)).removeprefix("torch.")
    if args.evict_layer is None:
        args.evict_layer = todre.probe_layers(PRESETS[args.preset]["text"]["num_hidden_layers"])[0]
    return args


def print_table(result: dict, evict_layer: int) -> None:
    runs = {r["name"]: r for r in result["runs"]}
    full = runs.get("full")
    print(
        f"preset {result['preset']} on {result['device']}, {result['dtype']}; Stage 2 forced after layer "
        f"{evict_layer} (random weights give meaningless attention ratios)"
    )
    print(
        "times in seconds (median); 'x' columns: prefill speed-up over full, measured and FLOP-ideal "
        "(eq. 1, and exact: SwiGLU's 3 matrices, causal attention)"
    )
    print(
        f"{'config':<15} {'tokens':>6} {'vision':>7} {'select':>7} {'prefill':>8} {'decode':>7} {'total':>7} "
        f"{'total x':>7} {'peak MB':>8} {'KV MB':>7} {'pf TFLOP':>8} {'prefill x':>9} {'eq.1 x':>7} {'exact x':>7}"
    )
    for r in result["runs"]:
        total = speedup = ideal = exact = ""
        if full and r is not full:
            total = f"{full['total_s'] / r['total_s']:.2f}"
            speedup = f"{full['prefill_s'] / r['prefill_s']:.2f}"
            ideal = f"{full['prefill_tflops'] / r['prefill_tflops']:.2f}"
            exact = f"{full['prefill_tflops_exact'] / r['prefill_tflops_exact']:.2f}"
        print(
            f"{r['name']:<15} {r['visual_tokens']:>6} {r['vision_s']:>7.3f} {r['select_s']:>7.3f} "
            f"{r['prefill_s']:>8.3f} {r['decode_s']:>7.3f} {r['total_s']:>7.3f} {total:>7} {r['peak_mem_mb']:>8.0f} "
            f"{r['kv_cache_mb']:>7.1f} {r['prefill_tflops']:>8.3f} {speedup:>9} {ideal:>7} {exact:>7}"
        )
    for r in result["runs"]:
        if "stage2_probe" in r:
            probe = r["stage2_probe"]
            print(
                f"Stage-2 probes in {r['name']} (eq. 7 at layers {probe['layers']}): {probe['probe_s'] * 1e3:.1f} ms "
                f"= {100 * probe['probe_s'] / r['prefill_s']:.2f}% of its prefill"
            )
        if r["select_s"] > 0 and r["visual_tokens"] < (full or r)["visual_tokens"]:
            print(
                f"Stage-1 selection in {r['name']}: {r['select_s'] * 1e3:.1f} ms = "
                f"{100 * r['select_s'] / r['total_s']:.2f}% of its total ({result['dtype']})"
            )


def expand(names: list[str], variants: list[str]) -> list[str]:
    """Each pruned configuration once per paper version; v1 keeps the plain name."""
    return [
        n if n in ("full", "hf-full") or v == "v1" else f"{n}-{v}"
        for n in names
        for v in (variants if n not in ("full", "hf-full") else [None])
    ]


def main(argv=None) -> int:
    """A bad flag is one `error:` line and exit code 2; a results file that cannot be written one
    line and 1; a configuration's failed run prints its error and gives 1; Ctrl-C a quiet 130."""
    code = 0

    def work():
        nonlocal code
        code = bench(parse_args(argv))

    return cli.exit_code(work, ()) or code


def write_json(path: str, result: dict) -> None:
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    except OSError as e:
        raise cli.OutputError(f"cannot write {path}: {e.strerror or e}") from None


def bench(args) -> int:
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    if args.reuse:
        if args.configs == ",".join(CONFIGS):
            args.configs = "full,todre-0.25,todre-0.10"
        result = run_reuse(args)
        print_reuse(result)
        if args.json:
            write_json(args.json, result)
        return 0
    variants = args.variant.split(",")
    if unknown := set(variants) - set(todre.VARIANTS):
        print(f"error: unknown variant(s) {', '.join(sorted(unknown))}; choose from v1, v2", file=sys.stderr)
        return 2
    names = expand([n for n in args.configs.split(",") if n], variants)
    for name in set(names) - {"hf-full"}:
        try:
            configs.parse_config(name)
        except ValueError as e:
            print(f"error: {str(e).splitlines()[0]} (see --help for the names)", file=sys.stderr)
            return 2
    if "hf-full" in names and args.preset in QWEN_PRESETS:  # the transformers run is LLaVA-NeXT's
        if args.configs != ",".join(CONFIGS):
            print("error: hf-full runs transformers' LLaVA-NeXT: use a LLaVA preset, or drop hf-full", file=sys.stderr)
            return 2
        names.remove("hf-full")
    if "hf-full" in names and importlib.util.find_spec("transformers") is None:  # the reference is optional
        print("transformers is not installed: skipping hf-full", file=sys.stderr)
        names.remove("hf-full")
    common = [
        "--preset",
        args.preset,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--evict-layer",
        str(args.evict_layer),
    ]
    runs = []
    for name in names:
        print(f"running {name} ...", file=sys.stderr)
        done = subprocess.run([sys.executable, __file__, *common, "--one", name], capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    result = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "evict_layer": args.evict_layer,
        "variant": args.variant,
        "runs": runs,
    }
    print_table(result, args.evict_layer)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    cli.run(main, CTRL_C_HANDLED)
