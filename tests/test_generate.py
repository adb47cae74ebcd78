"""generate.py: the command line, its one-line errors, streams, signals and the picture it saves."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

import anyres
import generate
import media
import model
import todre
from conftest import (
    HERE,
    PINPOINTS,
    QUESTION,
    cli_args,
    cli_process,
    hf_runtime_state,
    noise_image,
    one_line_error,
    resave,
    run_cli,
    write_video,
)


def test_cli_names_the_prompt_format_and_reports_a_clamped_token_count(families, tmp_path, capsys):
    llava15 = families("llava15")
    noise_image(200, 150, seed=94).save(tmp_path / "photo.png")
    argv = cli_args(
        llava15,
        "--image",
        str(tmp_path / "photo.png"),
        "--keep-tokens",
        "1000",
        "--max-new-tokens",
        "2",
        "--stats",
        "--pad-to-square",
    )
    code, _, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "Stage 1 budget: --keep-tokens 1000 clamped to the 576 candidates" in err
    assert (
        "visual tokens: 576 packed -> 576 after Stage 1" in err
        and "prompt format: vicuna (LLaVA's system prompt)" in err
    )


def test_streaming_prints_multibyte_characters_made_of_byte_fallback_tokens(mha, tmp_path, capsys, monkeypatch):
    text = "☃é"
    pieces = mha.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(pieces) == 6  # '▁', then 3 + 2 byte-fallback tokens
    monkeypatch.setattr(model.Llava, "decode", lambda self, *args, **kwargs: iter(pieces))
    code, out, err = run_cli(capsys, *cli_args(mha, "--max-new-tokens", "6"))
    assert code == 0 and out == text + "\n", err


def test_what_streams_is_the_whole_answer_decoded_at_once(mha, tmp_path, capsys):
    """Random weights emit runs of byte tokens that decode differently once the run goes on; the
    stream waits for a run to end, so it prints exactly the answer decoded at once."""
    noise_image(120, 90, seed=40).save(tmp_path / "photo.png")
    code, out, err = run_cli(capsys, *cli_args(mha, "--image", str(tmp_path / "photo.png"), "--max-new-tokens", "64"))
    reply = model.ask(
        mha.model, mha.tokenizer, QUESTION, mha.model.encode_image(noise_image(120, 90, seed=40)), max_new_tokens=64
    )
    assert code == 0 and out == reply.text + "\n"
    assert any(mha.tokenizer.is_byte(t) for t in reply.token_ids)  # the case this is about


def test_too_many_frames_for_the_context_are_refused_before_encoding(mha, tmp_path, capsys, monkeypatch):
    for i in range(30):  # 30 frames x (144 + 12 newlines) = 4680 tokens > 4096 without pruning
        noise_image(40, 30, seed=i).save(tmp_path / f"{i:02d}.png")
    monkeypatch.setattr(model.Llava, "encode_video", lambda *a, **k: pytest.fail("encoded before the check"))
    one_line_error(
        capsys,
        cli_args(mha, "--video", str(tmp_path), "--max-frames", "30", "--no-todre", "--max-new-tokens", "8"),
        "30 frames make 4680 visual tokens for the LLM, which with 8 new tokens exceeds the model's 4096-token "
        "context: take fewer frames, allow fewer new tokens, or prune more (--max-new-tokens; --retain or "
        "--keep-tokens; --max-frames)",
    )


def test_cli_answers_about_an_mp4(mha, tmp_path, capsys):
    write_video(tmp_path / "clip.mp4", 35, 10)
    picture = tmp_path / "kept.png"
    argv = cli_args(
        mha, "--video", str(tmp_path / "clip.mp4"), "--max-new-tokens", "3", "--stats", "--save-selection", str(picture)
    )
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and out.strip(), err
    assert "video frames: 4 of 35 (0.0, 1.0, 2.0, 3.0 s)" in err
    assert "visual tokens: 624 packed -> 58 after Stage 1 (kcenter, 0 of 48 newlines kept)" in err  # 4 x (144 + 12)
    with Image.open(picture) as saved:
        assert saved.width == 4 * 256 + 3 * 8


def test_cli_streams_exactly_the_answer_to_stdout(mha, tmp_path):
    image = tmp_path / "photo.png"
    noise_image(517, 301, seed=17).save(image)
    argv = cli_args(mha, "--image", str(image), "--max-new-tokens", "12", "--stats")
    done = subprocess.run(
        [sys.executable, str(HERE / "generate.py"), *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    settings = todre.Settings()
    visual, kept, ids = mha.pruned(Image.open(image), settings)
    answer = model.generate(mha.model, ids, visual.tokens[kept], settings, 12).token_ids
    assert done.stdout == mha.tokenizer.decode(answer) + "\n"
    for fact in (
        "visual tokens: 1608 packed -> 158 after Stage 1 (kcenter, 0 of 24 newlines kept)",
        "attention ratios (eq. 7): layer 0: a_tv=",
        "eviction:",
        "prefill:",
        "decode:",
        "peak memory:",
    ):
        assert fact in done.stderr


def test_cli_stats_are_complete_when_generation_stops_at_eos(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 80).save(tmp_path / "photo.png")
    real_decode_step = model.Llava.decode_step
    steps = []

    def eos_third(self, token, position, kv_cache):  # the model's own decoding, fed EOS as its third token
        steps.append(token)
        logits = real_decode_step(self, token, position, kv_cache)
        if len(steps) == 2:
            logits = torch.full_like(logits, -1e9)
            logits[self.config.text.eos_token_id] = 0
        return logits

    monkeypatch.setattr(model.Llava, "decode_step", eos_third)
    argv = cli_args(mha, "--image", str(tmp_path / "photo.png"), "--max-new-tokens", "10", "--stats")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and len(mha.tokenizer.encode(out.strip(), add_special_tokens=False).ids) >= 1
    assert "for 2 tokens" in err and "decode: 0.000 s" not in err and "KV cache: 0.0 MiB" not in err


def test_cli_no_todre_equals_retain_1_tau_0(mha, tmp_path, capsys):
    image = tmp_path / "photo.png"
    noise_image(300, 500, seed=18).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "10")
    code1, out1, _ = run_cli(capsys, *common, "--no-todre")
    code2, out2, _ = run_cli(capsys, *common, "--retain", "1", "--tau", "0")
    assert code1 == code2 == 0 and out1 == out2 and out1.strip()


def test_cli_variant_and_overrides_reach_the_model(mha, tmp_path, capsys):
    image = tmp_path / "photo.png"
    noise_image(300, 500, seed=19).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--stats")
    _, _, err = run_cli(capsys, *common, "--variant", "v2", "--tau", "1e-9")
    assert "(maxsum," in err and "layer 0: a_tv" in err  # 7L/8 of 2 layers: paper layer 1 = index 0
    _, _, err = run_cli(capsys, *common, "--variant", "v2", "--probe-layers", "0", "--tau", "2")
    assert "layer 0: a_tv" in err and "eviction: after layer 0" in err
    code, _, err = run_cli(capsys, *common, "--probe-layers", "5")
    assert code == 2 and "--probe-layers must be below 2" in err


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1x1", "1x4000", "LA"])
def test_cli_accepts_odd_but_valid_images(mha, tmp_path, capsys, mode):
    rgb = noise_image(97, 61, seed=24)
    path = tmp_path / ("image.tif" if mode == "CMYK" else "image.png")
    if mode == "1x1":
        rgb.resize((1, 1)).save(path)
    elif mode == "1x4000":
        rgb.resize((1, 4000)).save(path)
    elif mode == "I;16":
        Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).save(path)
    else:
        rgb.convert(mode).save(path)
    code, out, err = run_cli(capsys, *cli_args(mha, "--image", str(path), "--max-new-tokens", "2"))
    assert code == 0, err
    if mode in ("L", "RGBA", "P", "CMYK", "LA"):  # the same pixels as transformers' processor
        with Image.open(path) as opened:
            torch.testing.assert_close(
                anyres.preprocess(media.open_image(str(path)), PINPOINTS)[0],
                mha.image_processor(opened, return_tensors="pt")["pixel_values"][0],
                atol=1e-6,
                rtol=0,
            )
    if mode == "I;16":  # 16-bit grey is scaled to 8 bits (65535 -> 255), not clipped to white: exactly
        eight_bit = rgb.convert("L")  # the 8-bit grey that was stored as 16 bits (x 257)
        torch.testing.assert_close(
            anyres.preprocess(media.open_image(str(path)), PINPOINTS)[0],
            mha.image_processor(eight_bit.convert("RGB"), return_tensors="pt")["pixel_values"][0],
            atol=0,
            rtol=0,
        )


def test_cli_saves_the_selection_picture(mha, tmp_path, capsys):
    image, picture = tmp_path / "photo.png", tmp_path / "kept.png"
    noise_image(517, 301, seed=25).save(image)
    code, _, err = run_cli(
        capsys, *cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--save-selection", str(picture))
    )
    assert code == 0, err
    with Image.open(picture) as saved:
        assert saved.format == "PNG" and saved.width > 2 * 512  # thumbnail and crops side by side
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(5):
        noise_image(120, 90, seed=30 + i).save(frames / f"{i:03d}.png")
    argv = ["--video", str(frames), "--max-frames", "3", "--max-new-tokens", "2", "--save-selection", str(picture)]
    code, _, err = run_cli(capsys, *cli_args(mha, *argv, "--select", "cls", "--stats"))
    assert code == 0, err
    assert "video frames: 3 of 5 (no timing: spread evenly)" in err
    assert "visual tokens: 468 packed -> 43 after Stage 1 (cls, 0 of 36 newlines kept)" in err  # 3 x (144 + 12)
    with Image.open(picture) as saved:
        assert saved.width == 3 * 256 + 2 * 8  # one tile per frame


def test_cli_newlines_flag_reaches_stats_and_picture(mha, tmp_path, capsys):
    image, picture = tmp_path / "photo.png", tmp_path / "kept.png"
    noise_image(517, 301, seed=29).save(image)
    common = cli_args(mha, "--image", str(image), "--max-new-tokens", "2", "--stats")
    code, _, err = run_cli(capsys, *common, "--newlines", "keep", "--save-selection", str(picture))
    assert code == 0 and "1608 packed -> 182 after Stage 1 (kcenter, 24 of 24 newlines kept)" in err, err
    code, _, err = run_cli(capsys, *common)
    assert code == 0 and "1608 packed -> 158 after Stage 1 (kcenter, 0 of 24 newlines kept)" in err, err
    one_line_error(capsys, [*common, "--newlines", "some"], "argument --newlines: invalid choice: 'some'")


def bad_files(tmp):
    (tmp / "empty.png").write_bytes(b"")
    (tmp / "loop.png").symlink_to(tmp / "loop.png")
    (tmp / "link.png").symlink_to(tmp / "whole.png")
    (tmp / "notes.txt").write_text("hello")
    (tmp / "notes.mp4").write_text("hello")
    noise_image(200, 200).save(tmp / "whole.png")
    (tmp / "truncated.png").write_bytes((tmp / "whole.png").read_bytes()[:3000])
    (tmp / "config_only").mkdir()
    (tmp / "config_only" / "config.json").write_text(json.dumps({"model_type": "llama"}))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--image", "{tmp}/nope.png"], "image not found: "),
        (["--image", "{tmp}/empty.png"], "is not an image Pillow can read"),
        (["--image", "{tmp}/notes.txt"], "is not an image Pillow can read"),
        (["--image", "{tmp}/truncated.png"], "is damaged and cannot be decoded"),
        (["--image", "{tmp}"], "is a directory, not an image"),
        (["--retain", "0"], "--retain must be a finite number in (0, 1], got 0.0"),
        (["--retain", "1.5"], "--retain must be a finite number in (0, 1]"),
        (["--retain", "nan"], "--retain must be a finite number in (0, 1], got nan"),
        (["--tau", "-0.1"], "--tau must be a finite number in [0, inf)"),
        (["--tau", "nan"], "--tau must be a finite number in [0, inf), got nan"),
        (["--tau", "inf"], "--tau must be a finite number in [0, inf), got inf"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be an integer in [1, inf)"),
        (["--temperature", "-1"], "--temperature must be a finite number in [0, inf)"),
        (["--temperature", "nan"], "--temperature must be a finite number in [0, inf), got nan"),
        (["--seed", str(2**64)], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--seed", "1" + "0" * 400], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--seed", "-1"], "--seed must be an integer in [0, 18446744073709551615]"),
        (["--max-frames", "0"], "--max-frames must be an integer in [1, 10000]"),
        (["--frames", "0"], "--max-frames must be an integer in [1, 10000]"),
        (["--video", "{tmp}/notes.mp4"], "is not a video PyAV can read"),
        (["--video", "/dev/zero"], "/dev/zero is not a regular file"),
        (["--image", ""], "--image is empty (an unset shell variable?)"),
        (["--video", ""], "--video is empty (an unset shell variable?)"),
        (["--model", ""], "--model is empty"),
        (["--no-todre", "--retain", "0.5"], "--no-todre means no pruning: drop --retain/--keep-tokens/--tau"),
        (["--no-todre", "--keep-tokens", "64"], "--no-todre means no pruning"),
        (["--retain", "0.5", "--keep-tokens", "64"], "give --retain (a fraction) or --keep-tokens (a count), not both"),
        (["--keep-tokens", "0"], "--keep-tokens must be an integer in [1, inf)"),
        (["--no-todre", "--tau", "0.1"], "--no-todre means no pruning: drop --retain/--keep-tokens/--tau"),
        (["--image", "{tmp}/" + "a" * 300 + ".png"], "a name in the path is longer than the file system allows"),
        (["--video", "{tmp}/" + "a" * 300], "a name in the path is longer than the file system allows"),
        (["--model", "{tmp}/" + "a" * 300], "a name in the path is longer than the file system allows"),
        (
            ["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/" + "a" * 300 + ".png"],
            "a name in the path is longer than the file system allows",
        ),
        (["--image", "{tmp}/loop.png"], "the path is a loop of symbolic links"),
        (["--model", "{tmp}/loop.png"], "the path is a loop of symbolic links"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/whole.png"], "would overwrite the input itself"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/link.png"], "would overwrite the input itself"),
        (["--image", "{tmp}/whole.png", "--save-selection", "/proc/x.png"], "cannot create a file in /proc"),
        (["--image", "{tmp}/whole.png", "--save-selection", "/sys/x.png"], "cannot create a file in /sys"),
        (["--image", "/dev/zero"], "/dev/zero is a device, not an image file"),
        (["--probe-layers", "a,b"], "--probe-layers must be comma-separated"),
        (["--retain", "lots"], "invalid float value: 'lots'"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--image", "{tmp}/whole.png", "--video", "{tmp}"], "give --image or --video, not both"),
        (["--video", "{tmp}/config_only"], "contains no image frames"),
        (["--save-selection", "{tmp}/kept.png"], "--save-selection needs --image or --video"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/no/such/dir/kept.png"], "does not exist"),
        (["--image", "{tmp}/whole.png", "--save-selection", "{tmp}/kept.jpg"], "ending in .png"),
        (["--model", "{tmp}/no_such_dir"], "is not a checkpoint directory"),
        (["--model", "{tmp}"], "config.json is missing"),
        (
            ["--model", "{tmp}/config_only"],
            "holds a 'llama' model; supported: llava, llava_next, llava_next_video, qwen2_5_vl",
        ),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    bad_files(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in argv]
    code, out, err = run_cli(capsys, "--prompt", "hi", "--device", "cpu", *argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_cli_rejects_a_decompression_bomb(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 100).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # the same check Pillow makes at ~89 M pixels
    one_line_error(capsys, cli_args(mha, "--image", str(tmp_path / "big.png")), "decompression-bomb limit")


def test_cli_rejects_a_prompt_longer_than_the_context(mha, tmp_path, capsys):
    noise_image(672, 672).save(tmp_path / "big.png")  # 2928 visual tokens without pruning
    one_line_error(
        capsys,
        cli_args(mha, "--image", str(tmp_path / "big.png"), "--no-todre", "--max-new-tokens", "2000"),
        "exceeds the model's 4096-token context",
    )


def test_too_long_text_only_prompt_says_to_shorten_it(mha, capsys):
    one_line_error(
        capsys,
        cli_args(mha, "--max-new-tokens", "4090"),
        "plus 4090 new tokens exceeds the model's 4096-token context: shorten the prompt or allow fewer new tokens "
        "(--max-new-tokens)\n",
    )


def test_cli_refuses_a_prompt_that_is_not_utf8(mha, capsys):
    latin1_prompt = os.fsdecode(b"caf\xe9 ?")  # what Python makes of Latin-1 bytes in argv
    one_line_error(capsys, cli_args(mha, "--prompt", latin1_prompt), "--prompt is not valid UTF-8")
    with pytest.raises(model.InputError, match="not valid UTF-8"):
        mha.prompt(None, latin1_prompt)


def test_cli_rejects_checkpoints_with_missing_or_misshaped_tensors(mha, tmp_path, capsys):
    state = hf_runtime_state(mha)
    del state["model.multi_modal_projector.linear_2.bias"]
    state["model.image_newline"] = torch.zeros(7)
    directory = resave(mha, tmp_path / "broken", state)
    (directory / "tokenizer.json").write_text((mha.directory / "tokenizer.json").read_text())
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), "missing (1): multi_modal_projector.linear_2.bias")
    one_line_error(capsys, cli_args(mha, "--model", str(directory)), "wrong shape (1): model.image_newline (7,)")


def test_cli_checks_the_picture_path_before_loading_the_model(tmp_path, capsys, monkeypatch):
    noise_image(50, 50).save(tmp_path / "photo.png")

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(generate, "load", no_load)
    (tmp_path / "taken.png").mkdir()
    one_line_error(
        capsys,
        [
            "--prompt",
            "hi",
            "--image",
            str(tmp_path / "photo.png"),
            "--save-selection",
            str(tmp_path / "photo.png" / "x.png"),
        ],
        "a part of the path is not a directory",
    )
    one_line_error(
        capsys,
        ["--prompt", "hi", "--image", str(tmp_path / "photo.png"), "--save-selection", str(tmp_path / "taken.png")],
        "it is a directory",
    )


def test_cli_offline_hub_says_how_to_use_a_local_directory(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(HERE / "generate.py"), "--prompt", "hi", "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2 and done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1 and "pass a local checkpoint directory with --model DIR" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cli_cuda_without_cuda_is_a_clear_error(capsys):
    one_line_error(capsys, ["--prompt", "hi", "--device", "cuda"], "no CUDA GPU is available")


def test_cli_image_from_a_pipe_works_and_a_fifo_without_writer_is_an_error(mha, tmp_path, capsys, monkeypatch):
    noise_image(97, 61, seed=41).save(tmp_path / "photo.png")
    png = (tmp_path / "photo.png").read_bytes()
    expected = np.asarray(Image.open(tmp_path / "photo.png"))
    read_end, write_end = os.pipe()  # what `--image <(cat photo.png)` passes: /dev/fd/N

    def write(fd, delay):
        time.sleep(delay)
        with os.fdopen(fd, "wb") as f:
            f.write(png)

    threading.Thread(target=write, args=(write_end, 0.2)).start()
    assert np.array_equal(np.asarray(media.open_image(f"/dev/fd/{read_end}")), expected)
    os.close(read_end)

    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)
    threading.Thread(target=lambda: write(os.open(fifo, os.O_WRONLY), 0)).start()  # a writer that comes late
    assert np.array_equal(np.asarray(media.open_image(str(fifo))), expected)
    monkeypatch.setattr(media, "WAIT_FOR_WRITER_S", 0.3)
    started = time.monotonic()
    one_line_error(capsys, cli_args(mha, "--image", str(fifo)), f"nothing is writing to {fifo}")
    assert time.monotonic() - started < 10


def test_cli_reads_the_image_from_dev_stdin(mha, tmp_path):
    noise_image(120, 90, seed=42).save(tmp_path / "photo.png")
    argv = [sys.executable, str(HERE / "generate.py"), *cli_args(mha, "--image", "/dev/stdin", "--max-new-tokens", "4")]
    with open(tmp_path / "photo.png", "rb") as png:
        through_pipe = subprocess.run(argv, input=png.read(), capture_output=True, timeout=300)
    direct = subprocess.run(
        argv[:-4] + ["--image", str(tmp_path / "photo.png"), "--max-new-tokens", "4"], capture_output=True, timeout=300
    )
    assert through_pipe.returncode == direct.returncode == 0, through_pipe.stderr
    assert through_pipe.stdout == direct.stdout and through_pipe.stdout.strip()


def test_cli_reader_that_goes_away_ends_quietly(mha, tmp_path):
    """`generate.py ... | head -c 1`: the pipe closes under the writer; like any Unix filter, no traceback."""
    process = cli_process(mha, tmp_path, "--max-new-tokens", "8", stdout=subprocess.PIPE)
    process.stdout.close()  # the reader is gone before the first token
    _, err = process.communicate(timeout=300)
    assert process.returncode == 141 and err == ""


@pytest.mark.parametrize(
    "stdout, code, message",
    [
        ("closed", 2, "error: stdout is closed: the answer would have nowhere to go\n"),
        ("/dev/full", 1, "error: cannot write the answer to stdout: no space left on the device\n"),
    ],
)
def test_cli_stdout_that_cannot_be_written_is_one_error_line(mha, tmp_path, stdout, code, message):
    if stdout == "closed":  # `>&-` in a shell
        argv = " ".join(
            f"'{a}'" for a in [sys.executable, str(HERE / "generate.py"), *cli_args(mha, "--max-new-tokens", "4")]
        )
        done = subprocess.run(["bash", "-c", argv + " >&-"], capture_output=True, text=True, timeout=300)
        err, returncode = done.stderr, done.returncode
    else:
        with open(stdout, "w") as full:
            process = cli_process(mha, tmp_path, "--max-new-tokens", "4", stdout=full)
            _, err = process.communicate(timeout=300)
            returncode = process.returncode
    assert returncode == code and err == message


@pytest.mark.parametrize("after_s", [0.2, 1.5])
def test_cli_ctrl_c_during_start_up_is_quiet(mha, tmp_path, after_s):
    """Ctrl-C while torch imports or the model loads: no traceback, the shell sees 130 (SIGINT)."""
    process = cli_process(mha, tmp_path, "--max-new-tokens", "200", stdout=subprocess.PIPE)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=300)
    assert process.returncode in (-signal.SIGINT, 130) and "Traceback" not in err and err.strip() == ""


def test_cli_ctrl_c_during_generation_exits_quietly_without_a_picture(mha, tmp_path, capsys, monkeypatch):
    noise_image(200, 150).save(tmp_path / "photo.png")
    real_decode = model.Llava.decode

    def interrupted(self, *args, **kwargs):
        tokens = real_decode(self, *args, **kwargs)
        yield next(tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(model.Llava, "decode", interrupted)
    argv = cli_args(mha, "--image", str(tmp_path / "photo.png"), "--save-selection", str(tmp_path / "kept.png"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 130 and "Traceback" not in err and err.strip() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # no picture, no temporary file


def test_cli_picture_that_cannot_be_written_is_one_line_after_the_answer(mha, tmp_path, capsys, monkeypatch):
    noise_image(120, 90, seed=45).save(tmp_path / "photo.png")

    def disk_full(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", disk_full)
    code, out, err = run_cli(
        capsys,
        *cli_args(
            mha,
            "--image",
            str(tmp_path / "photo.png"),
            "--max-new-tokens",
            "4",
            "--save-selection",
            str(tmp_path / "kept.png"),
        ),
    )
    assert code == 1 and out.strip()  # the answer stays printed
    assert err == f"error: cannot write {tmp_path / 'kept.png'}: no space left on the device\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.png"]  # no picture, no temporary file


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_cli_picture_gets_the_usual_mode_of_a_new_file(mha, tmp_path, capsys, umask):
    noise_image(120, 90, seed=45).save(tmp_path / "photo.png")
    old = os.umask(umask)
    try:
        code, _, err = run_cli(
            capsys,
            *cli_args(
                mha,
                "--image",
                str(tmp_path / "photo.png"),
                "--max-new-tokens",
                "1",
                "--save-selection",
                str(tmp_path / "kept.png"),
            ),
        )
    finally:
        os.umask(old)
    assert code == 0, err
    assert stat.S_IMODE(os.stat(tmp_path / "kept.png").st_mode) == 0o666 & ~umask
