"""Answer a question about an image (or a video) with LLaVA-NeXT, pruned by ToDRE.

    python generate.py --image photo.jpg --prompt "What is in this picture?"

The answer streams to stdout and nothing else goes there; progress, --stats and errors go to stderr.
A user mistake (bad flag, unreadable image, wrong checkpoint) is one line on stderr and exit code 2.
"""
import argparse
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageSequence, UnidentifiedImageError

import model as llava

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class UsageError(Exception):
    """A bad flag or input file; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


def parse_args(argv):
    p = Parser(description="LLaVA-NeXT with ToDRE visual token pruning.")
    p.add_argument("--image", help="image file to ask about")
    p.add_argument("--video", help="directory of frames, or an animated GIF/WebP")
    p.add_argument("--frames", type=int, default=8, help="frames sampled evenly from --video (default 8)")
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--model", default=llava.DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="auto: float16 on a GPU, bfloat16 on CPU")
    p.add_argument("--retain", type=float, default=0.1,
                   help="Stage 1: fraction of visual tokens kept, in (0, 1]; 1 = Stage 1 off (default 0.1)")
    p.add_argument("--tau", type=float, default=0.03,
                   help="Stage 2: evict visual tokens once both attention ratios < tau; 0 = off (default 0.03)")
    p.add_argument("--select", default="kcenter", choices=["kcenter", "cls"],
                   help="Stage 1 selector: ToDRE's k-center, or the FasterVLM-style [CLS] top-k baseline")
    p.add_argument("--no-todre", action="store_true", help="no pruning; the same as --retain 1 --tau 0")
    p.add_argument("--stats", action="store_true", help="token counts, attention ratios and timings to stderr")
    args = p.parse_args(argv)
    if args.image and args.video:
        raise UsageError("give --image or --video, not both")
    if not 0 < args.retain <= 1:
        raise UsageError(f"--retain must be in (0, 1], got {args.retain}")
    if args.tau < 0:
        raise UsageError(f"--tau must be >= 0, got {args.tau}")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.frames < 1:
        raise UsageError(f"--frames must be at least 1, got {args.frames}")
    return args


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    return getattr(torch, name)


def open_image(path: str) -> Image.Image:
    """A decoded image, or a UsageError saying what is wrong with the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except FileNotFoundError:
        raise UsageError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not an image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"{path} is too large to decode safely (over Pillow's decompression-bomb limit)") from None
    except UnidentifiedImageError:
        raise UsageError(f"{path} is not an image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise UsageError(f"{path} is damaged and cannot be decoded ({e})") from None
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale to 8 bits rather than clip
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    return image


def open_frames(path: str, count: int) -> list[Image.Image]:
    """Up to `count` frames sampled evenly from a directory of images or an animated GIF/WebP."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise UsageError(f"{path} contains no image frames")
        frames = [str(f) for f in files]
    else:
        animation = open_image(path)
        frames = [f.copy() for f in ImageSequence.Iterator(animation)]
    picks = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(count, len(frames)))})
    return [open_image(frames[i]) if isinstance(frames[i], str) else frames[i] for i in picks]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    settings = llava.NO_PRUNING if args.no_todre else llava.ToDRE(retain=args.retain, tau=args.tau, select=args.select)
    device = pick_device(args.device)
    media = open_image(args.image) if args.image else open_frames(args.video, args.frames) if args.video else None
    if sys.stderr.isatty():  # progress for people; a script reading stderr sees only errors and --stats
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
    model, tokenizer = llava.load(args.model, device, pick_dtype(args.dtype, device))

    start = llava.now(device)
    visual = None
    if media is not None:
        visual = model.encode_image(media) if isinstance(media, Image.Image) else model.encode_frames(media)
    vision_s = llava.now(device) - start
    start = llava.now(device)
    kept = model.select(visual, settings) if visual is not None else None
    select_s = llava.now(device) - start
    tokens = visual.tokens[kept] if visual is not None else None
    input_ids = llava.prompt_ids(tokenizer, args.prompt, model.config.image_token_index,
                                 None if tokens is None else len(tokens)).to(device)

    stats = llava.Stats()
    generator = torch.Generator(device).manual_seed(args.seed)
    answer, printed = [], ""
    for token in model.generate(input_ids, tokens, settings, args.max_new_tokens, args.temperature, generator, stats):
        if token == model.config.text.eos_token_id:
            break
        answer.append(token)
        text = tokenizer.decode(answer)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    print()

    if args.stats:
        info = stats.prefill
        lines = []
        if visual is not None:
            lines.append(f"visual tokens: {len(visual.tokens)} packed -> {len(kept)} after Stage 1 ({settings.select})")
            ratios = ", ".join(f"layer {i}: a_tv={tv:.4f} a_vt={vt:.4f}" for i, (tv, vt) in info.ratios.items())
            lines.append(f"attention ratios (eq. 7): {ratios or 'not measured (tau = 0)'}")
            lines.append("eviction: " + (f"after layer {info.evict_layer}" if info.evict_layer is not None else "none"))
        lines += [
            f"prompt tokens: {info.prompt_len}",
            f"vision encode: {vision_s:.3f} s",
            f"Stage 1 selection: {select_s:.3f} s",
            f"prefill: {stats.prefill_s:.3f} s",
            f"decode: {stats.decode_s:.3f} s for {stats.new_tokens} tokens",
            f"KV cache: {stats.kv_cache_bytes / 2 ** 20:.1f} MiB",
            f"peak memory: {peak_memory_mb(device):.0f} MiB",
        ]
        print("\n".join(lines), file=sys.stderr)
    return 0


def run(argv=None) -> int:
    """main() with user errors as one stderr line and exit code 2, Ctrl-C as a quiet exit 130."""
    try:
        return main(argv)
    except (UsageError, llava.CheckpointError, llava.InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(run())
