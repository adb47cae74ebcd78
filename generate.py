"""Answer a question about an image (or a video) with LLaVA or Qwen2.5-VL, pruned by ToDRE.

    python generate.py --image photo.jpg --prompt "What is in this picture?"

The answer streams to stdout and nothing else goes there; progress, --stats and errors go to stderr.
A user mistake (bad flag, unreadable image, wrong checkpoint) is one line on stderr and exit code 2;
a failure to write the answer or the picture is one line and exit code 1; Ctrl-C is a quiet 130.
"""

import cli

CTRL_C_HANDLED = cli.quiet_ctrl_c(__name__)  # before the slow imports (torch)

import math
import os
import sys
from pathlib import Path

import torch

import anyres
import files
import picture
import todre
from checkpoint import DEFAULT_MODEL, CheckpointError, peek_model_type
from cli import OutputError, UsageError, check_not_empty, check_number
from media import MediaError, open_image, open_video
from model import ContextError, InputError, Reply, ask, check_video_budget, load
from qwen import VIDEO_REFUSAL, set_pixel_budget


@torch.inference_mode()
def run(args) -> None:
    """File -> image (or frames) -> visual tokens -> Stage 1 -> prompt -> prefill with Stage 2 ->
    decode: stream the answer, then draw the picture and print --stats."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): file descriptor 1 may become any file
        raise UsageError("stdout is closed: the answer would have nowhere to go")
    settings = settings_from(args)
    device = cli.pick_device(args.device)
    clip = open_video(args.video, args.max_frames, args.transparency) if args.video else None
    if clip is not None and peek_model_type(args.model) == "qwen2_5_vl":  # said now, not after minutes of loading
        raise InputError(VIDEO_REFUSAL)
    media = open_image(args.image, args.transparency) if args.image else clip.frames if clip else None
    if sys.stderr.isatty():  # progress for people; a script reading stderr sees only errors and --stats
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
    model, tokenizer = load(args.model, device, args.dtype)  # auto: model.auto_dtype
    set_pixel_budget(model, args.min_pixels, args.max_pixels)
    if args.probe_layers and max(args.probe_layers) >= model.config.text.num_hidden_layers:
        raise UsageError(f"--probe-layers must be below {model.config.text.num_hidden_layers}, the model's layers")

    start = cli.now(device)
    visual = None
    if clip is not None:
        check_video_budget(model, len(media), args.video_newlines, settings, args.max_new_tokens)
        visual = model.encode_video(media, args.video_newlines)  # frames -> pooled tokens in LLM space
    elif media is not None:
        visual = model.encode_image(media, pad_to_square=args.pad_to_square)  # AnyRes tokens in LLM space
    vision_s = cli.now(device) - start
    printed = ""

    def stream(token_ids):  # print what the answer has become, once it cannot change any more
        nonlocal printed
        text = tokenizer.settled_text(token_ids)
        if text is not None and text.startswith(printed):
            write_answer(text[len(printed) :])
            printed = text

    generator = torch.Generator(device).manual_seed(args.seed)
    reply = ask(  # Stage 1, the prompt, prefill with Stage 2, decode
        model, tokenizer, args.prompt, visual, settings, args.max_new_tokens, args.temperature, generator,
        video=clip is not None, on_token=stream, clock=lambda: cli.now(device),
    )  # fmt: skip
    write_answer(reply.text[len(printed) :] + "\n")  # a multi-byte character cut off, as is
    if args.save_selection:
        try:
            picture.save_png(picture.draw_selection(media, visual, reply.kept, settings.select), args.save_selection)
        except OSError as e:
            raise OutputError(f"cannot write {args.save_selection}: {files.os_error_text(e)}") from None
    if args.stats:
        print("\n".join(stats(clip, visual, settings, tokenizer, reply, vision_s, device)), file=sys.stderr)


def stats(clip, visual, settings, tokenizer, reply: Reply, vision_s: float, device) -> list[str]:
    """--stats: what was sampled, kept, measured and evicted, and where the time went."""
    lines = []
    if clip is not None:
        when = ", ".join(f"{t:.1f}" for t in clip.times) + " s" if clip.times else "no timing: spread evenly"
        lines.append(f"video frames: {len(clip.frames)} of {clip.total_frames} ({when})")
    if visual is not None:
        is_newline = visual.sources == anyres.NEWLINE
        candidates = int((~is_newline).sum())
        if settings.keep_tokens is not None and settings.keep_tokens > candidates:
            lines.append(f"Stage 1 budget: --keep-tokens {settings.keep_tokens} clamped to the {candidates} candidates")
        if visual.grid is not None:  # Qwen2.5-VL: merged tokens on the image's own grid, no newlines
            rows, cols = visual.grid[1:]
            lines.append(
                f"visual tokens: {len(visual.tokens)} merged ({rows}x{cols}) -> {len(reply.kept)} after Stage 1 "
                f"({settings.select}, {settings.pivot} pivot)"
            )
        else:
            lines.append(
                f"visual tokens: {len(visual.tokens)} packed -> {len(reply.kept)} after Stage 1 ({settings.select}, "
                f"{int(is_newline[reply.kept].sum())} of {int(is_newline.sum())} newlines kept)"
            )
        ratios = ", ".join(f"layer {i}: a_tv={tv:.4f} a_vt={vt:.4f}" for i, (tv, vt) in reply.info.ratios.items())
        lines.append(f"attention ratios (eq. 7): {ratios or 'not measured (tau = 0)'}")
        evict = reply.info.evict_layer
        lines.append("eviction: " + (f"after layer {evict}" if evict is not None else "none"))
    return lines + [
        f"prompt format: {tokenizer.format.name}",
        f"prompt tokens: {len(reply.prompt_ids)}",
        f"vision encode: {vision_s:.3f} s",
        f"Stage 1 selection: {reply.select_s:.3f} s",
        f"prefill: {reply.prefill_s:.3f} s",
        f"decode: {reply.decode_s:.3f} s for {len(reply.token_ids)} tokens",
        f"KV cache: {reply.kv_cache_bytes / 2**20:.1f} MiB",
        f"peak memory: {cli.peak_memory_mb(device):.0f} MiB",
    ]


def write_answer(text: str) -> None:
    """Text to stdout, now. A reader that went away (closed pipe) ends the program quietly;
    any other failure to write is an OutputError."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as e:
        raise OutputError(f"cannot write the answer to stdout: {files.os_error_text(e)}") from None


