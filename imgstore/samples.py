"""A sample collection that works offline: scikit-image's bundled photos plus transformed copies.

``python -m imgstore.samples DIR`` writes ``DIR/originals/<name>.png`` and, per photo, one copy
per transformation in :data:`TRANSFORMS` under ``DIR/copies/<transform>/``: the near-duplicates
a real collection holds (resized, recompressed, cropped, flipped, colour-adjusted, rotated).
Needs scikit-image (``pip install 'imgstore[test]'``), which ships the photos.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageEnhance

from .errors import ConfigError


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
        return Image.open(io.BytesIO(buf.getvalue()))

    return apply


def _crop(fraction: float) -> Callable[[Image.Image], Image.Image]:
    def apply(img: Image.Image) -> Image.Image:
        w, h = img.size
        dw, dh = int(w * (1 - fraction) / 2), int(h * (1 - fraction) / 2)
        return img.crop((dw, dh, w - dw, h - dh))

    return apply


def _resize(scale: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: img.resize((max(8, int(img.width * scale)), max(8, int(img.height * scale))), Image.Resampling.LANCZOS)


TRANSFORMS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "resize_half": _resize(0.5),
    "resize_quarter": _resize(0.25),
    "jpeg_q30": _jpeg(30),
    "jpeg_q60": _jpeg(60),
    "crop_90": _crop(0.9),
    "crop_80": _crop(0.8),
    "flip": lambda img: img.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
    "brighter_20": lambda img: ImageEnhance.Brightness(img).enhance(1.2),
    "darker_20": lambda img: ImageEnhance.Brightness(img).enhance(0.8),
    "rotate_5": lambda img: img.rotate(5, resample=Image.Resampling.BICUBIC, expand=False),
    "rotate_-5": lambda img: img.rotate(-5, resample=Image.Resampling.BICUBIC, expand=False),
}


def skimage_photos() -> list[Path]:
    """The photos bundled in the scikit-image wheel (PNG and JPEG files)."""
    try:
        import skimage
    except ImportError as exc:
        raise ConfigError("the sample photos come with scikit-image: pip install 'imgstore[test]'") from exc
    folder = Path(skimage.__file__).parent / "data"
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg"))


def write_samples(folder: str | Path, transforms: dict[str, Callable[[Image.Image], Image.Image]] | None = None) -> list[Path]:
    """Write the originals and their transformed copies under ``folder``; returns every file written.

    Copies are saved as JPEG at quality 90, the recompression ones at their own quality.
    Existing files are left alone, so a second call is cheap.
    """
    root = Path(folder)
    out = []
    for src in skimage_photos():
        with Image.open(src) as opened:
            img = opened.convert("RGB")
        original = root / "originals" / f"{src.stem}.png"
        if not original.exists():
            original.parent.mkdir(parents=True, exist_ok=True)
            img.save(original)
        out.append(original)
        for name, transform in (transforms or TRANSFORMS).items():
            target = root / "copies" / name / f"{src.stem}.jpg"
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                quality = int(name.removeprefix("jpeg_q")) if name.startswith("jpeg_q") else 90
                transform(img).convert("RGB").save(target, format="JPEG", quality=quality)
            out.append(target)
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m imgstore.samples DIR", file=sys.stderr)
        return 2
    try:
        files = write_samples(args[0])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(files)} sample images in {args[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
