"""Answer a question about an image (or a video) with LLaVA-NeXT, pruned by ToDRE.

    python generate.py --image photo.jpg --prompt "What is in this picture?"

The answer streams to stdout and nothing else goes there; progress, --stats and errors go to stderr.
A user mistake (bad flag, unreadable image, wrong checkpoint) is one line on stderr and exit code 2;
a failure to write the answer or the picture is one line and exit code 1; Ctrl-C is a quiet 130.
"""

import signal

# Ctrl-C while torch imports: end quietly, as any Unix tool does (exit 130). Left alone where the
# caller ignores Ctrl-C (a background job) or when imported as a module.
CTRL_C_HANDLED = __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if CTRL_C_HANDLED:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import math
import os
import stat
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import anyres
import model as llava
import todre
from checkpoint import os_error_text
from media import MediaError, open_image, open_video  # noqa: F401 (open_image: part of this module's interface)


class UsageError(Exception):
    """A bad flag or input file; printed as one line, exit code 2."""


class OutputError(Exception):
    """The answer or the picture could not be written (full disk, closed stdout); one line, exit code 1."""


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UsageError(f"{message} (see --help)")


def parse_args(argv):
    p = Parser(description="LLaVA-NeXT with ToDRE visual token pruning.")
    p.add_argument("--image", help="image file to ask about")
    p.add_argument(
        "--video",
        help="video file (.mp4, .mkv, .webm, .mov, .avi; needs PyAV), directory of frames, or animated GIF/WebP",
    )
    p.add_argument(
        "--max-frames",
        "--frames",
        type=int,
        default=20,
        dest="max_frames",
        help="--video: one frame per second, at most this many spread over the whole video (default 20)",
    )
    p.add_argument(
        "--video-newlines",
        choices=["grid", "none"],
        help="--video: an image_newline after every row of 12 pooled tokens (grid, the default where the "
        "checkpoint has that vector, as LLaVA-NeXT does), or none",
    )
    p.add_argument(
        "--pad-to-square",
        action="store_true",
        help="LLaVA-1.5 checkpoints: centre the image on a square of the mean colour instead of centre-cropping "
        "it, as LLaVA's own evaluation (and the published 1.5 numbers) did",
    )
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--model", default=llava.DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    add_device_flags(p)
    p.add_argument(
        "--variant",
        default="v1",
        choices=["v1", "v2"],
        help="paper version: v1 (default: k-center, 4 probe layers, tau 0.03) or v2 (max-sum, 7L/8, tau 0.10)",
    )
    p.add_argument(
        "--retain", type=float, help="Stage 1: fraction of visual tokens kept, in (0, 1]; 1 = Stage 1 off (default 0.1)"
    )
    p.add_argument(
        "--keep-tokens",
        type=int,
        metavar="N",
        help="Stage 1: keep N visual tokens instead of a fraction (the budgets peers report: 64, 128, 192)",
    )
    p.add_argument(
        "--tau",
        type=float,
        help="Stage 2: evict visual tokens once both attention ratios < tau; "
        "0 = off (default: the variant's, 0.03 or 0.10)",
    )
    p.add_argument(
        "--probe-layers",
        help="Stage 2: comma-separated layers to probe, 0-based (the paper counts from 1: "
        "its layer 16 is 15 here); default: the variant's, 15,19,23,27 for 32 layers",
    )
    p.add_argument(
        "--select",
        choices=list(todre.SELECTORS),
        help="Stage 1 selector: k-center (v1), max-sum (v2), or the [CLS] top-k baseline: "
        "per crop as FasterVLM does (cls), or one global top-k (cls-global)",
    )
    p.add_argument(
        "--newlines",
        choices=["drop", "keep"],
        default="drop",
        help="Stage 1 and the image_newline tokens (never candidates): drop them all (default) "
        "or keep them all in place, as GlobalCom2 does",
    )
    p.add_argument("--no-todre", action="store_true", help="no pruning; the same as --retain 1 --tau 0")
    p.add_argument("--save-selection", metavar="PNG", help="save the image with the kept visual tokens highlighted")
    p.add_argument("--stats", action="store_true", help="token counts, attention ratios and timings to stderr")
    args = p.parse_args(argv)

    check_not_empty(args, "image", "video", "model", "save_selection")
    if args.image and args.video:
        raise UsageError("give --image or --video, not both")
    if args.no_todre and (args.retain is not None or args.tau is not None or args.keep_tokens is not None):
        raise UsageError("--no-todre means no pruning: drop --retain/--keep-tokens/--tau, or drop --no-todre")
    if args.retain is not None and args.keep_tokens is not None:
        raise UsageError("give --retain (a fraction) or --keep-tokens (a count), not both")
    check_number("--retain", args.retain, 0, 1, low_open=True)
    check_number("--keep-tokens", args.keep_tokens, 1, math.inf)
    check_number("--tau", args.tau, 0, math.inf)
    check_number("--temperature", args.temperature, 0, math.inf)
    check_number("--max-new-tokens", args.max_new_tokens, 1, math.inf)
    check_number("--max-frames", args.max_frames, 1, 10_000)
    check_number("--seed", args.seed, 0, 2**64 - 1)
    if args.probe_layers is not None:
        try:
            args.probe_layers = [int(x) for x in args.probe_layers.split(",")]
        except ValueError:
            raise UsageError(
                f"--probe-layers must be comma-separated layer numbers, got {args.probe_layers!r}"
            ) from None
        if min(args.probe_layers) < 0:
            raise UsageError("--probe-layers must be 0 or more")
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # Python keeps argv bytes that are not UTF-8 as lone surrogates
        raise UsageError(
            f"--prompt is not valid UTF-8 (undecodable byte at character {e.start}): "
            "use a UTF-8 terminal or locale, or re-encode the text"
        ) from None
    if args.save_selection is not None:
        if not (args.image or args.video):
            raise UsageError("--save-selection needs --image or --video")
        check_writable(args.save_selection, [p for p in (args.image, args.video) if p])
    return args