def settings_from(args) -> todre.Settings:
    if args.no_todre:
        return todre.NO_PRUNING
    overrides = dict(retain=args.retain, keep_tokens=args.keep_tokens, tau=args.tau, select=args.select)
    overrides.update(pivot=args.pivot, pivot_seed=args.pivot_seed)
    return todre.variant(args.variant, probe_layers=args.probe_layers, newlines=args.newlines, **overrides)


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def flags() -> cli.Parser:
    p = cli.Parser(description="LLaVA or Qwen2.5-VL with ToDRE visual token pruning.")
    add = p.add_argument
    add("--image", help="image file to ask about")
    add("--video", help="video file (.mp4, .mkv, .webm, ...; needs PyAV), directory of frames, or animated GIF/WebP")
    add("--max-frames", "--frames", type=int, default=20, help="--video: 1 frame per second, at most this many")
    add("--video-newlines", choices=["grid", "none"], help="--video: image_newline after every pooled row, or none")
    add("--pad-to-square", action="store_true", help="LLaVA-1.5: pad to a square of the mean colour, not crop")
    add(
        "--min-pixels",
        type=int,
        metavar="N",
        help="Qwen2.5-VL: smallest image area in pixels (default: the checkpoint's)",
    )
    add(
        "--max-pixels",
        type=int,
        metavar="N",
        help="Qwen2.5-VL: largest image area in pixels (default: the checkpoint's)",
    )
    add("--transparency", choices=["stored", "white"], default="stored", help="transparent pixels: stored or white")
    add("--prompt", required=True, help="the question")
    add("--model", default=DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    add("--max-new-tokens", type=int, default=256)
    add("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    add("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    cli.add_device_flags(p)
    add("--variant", default="v1", choices=["v1", "v2"], help="paper version: v1 (default) or v2")
    add("--retain", type=float, help="Stage 1: fraction of the patch tokens kept, in (0, 1] (default 0.1)")
    add("--keep-tokens", type=int, metavar="N", help="Stage 1: keep N tokens instead of a fraction")
    add("--tau", type=float, help="Stage 2 threshold; 0 = off (default: the variant's, 0.03 or 0.10)")
    add("--probe-layers", help="Stage 2: comma-separated 0-based layers (default 15,19,23,27 for 32 layers)")
    add("--select", choices=list(todre.SELECTORS), help="Stage 1 selector (default: the variant's)")
    add("--newlines", choices=["drop", "keep"], default="drop", help="Stage 1: drop or keep the image_newline tokens")
    add("--pivot", choices=["attention", "random"], help="Stage 1's first token: most attended (default) or random")
    add("--pivot-seed", type=int, help="--pivot random: its seed (default 0)")
    add("--no-todre", action="store_true", help="no pruning; the same as --retain 1 --tau 0")
    add("--save-selection", metavar="PNG", help="save the image with the kept visual tokens highlighted")
    add("--stats", action="store_true", help="token counts, attention ratios and timings to stderr")
    return p


def parse_args(argv):
    """The flags, checked before anything slow happens: a UsageError names the first that cannot be used."""
    args = flags().parse_args(argv)
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
    check_number("--pivot-seed", args.pivot_seed, 0, 2**63 - 1)
    check_number("--min-pixels", args.min_pixels, 1, 2**40)
    check_number("--max-pixels", args.max_pixels, 1, 2**40)
    if args.pivot_seed is not None and args.pivot != "random":
        raise UsageError("--pivot-seed seeds a random pivot: add --pivot random")
    if args.probe_layers is not None:
        args.probe_layers = cli.layer_list("--probe-layers", args.probe_layers)
    try:
        args.prompt.encode("utf-8")
    except UnicodeEncodeError as e:  # Python keeps argv bytes that are not UTF-8 as lone surrogates
        raise UsageError(
            f"--prompt is not valid UTF-8 (undecodable byte at character {e.start}): "
            "use a UTF-8 terminal or locale, or re-encode the text"
        ) from None
    if args.save_selection is not None:
        check_picture_path(args.save_selection, [path for path in (args.image, args.video) if path])
    return args


def check_picture_path(path: str, inputs: list[str]) -> None:
    """Fail now, before minutes of model loading, if the picture could not be written later."""
    if not inputs:
        raise UsageError("--save-selection needs --image or --video")
    if Path(path).suffix.lower() != ".png":
        raise UsageError(f"--save-selection writes a PNG: give a path ending in .png, got {path}")
    for source in inputs:
        same = os.path.realpath(path) == os.path.realpath(source)
        if same or os.path.exists(path) and os.path.exists(source) and os.path.samefile(path, source):
            raise UsageError(f"--save-selection {path} would overwrite the input itself: choose another file")
    try:
        files.check_can_write(path)
    except files.FileProblem as e:
        raise UsageError(str(e)) from None


def explain(e: Exception) -> str:
    """The error line; a context overflow adds the flags that change it (the library names none)."""
    if not isinstance(e, ContextError):
        return str(e)
    flags = "; --retain or --keep-tokens" if e.visual else ""
    return f"{e} (--max-new-tokens{flags}{'; --max-frames' if 'frames' in str(e) else ''})"


def main(argv=None) -> int:
    return cli.exit_code(lambda: run(parse_args(argv)), (MediaError, CheckpointError, InputError), explain)


if __name__ == "__main__":
    cli.run(main, CTRL_C_HANDLED)
