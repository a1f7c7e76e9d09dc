"""Drawing: grids of image columns with titles, a heat colour map, a line chart, PNG files. Small
images are scaled up by a whole factor with nearest neighbour, so every patch stays a sharp block."""

from __future__ import annotations

import colorsys
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


def class_colours(num_classes: int) -> torch.Tensor:
    """(num_classes, 3) RGB in [0, 1]: class 0 (background, as segmentation shards have it) dark
    grey, the others hues spread around the colour wheel by the golden ratio, at alternating
    brightness, so neighbouring labels never look alike."""
    colours = [
        colorsys.hsv_to_rgb(label * 0.618034 % 1.0, 0.8, 0.95 if label % 2 == 0 else 0.75)
        for label in range(num_classes)
    ]
    table = torch.tensor(colours, dtype=torch.float32).reshape(num_classes, 3)
    table[0] = 0.15
    return table


def label_picture(labels: torch.Tensor, colours: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """(H, W) class indices -> (3, H, W) colours; ignored pixels (and unknown labels) white."""
    known = (labels >= 0) & (labels < len(colours)) & (labels != ignore_index)
    picture = torch.ones(3, *labels.shape)
    picture[:, known] = colours[labels[known]].T
    return picture


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


def titled_grid(
    columns: list[torch.Tensor],
    titles: list[str],
    min_cell: int = MIN_CELL,
    heading: str = "",
    colour_scale: tuple[str, str] | None = None,
    legend: list[tuple[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Columns of images (each (N, C, H, W), values in [0, 1], C 1 or 3) side by side, one row per
    image, a title over each column -> one uint8 picture (3, height, width). `heading`: what the
    picture shows, over the whole width; `colour_scale`: (low, high) labels of a heat_colours bar
    drawn under the rows, for pictures where colour carries a value; `legend`: (name, RGB colour in
    [0, 1]) swatches under the rows, for pictures where colour names a class."""
    if len(columns) != len(titles):
        raise ValueError(f"{len(columns)} columns but {len(titles)} titles")
    num_rows, _, height, width = columns[0].shape
    scale = max(1, math.ceil(min_cell / max(height, width)))
    cell_h, cell_w = height * scale, width * scale
    font = _font(max(10, min(16, cell_w // 9)))
    total_w = len(columns) * cell_w + (len(columns) + 1) * GAP
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heading_lines = _wrapped(measure, heading, font, total_w - 8) if heading else []
    wrapped = [_wrapped(measure, title, font, cell_w - 4) for title in titles]
    line_height = font.getbbox("Ag")[3] + 3
    top = line_height * len(heading_lines) + (6 if heading_lines else 0)
    header = top + line_height * max(len(lines) for lines in wrapped) + 4
    rows_bottom = header + num_rows * cell_h + (num_rows + 1) * GAP
    bar_height = 2 * line_height + 8 if colour_scale else 0
    entries = _legend_layout(measure, legend or [], font, total_w, line_height)
    legend_height = (max(row for row, _, _, _ in entries) + 1) * line_height + 6 if entries else 0
    canvas = Image.new("RGB", (total_w, rows_bottom + bar_height + legend_height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for line_number, line in enumerate(heading_lines):
        draw.text((4, 3 + line_number * line_height), line, fill=(0, 0, 0), font=font)
    for column, (images, lines) in enumerate(zip(columns, wrapped, strict=True)):
        left = GAP + column * (cell_w + GAP)
        for line_number, line in enumerate(lines):
            text_w = draw.textlength(line, font=font)
            draw.text(
                (left + (cell_w - text_w) / 2, top + 2 + line_number * line_height),
                line,
                fill=(60, 60, 60),
                font=font,
            )
        for row, image in enumerate(images):
            pixels = (image.float().clamp(0, 1).expand(3, -1, -1) * 255).round().to(torch.uint8)
            tile = Image.fromarray(pixels.permute(1, 2, 0).cpu().numpy()).resize(
                (cell_w, cell_h), Image.NEAREST
            )
            canvas.paste(tile, (left, header + GAP + row * (cell_h + GAP)))
    if colour_scale:
        _colour_bar(draw, canvas, (4, rows_bottom + 4, total_w - 4, line_height), colour_scale, font)
    for row, left, name, colour in entries:
        top = rows_bottom + bar_height + 4 + row * line_height
        swatch = tuple(int(round(float(c) * 255)) for c in colour)
        draw.rectangle(
            (left, top + 1, left + line_height - 4, top + line_height - 3), fill=swatch, outline=(0, 0, 0)
        )
        draw.text((left + line_height, top), name, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def _legend_layout(measure, legend: list[tuple[str, torch.Tensor]], font, width: int, line_height: int):
    """(row, left, name, colour) of each legend entry, entries flowing left to right in rows."""
    entries, row, left = [], 0, 4
    for name, colour in legend:
        entry_w = line_height + measure.textlength(name, font=font) + 10
        if left + entry_w > width and left > 4:
            row, left = row + 1, 4
        entries.append((row, left, name, colour))
        left += entry_w
    return entries


def _colour_bar(draw, canvas, box: tuple[int, int, int, int], labels: tuple[str, str], font) -> None:
    """A heat_colours bar from `box` (left, top, right, bar height), its two end labels under it."""
    left, top, right, bar_height = box
    ramp = heat_colours(torch.linspace(0, 1, right - left)).unsqueeze(1).expand(-1, bar_height, -1)
    pixels = (ramp * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()  # (bar_height, width, 3)
    canvas.paste(Image.fromarray(np.ascontiguousarray(pixels)), (left, top))
    low, high = labels
    draw.text((left, top + bar_height + 2), low, fill=(0, 0, 0), font=font)
    draw.text(
        (right - draw.textlength(high, font=font), top + bar_height + 2), high, fill=(0, 0, 0), font=font
    )


def save_png(picture: torch.Tensor, path: Path) -> None:
    """A uint8 picture (C, H, W) as a PNG file."""
    array = picture.permute(1, 2, 0).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path)


def nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) covering [low, high]
    with about `target` intervals: the axis runs from the first tick to the last."""
    span = high - low if high > low else max(1.0, abs(high))
    raw = span / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    if last == first:
        last += 1
    return [round(k * step, 12) for k in range(first, last + 1)]


def tick_labels(ticks: list[float]) -> list[str]:
    """The ticks' texts: one unit for the axis (k or M where its largest tick reaches 10,000 or
    10,000,000) and as many decimals as the step needs in that unit."""
    largest = max(abs(t) for t in ticks)
    size, suffix = (1e6, "M") if largest >= 1e7 else (1e3, "k") if largest >= 1e4 else (1.0, "")
    step = (ticks[1] - ticks[0]) / size
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-9:
        decimals += 1
    return [f"{t / size:,.{decimals}f}{suffix}" if t else "0" for t in ticks]


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    path: Path,
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (640, 400),
) -> None:
    """A PNG line chart: one line with dots per series, round ticks on both axes, a light grid."""
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]
    width, height = size
    left, right, top, bottom = 64, 40, 36, 52
    points = [p for values in series.values() for p in values]
    if not points:
        raise ValueError("a chart needs at least one point")
    x_ticks = nice_ticks(min(p[0] for p in points), max(p[0] for p in points))
    y_ticks = nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    x_low, x_high, y_low, y_high = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x_low) / (x_high - x_low) * (width - left - right),
            top + (y_high - y) / (y_high - y_low) * (height - top - bottom),
        )

    image = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(image)
    font, small = _font(14), _font(11)
    draw.text((left, 8), title, fill=(0, 0, 0), font=font)
    grid = (228, 228, 228)
    for y, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        _, py = at(x_low, y)
        draw.line([left, py, width - right, py], fill=grid)
        draw.text((left - 6 - draw.textlength(label, font=small), py - 7), label, fill=(0, 0, 0), font=small)
    for x, label in zip(x_ticks, tick_labels(x_ticks), strict=True):
        px, _ = at(x, y_low)
        draw.line([px, top, px, height - bottom], fill=grid)
        draw.text(
            (px - draw.textlength(label, font=small) / 2, height - bottom + 4),
            label,
            fill=(0, 0, 0),
            font=small,
        )
    draw.rectangle([left, top, width - right, height - bottom], outline=(0, 0, 0))
    draw.text((left + (width - left - right) / 2 - 30, height - 22), x_label, fill=(0, 0, 0), font=small)
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
