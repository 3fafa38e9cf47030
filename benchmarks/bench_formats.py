"""Decode cost per format against JPEG of the same pixels: a phone-sized photo (4032 x 3024,
scikit-image's photos scaled up) encoded as JPEG, HEIC, AVIF, WebP, PNG and a DNG (LinearRaw,
no preview: the develop path), decoded as ingest does (``draft_size`` of the default
extractor) and in full, interleaved over rounds; medians and the ratio to JPEG.

    python benchmarks/bench_formats.py [--rounds 5] [--photos 4]

Writes benchmarks/results/formats.json and formats.md.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR  # noqa: E402
from imgstore.decode import decode_bytes  # noqa: E402
from imgstore.features import get_extractor  # noqa: E402
from imgstore.samples import skimage_photos  # noqa: E402

SIZE = (4032, 3024)


def encodings(img: Image.Image, tmp: Path) -> dict[str, tuple[bytes, str]]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    from tests.test_formats import write_dng  # the DNG the tests write: LinearRaw, no preview

    out: dict[str, tuple[bytes, str]] = {}
    for name, fmt, kw in (("JPEG q90", "JPEG", {"quality": 90}), ("HEIC q90", "HEIF", {"quality": 90}),
                          ("AVIF q90", "AVIF", {"quality": 90}), ("WebP q90", "WEBP", {"quality": 90}),
                          ("PNG", "PNG", {})):
        buf = io.BytesIO()
        img.save(buf, format=fmt, **kw)
        out[name] = (buf.getvalue(), f"x.{fmt.lower()}")
    dng = write_dng(img, tmp / "x.dng")
    out["DNG (develop)"] = (dng.read_bytes(), "x.dng")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--photos", type=int, default=4)
    args = parser.parse_args()
    draft = get_extractor("efficientnet-lite0").draft_size
    photos = [p for p in skimage_photos() if p.stem in ("chelsea", "coffee", "astronaut", "rocket", "motorcycle_left")]
    times: dict[tuple[str, str], list[float]] = {}
    sizes: dict[str, list[int]] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        sets = []
        for p in photos[: args.photos]:
            img = Image.open(p).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
            enc = encodings(img, Path(tmp_name))
            sets.append(enc)
            for name, (data, _) in enc.items():
                sizes.setdefault(name, []).append(len(data))
        for _ in range(args.rounds):
            for enc in sets:
                for name, (data, fake_name) in enc.items():
                    for mode, size in (("ingest", draft), ("full", None)):
                        t0 = time.perf_counter()
                        decode_bytes(data, path=fake_name, draft_size=size)
                        times.setdefault((name, mode), []).append(time.perf_counter() - t0)
    names = list(sets[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"size": SIZE, "draft_size": draft, "rounds": args.rounds, "photos": len(sets),
              "median_ms": {f"{n} / {m}": round(1000 * med[(n, m)], 1) for n, m in med},
              "mean_bytes": {n: round(statistics.mean(v)) for n, v in sizes.items()}}
    lines = [f"Decode of a {SIZE[0]} x {SIZE[1]} photo ({len(sets)} photos, {args.rounds} interleaved rounds, one "
             f"thread; medians). `ingest`: with the default extractor's draft size {draft}; `full`: every pixel.", "",
             "| format | file size | ingest ms | x JPEG | full ms | x JPEG |", "|---|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {result['mean_bytes'][n] / 1e6:.2f} MB | {1000 * med[(n, 'ingest')]:.1f} | "
                     f"{med[(n, 'ingest')] / med[(names[0], 'ingest')]:.2f} | {1000 * med[(n, 'full')]:.1f} | "
                     f"{med[(n, 'full')] / med[(names[0], 'full')]:.2f} |")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "formats.json").write_text(json.dumps(result, indent=2))
    (RESULTS_DIR / "formats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
