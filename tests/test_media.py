"""media.py: images (EXIF, bit depth, transparency), animations, frame directories and video files,
sampled as lmms-eval's llava_vid samples them."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image

import anyres
import media
from conftest import (
    PINPOINTS,
    cli_args,
    noise_image,
    one_line_error,
    write_video,
)


def llava_vid_indices(total: int, fps: float, max_frames: int) -> list[int]:
    """lmms-eval llava_vid's sampling, read literally: every round(fps)-th frame; if that is more
    than max_frames, np.linspace over the whole video cast to int."""
    indices = [i for i in range(0, total, round(fps))]
    if len(indices) > max_frames:
        indices = [int(x) for x in np.linspace(0, total - 1, max_frames)]
    return indices


@pytest.mark.parametrize("fps", [1, 2, 8, 24, 25, 29.97, 30, 60])
def test_frame_indices_follow_llava_vid_for_every_length(fps):
    for total in [1, 2, 5, 23, 24, 25, 59, 60, 61, 100, 599, 600, 601, 1799, 1800, 7213]:
        for max_frames in (1, 4, 20, 64):
            assert media.frame_indices(total, fps, max_frames) == llava_vid_indices(total, fps, max_frames)
    assert media.frame_indices(5, None, 20) == [0, 1, 2, 3, 4]  # no timing: uniform
    assert media.frame_indices(100, None, 4) == [0, 33, 66, 99]


@pytest.mark.parametrize(
    "frames, fps, max_frames, expected",
    [
        (35, 10, 20, [0, 10, 20, 30]),  # 1 fps
        (35, 10, 3, [0, 17, 34]),  # the uniform cap
        (6, 10, 20, [0]),
    ],
)  # shorter than 1 s
def test_video_files_are_sampled_at_one_frame_per_second(tmp_path, frames, fps, max_frames, expected):
    write_video(tmp_path / "clip.mp4", frames, fps)
    clip = media.open_video(str(tmp_path / "clip.mp4"), max_frames)
    assert clip.indices == expected and clip.total_frames == frames and clip.fps == fps
    assert clip.times == [i / fps for i in expected]
    reds = [np.asarray(f.convert("RGB"), dtype=float)[..., 0].mean() for f in clip.frames]
    assert all(abs(red - 4 * i) < 6 for red, i in zip(reds, expected, strict=True))  # the right frames, decoded


def test_video_file_without_pyav_is_one_line_saying_pip_install_av(tmp_path, capsys, monkeypatch, mha):
    write_video(tmp_path / "clip.mp4", 3, 1)
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` now fails as if PyAV were not installed
    one_line_error(capsys, cli_args(mha, "--video", str(tmp_path / "clip.mp4")), "needs PyAV: pip install av")
    for i in range(2):  # frame directories keep working without it
        noise_image(40, 30, seed=i).save(tmp_path / f"{i}.png")
    assert len(media.open_video(str(tmp_path), 20).frames) == 2


def test_animated_gif_durations_give_its_frame_rate(tmp_path):
    frames = [Image.new("RGB", (40, 30), (i * 25, 0, 0)) for i in range(10)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=1000)  # 1 fps
    clip = media.open_video(str(tmp_path / "clip.gif"), 4)
    assert clip.fps == 1.0 and clip.indices == [0, 3, 6, 9]
    assert [f.convert("RGB").getpixel((0, 0))[0] for f in clip.frames] == [0, 75, 150, 225]
    assert media.open_video(str(tmp_path / "clip.gif"), 50).indices == list(range(10))


def test_an_animations_frame_rate_is_the_mean_of_all_its_frame_durations(tmp_path):
    frames = [Image.new("RGB", (40, 30), (i * 20, 0, 0)) for i in range(12)]
    durations = [100, 300] * 6  # 200 ms on average: 5 fps (the first frame alone would say 10)
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=durations)
    clip = media.open_video(str(tmp_path / "clip.gif"), 20)
    assert clip.fps == 5.0 and clip.indices == [0, 5, 10]


def test_what_a_video_file_is_comes_from_its_content_not_its_name(tmp_path):
    write_video(tmp_path / "clip.mp4", 3, 1)
    (tmp_path / "clip.mp4").rename(tmp_path / "clip.gif")  # an mp4 with the wrong name
    assert media.open_video(str(tmp_path / "clip.gif"), 20).total_frames == 3
    frames = [Image.new("RGB", (40, 30), (i * 25, 0, 0)) for i in range(4)]
    frames[0].save(tmp_path / "anim.mp4", format="GIF", save_all=True, append_images=frames[1:], duration=1000)
    assert media.open_video(str(tmp_path / "anim.mp4"), 20).fps == 1.0  # a GIF named .mp4, read by Pillow


def test_video_frames_over_the_decompression_bomb_limit_are_refused(tmp_path, monkeypatch):
    write_video(tmp_path / "clip.mp4", 3, 1)  # 64 x 48 frames
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(media.MediaError, match="has 64x48 frames, too large to decode safely"):
        media.open_video(str(tmp_path / "clip.mp4"), 20)


def test_animated_gif_decodes_only_the_sampled_frames(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (64, 48), (i * 4, 0, 0)) for i in range(60)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=100)  # 10 fps
    copies = []
    real_copy = Image.Image.copy
    monkeypatch.setattr(Image.Image, "copy", lambda self: copies.append(1) or real_copy(self))
    clip = media.open_video(str(tmp_path / "clip.gif"), 20)
    assert [f.convert("RGB").getpixel((0, 0))[0] for f in clip.frames] == [0, 40, 80, 120, 160, 200]  # 1 per s
    assert len(copies) <= 2 * 6  # the sampled frames (and Pillow's own copies of them), not all 60


def test_frame_directory_skips_entries_that_are_not_files(tmp_path):
    (tmp_path / "sub.png").mkdir()  # a directory named like an image
    for i in range(3):
        noise_image(40, 30, seed=i).save(tmp_path / f"{i}.png")
    assert len(media.open_video(str(tmp_path), 8).frames) == 3


def transparent_files(folder):
    """One file per kind of transparency, each with a transparent region whose stored colour is
    not white: RGBA, LA, a palette with a transparent index, an RGB colour key."""
    rgb = np.asarray(noise_image(60, 40, seed=25))
    alpha = np.full((40, 60), 255, dtype=np.uint8)
    alpha[10:30, 20:40] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(folder / "rgba.png")
    Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA").save(folder / "la.png")
    palette = np.zeros((40, 60), dtype=np.uint8)
    palette[10:30] = 1
    p = Image.fromarray(palette, "P")
    p.putpalette([10, 20, 30, 192, 192, 255] + [0] * 762)
    p.save(folder / "p.png", transparency=1)
    key = rgb.copy()
    key[10:30, 20:40] = (5, 6, 7)
    Image.fromarray(key).save(folder / "key.png", transparency=(5, 6, 7))
    return [folder / name for name in ("rgba.png", "la.png", "p.png", "key.png")]


def test_transparent_pixels_keep_their_stored_colour_as_llava_read_them(tmp_path, image_processor):
    """LLaVA's training and evaluation code opened images with .convert('RGB'), which keeps the
    colour under a transparent pixel; that image through the processor is the reference. White
    (transformers' own compositing) is the --transparency white choice."""
    files = transparent_files(tmp_path)
    for path in files:
        with Image.open(path) as opened:
            llava_read = opened.convert("RGB")
        # PIL keeps a palette's or colour key's transparency as a key on the RGB image, which
        # transformers 5's processor would paint white; LLaVA's transformers never looked at it
        llava_read.info.pop("transparency", None)
        torch.testing.assert_close(
            anyres.preprocess(media.open_image(str(path)), PINPOINTS)[0],
            image_processor(llava_read, return_tensors="pt")["pixel_values"][0],
            atol=0,
            rtol=0,
        )
        white = np.asarray(anyres.to_rgb(media.open_image(str(path), transparency="white")))
        assert (white[15, 25] == 255).all()  # inside the transparent region
    stored = np.asarray(anyres.to_rgb(media.open_image(str(files[2]))))
    assert stored[15, 0].tolist() == [192, 192, 255] and stored[0, 0].tolist() == [10, 20, 30]
    for path in files[:2]:  # alpha channels: transformers' processor composites onto white, as ours does
        with Image.open(path) as opened:
            torch.testing.assert_close(
                anyres.preprocess(media.open_image(str(path), transparency="white"), PINPOINTS)[0],
                image_processor(opened, return_tensors="pt")["pixel_values"][0],
                atol=1e-6,
                rtol=0,
            )


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    from transformers.image_utils import load_image

    upright = noise_image(80, 50, seed=43)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; show rotated 90 degrees clockwise
    upright.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    ours = media.open_image(str(tmp_path / "phone.jpg"))
    assert ours.size == (50, 80)  # upright: taller than wide
    assert np.array_equal(np.asarray(ours), np.asarray(load_image(str(tmp_path / "phone.jpg"))))


@pytest.mark.parametrize(
    "mode, stored, shown",
    [("I", 200, 200), ("I", 51400, 200), ("I", 2**31 - 1, 127), ("I;16", 51400, 200), ("I;16", 200, 1)],
)
def test_integer_images_are_scaled_by_their_real_bit_depth(tmp_path, mode, stored, shown):
    values = np.full((20, 30), stored, dtype=np.int32 if mode == "I" else np.uint16)
    values[0, 0] = 0
    image = Image.fromarray(values, mode=mode) if mode == "I" else Image.fromarray(values)
    assert image.mode == mode
    image.save(tmp_path / "deep.png" if mode == "I;16" else tmp_path / "deep.tif")
    path = tmp_path / ("deep.png" if mode == "I;16" else "deep.tif")
    pixels = np.asarray(media.open_image(str(path)).convert("RGB"))
    assert pixels[5, 5].tolist() == [shown] * 3 and pixels[0, 0].tolist() == [0, 0, 0]


def test_a_long_video_is_read_by_seeking_to_the_same_frames(tmp_path, monkeypatch):
    import av

    with av.open(str(tmp_path / "long.mp4"), "w") as out:  # 150 frames at 25 fps, a keyframe every 12
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 64, 48, "yuv420p", 12
        for i in range(150):
            pixels = np.zeros((48, 64, 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = i, 255 - i
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    walked = media.open_video(str(tmp_path / "long.mp4"), 20)
    sought_with = []
    real_seek_frames = media.seek_frames
    monkeypatch.setattr(media, "seek_frames", lambda *a: sought_with.append(a[2]) or real_seek_frames(*a))
    monkeypatch.setattr(media, "SEEK_AFTER_FRAMES", 100)
    sought = media.open_video(str(tmp_path / "long.mp4"), 20)
    assert sought_with == [[0, 25, 50, 75, 100, 125]] and sought.indices == walked.indices == sought_with[0]
    for a, b in zip(sought.frames, walked.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_variable_frame_rate_video_past_the_seeking_threshold_gives_the_frames_sampled(tmp_path, monkeypatch):
    """A phone video's frames are not evenly spaced: frame n is not at n / mean fps. Seeking goes to
    each sampled frame's own presentation time, so the frames equal decoding in order."""
    from fractions import Fraction

    import av

    with av.open(str(tmp_path / "vfr.mp4"), "w") as out:  # 75 frames 20 ms apart, then 75 frames 60 ms apart
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt, stream.gop_size = 64, 48, "yuv420p", 12
        stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(150):
            pixels = np.zeros((48, 64, 3), dtype=np.uint8)
            pixels[..., 0], pixels[..., 1] = i, 255 - i
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts, frame.time_base = 20 * i if i < 75 else 1500 + 60 * (i - 75), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    walked = media.open_video(str(tmp_path / "vfr.mp4"), 20)
    monkeypatch.setattr(media, "SEEK_AFTER_FRAMES", 100)
    sought = media.open_video(str(tmp_path / "vfr.mp4"), 20)
    assert sought.indices == walked.indices and len(sought.frames) == len(walked.indices) > 3
    for index, a, b in zip(walked.indices, sought.frames, walked.frames, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
        assert abs(int(np.asarray(a)[..., 0].mean()) - index) <= 3  # frame `index` itself (its red channel)


def test_transparency_white_applies_to_video_frames(tmp_path):
    frames = [Image.new("RGBA", (40, 30), (255, 0, 0, 0)) for _ in range(3)]
    frames[0].save(tmp_path / "clear.png")
    (tmp_path / "frames").mkdir()
    for i, frame in enumerate(frames):
        frame.save(tmp_path / "frames" / f"{i}.png")
    for path in (tmp_path / "frames",):
        stored = media.open_video(str(path), 20)
        white = media.open_video(str(path), 20, "white")
        assert stored.frames[0].convert("RGB").getpixel((0, 0)) == (255, 0, 0)  # the colour stored under alpha 0
        assert white.frames[0].getpixel((0, 0)) == (255, 255, 255)


def test_an_animation_with_a_huge_canvas_is_refused_before_decoding(tmp_path, monkeypatch):
    frames = [Image.new("RGB", (400, 300), (40 * i, 0, 0)) for i in range(6)]
    frames[0].save(tmp_path / "big.gif", save_all=True, append_images=frames[1:], duration=40)
    monkeypatch.setattr(media, "MAX_ANIMATION_PIXELS", 400 * 300 * 5)  # as an 8000x8000 canvas of 150 frames
    with pytest.raises(media.MediaError, match=r"big.gif is a 400x300 animation of 6 frames: decoding it would"):
        media.open_video(str(tmp_path / "big.gif"), 20)
