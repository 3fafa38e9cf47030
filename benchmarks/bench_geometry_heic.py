"""The geometric check on a phone HEIC's 512-px thumbnail against the same check on its whole
decode: same verdicts? how much faster?

dedup's geometric check works on the picture fitted in 512 x 512 (``geometry.WORK_SIDE``). A
HEIC whose embedded thumbnail covers that (a Galaxy's 512-px one) is read from the thumbnail
(``load_image(..., thumbnail_box=512)``); an iPhone's 320-px one does not cover it.

Pairs: N of bench_ingest_photos' photos cropped to 4:3, each written as a HEIC (quality 85)
with a 512-px thumbnail, paired with a JPEG (q80) copy of it edited one of eight ways (``EDITS``:
as is, cropped, brightened, smaller, turned, and three near what the check can still tie: 55 %
of it kept, an eighth of the size at JPEG q30, cropped + darker + turned), and with another
photo's copy (a pair that is not a copy). Each way of reading the HEICs runs the check on every pair (2
threads, a new verifier each time, so every image is read), ``--rounds`` times interleaved;
medians. The real Galaxy S24 Ultra (200 MP) and S25 Ultra photos of tests/test_camera_files.py
are checked the same way against their copies when ``make samples`` fetched them.

    python benchmarks/bench_geometry_heic.py [--photos 40] [--rounds 3]

Writes benchmarks/results/geometry_heic.json and geometry_heic.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pillow_heif
from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore.decode import load_image
from imgstore.geometry import COPY, DIFFERENT, UNKNOWN, WORK_SIDE, PairVerifier

import common
from tests import camera_samples

NAMES = {COPY: "copy", DIFFERENT: "different", UNKNOWN: "unknown"}
EDITS = ("as is", "cropped 84 %", "brightened", "a third of the size", "turned 4 degrees", "cropped 55 %",
         "an eighth of the size, JPEG q30", "cropped 70 %, darker, turned 2 degrees")


def edit(img: Image.Image, k: int) -> Image.Image:
    w, h = img.size
    if k == 1:
        return img.crop((w * 8 // 100, h * 8 // 100, w * 92 // 100, h * 92 // 100))
    if k == 2:
        return ImageEnhance.Brightness(img).enhance(1.25)
    if k == 3:
        return img.resize((w // 3, h // 3), Image.Resampling.LANCZOS)
    if k == 4:
        return img.rotate(4, resample=Image.Resampling.BICUBIC)
    if k == 5:  # near what the check can still tie: half the picture gone
        return img.crop((w * 20 // 100, h * 25 // 100, w * 75 // 100, h * 80 // 100))
    if k == 6:  # a small, blocky copy (a messaging app's); its JPEG quality is set in main
        return img.resize((w // 8, h // 8), Image.Resampling.BILINEAR)
    if k == 7:
        small = img.crop((w * 15 // 100, h * 15 // 100, w * 85 // 100, h * 85 // 100))
        return ImageEnhance.Brightness(small).enhance(0.7).rotate(2, resample=Image.Resampling.BICUBIC)
    return img


def encoded(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def run(items: dict[int, bytes], heics: set[int], pairs: list[tuple[int, int]], thumb: bool) -> tuple[list[int], float]:
    def load(i: int) -> Image.Image:
        box = WORK_SIDE if thumb and i in heics else None
        return load_image(items[i], draft_size=(WORK_SIDE, WORK_SIDE), thumbnail_box=box).image

    started = time.perf_counter()
    verdicts = PairVerifier(load, workers=2).verdicts([a for a, _ in pairs], [b for _, b in pairs])
    return [int(v) for v in verdicts], time.perf_counter() - started


def compare(items: dict[int, bytes], heics: set[int], pairs: list[tuple[int, int]], rounds: int) -> dict[str, Any]:
    times: dict[bool, list[float]] = {False: [], True: []}
    verdicts: dict[bool, list[int]] = {}
    for _ in range(rounds):
        for thumb in (False, True):
            verdicts[thumb], seconds = run(items, heics, pairs, thumb)
            times[thumb].append(seconds)
    whole, thumbs = verdicts[False], verdicts[True]
    return {"pairs": len(pairs), "agree": sum(a == b for a, b in zip(whole, thumbs)),
            "whole_s": statistics.median(times[False]), "thumbnail_s": statistics.median(times[True]),
            "whole_verdicts": [NAMES[v] for v in whole], "thumbnail_verdicts": [NAMES[v] for v in thumbs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    pillow_heif.register_heif_opener()  # to write HEICs

    items: dict[int, bytes] = {}
    heics: set[int] = set()
    pairs: list[tuple[int, int]] = []
    kinds: list[str] = []
    for n, path in enumerate(common.photo_folder(args.photos)):
        img = Image.open(path).convert("RGB")
        w, h = img.size
        img = img.crop((0, 0, w, w * 3 // 4)) if w * 3 // 4 <= h else img.crop((0, 0, h * 4 // 3, h))
        items[2 * n] = encoded(img, "HEIF", quality=85, thumbnails=[512])
        heics.add(2 * n)
        items[2 * n + 1] = encoded(edit(img, n % len(EDITS)), "JPEG", quality=30 if n % len(EDITS) == 6 else 80)
        pairs.append((2 * n, 2 * n + 1))
        kinds.append(f"copy: {EDITS[n % len(EDITS)]}")
    n_photos = len(heics)
    for n in range(n_photos):
        pairs.append((2 * n, 2 * ((n + 7) % n_photos) + 1))
        kinds.append("another photo")
    bench = compare(items, heics, pairs, args.rounds)
    by_kind = {kind: dict(Counter((w, t) for k, w, t in zip(kinds, bench["whole_verdicts"], bench["thumbnail_verdicts"])
                                  if k == kind)) for kind in sorted(set(kinds))}
    report: dict[str, Any] = {"cores": os.cpu_count(), "machine": platform.machine(), "photos": n_photos, "rounds": args.rounds,
                              "bench": {k: v for k, v in bench.items() if not k.endswith("_verdicts")},
                              "by_kind": {k: {f"{w} / {t}": c for (w, t), c in v.items()} for k, v in by_kind.items()}}

    folder = camera_samples.folder()
    real: dict[str, Any] = {}
    if folder is not None:
        galaxy = {"200MP.heic": folder / "heif_special" / "200MP.heic",
                  "aux_YCbCr.heic": folder / "heif_special" / "aux_YCbCr.heic"}
        for name, path in galaxy.items():
            other = next(p for n, p in galaxy.items() if n != name)
            whole = load_image(path, draft_size=(2048, 2048)).image
            ritems = {0: path.read_bytes(), 1: other.read_bytes()}
            for k in range(3):
                ritems[2 + k] = encoded(edit(whole, k), "JPEG", quality=80)
            real[name] = compare(ritems, {0, 1}, [(0, 1), (0, 2), (0, 3), (0, 4)], args.rounds)
    report["galaxy"] = real
    (common.RESULTS_DIR / "geometry_heic.json").write_text(json.dumps(report, indent=1) + "\n")

    lines = ["# The geometric check on a HEIC's 512-px thumbnail against its whole decode", "",
             f"`python benchmarks/bench_geometry_heic.py --photos {args.photos} --rounds {args.rounds}` on "
             f"{os.cpu_count()} cores ({platform.machine()}): {n_photos} photos as 4:3 HEICs "
             "(q85, a 512-px thumbnail), each paired with an edited JPEG copy and with another photo's copy; "
             "the check on every pair, 2 threads, every image read each run; medians of the rounds, interleaved.", "",
             "| pairs | same verdict | whole decode, s | from the thumbnail, s | ratio |", "|---:|---:|---:|---:|---:|",
             f"| {bench['pairs']} | {bench['agree']} | {bench['whole_s']:.2f} | {bench['thumbnail_s']:.2f} | "
             f"{bench['whole_s'] / bench['thumbnail_s']:.1f}x |", "",
             "| pair | verdicts (whole / thumbnail): pairs |", "|---|---|"]
    notes = ["", "*another photo*: an edited copy of a photo made from another of scikit-image's photos (20 of them, "
             "cycled); some are alike (motorcycle_left and _right are a stereo pair), and the check calls a few such "
             "pairs copies, from the thumbnail and from the whole decode alike."]
    for kind, counts in by_kind.items():
        lines.append(f"| {kind} | {', '.join(f'{w} / {t}: {c}' for (w, t), c in sorted(counts.items()))} |")
    lines += notes
    if real:
        lines += ["", "Real Galaxy photos (tests/test_camera_files.py's samples) against the other Galaxy photo and "
                  "three JPEG copies (as is, cropped, brightened) of their own:", "",
                  "| photo | verdicts, whole decode | from the thumbnail | whole, s | thumbnail, s |",
                  "|---|---|---|---:|---:|"]
        for name, r in real.items():
            lines.append(f"| {name} | {', '.join(r['whole_verdicts'])} | {', '.join(r['thumbnail_verdicts'])} | "
                         f"{r['whole_s']:.2f} | {r['thumbnail_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    (common.RESULTS_DIR / "geometry_heic.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