def add_device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --dtype, the same for every command of the project."""
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float16", "bfloat16", "float32"],
        help="auto: float16 on a GPU, bfloat16 on CPU",
    )


def check_not_empty(args, *names: str) -> None:
    """An empty path flag is an unset shell variable, never what was meant."""
    for name in names:
        if getattr(args, name) == "":
            raise UsageError(f"--{name.replace('_', '-')} is empty (an unset shell variable?)")


def check_number(flag: str, value, low, high, low_open: bool = False) -> None:
    """A finite number in [low, high] (or (low, high] when low_open); None = not given, fine."""
    if value is None:
        return
    finite = not isinstance(value, float) or math.isfinite(value)
    if not (finite and (value > low if low_open else value >= low) and value <= high):
        bounds = f"{'(' if low_open else '['}{low}, {'inf)' if high == math.inf else f'{high}]'}"
        kind = "a finite number" if isinstance(value, float) else "an integer"
        raise UsageError(f"{flag} must be {kind} in {bounds}, got {value}")


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but no CUDA GPU is available; use --device cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for, but MPS is not available; use --device cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    return llava.auto_dtype(device) if name == "auto" else getattr(torch, name)


# ---------------------------------------------------------------------------------------------
# The selection picture
# ---------------------------------------------------------------------------------------------


def check_writable(path: str, inputs: list[str]) -> None:
    """Fail now, before minutes of model loading, if the picture could not be written later."""
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise UsageError(f"--save-selection writes a PNG: give a path ending in .png, got {path}")
    try:
        parent_mode = os.stat(p.parent).st_mode
    except FileNotFoundError:
        raise UsageError(f"cannot write {path}: the directory {p.parent} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {os_error_text(e)}") from None
    try:
        target = os.stat(p)
    except FileNotFoundError:
        target = None
    except OSError as e:
        raise UsageError(f"cannot write {path}: {os_error_text(e)}") from None
    for source in inputs:
        if os.path.realpath(path) == os.path.realpath(source) or target and os.path.samefile(path, source):
            raise UsageError(f"--save-selection {path} would overwrite the input itself: choose another file")
    if not stat.S_ISDIR(parent_mode):
        raise UsageError(f"cannot write {path}: {p.parent} is not a directory")
    if target and stat.S_ISDIR(target.st_mode):
        raise UsageError(f"cannot write {path}: it is a directory")
    if target and not os.access(p, os.W_OK):
        raise UsageError(f"cannot write {path}: permission denied")
    try:  # the only sure test is to create a file there (/proc and /sys refuse, whatever access() says)
        fd, probe = tempfile.mkstemp(suffix=".png", dir=p.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"cannot write {path}: cannot create a file in {p.parent} ({os_error_text(e)})") from None


def selection_panel(
    image: Image.Image, boxes: torch.Tensor, kept: torch.Tensor, title: str, size: int = 512, note: str = ""
):
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
    else:  # square crops: one tile per video frame (or the one crop of an image)
        per_frame = visual.cls_attn.shape[1]
        side = math.isqrt(per_frame)
        frames = media if isinstance(media, list) else [media]
        frame_of = sources.clamp(min=0).div(per_frame, rounding_mode="floor")
        for f, (frame, framing) in enumerate(zip(frames, visual.framings, strict=True)):
            part = (frame_of == f) & (sources != anyres.NEWLINE)
            boxes = anyres.patch_boxes(framing, sources[part] % per_frame, side)
            title = f"{select} frame {f}" if len(frames) > 1 else select
            panels.append(selection_panel(frame, boxes, is_kept[part], title, size=256 if len(frames) > 1 else 512))
    width = sum(p.width for p in panels) + 8 * (len(panels) - 1)
    picture = Image.new("RGB", (width, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        picture.paste(p, (x, 0))
        x += p.width + 8
    return picture


def save_png(picture: Image.Image, path: str) -> None:
    """Write atomically: a complete file appears, or none (also on Ctrl-C or a full disk). The file
    gets the usual mode of a new file (0666 less the umask), not the 0600 of a temporary file."""
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=Path(path).parent)
    try:
        with os.fdopen(fd, "wb") as f:
            picture.save(f, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {os_error_text(e)}") from None
        raise


# ---------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------


def write_answer(text: str) -> None:
    """Text to stdout, now. A reader that went away (closed pipe) ends the program quietly in
    `main`; any other failure to write is an OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write the answer to stdout: {os_error_text(e)}") from None


