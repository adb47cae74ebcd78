"""Answer a question about an image (or a video) with LLaVA-NeXT, pruned by ToDRE.

    python generate.py --image photo.jpg --prompt "What is in this picture?"

The answer streams to stdout and nothing else goes there; progress, --stats and errors go to stderr.
A user mistake (bad flag, unreadable image, wrong checkpoint) is one line on stderr and exit code 2;
a failure to write the answer or the picture is one line and exit code 1; Ctrl-C is a quiet 130.
"""

import cli

CTRL_C_HANDLED = cli.quiet_ctrl_c(__name__)  # before the slow imports (torch)

import math
import os
import stat
import sys
import tempfile
from pathlib import Path

import torch

import anyres
import picture
import todre
from checkpoint import DEFAULT_MODEL, CheckpointError
from cli import UsageError, check_not_empty, check_number
from media import MediaError, open_image, open_video, os_error_text
from model import ContextError, InputError, Reply, ask, check_video_budget, load


class OutputError(Exception):
    """The answer or the picture could not be written (full disk, closed stdout); one line, exit code 1."""


# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    """The flags, checked: a UsageError names the first one that cannot be used."""
    args = flags().parse_args(argv)
    check_args(args)
    return args


def flags() -> cli.Parser:
    p = cli.Parser(description="LLaVA-NeXT with ToDRE visual token pruning.")
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
    p.add_argument(
        "--transparency",
        choices=["stored", "white"],
        default="stored",
        help="transparent pixels: the colour stored under them, as LLaVA read its images (default), "
        "or white, as transformers' processors composite them",
    )
    p.add_argument("--prompt", required=True, help="the question")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed when --temperature > 0")
    cli.add_device_flags(p)
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
    return p


def check_args(args) -> None:
    """Every rule the flags must follow, before anything slow happens."""

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
def run(args) -> None:
    """Load, encode, prune, generate: stream the answer, then the picture and --stats."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): file descriptor 1 may become any file
        raise UsageError("stdout is closed: the answer would have nowhere to go")
    settings = settings_from(args)
    device = cli.pick_device(args.device)
    clip = open_video(args.video, args.max_frames) if args.video else None
    media = open_image(args.image, args.transparency) if args.image else clip.frames if clip else None
    if sys.stderr.isatty():  # progress for people; a script reading stderr sees only errors and --stats
        print(f"loading {args.model} on {device} ...", file=sys.stderr)
    model, tokenizer = load(args.model, device, cli.pick_dtype(args.dtype, device))
    num_layers = model.config.text.num_hidden_layers
    if args.probe_layers and max(args.probe_layers) >= num_layers:
        raise UsageError(f"--probe-layers must be below {num_layers}, the model's number of layers")

    start = cli.now(device)
    visual = None
    if clip is not None:
        check_video_budget(model, len(media), args.video_newlines, settings, args.max_new_tokens)
        visual = model.encode_video(media, args.video_newlines)
    elif media is not None:
        visual = model.encode_image(media, pad_to_square=args.pad_to_square)
    vision_s = cli.now(device) - start
    printed = ""

    def stream(token_ids):
        """Print what the answer has become, once it cannot change any more: a run of byte tokens
        (SentencePiece's byte fallback) decodes as a whole, so it waits for the token after it,
        and a multi-byte character cut off at the end (byte-level tokenizers) waits for the rest."""
        nonlocal printed
        if tokenizer.is_byte(token_ids[-1]):
            return
        text = tokenizer.decode(token_ids)
        if not text.endswith("\ufffd") and text.startswith(printed):
            write_answer(text[len(printed) :])
            printed = text

    reply = ask(
        model,
        tokenizer,
        args.prompt,
        visual,
        settings,
        args.max_new_tokens,
        args.temperature,
        torch.Generator(device).manual_seed(args.seed),
        video=clip is not None,
        on_token=stream,
        clock=lambda: cli.now(device),
    )
    write_answer(reply.text[len(printed) :] + "\n")  # a multi-byte character cut off, as is
    if args.save_selection:
        try:
            picture.save_png(picture.draw_selection(media, visual, reply.kept, settings.select), args.save_selection)
        except OSError as e:
            raise OutputError(f"cannot write {args.save_selection}: {os_error_text(e)}") from None
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
        run(parse_args(argv))
        return 0
    except ContextError as e:  # the library says what overflowed; the flags to change are ours
        flags = "; --retain or --keep-tokens" if e.visual else ""
        flags += "; --max-frames" if "frames" in str(e) else ""
        cli.print_error(f"{e} (--max-new-tokens{flags})")
        return 2
    except (UsageError, MediaError, CheckpointError, InputError, OutputError) as e:
        if isinstance(e, OutputError):
            silence_stdout()
        cli.print_error(str(e))
        return 1 if isinstance(e, OutputError) else 2
    except BrokenPipeError:  # like any Unix filter whose reader stopped reading
        silence_stdout()
        return 141
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    cli.run(main, CTRL_C_HANDLED)
