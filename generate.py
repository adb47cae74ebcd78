"""Answer a question about an image (or a video) with LLaVA-NeXT, pruned by ToDRE.

    python generate.py --image photo.jpg --prompt "What is in this picture?"

The answer streams to stdout and nothing else goes there; progress, --stats and errors go to stderr.
A user mistake (bad flag, unreadable image, wrong checkpoint) is one line on stderr and exit code 2.
"""
import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageSequence, UnidentifiedImageError

import anyres
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
    p.add_argument("--variant", default="v1", choices=["v1", "v2"],
                   help="paper version: v1 (default: k-center, 4 probe layers, tau 0.03) or v2 (max-sum, 7L/8, tau 0.10)")
    p.add_argument("--retain", type=float, default=0.1,
                   help="Stage 1: fraction of visual tokens kept, in (0, 1]; 1 = Stage 1 off (default 0.1)")
    p.add_argument("--tau", type=float, help="Stage 2: evict visual tokens once both attention ratios < tau; "
                                             "0 = off (default: the variant's, 0.03 or 0.10)")
    p.add_argument("--probe-layers", help="Stage 2: comma-separated layers to probe, 0-based (the paper counts from 1: "
                                          "its layer 16 is 15 here); default: the variant's, 15,19,23,27 for 32 layers")
    p.add_argument("--select", choices=list(llava.SELECTORS),
                   help="Stage 1 selector: k-center (v1), max-sum (v2), or the [CLS] top-k baseline: "
                        "per crop as FasterVLM does (cls), or one global top-k (cls-global)")
    p.add_argument("--newlines", choices=["drop", "keep"], default="drop",
                   help="Stage 1 and the image_newline tokens (never candidates): drop them all (default) "
                        "or keep them all in place, as GlobalCom2 does")
    p.add_argument("--no-todre", action="store_true", help="no pruning; the same as --retain 1 --tau 0")
    p.add_argument("--save-selection", metavar="PNG", help="save the image with the kept visual tokens highlighted")
    p.add_argument("--stats", action="store_true", help="token counts, attention ratios and timings to stderr")
    args = p.parse_args(argv)
    if args.image and args.video:
        raise UsageError("give --image or --video, not both")
    if not 0 < args.retain <= 1:
        raise UsageError(f"--retain must be in (0, 1], got {args.retain}")
    if args.tau is not None and args.tau < 0:
        raise UsageError(f"--tau must be >= 0, got {args.tau}")
    if args.probe_layers is not None:
        try:
            args.probe_layers = [int(x) for x in args.probe_layers.split(",")]
        except ValueError:
            raise UsageError(f"--probe-layers must be comma-separated layer numbers, got {args.probe_layers!r}") from None
        if min(args.probe_layers) < 0:
            raise UsageError("--probe-layers must be 0 or more")
    if args.save_selection is not None:
        if not (args.image or args.video):
            raise UsageError("--save-selection needs --image or --video")
        check_writable(args.save_selection)
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


def check_writable(path: str) -> None:
    """Fail now, before minutes of model loading, if the picture could not be written later."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UsageError(f"--save-selection writes a PNG: give a path ending in .png, got {path}")
    if not p.parent.is_dir():
        raise UsageError(f"cannot write {path}: the directory {p.parent} does not exist")
    if p.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UsageError(f"cannot write {path}: permission denied")


def selection_panel(image: Image.Image, boxes: torch.Tensor, kept: torch.Tensor, title: str, size: int = 512,
                    note: str = ""):
    """One picture: the image dimmed, with the boxes of the kept tokens at full brightness."""
    scale = size / max(image.size)
    shown = anyres.to_rgb(image).resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    panel = Image.blend(shown, Image.new("RGB", shown.size), 0.75)
    for x0, y0, x1, y1 in (boxes[kept] * scale).tolist():
        box = (int(x0), int(y0), max(int(x0) + 1, round(x1)), max(int(y0) + 1, round(y1)))
        panel.paste(shown.crop(box), box[:2])
    canvas = Image.new("RGB", (max(panel.width, 160), panel.height + 16), "white")
    canvas.paste(panel, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), f"{title}: {int(kept.sum())} of {len(kept)} kept{note}", fill="black")
    return canvas


def draw_selection(media, visual: llava.VisualTokens, kept: torch.Tensor, select: str) -> Image.Image:
    """The paper's Figure 7 view: for an image, its thumbnail tokens and its high-resolution crop
    tokens side by side; for a video, one tile per frame."""
    sources = visual.sources.cpu()
    is_kept = torch.zeros(len(sources), dtype=torch.bool)
    is_kept[kept.cpu()] = True
    panels = []
    if visual.layout is not None:
        side = visual.layout.side
        boxes = anyres.token_boxes(visual.layout, sources)
        crop = sources.div(side * side, rounding_mode="floor")
        is_newline = sources == anyres.NEWLINE
        newlines = f", newlines {int(is_kept[is_newline].sum())} of {int(is_newline.sum())}"
        for title, part, note in (("thumbnail", crop == 0, ""), ("crops", (crop > 0) & ~is_newline, newlines)):
            panels.append(selection_panel(media, boxes[part], is_kept[part], f"{select} {title}", note=note))
    else:
        per_frame = visual.cls_attn.shape[1]
        side = int(per_frame ** 0.5)
        for f, frame in enumerate(media):
            part = sources.div(per_frame, rounding_mode="floor") == f
            boxes = anyres.squashed_boxes(sources[part] % per_frame, (frame.height, frame.width), side)
            panels.append(selection_panel(frame, boxes, is_kept[part], f"{select} frame {f}", size=256))
    picture = Image.new("RGB", (sum(p.width for p in panels) + 8 * (len(panels) - 1), max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        picture.paste(p, (x, 0))
        x += p.width + 8
    return picture


def save_png(picture: Image.Image, path: str) -> None:
    """Write atomically: a complete file appears, or none (also on Ctrl-C)."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=Path(path).parent)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


@torch.inference_mode()
def main(argv=None) -> int:
    args = parse_args(argv)
    settings = llava.NO_PRUNING if args.no_todre else llava.variant(
        args.variant, retain=args.retain, tau=args.tau, select=args.select, probe_layers=args.probe_layers,
        newlines=args.newlines)
    device = pick_device(args.device)
    media = open_image(args.image) if args.image else open_frames(args.video, args.frames) if args.video else None
    if sys.stderr.isatty():  # progress for people; a script reading stderr sees only errors and --stats
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
    model, tokenizer = llava.load(args.model, device, pick_dtype(args.dtype, device))
    num_layers = model.config.text.num_hidden_layers
    if args.probe_layers and max(args.probe_layers) >= num_layers:
        raise UsageError(f"--probe-layers must be below {num_layers}, the model's number of layers")

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
            continue  # not printed; the generator ends after it (and records its timings)
        answer.append(token)
        text = tokenizer.decode(answer)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed):])
            sys.stdout.flush()
            printed = text
    print()
    if args.save_selection:
        save_png(draw_selection(media, visual, kept, settings.select), args.save_selection)

    if args.stats:
        info = stats.prefill
        lines = []
        if visual is not None:
            newlines = int((visual.sources[kept] == anyres.NEWLINE).sum())
            lines.append(f"visual tokens: {len(visual.tokens)} packed -> {len(kept)} after Stage 1 ({settings.select}, "
                         f"{newlines} of {int((visual.sources == anyres.NEWLINE).sum())} newlines kept)")
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
            f"peak memory: {llava.peak_memory_mb(device):.0f} MiB",
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
