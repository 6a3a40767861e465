"""PNG figures drawn with PIL alone: an image grid (recipes x prompts) and a per-layer SQNR chart.

No matplotlib: the project only needs two simple figures, and PIL is already a dependency. Text
uses PIL's bundled default font (`ImageFont.load_default(size=...)`, Aileron with FreeType,
pillow >= 10.1). That font covers ASCII and little else, so labels are folded to ASCII first
(accents dropped, other characters shown as '?'). Files are written atomically (`artifacts.atomic.write_atomic`:
a temporary name, then a rename), so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from diffquant.artifacts.atomic import write_atomic

__all__ = ["image_grid", "layer_sqnr_plot"]

# matplotlib's "tab10" colours: distinguishable, and familiar from other quantization reports.
PALETTE: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_BACKGROUND = "white"
_INK = "#222222"
_FAINT = "#dddddd"
_ELLIPSIS = "..."


def image_grid(
    rows: Sequence[tuple[str, Sequence[Image.Image]]],
    column_labels: Sequence[str],
    path: Path,
    *,
    min_cell: int = 192,
    font_size: int = 14,
) -> Path:
    """Write a grid PNG: one row per `(label, images)` entry, one column per `column_labels` entry.

    Row labels (e.g. recipe names) are drawn in a column at the left, column labels (e.g.
    "seed 0: a cat on a mat") in a header row; both are word-wrapped and shortened with "..." to
    fit. Every row must hold exactly `len(column_labels)` images. Cells are as large as the largest
    image; images smaller than `min_cell` pixels on their short side are enlarged by a whole factor
    with nearest-neighbour sampling, so the pixels of a tiny test model's 32x32 output stay visible
    and exact. RGBA images are composited on white.

    Example:
        >>> import tempfile
        >>> workdir = tempfile.TemporaryDirectory()
        >>> img = Image.new("RGB", (64, 64), "gray")
        >>> path = image_grid([("bf16", [img, img]), ("w8a8", [img, img])],
        ...                   ["seed 0: a cat", "seed 1: a dog"], Path(workdir.name) / "grid.png")
        >>> path.name, Image.open(path).mode
        ('grid.png', 'RGB')
        >>> workdir.cleanup()
    """
    if not rows:
        raise ValueError("image_grid: no rows — pass at least one (label, images) row")
    if not column_labels:
        raise ValueError("image_grid: no column labels — pass one label per image column")
    n_cols = len(column_labels)
    for label, images in rows:
        if len(images) != n_cols:
            raise ValueError(
                f"image_grid: row {label!r} has {len(images)} images but there are {n_cols} "
                "column labels — pass one image per column in every row"
            )

    font = ImageFont.load_default(size=font_size)
    line_h = _line_height(font)
    max_w = max(img.width for _, images in rows for img in images)
    max_h = max(img.height for _, images in rows for img in images)
    scale = max(1, math.ceil(min_cell / max(1, min(max_w, max_h))))
    cell_w, cell_h = max_w * scale, max_h * scale

    pad, gap = 10, 6
    label_w = 150
    header_lines = [_wrap(_ascii(t), font, cell_w, max_lines=3) for t in column_labels]
    header_h = max(len(lines) for lines in header_lines) * line_h + gap
    row_lines = [_wrap(_ascii(label), font, label_w, max(1, cell_h // line_h)) for label, _ in rows]

    width = pad + label_w + gap + n_cols * cell_w + (n_cols - 1) * gap + pad
    height = pad + header_h + len(rows) * cell_h + (len(rows) - 1) * gap + pad
    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def cell_left(col: int) -> int:
        return pad + label_w + gap + col * (cell_w + gap)

    for col, lines in enumerate(header_lines):
        top = pad + header_h - gap - len(lines) * line_h  # bottom-aligned above the images
        for k, line in enumerate(lines):
            draw.text((cell_left(col), top + k * line_h), line, font=font, fill=_INK)

    for r, (_, images) in enumerate(rows):
        top = pad + header_h + r * (cell_h + gap)
        lines = row_lines[r]
        text_top = top + (cell_h - len(lines) * line_h) // 2
        for k, line in enumerate(lines):
            draw.text((pad, text_top + k * line_h), line, font=font, fill=_INK)
        for col, img in enumerate(images):
            tile = _to_rgb(img)
            if scale > 1:
                tile = tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST)
            left = cell_left(col) + (cell_w - tile.width) // 2
            canvas.paste(tile, (left, top + (cell_h - tile.height) // 2))

    return _save_png_atomic(canvas, Path(path))


def layer_sqnr_plot(
    series: dict[str, Sequence[float]],
    layer_names: Sequence[str],
    path: Path,
    title: str,
    *,
    size: tuple[int, int] = (1200, 600),
) -> Path:
    """Write a dot-and-line chart of per-layer SQNR: x = layer index in model order, y = SQNR in dB.

    `series` maps a name (a recipe) to one value per entry of `layer_names`, in the same order.
    Each series gets its own colour (the 10 tab10 colours; past ten, colours repeat with square
    instead of round markers) and a legend entry
    that names its worst layer (names only, when there are too many series for the height). Lines
    join neighbouring finite points only. `+inf` (no error at all) is drawn as a triangle in a band above
    the plot marked "+inf", `-inf` (zero reference, nonzero error) as a triangle in a band below
    marked "-inf"; NaN is skipped. The y range fits the finite values, with tick labels in dB.

    Example:
        >>> import tempfile
        >>> workdir = tempfile.TemporaryDirectory()
        >>> path = layer_sqnr_plot({"w8a8": [31.5, 28.0, math.inf], "w4a8": [18.2, 12.9, 20.1]},
        ...                        ["conv_in", "down.0.attn1.to_q", "conv_out"],
        ...                        Path(workdir.name) / "sqnr.png", "UNet per-layer SQNR")
        >>> path.name, Image.open(path).size
        ('sqnr.png', (1200, 600))
        >>> workdir.cleanup()
    """
    n = len(layer_names)
    if n == 0:
        raise ValueError("layer_sqnr_plot: no layers — pass at least one layer name")
    for name, values in series.items():
        if len(values) != n:
            raise ValueError(
                f"layer_sqnr_plot: series {name!r} has {len(values)} values for {n} layers — "
                "pass one value per layer name, in the same order"
            )

    width, height = size
    font = ImageFont.load_default(size=14)
    small = ImageFont.load_default(size=12)
    title_font = ImageFont.load_default(size=20)
    line_h = _line_height(font)
    small_h = _line_height(small)

    legend_w = 300
    x0, x1 = 90, width - legend_w - 20
    y_top, y_bottom = 56, height - 64  # frame of the plot area
    values_all = [float(v) for vs in series.values() for v in vs]
    finite = [v for v in values_all if math.isfinite(v)]
    has_pos_inf = any(v == math.inf for v in values_all)
    has_neg_inf = any(v == -math.inf for v in values_all)
    band = 36
    fy0 = y_top + (band if has_pos_inf else 8)  # finite values live in [fy0, fy1]
    fy1 = y_bottom - (band if has_neg_inf else 8)

    lo, hi = (min(finite), max(finite)) if finite else (0.0, 10.0)
    ticks, step = _nice_ticks(lo, hi)
    lo, hi = ticks[0], ticks[-1]

    def y_of(v: float) -> float:
        if v == math.inf:
            return y_top + band / 2
        if v == -math.inf:
            return y_bottom - band / 2
        return fy1 - (v - lo) / (hi - lo) * (fy1 - fy0)

    x_pad = 12

    def x_of(i: int) -> float:
        if n == 1:
            return (x0 + x1) / 2
        return x0 + x_pad + i / (n - 1) * (x1 - x0 - 2 * x_pad)

    canvas = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    draw.text((x0, 14), _ascii(title), font=title_font, fill=_INK)

    # y grid and tick labels
    decimals = _decimals(step)
    for t in ticks:
        y = y_of(t)
        draw.line([(x0, y), (x1, y)], fill=_FAINT, width=1)
        draw.line([(x0 - 5, y), (x0, y)], fill=_INK, width=1)
        label = f"{t:.{decimals}f}"
        draw.text((x0 - 8, y), label, font=font, fill=_INK, anchor="rm")
    for v, mark in ((math.inf, "+inf"), (-math.inf, "-inf")):
        if (v > 0 and has_pos_inf) or (v < 0 and has_neg_inf):
            y = y_of(v)
            edge = y_top + band if v > 0 else y_bottom - band
            draw.line([(x0, edge), (x1, edge)], fill="#999999", width=1)
            draw.text((x0 - 8, y), mark, font=font, fill=_INK, anchor="rm")
    y_label = _rotated_text("SQNR (dB)", font, _INK)
    canvas.paste(y_label, (12, (y_top + y_bottom - y_label.height) // 2), y_label)

    # x ticks
    x_ticks, _ = _nice_ticks(0, n - 1, max_ticks=16, integer=True)
    for t in x_ticks:
        if 0 <= t <= n - 1:
            x = x_of(int(t))
            draw.line([(x, y_bottom), (x, y_bottom + 5)], fill=_INK, width=1)
            draw.text((x, y_bottom + 8), str(int(t)), font=font, fill=_INK, anchor="mt")
    draw.text(
        ((x0 + x1) / 2, height - 22),
        f"layer index in model order ({n} layer{'s' if n != 1 else ''})",
        font=font, fill=_INK, anchor="mm",
    )
    draw.rectangle([x0, y_top, x1, y_bottom], outline=_INK, width=1)

    # data
    radius = 4 if n <= 60 else 3 if n <= 200 else 2
    for k, values in enumerate(series.values()):
        colour = PALETTE[k % len(PALETTE)]
        vals = [float(v) for v in values]
        for i in range(n - 1):
            if math.isfinite(vals[i]) and math.isfinite(vals[i + 1]):
                draw.line(
                    [(x_of(i), y_of(vals[i])), (x_of(i + 1), y_of(vals[i + 1]))],
                    fill=colour, width=2 if n <= 200 else 1,
                )
        for i, v in enumerate(vals):
            if math.isnan(v):
                continue
            x, y = x_of(i), y_of(v)
            if math.isfinite(v):
                # Past the palette's length colours repeat, so the marker shape changes instead.
                box = [x - radius, y - radius, x + radius, y + radius]
                (draw.ellipse if k < len(PALETTE) else draw.rectangle)(box, fill=colour)
            else:
                r = radius + 2
                # Several recipes are often exact on the same layer: stagger them in the band.
                y += ((k % 3) - 1) * (band // 4)
                tip = -r if v > 0 else r  # points up for +inf, down for -inf
                draw.polygon([(x, y + tip), (x - r, y - tip), (x + r, y - tip)], fill=colour)

    # legend: swatch, name, worst layer
    lx, ly = x1 + 20, y_top
    text_w = width - lx - 26 - 10
    entry_h = line_h + 2 * small_h + 6
    # Too many series for name + worst layer each: keep the names, which the colours need.
    detailed = len(series) * entry_h <= (y_bottom - y_top) - 2 * small_h
    for k, (name, values) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        if k < len(PALETTE):
            draw.ellipse([lx + 3, ly + 3, lx + 13, ly + 13], fill=colour)
        else:
            draw.rectangle([lx + 3, ly + 3, lx + 13, ly + 13], fill=colour)
        draw.text((lx + 26, ly), _fit(_ascii(name), font, text_w), font=font, fill=_INK)
        ly += line_h
        if not detailed:
            continue
        worst = _worst_layer(values)
        if worst is None:
            all_exact = all(float(v) == math.inf for v in values)
            detail = ["+inf on every layer (no error)" if all_exact else "no finite values"]
        else:
            i, v = worst
            detail = [
                f"min {v:.{max(decimals, 1)}f} dB at #{i}",
                _fit_left(_ascii(layer_names[i]), small, text_w),
            ]
        for line in detail:
            draw.text((lx + 26, ly), line, font=small, fill="#555555")
            ly += small_h
        ly += 6
    if has_pos_inf or has_neg_inf:
        ly += 4
        notes = ["triangles: +inf = no error (top)"] if has_pos_inf else []
        if has_neg_inf:
            notes.append("-inf = zero reference (bottom)")
        for line in notes:
            draw.text((lx, ly), line, font=small, fill="#555555")
            ly += small_h

    return _save_png_atomic(canvas, Path(path))


# --- helpers -------------------------------------------------------------------------------------


def _save_png_atomic(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def _ascii(text: str) -> str:
    """Fold to what the default font can draw: accents dropped, other non-ASCII as '?'."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in decomposed if not unicodedata.combining(c))
    return "".join(c if 32 <= ord(c) < 127 else ("?" if not c.isspace() else " ") for c in kept)


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    ascent, descent = font.getmetrics()
    return ascent + descent + 2


