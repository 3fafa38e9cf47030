"""Decode cost per format against JPEG of the same pixels: a phone-sized photo (4032 x 3024,
scikit-image's photos scaled up) encoded as JPEG, HEIC (without and with the 320-px thumbnail a
phone writes), AVIF, WebP, PNG and a DNG (LinearRaw, no preview: the develop path), decoded as
ingest does (``draft_size`` and ``thumbnail_size`` of the default extractor) and in full,
interleaved over rounds; medians and the ratio to JPEG.

Then what a HEIC's thumbnail does to features (``--features N``): N of bench_ingest_photos'
photos (2000-4000 px, mixed aspect ratios) as HEIC with a 320-px thumbnail; for those whose
thumbnail covers the default extractor's input, the cosine of the features ingest now takes
(from the thumbnail) to those of the full decode and of the JPEG the HEIC was made from, and
whether each finds its JPEG first among all N.

    python benchmarks/bench_formats.py [--rounds 5] [--photos 4] [--features 100]

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
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore.decode import decode_bytes, load_image
from imgstore.features import get_extractor
from imgstore.samples import skimage_photos

import common
from common import RESULTS_DIR

SIZE = (4032, 3024)


def encodings(img: Image.Image, tmp: Path) -> dict[str, tuple[bytes, str]]:
    import pillow_heif

    pillow_heif.register_heif_opener()
    from tests.test_formats import write_dng  # the DNG the tests write: LinearRaw, no preview

    out: dict[str, tuple[bytes, str]] = {}
    for name, fmt, kw in (("JPEG q90", "JPEG", {"quality": 90}), ("HEIC q90", "HEIF", {"quality": 90}),
                          ("HEIC q90, 320-px thumbnail", "HEIF", {"quality": 90, "thumbnails": [320]}),
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
    parser.add_argument("--features", type=int, default=100, help="photos for the thumbnail's feature check (0: none)")
    args = parser.parse_args()
    extractor = get_extractor("efficientnet-lite0")
    draft, thumb = extractor.draft_size, extractor.thumbnail_size
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
                    for mode, size, t_size in (("ingest", draft, thumb), ("full", None, None)):
                        t0 = time.perf_counter()
                        decode_bytes(data, path=fake_name, draft_size=size, thumbnail_size=t_size)
                        times.setdefault((name, mode), []).append(time.perf_counter() - t0)
    names = list(sets[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
              "size": SIZE, "draft_size": draft, "thumbnail_size": thumb, "rounds": args.rounds, "photos": len(sets),
              "median_ms": {f"{n} / {m}": round(1000 * med[(n, m)], 1) for n, m in med},
              "mean_bytes": {n: round(statistics.mean(v)) for n, v in sizes.items()}}
    lines = [f"Decode of a {SIZE[0]} x {SIZE[1]} photo ({len(sets)} photos, {args.rounds} interleaved rounds, one "
             f"thread; medians). `ingest`: with the default extractor's draft size {draft} (JPEG) and thumbnail size "
             f"{thumb} (HEIC); `full`: every pixel.", "",
             "| format | file size | ingest ms | x JPEG | full ms | x JPEG |", "|---|---|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {result['mean_bytes'][n] / 1e6:.2f} MB | {1000 * med[(n, 'ingest')]:.1f} | "
                     f"{med[(n, 'ingest')] / med[(names[0], 'ingest')]:.2f} | {1000 * med[(n, 'full')]:.1f} | "
                     f"{med[(n, 'full')] / med[(names[0], 'full')]:.2f} |")
    if args.features:
        result["thumbnail_features"] = thumbnail_features(extractor, args.features)
        lines += ["", *thumbnail_lines(result["thumbnail_features"])]
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "formats.json").write_text(json.dumps(result, indent=2))
    (RESULTS_DIR / "formats.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def thumbnail_features(extractor: Any, n: int) -> dict[str, Any]:
    """Features from HEIC thumbnails against the full decode and the source JPEG (see the module)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    photos = common.photo_folder(100)[:n]
    feats: dict[str, list[np.ndarray]] = {"thumb": [], "full": [], "jpeg": []}
    used, sizes = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        for i, p in enumerate(photos):
            heic = Path(tmp_name) / f"{p.stem}.heic"
            with Image.open(p) as im:
                im.save(heic, format="HEIF", quality=90, thumbnails=[320])
            ingest = load_image(heic, draft_size=extractor.draft_size, thumbnail_size=extractor.thumbnail_size)
            if ingest.image.size != (ingest.width, ingest.height):
                used.append(i)
                sizes.append(ingest.image.size)
            full = load_image(heic, draft_size=extractor.draft_size)
            jpeg = load_image(p, draft_size=extractor.draft_size)
            for key, img in (("thumb", ingest.image), ("full", full.image), ("jpeg", jpeg.image)):
                f = extractor.extract([img])[0]
                feats[key].append(f / np.linalg.norm(f))
    f = {k: np.stack(v) for k, v in feats.items()}
    to_full = (f["thumb"] * f["full"]).sum(1)[used]
    to_jpeg = (f["thumb"] * f["jpeg"]).sum(1)[used]
    full_to_jpeg = (f["full"] * f["jpeg"]).sum(1)[used]
    first = (f["thumb"] @ f["jpeg"].T).argmax(1)[used] == np.asarray(used)
    first_full = (f["full"] @ f["jpeg"].T).argmax(1)[used] == np.asarray(used)

    def stats(c: np.ndarray) -> dict[str, float]:
        return {"min": round(float(c.min()), 4), "median": round(float(np.median(c)), 4), "mean": round(float(c.mean()), 4)}

    return {"photos": len(photos), "thumbnail_used": len(used), "thumbnail_sizes": sorted({str(s) for s in sizes}),
            "cos_thumb_full": stats(to_full), "cos_thumb_jpeg": stats(to_jpeg), "cos_full_jpeg": stats(full_to_jpeg),
            "finds_its_jpeg_first": int(first.sum()), "finds_its_jpeg_first_full_decode": int(first_full.sum())}


def thumbnail_lines(t: dict[str, Any]) -> list[str]:
    c = {k: t[k] for k in ("cos_thumb_full", "cos_thumb_jpeg", "cos_full_jpeg")}
    return [f"Features (efficientnet-lite0) of {t['photos']} photos as HEIC with a 320-px thumbnail: the thumbnail "
            f"covers the input in {t['thumbnail_used']} (sizes {', '.join(t['thumbnail_sizes'])}; 3:2 and 16:9 "
            "photos' thumbnails are under 224 px high, so those decode in full). For those:", "",
            "| cosine | min | median | mean |", "|---|---:|---:|---:|",
            *(f"| {label} | {c[k]['min']:.4f} | {c[k]['median']:.4f} | {c[k]['mean']:.4f} |" for k, label in (
                ("cos_thumb_full", "thumbnail vs the HEIC's full decode"),
                ("cos_thumb_jpeg", "thumbnail vs the source JPEG"),
                ("cos_full_jpeg", "full decode vs the source JPEG (before this change)"))),
            "", f"Each finds its own JPEG first among all {t['photos']}: {t['finds_its_jpeg_first']} of "
            f"{t['thumbnail_used']} from the thumbnail, {t['finds_its_jpeg_first_full_decode']} from the full decode."]


if __name__ == "__main__":
    main()
