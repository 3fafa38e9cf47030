"""Contact sheets: thumbnails with captions, Pillow only."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .decode import load_image
from .errors import ConfigError, ImgStoreError

THUMB = 200
CAPTION_LINES = 3
LINE_HEIGHT = 16
PAD = 8
BACKGROUND = (250, 250, 250)
HIGHLIGHT = (30, 110, 220)


@dataclass(frozen=True)
class Tile:
    source: str | os.PathLike[str] | bytes | Image.Image | None  # None: a grey "missing" tile
    lines: Sequence[str]
    highlight: bool = False


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _fit(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """Shorten ``text`` from the left (file names matter at their end) to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength("…" + text, font=font) > width:
        text = text[1:]
    return "…" + text


def contact_sheet(tiles: Sequence[Tile], path: str | os.PathLike[str], *, columns: int = 6, title: str | None = None,
                  max_pixels: int | None = None) -> Path:
    """Write a PNG grid of thumbnails, each with up to three caption lines; returns the path.

    Unreadable images become grey tiles (their caption says so) rather than failing the sheet;
    so does an image over ``max_pixels`` (None: the process's limit; the CLI passes the store's).
    Writes only ``path``; its folder must exist.
    """
    out = Path(path)
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist")
    if not tiles:
        raise ConfigError("nothing to draw: no images")
    font = _font()
    columns = max(1, min(columns, len(tiles)))
    rows = -(-len(tiles) // columns)
    cell_w, cell_h = THUMB + 2 * PAD, THUMB + CAPTION_LINES * LINE_HEIGHT + 2 * PAD
    top = LINE_HEIGHT + 2 * PAD if title else 0
    sheet = Image.new("RGB", (columns * cell_w, top + rows * cell_h), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((PAD, PAD), _fit(title, draw, font, sheet.width - 2 * PAD), fill=(0, 0, 0), font=font)
    for n, tile in enumerate(tiles):
        x, y = (n % columns) * cell_w + PAD, top + (n // columns) * cell_h + PAD
        lines = list(tile.lines)
        try:
            if tile.source is None:
                raise ImgStoreError("no file")
            thumb = load_image(tile.source, max_pixels=max_pixels, draft_size=(THUMB, THUMB), thumbnail_size=(THUMB, THUMB)).image
            thumb.thumbnail((THUMB, THUMB), Image.Resampling.LANCZOS)
            sheet.paste(thumb, (x + (THUMB - thumb.width) // 2, y + (THUMB - thumb.height) // 2))
        except (ImgStoreError, OSError) as exc:
            draw.rectangle([x, y, x + THUMB, y + THUMB], fill=(200, 200, 200))
            lines = [*lines[:2], f"unreadable: {exc}"]
        if tile.highlight:
            draw.rectangle([x - 3, y - 3, x + THUMB + 2, y + THUMB + 2], outline=HIGHLIGHT, width=3)
        for i, line in enumerate(lines[:CAPTION_LINES]):
            draw.text((x, y + THUMB + 4 + i * LINE_HEIGHT), _fit(line, draw, font, THUMB), fill=(20, 20, 20), font=font)
    sheet.save(out, format="PNG")
    return out