def settings_from(args) -> todre.Settings:
    if args.no_todre:
        return todre.NO_PRUNING
    return todre.variant(
        args.variant,
        retain=args.retain,
        keep_tokens=args.keep_tokens,
        tau=args.tau,
        select=args.select,
        probe_layers=args.probe_layers,
        newlines=args.newlines,
    )


@torch.inference_mode()
def answer(args) -> None:
    """Load, encode, prune, generate: stream the answer, then the picture and --stats."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): file descriptor 1 may become any file
        raise UsageError("stdout is closed: the answer would have nowhere to go")
    settings = settings_from(args)
    device = pick_device(args.device)
    clip = open_video(args.video, args.max_frames) if args.video else None
    media = open_image(args.image) if args.image else clip.frames if clip else None
    if sys.stderr.isatty():  # progress for people; a script reading stderr sees only errors and --stats
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
    model, tokenizer = llava.load(args.model, device, pick_dtype(args.dtype, device))
    num_layers = model.config.text.num_hidden_layers
    if args.probe_layers and max(args.probe_layers) >= num_layers:
        raise UsageError(f"--probe-layers must be below {num_layers}, the model's number of layers")

    start = llava.now(device)
    visual = None
    if media is not None:
        if clip is None:
            visual = model.encode_image(media, pad_to_square=args.pad_to_square)
        else:
            visual = model.encode_video(media, args.video_newlines)
    vision_done = llava.now(device)
    kept = model.select(visual, settings) if visual is not None else None
    visual_embeds = visual.tokens[kept] if visual is not None else None
    select_done = llava.now(device)
    num_visual = None if visual is None else len(kept)
    input_ids = llava.prompt_ids(tokenizer, args.prompt, num_visual, video=clip is not None).to(device)
    model.check_generation(input_ids, visual_embeds, args.max_new_tokens, args.temperature)

    kv_cache = model.new_kv_cache(args.max_new_tokens)
    logits, info = model.prefill(input_ids, visual_embeds, settings, kv_cache)
    prefill_done = llava.now(device)
    generator = torch.Generator(device).manual_seed(args.seed)
    answer_ids, printed = [], ""
    for token in model.decode(
        logits[0, -1], len(input_ids), kv_cache, args.max_new_tokens, args.temperature, generator
    ):
        answer_ids.append(token)
        text = tokenizer.decode(answer_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            write_answer(text[len(printed) :])
            printed = text
    decode_done = llava.now(device)
    write_answer(tokenizer.decode(answer_ids)[len(printed) :] + "\n")  # a multi-byte character cut off, as is
    if args.save_selection:
        save_png(draw_selection(media, visual, kept, settings.select), args.save_selection)

    if args.stats:
        lines = []
        if clip is not None:
            when = ", ".join(f"{t:.1f}" for t in clip.times) + " s" if clip.times else "no timing: spread evenly"
            lines.append(f"video frames: {len(clip.frames)} of {clip.total_frames} ({when})")
        if visual is not None:
            candidates = int((visual.sources != anyres.NEWLINE).sum())
            if settings.keep_tokens is not None and settings.keep_tokens > candidates:
                lines.append(
                    f"Stage 1 budget: --keep-tokens {settings.keep_tokens} clamped to the {candidates} candidates"
                )
            newlines = int((visual.sources[kept] == anyres.NEWLINE).sum())
            lines.append(
                f"visual tokens: {len(visual.tokens)} packed -> {len(kept)} after Stage 1 ({settings.select}, "
                f"{newlines} of {int((visual.sources == anyres.NEWLINE).sum())} newlines kept)"
            )
            ratios = ", ".join(f"layer {i}: a_tv={tv:.4f} a_vt={vt:.4f}" for i, (tv, vt) in info.ratios.items())
            lines.append(f"attention ratios (eq. 7): {ratios or 'not measured (tau = 0)'}")
            lines.append("eviction: " + (f"after layer {info.evict_layer}" if info.evict_layer is not None else "none"))
        lines += [
            f"prompt format: {tokenizer.format.name}",
            f"prompt tokens: {len(input_ids)}",
            f"vision encode: {vision_done - start:.3f} s",
            f"Stage 1 selection: {select_done - vision_done:.3f} s",
            f"prefill: {prefill_done - select_done:.3f} s",
            f"decode: {decode_done - prefill_done:.3f} s for {len(answer_ids)} tokens",
            f"KV cache: {kv_cache.nbytes() / 2**20:.1f} MiB",
            f"peak memory: {llava.peak_memory_mb(device):.0f} MiB",
        ]
        print("\n".join(lines), file=sys.stderr)


def silence_stdout() -> None:
    """Point file descriptor 1 at /dev/null, so the interpreter's last flush of a dead stdout
    (closed pipe, full disk) cannot print a second error at exit."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass


def main(argv=None) -> int:
    """The command line: user errors as one stderr line and exit code 2, output failures as one
    line and 1, a reader that went away (`| head`) quietly as 141, Ctrl-C quietly as 130."""
    try:
        answer(parse_args(argv))
        return 0
    except (UsageError, MediaError, llava.CheckpointError, llava.InputError, OutputError) as e:
        if isinstance(e, OutputError):
            silence_stdout()
        try:
            if sys.stderr is not None:  # print(file=None) would write to stdout
                print(f"error: {e}", file=sys.stderr)
        except OSError:
            pass  # stderr is gone too: the exit code is all that is left
        return 1 if isinstance(e, OutputError) else 2
    except BrokenPipeError:  # like any Unix filter whose reader stopped reading
        silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    if CTRL_C_HANDLED:  # from here on Ctrl-C raises KeyboardInterrupt, so `main` can clean up
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    if CTRL_C_HANDLED:  # a second Ctrl-C during interpreter shutdown: no traceback
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)