def _text_width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> float:
    return font.getlength(text)


def _fit(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """`text`, or its longest prefix that fits `width` with '...' appended."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(text.rstrip() + _ELLIPSIS, font) > width:
        text = text[:-1]
    return text.rstrip() + _ELLIPSIS


def _fit_left(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """Like `_fit` but keeps the end: a layer name's tail (`...attn1.to_q`) says what it is."""
    if _text_width(text, font) <= width:
        return text
    while text and _text_width(_ELLIPSIS + text.lstrip(), font) > width:
        text = text[1:]
    return _ELLIPSIS + text.lstrip()


def _wrap(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float, max_lines: int
) -> list[str]:
    """Greedy word wrap into at most `max_lines` lines; overflow ends the last line with '...'."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(candidate, font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = word
        while _text_width(current, font) > width:
            # A word wider than the cell (a path, a URL): break it where it overflows.
            cut = len(current) - 1
            while cut > 1 and _text_width(current[:cut], font) > width:
                cut -= 1
            lines.append(current[:cut])
            current = current[cut:]
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_fit(" ".join(lines[max_lines - 1:]), font, width)]
    return lines or [""]


def _nice_ticks(
    lo: float, hi: float, max_ticks: int = 8, integer: bool = False
) -> tuple[list[float], float]:
    """Ticks at a 1-2-2.5-5 x 10^k step covering [lo, hi]; the first and last enclose the data."""
    if hi - lo < 1e-9:
        lo, hi = lo - 1.0, hi + 1.0
    raw = (hi - lo) / max(max_ticks - 1, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw))
    multipliers = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = magnitude * 10
    for m in multipliers:
        if (hi - lo) / (m * magnitude) <= max_ticks - 1:
            step = m * magnitude
            break
    if integer:
        step = max(1.0, round(step))
    start = math.floor(lo / step + 1e-9) * step
    stop = math.ceil(hi / step - 1e-9) * step
    count = int(round((stop - start) / step))
    return [start + k * step for k in range(count + 1)], step


def _decimals(step: float) -> int:
    """Digits after the point that tell ticks `step` apart (0 for steps >= 1, 1 for 0.5 or 0.25 ...)."""
    if step >= 1:
        return 0
    decimals = -math.floor(math.log10(step))
    return decimals + (0 if abs(round(step, decimals) - step) < 1e-12 else 1)


def _worst_layer(values: Sequence[float]) -> tuple[int, float] | None:
    """(index, value) of the lowest value, -inf included; None when all are NaN or +inf."""
    candidates = [(float(v), i) for i, v in enumerate(values) if float(v) < math.inf]
    if not candidates:
        return None
    v, i = min(candidates)
    return i, v


def _rotated_text(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, fill: str
) -> Image.Image:
    """`text` on a transparent RGBA tile, turned 90 degrees counter-clockwise (reads bottom-up)."""
    left, top, right, bottom = font.getbbox(text)
    tile = Image.new("RGBA", (right + 2, bottom + 2), (0, 0, 0, 0))
    ImageDraw.Draw(tile).text((0, 0), text, font=font, fill=fill)
    return tile.rotate(90, expand=True)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, _BACKGROUND)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    return image.convert("RGB")
