"""Reading what people ask about: image files, frame directories, animations and video files.

Every failure is a `MediaError` whose message says what is wrong with the file, in words.
Images come out upright (EXIF orientation applied, as transformers' `load_image` does) and in at
most 8 bits per channel. Videos are sampled by frame index exactly as lmms-eval's `llava_vid`
does (the setting of the paper's video table), and only the sampled frames are ever kept.
Video files need PyAV (`pip install av`); frame directories and GIF/WebP do not.
"""

import io
import math
import os
import stat
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from files import FileProblem, os_error_text, read_pipe

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
WAIT_FOR_WRITER_S = 5.0  # how long a FIFO may stay without a writer before that is an error
MAX_STREAM_BYTES = 2**30  # an image read from a pipe larger than this is not an image


class MediaError(Exception):
    """An image or video that cannot be read; the message says why."""


class NotAnImage(MediaError):
    """A file Pillow does not recognise as an image (it may still be a video)."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def open_image(path: str, transparency: str = "stored") -> Image.Image:
    """A decoded image, upright (EXIF orientation applied, as transformers' load_image does), or a
    MediaError saying what is wrong with the file. Transparent pixels keep their stored colour, as
    LLaVA read its training and evaluation images (`transparency="white"`: composited onto white,
    as transformers' processors do)."""
    return decoded(open_lazily(path), path, transparency)


def open_image_bytes(data: bytes, name: str, transparency: str = "stored") -> Image.Image:
    """open_image for an image held in memory (a dataset's embedded image); `name` for messages."""
    return decoded(open_source(io.BytesIO(data), name), name, transparency)


def decoded(image: Image.Image, name: str, transparency: str) -> Image.Image:
    load_pixels(image, name)
    image = to_8_bit(ImageOps.exif_transpose(image))
    return on_white(image) if transparency == "white" else image


def check_path(path: str, what: str) -> os.stat_result:
    """os.stat(path), or a MediaError that says in words what is wrong with the path."""
    if path == "":
        raise MediaError(f"the {what} path is empty (an unset shell variable?)")
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise MediaError(f"{what} not found: {path}") from None
    except OSError as e:
        raise MediaError(f"cannot open {what} {path}: {os_error_text(e)}") from None


@contextmanager
def bomb_guard(name: str):
    """Pillow's decompression-bomb warning and error, both as one MediaError naming the file: an
    image that large is refused before its pixels are decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError(f"{name} is too large to decode safely (over Pillow's decompression-bomb limit)") from None


def open_lazily(path: str) -> Image.Image:
    """The opened (not yet decoded) image at `path`, or a MediaError saying what is wrong."""
    mode = check_path(path, "image").st_mode
    if stat.S_ISDIR(mode):
        raise MediaError(f"{path} is a directory, not an image")
    if stat.S_ISFIFO(mode):
        source = io.BytesIO(read_fifo(path))
    elif stat.S_ISREG(mode):
        source = path
    else:
        kind = "a terminal" if stat.S_ISCHR(mode) and os.path.realpath(path).startswith("/dev/pts") else "a device"
        raise MediaError(f"{path} is {kind}, not an image file")
    return open_source(source, path)


def read_fifo(path: str) -> bytes:
    """An image streamed through a FIFO or pipe (`<(cat x.png)`, `/dev/stdin`), read whole."""
    try:
        return read_pipe(path, MAX_STREAM_BYTES, WAIT_FOR_WRITER_S)
    except FileProblem as e:
        hint = ": start the writer, or pass the image file itself" if "nothing is writing" in str(e) else ""
        raise MediaError(f"{e}{hint}") from None


def open_source(source, name: str) -> Image.Image:
    """Image.open on a path or a file object, its failures as MediaErrors naming `name`."""
    try:
        with bomb_guard(name):
            return Image.open(source)
    except UnidentifiedImageError:
        raise NotAnImage(f"{name} is not an image Pillow can read") from None
    except OSError as e:
        raise MediaError(f"cannot read image {name}: {os_error_text(e)}") from None


def load_pixels(image: Image.Image, path: str) -> None:
    """Decode the pixels now, so that a damaged file fails here, with its name."""
    try:
        with bomb_guard(path):
            image.load()
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt data
        raise MediaError(f"{path} is damaged and cannot be decoded ({e})") from None


def to_8_bit(image: Image.Image) -> Image.Image:
    """Integer images wider than 8 bits, scaled to 8 bits by their real bit depth (Pillow's own
    conversion would clip them, turning most 16-bit pictures white).

    16-bit modes divide by 257 (65535 -> 255). Mode "I" (32-bit) says nothing of the depth its
    data had: values up to 255 are taken as 8-bit, up to 65535 as 16-bit, larger as 32-bit.
    """
    if not image.mode.startswith("I"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16"):
        full_scale = 65535
    else:
        full_scale = next(top for top in (255, 65535, 2**32 - 1) if values.max(initial=0) <= top)
    return Image.fromarray((values * (255 / full_scale)).clip(0, 255).round().astype(np.uint8))


def on_white(image: Image.Image) -> Image.Image:
    """The image with any transparency composited onto white (transformers' convert_to_rgb), as RGB."""
    if "A" not in image.getbands() and image.info.get("transparency") is None:
        return image
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


# ---------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """The frames sampled from a video, with where they came from."""

    frames: list[Image.Image]
    indices: list[int]  # frame numbers in the source
    total_frames: int
    fps: float | None  # frames per second of the source; None where it has no timing

    @property
    def times(self) -> list[float] | None:
        """Seconds into the video of each sampled frame."""
        return None if not self.fps else [i / self.fps for i in self.indices]


def frame_indices(total_frames: int, fps: float | None, max_frames: int) -> list[int]:
    """Which frames to keep, as lmms-eval's llava_vid samples them: one frame per second
    (step = round(fps), every step-th frame from frame 0), and if that is more than max_frames,
    max_frames spread uniformly over the whole video (linspace(0, total - 1) cast to int).
    A source without timing (frame directories, animations without durations) is uniform."""
    if total_frames < 1:
        return []
    indices = list(range(0, total_frames, max(1, round(fps)))) if fps else []
    if not indices or len(indices) > max_frames:
        indices = np.linspace(0, total_frames - 1, min(max_frames, total_frames)).astype(int).tolist()
    return sorted(set(indices))


def open_video(path: str, max_frames: int, transparency: str = "stored") -> Clip:
    """The frames of a video file, a directory of frames or an animated GIF/WebP, sampled by
    `frame_indices`. Only the sampled frames are decoded into pictures and kept. Transparent
    pixels, as for images: their stored colour, or composited onto white ("white")."""
    clip = read_video(path, max_frames)
    if transparency == "white":
        clip.frames = [on_white(frame) for frame in clip.frames]
    return clip


def read_video(path: str, max_frames: int) -> Clip:
    mode = check_path(path, "video").st_mode
    if stat.S_ISDIR(mode):
        return open_frame_directory(path, max_frames)
    if not stat.S_ISREG(mode):
        raise MediaError(f"{path} is not a regular file: pass a video file, an animation or a directory of frames")
    # What the file is, not what its name says: anything Pillow reads is an animation (or a single
    # image), anything else goes to PyAV.
    try:
        open_source(path, path).close()
    except NotAnImage:
        return open_video_file(path, max_frames)
    return open_animation(path, max_frames)


def open_frame_directory(path: str, max_frames: int) -> Clip:
    files = sorted(f for f in Path(path).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
    if not files:
        raise MediaError(f"{path} contains no image frames")
    indices = frame_indices(len(files), None, max_frames)
    return Clip([open_image(str(files[i])) for i in indices], indices, len(files), None)


def open_animation(path: str, max_frames: int) -> Clip:
    """A GIF/WebP/APNG (or any single image): its frames' durations give it a frame rate."""
    animation = open_lazily(path)
    total = getattr(animation, "n_frames", 1)
    work = animation.width * animation.height * total  # every frame is decoded onto the whole canvas
    if work > MAX_ANIMATION_PIXELS:
        raise MediaError(
            f"{path} is a {animation.width}x{animation.height} animation of {total} frames: decoding it would write "
            f"{work / 1e9:.1f} billion pixels, more than this reader does ({MAX_ANIMATION_PIXELS / 1e9:.1f} billion)"
        )
    fps = None
    if total > 1:  # the mean of every frame's duration: frames may differ (a pause, a slow start)
        durations = []
        for i in range(total):
            try:
                animation.seek(i)
            except EOFError:
                raise MediaError(f"{path} is damaged and cannot be decoded (frame {i} is missing)") from None
            durations.append(animation.info.get("duration") or 0)
        fps = 1000 * total / sum(durations) if all(d > 0 for d in durations) else None
    indices = frame_indices(total, fps, max_frames)
    frames = []
    for i in indices:
        try:
            animation.seek(i)  # decodes up to frame i without keeping the frames before it
        except EOFError:
            raise MediaError(f"{path} is damaged and cannot be decoded (frame {i} is missing)") from None
        load_pixels(animation, path)
        frames.append(to_8_bit(animation.copy()))
    return Clip(frames, indices, total, fps)


MAX_ANIMATION_PIXELS = 2**32  # canvas x frames: a 1080p animation of 2,000 frames; a GIF's canvas can be huge
SEEK_AFTER_FRAMES = 3000  # a longer video is read by seeking to each sampled frame, not by decoding them all


def frame_picture(frame, path: str) -> Image.Image:
    """A decoded frame as a picture, refused over Pillow's decompression-bomb limit like an image."""
    if frame.width * frame.height > (Image.MAX_IMAGE_PIXELS or math.inf):
        raise MediaError(
            f"{path} has {frame.width}x{frame.height} frames, too large to decode safely "
            "(over Pillow's decompression-bomb limit)"
        )
    return frame.to_image()


def walk_frames(container, stream, indices: list[int], fps, path: str) -> list[Image.Image]:
    """The frames numbered `indices`, decoding in order and stopping after the last of them."""
    wanted, frames = set(indices), []
    for number, frame in enumerate(container.decode(stream)):
        if number in wanted:
            frames.append(frame_picture(frame, path))
        if len(frames) == len(wanted):
            break
    return frames


def frame_times(container, stream) -> list[int]:
    """Every frame's presentation timestamp in presentation order, from the packets alone (no
    decoding): the i-th is the frame a decoder reading in order numbers i, at a constant frame
    rate or not."""
    return sorted(packet.pts for packet in container.demux(stream) if packet.size and packet.pts is not None)


def seek_frames(container, stream, indices: list[int], path: str) -> list[Image.Image]:
    """The frames numbered `indices`, each reached by seeking to the keyframe before its
    presentation time and decoding from there. A stream whose packets or frames lack timestamps
    sends the whole reading back to walk_frames."""
    times = frame_times(container, stream)
    if len(times) <= max(indices):
        container.seek(0)
        return walk_frames(container, stream, indices, None, path)
    frames = []
    for index in indices:
        container.seek(times[index], stream=stream, backward=True)
        for frame in container.decode(stream):
            if frame.pts is None:
                container.seek(0)
                return walk_frames(container, stream, indices, None, path)
            if frame.pts >= times[index]:
                frames.append(frame_picture(frame, path))
                break
    return frames


def open_video_file(path: str, max_frames: int) -> Clip:
    """An .mp4/.mkv/.webm/.mov/.avi... through PyAV (the decoder transformers and lmms-eval use).

    The frame count comes from the container, or, where it does not say, from counting the
    stream's packets (no decoding); then the frames are decoded in order up to the last sampled
    one (a long video: reached by seeking), and only the sampled ones are turned into pictures,
    so memory holds max_frames frames, never the whole video.
    """
    try:
        import av
    except ImportError:
        raise MediaError(f"reading the video file {path} needs PyAV: pip install av") from None
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError(f"{path} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        indices = frame_indices(total, fps, max_frames)
        with av.open(path) as container:
            stream = container.streams.video[0]
            if total > SEEK_AFTER_FRAMES and stream.time_base:
                frames = seek_frames(container, stream, indices, path)
            else:
                frames = walk_frames(container, stream, indices, fps, path)
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path} is not a video PyAV can read ({e})") from None
    if not frames:
        raise MediaError(f"{path} has no frames")
    return Clip(frames, indices[: len(frames)], total, fps)
