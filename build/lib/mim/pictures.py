"""Drawing: grids of image columns with titles, a heat colour map, a line chart, PNG files. Small
images are scaled up by a whole factor with nearest neighbour, so every patch stays a sharp block."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 112  # pixels: a 28x28 image is drawn 4x, a 224x224 one as it is
GAP = 2
BACKGROUND = (255, 255, 255)
# Anchors of matplotlib's "inferno" colour map at 0, 1/4, 1/2, 3/4 and 1: dark = little, bright = much.
_HEAT = torch.tensor(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=torch.float32
)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1], any shape S -> RGB in [0, 1], shape (3, *S)."""
    position = values.clamp(0, 1) * (len(_HEAT) - 1)
    low = position.floor().long().clamp(max=len(_HEAT) - 2)
    weight = (position - low).unsqueeze(-1)
    colours = _HEAT[low] * (1 - weight) + _HEAT[low + 1] * weight  # (*S, 3)
    return colours.movedim(-1, 0) / 255


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current]


def titled_grid(columns: list[torch.Tensor], titles: list[str], min_cell: int = MIN_CELL) -> torch.Tensor:
    """Columns of images (each (N, C, H, W), values in [0, 1], C 1 or 3) side by side, one row per
    image, a title over each column -> one uint8 picture (3, height, width)."""
    if len(columns) != len(titles):
        raise ValueError(f"{len(columns)} columns but {len(titles)} titles")
    num_rows, _, height, width = columns[0].shape
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    font = _font(max(10, min(16, cell_w // 9)))
    canvas = Image.new("RGB", (1, 1))
    wrapped = [_wrapped(ImageDraw.Draw(canvas), title, font, cell_w - 4) for title in titles]
    line_height = font.getbbox("Ag")[3] + 3
    header = line_height * max(len(lines) for lines in wrapped) + 4
    total_w = len(columns) * cell_w + (len(columns) + 1) * GAP
    total_h = header + num_rows * cell_h + (num_rows + 1) * GAP
    canvas = Image.new("RGB", (total_w, total_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for column, (images, lines) in enumerate(zip(columns, wrapped, strict=True)):
        left = GAP + column * (cell_w + GAP)
        for line_number, line in enumerate(lines):
            text_w = draw.textlength(line, font=font)
            draw.text(
                (left + (cell_w - text_w) / 2, 2 + line_number * line_height), line, fill=(0, 0, 0), font=font
            )
        for row, image in enumerate(images):
            pixels = (image.float().clamp(0, 1).expand(3, -1, -1) * 255).round().to(torch.uint8)
            tile = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).resize(
                (cell_w, cell_h), Image.NEAREST
            )
            canvas.paste(tile, (left, header + GAP + row * (cell_h + GAP)))
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def save_png(picture: torch.Tensor, path: Path) -> None:
    """A uint8 picture (C, H, W) as a PNG file."""
    array = picture.permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (640, 400),
) -> None:
    """A PNG line chart: one line with dots per series, the y axis from the data's range."""
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    width, height = size
    left, right, top, bottom = 64, 40, 36, 52
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("a chart needs at least one point")
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    y_low, y_high = min(p[1] for p in points), max(p[1] for p in points)
    y_pad = max(1e-9, (y_high - y_low) * 0.1) if y_high > y_low else max(1.0, abs(y_high) * 0.05)
    y_low, y_high = y_low - y_pad, y_high + y_pad
    x_high = x_high if x_high > x_low else x_low + 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom),
        )

    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    for tick in range(5):
        y = y_low + (y_high - y_low) * tick / 4
        x = x_low + (x_high - x_low) * tick / 4
        _, py = at(x_low, y)
        px, _ = at(x, y_low)
        draw.line([left, py, width - right, py], fill=(225, 225, 225))
        draw.text((4, py - 7), f"{y:.1f}", fill=(0, 0, 0), font=small)
        label = f"{x:,.0f}"
        draw.text(
            (px - draw.textlength(label, font=small) / 2, height - bottom + 4),
            label,
            fill=(0, 0, 0),
            font=small,
        )
    draw.text((left, height - 20), x_label, fill=(0, 0, 0), font=small)
    draw.text((left + 4, top + 4), y_label, fill=(90, 90, 90), font=small)
    for number, (name, values) in enumerate(series.items()):
        colour = palette[number % len(palette)]
        pixels = [at(x, y) for x, y in sorted(values)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        legend_x = width - right - 220
        draw.line(
            [legend_x, top + 12 + 16 * number, legend_x + 18, top + 12 + 16 * number], fill=colour, width=2
        )
        draw.text((legend_x + 24, top + 5 + 16 * number), name, fill=(0, 0, 0), font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
