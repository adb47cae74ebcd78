"""The selection picture (the paper's Figure 7): which visual tokens Stage 1 kept, drawn on the image.

Each packed token maps back to the box of original pixels its patch was made from, so kept tokens
are drawn at full brightness on a dimmed copy of the image: for AnyRes the thumbnail and the
high-resolution crops side by side, for video one tile per frame.
"""

import io
import math

import torch
from PIL import Image, ImageDraw

import files
from anyres import NEWLINE, Framing, Layout, resized_size, to_rgb
from model import VisualTokens

# ---------------------------------------------------------------------------------------------
# Where each token's pixels came from
# ---------------------------------------------------------------------------------------------


def token_boxes(lay: Layout, sources: torch.Tensor) -> torch.Tensor:
    """For each packed token, the box (x0, y0, x1, y1) of original-image pixels its patch was made
    from; NaN for newlines.

    Thumbnail tokens map back by the two squash factors. Crop tokens: canvas cell + patch offset
    gives canvas pixels; minus the centred padding they are pixels of the resized image, which
    scale back to the original (any part of a box in the padding is clipped off).
    """
    height, width = lay.image_size
    patch = lay.crop_size // lay.side
    new_h, new_w = resized_size(height, width, *lay.best_resolution)
    top, left = (lay.best_resolution[0] - new_h) // 2, (lay.best_resolution[1] - new_w) // 2
    crop, within = sources.div(lay.side**2, rounding_mode="floor"), sources % lay.side**2
    cell_y, cell_x = ((crop - 1).clamp(min=0) // lay.grid[1]).double(), ((crop - 1).clamp(min=0) % lay.grid[1]).double()
    y0 = cell_y * lay.crop_size + (within // lay.side * patch).double() - top  # pixels of the resized image
    x0 = cell_x * lay.crop_size + (within % lay.side * patch).double() - left
    sy, sx = height / new_h, width / new_w
    mosaic = torch.stack(
        [
            (x0 * sx).clamp(0, width),
            (y0 * sy).clamp(0, height),
            ((x0 + patch) * sx).clamp(0, width),
            ((y0 + patch) * sy).clamp(0, height),
        ],
        dim=-1,
    )
    thumbnail = patch_boxes(Framing.squashed(lay.image_size, lay.crop_size), within, lay.side)
    boxes = torch.where((crop == 0)[:, None], thumbnail, mosaic)
    return torch.where((sources == NEWLINE)[:, None], torch.full_like(boxes, float("nan")), boxes)


def patch_boxes(framing: Framing, patches: torch.Tensor, side: int) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) in original pixels of patches (row-major indices into a side x side
    grid over the crop), clipped to the image (a box wholly in padding has zero area)."""
    height, width = framing.image_size
    cell = framing.crop / side
    r, c = (patches // side).double(), (patches % side).double()
    y0, x0 = framing.offset[0] + r * cell, framing.offset[1] + c * cell  # in scaled pixels
    sy, sx = height / framing.scaled[0], width / framing.scaled[1]
    return torch.stack(
        [
            (x0 * sx).clamp(0, width),
            (y0 * sy).clamp(0, height),
            ((x0 + cell) * sx).clamp(0, width),
            ((y0 + cell) * sy).clamp(0, height),
        ],
        dim=-1,
    )


def grid_boxes(image_size: tuple[int, int], rows: int, cols: int) -> torch.Tensor:
    """Boxes (x0, y0, x1, y1) in original pixels of a rows x cols grid laid over the whole image,
    row-major: Qwen2.5-VL resizes the whole image (no crop, no padding) to a multiple of 28 pixels
    per side, and each merged token is one 28 x 28 cell of it."""
    width, height = image_size
    r, c = torch.meshgrid(torch.arange(rows).double(), torch.arange(cols).double(), indexing="ij")
    r, c = r.flatten(), c.flatten()
    return torch.stack([c * width / cols, r * height / rows, (c + 1) * width / cols, (r + 1) * height / rows], dim=-1)


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def selection_panel(
    image: Image.Image, boxes: torch.Tensor, kept: torch.Tensor, title: str, size: int = 512, note: str = ""
):
    """One picture: the image dimmed, with the boxes of the kept tokens at full brightness."""
    scale = size / max(image.size)
    shown = to_rgb(image).resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
    panel = Image.blend(shown, Image.new("RGB", shown.size), 0.75)
    for x0, y0, x1, y1 in (boxes[kept] * scale).tolist():
        box = (int(x0), int(y0), max(int(x0) + 1, round(x1)), max(int(y0) + 1, round(y1)))
        panel.paste(shown.crop(box), box[:2])
    canvas = Image.new("RGB", (max(panel.width, 160), panel.height + 16), "white")
    canvas.paste(panel, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), f"{title}: {int(kept.sum())} of {len(kept)} kept{note}", fill="black")
    return canvas


def draw_selection(media, visual: VisualTokens, kept: torch.Tensor, select: str) -> Image.Image:
    """The paper's Figure 7 view: for an image, its thumbnail tokens and its high-resolution crop
    tokens side by side; for a video, one tile per frame."""
    sources = visual.sources.cpu()
    is_kept = torch.zeros(len(sources), dtype=torch.bool)
    is_kept[kept.cpu()] = True
    panels = []
    if visual.grid is not None:  # Qwen2.5-VL: the whole image on a grid of merged tokens
        _, rows, cols = visual.grid
        panels.append(selection_panel(media, grid_boxes(media.size, rows, cols), is_kept, f"{select} merged tokens"))
    elif visual.layout is not None:
        side = visual.layout.side
        boxes = token_boxes(visual.layout, sources)
        crop = sources.div(side * side, rounding_mode="floor")
        is_newline = sources == NEWLINE
        newlines = f", newlines {int(is_kept[is_newline].sum())} of {int(is_newline.sum())}"
        for title, part, note in (("thumbnail", crop == 0, ""), ("crops", (crop > 0) & ~is_newline, newlines)):
            panels.append(selection_panel(media, boxes[part], is_kept[part], f"{select} {title}", note=note))
    else:  # square crops: one tile per video frame (or the one crop of an image)
        per_frame = visual.cls_attn.shape[1]
        side = math.isqrt(per_frame)
        frames = media if isinstance(media, list) else [media]
        frame_of = sources.clamp(min=0).div(per_frame, rounding_mode="floor")
        for f, (frame, framing) in enumerate(zip(frames, visual.framings, strict=True)):
            part = (frame_of == f) & (sources != NEWLINE)
            boxes = patch_boxes(framing, sources[part] % per_frame, side)
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
    """Write atomically (files.write_atomic): a complete file appears, or none. An OSError (full
    disk, permissions) is the caller's to report."""
    encoded = io.BytesIO()
    picture.save(encoded, format="PNG")
    files.write_atomic(path, encoded.getvalue())
