"""The inspect picture: one coloured cell per block id, so a user sees where an adapter acts before
choosing block weights.

Drawn with PIL and numpy only (both ship with ComfyUI). The colour scale is linear from 0 to the
largest value, on a perceptually uniform dark-purple-to-yellow ramp (viridis-like: lightness rises
steadily, readable by colour-blind users and in greyscale). Blocks where the file has no layer are
drawn as empty outlines, so "not adapted" never looks like "adapted a little". Text is ASCII only:
the fallback bitmap font of old Pillow versions has no other glyphs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..lycoris_core.blocks import id_group

# Anchor colours of the ramp at equally spaced positions 0..1 (dark purple, blue, teal, green, yellow).
RAMP = np.array([
    (68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
    (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37),
], dtype=np.float64)

BACKGROUND = (30, 30, 34)
TEXT = (230, 230, 230)
MUTED = (150, 150, 155)
EMPTY_OUTLINE = (85, 85, 92)

CELL_WIDTH, CELL_HEIGHT, GAP, GROUP_GAP, MARGIN = 64, 42, 4, 10, 16
MAX_COLUMNS = 20
BAR_HEIGHT = 16


def ramp_colour(position) -> np.ndarray:
    """RGB (0..255, float) of the ramp at `position` in [0, 1] (scalar or array), linearly interpolated."""
    t = np.clip(np.asarray(position, dtype=np.float64), 0.0, 1.0) * (len(RAMP) - 1)
    low = np.minimum(np.floor(t).astype(int), len(RAMP) - 2)
    frac = (t - low)[..., None]
    return RAMP[low] * (1.0 - frac) + RAMP[low + 1] * frac


def value_label(value: float) -> str:
    """Three significant digits, as printed in the cells (1.00, 0.176, 15.4, 1.23e+03)."""
    if value == 0:
        return "0"
    text = f"{value:#.3g}"
    return text[:-1] if text.endswith(".") else text


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable on Pillow >= 10.1
    except (TypeError, OSError, AttributeError):
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _text_height(draw: ImageDraw.ImageDraw, font) -> int:
    _, top, _, bottom = draw.textbbox((0, 0), "Ag0", font=font)
    return bottom - top


def _centred(draw, box_x0: int, box_x1: int, y: int, text: str, font, fill) -> None:
    x = box_x0 + (box_x1 - box_x0 - _text_width(draw, text, font)) // 2
    draw.text((x, y), text, font=font, fill=fill)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if line and _text_width(draw, candidate, font) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return lines + ([line] if line else [])


@dataclass
class Heatmap:
    """A rendered picture and where things are on it (for callers that check or annotate it)."""

    image: Image.Image
    cells: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # id -> (x0, y0, x1, y1)
    labels: dict[str, str] = field(default_factory=dict)  # id -> value text drawn in the cell
    colour_bar: tuple[int, int, int, int] = (0, 0, 0, 0)  # spans 0 .. scale_max, left to right
    scale_max: float = 1.0


def _rows(ids: list[str]) -> tuple[list[tuple[str, list[str]]], int]:
    """(group label, ids) per row, groups in order; long groups wrap into balanced rows."""
    groups: dict[str, list[str]] = {}
    for block in ids:
        groups.setdefault(id_group(block), []).append(block)
    columns = 1
    for members in groups.values():
        rows = math.ceil(len(members) / MAX_COLUMNS)
        columns = max(columns, math.ceil(len(members) / rows))
    out = []
    for group, members in groups.items():
        for start in range(0, len(members), columns):
            out.append((group if start == 0 else "", members[start:start + columns]))
    return out, columns


def render_heatmap(values: dict, title: str, subtitle=(), notes=()) -> Heatmap:
    """Draw `values` (block id -> magnitude, None where the file has no layer; in display order).

    Rows follow the id groups (BASE, IN, M, OUT, TE; BASE, D, S, TE; ...). Colour is linear in
    the value from 0 to the largest value; each cell carries its id and its value to three
    significant digits. `subtitle` lines go under the title; a colour bar gives the scale;
    `notes` are wrapped below it.
    """
    ids = list(values)
    measured = [v for v in values.values() if v is not None]
    scale_max = max(measured) if measured and max(measured) > 0 else 1.0
    title_font, body_font, id_font, small_font = _font(18), _font(14), _font(12), _font(12)

    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, columns = _rows(ids)
    label_width = max([_text_width(probe, g, body_font) for g, _ in rows] + [20]) + 12
    grid_width = label_width + columns * (CELL_WIDTH + GAP) - GAP
    width = max(grid_width, 460) + 2 * MARGIN
    inner = width - 2 * MARGIN
    title_lines = _wrap(probe, title, title_font, inner) or [""]
    subtitle = [subtitle] if isinstance(subtitle, str) else list(subtitle)
    subtitle_lines = [line for text in subtitle for line in _wrap(probe, text, small_font, inner)]
    note_lines = [line for note in notes for line in _wrap(probe, note, small_font, inner)]
    title_h, small_h = _text_height(probe, title_font) + 6, _text_height(probe, small_font) + 5
    group_starts = sum(1 for g, _ in rows if g) - 1

    grid_top = MARGIN + len(title_lines) * title_h + len(subtitle_lines) * small_h + 10
    grid_height = len(rows) * (CELL_HEIGHT + GAP) - GAP + max(group_starts, 0) * GROUP_GAP
    bar_top = grid_top + grid_height + 18 + small_h
    height = bar_top + BAR_HEIGHT + 6 + small_h + 12 + len(note_lines) * small_h + MARGIN
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)

    y = MARGIN
    for line in title_lines:
        draw.text((MARGIN, y), line, font=title_font, fill=TEXT)
        y += title_h
    for line in subtitle_lines:
        draw.text((MARGIN, y), line, font=small_font, fill=MUTED)
        y += small_h

    heatmap = Heatmap(image, scale_max=scale_max)
    id_h, body_h = _text_height(probe, id_font), _text_height(probe, body_font)
    y = grid_top
    for index, (group, members) in enumerate(rows):
        if group and index:
            y += GROUP_GAP
        if group:
            draw.text((MARGIN, y + (CELL_HEIGHT - body_h) // 2 - 2), group, font=body_font, fill=TEXT)
        for column, block in enumerate(members):
            x0 = MARGIN + label_width + column * (CELL_WIDTH + GAP)
            box = (x0, y, x0 + CELL_WIDTH - 1, y + CELL_HEIGHT - 1)
            heatmap.cells[block] = box
            value = values[block]
            if value is None:
                draw.rectangle(box, outline=EMPTY_OUTLINE, width=1)
                ink, label = MUTED, "-"
            else:
                fill = tuple(int(round(c)) for c in ramp_colour(value / scale_max))
                draw.rectangle(box, fill=fill)
                # dark text on the light end of the ramp, light text on the dark end
                ink = (20, 20, 20) if 0.299 * fill[0] + 0.587 * fill[1] + 0.114 * fill[2] > 140 else (245, 245, 245)
                label = value_label(value)
            heatmap.labels[block] = label
            _centred(draw, box[0], box[2] + 1, y + 5, block, id_font, ink)
            _centred(draw, box[0], box[2] + 1, y + 5 + id_h + 7, label, body_font, ink)
        y += CELL_HEIGHT + GAP

    draw.text((MARGIN, bar_top - small_h - 2),
              "colour scale: Frobenius norm of the block's weight change (linear, 0 to max)",
              font=small_font, fill=MUTED)
    bar_x0 = MARGIN + label_width  # under the cells
    bar_width = min(max(grid_width - label_width, 300), width - MARGIN - bar_x0)
    gradient = ramp_colour(np.linspace(0.0, 1.0, bar_width)).round().astype(np.uint8)
    image.paste(Image.fromarray(np.repeat(gradient[None], BAR_HEIGHT, axis=0)), (bar_x0, bar_top))
    heatmap.colour_bar = (bar_x0, bar_top, bar_x0 + bar_width - 1, bar_top + BAR_HEIGHT - 1)
    for i in range(5):
        x = bar_x0 + round(i * (bar_width - 1) / 4)
        draw.line((x, bar_top + BAR_HEIGHT, x, bar_top + BAR_HEIGHT + 3), fill=MUTED)
        tick = value_label(scale_max * i / 4)
        tick_width = _text_width(draw, tick, small_font)
        tx = min(max(x - tick_width // 2, bar_x0), bar_x0 + bar_width - tick_width)  # inside the bar's span
        draw.text((tx, bar_top + BAR_HEIGHT + 5), tick, font=small_font, fill=TEXT)

    y = bar_top + BAR_HEIGHT + 6 + small_h + 12
    for line in note_lines:
        draw.text((MARGIN, y), line, font=small_font, fill=MUTED)
        y += small_h
    return heatmap


def as_comfy_image(image: Image.Image):
    """ComfyUI's IMAGE: float32 tensor [1, H, W, 3] in 0..1."""
    import torch

    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(np.ascontiguousarray(array))[None]
