"""Near-duplicate detection quality: precision and recall of duplicate pairs, per transformation.

    python benchmarks/bench_dedup.py [--cifar-originals 300] [--distractors 1000] [--copies extended|basic]

Copy-detection set, built from real photos: scikit-image's bundled photos and CIFAR-10 test
images (taken from the database part of the protocol split) are the originals; each gets one
copy per transformation: ``--copies basic``, resize to half, JPEG quality 30, crop 90%,
horizontal flip, brightness +20%, rotation 5 degrees; ``extended`` (the default) adds rotations
of 2, 10 and 15 degrees, 5 and 10 with ``expand``, centred crops keeping 70% and 50% of the
area, a caption band and a logo badge (each about a tenth of the image), greyscale, sepia, aspect
changes 4:3 <-> 16:9, and crop 70% + greyscale, rotation 5 + caption. Distractors: other
CIFAR-10 images with no copy (same classes as the originals: the same subject on other
photos), the left and right halves of three photos (no overlap; the photos themselves are not
in the set), and scikit-image's stereo pair motorcycle_left/right (two originals: the same
scene from two viewpoints, not copies). Figures are given over the whole set and per size
class (photos; thumbnails). Everything is
ingested into a fresh SQLite store with the default extractor and default index, then
``ImageStore.find_duplicates`` runs with default settings (the geometric check on), without the
check (``geometry=False``: the rule of features and layouts alone), with the features alone
(``min_signature=0``) with and without the check, and with ``min_cosine=0.95``. The check alone
is also run on every (original, copy) pair of photos, and its cost per pair is reported.
(chessboard_GRAY is left out: it is chessboard_RGB in grey, pixel for pixel.)

A found pair is two images in one group. For transformation t: recall = share of
(original, t-copy) pairs found; precision = share of found pairs involving a t-copy that are
true (both derive from the same original). Writes benchmarks/results/dedup.json and dedup.md
(``--out NAME``: NAME.json and NAME.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, cifar_split  # noqa: E402
from imgstore import ImageStore  # noqa: E402
from imgstore.dedup import ALL_PAIRS_MAX, PairVerdicts  # noqa: E402
from imgstore.samples import TRANSFORMS, skimage_photos  # noqa: E402

BASIC = {
    "resize_half": TRANSFORMS["resize_half"],
    "jpeg_q30": TRANSFORMS["jpeg_q30"],
    "crop_90": TRANSFORMS["crop_90"],
    "flip": TRANSFORMS["flip"],
    "brighter_20": lambda img: ImageEnhance.Brightness(img).enhance(1.2),
    "rotate_5": TRANSFORMS["rotate_5"],
}


def _rotate(degrees: float, expand: bool) -> Any:
    return lambda img: img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=expand)


def _crop_area(area: float) -> Any:
    """A centred crop keeping ``area`` of the pixels."""
    side = area ** 0.5

    def apply(img: Image.Image) -> Image.Image:
        w, h = img.size
        cw, ch = max(1, round(w * side)), max(1, round(h * side))
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch))
    return apply


def _caption(img: Image.Image) -> Image.Image:
    """A white caption band with black text across the bottom tenth of the image."""
    out = img.convert("RGB").copy()
    w, h = out.size
    band = max(2, h // 10)
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, h - band, w, h), fill=(255, 255, 255))
    font = ImageFont.load_default(size=max(6, int(band * 0.7)))
    draw.text((max(1, w // 40), h - band + band // 8), "Holiday 2024 - imgstore", fill=(0, 0, 0), font=font)
    return out


def _logo(img: Image.Image) -> Image.Image:
    """A coloured badge (disc, bar and letters) over about a tenth of the image, top right."""
    out = img.convert("RGB").copy()
    w, h = out.size
    side = max(4, int((0.10 * w * h) ** 0.5))
    x0, y0 = w - side - w // 30, h // 30
    draw = ImageDraw.Draw(out)
    draw.rectangle((x0, y0, x0 + side, y0 + side), fill=(20, 60, 160))
    draw.ellipse((x0 + side // 8, y0 + side // 8, x0 + side // 2, y0 + side // 2), fill=(250, 200, 0))
    draw.rectangle((x0 + side // 8, y0 + 5 * side // 8, x0 + 7 * side // 8, y0 + 6 * side // 8), fill=(230, 40, 40))
    draw.text((x0 + side // 2, y0 + side // 5), "TV", fill=(255, 255, 255), font=ImageFont.load_default(size=max(6, side // 4)))
    return out


def _sepia(img: Image.Image) -> Image.Image:
    rgb = np.asarray(img.convert("RGB"), dtype=np.float32)
    m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], dtype=np.float32)
    return Image.fromarray(np.clip(rgb @ m.T, 0, 255).astype(np.uint8))


def _aspect(factor: float) -> Any:
    """Width scaled by ``factor``, height kept: 4:3 -> 16:9 is 4/3, 16:9 -> 4:3 is 3/4."""
    return lambda img: img.resize((max(8, round(img.width * factor)), img.height), Image.Resampling.LANCZOS)


def _then(*steps: Any) -> Any:
    def apply(img: Image.Image) -> Image.Image:
        for step in steps:
            img = step(img)
        return img
    return apply


def _grey(img: Image.Image) -> Image.Image:
    return ImageOps.grayscale(img).convert("RGB")


#: Issue 18's edits: rotations (with and without ``expand``), hard crops, overlays, colour
#: changes, aspect changes and combinations of two, beside the basic six.
EXTENDED = {
    **BASIC,
    "rotate_2": _rotate(2, False),
    "rotate_10": _rotate(10, False),
    "rotate_15": _rotate(15, False),
    "rotate_5_expand": _rotate(5, True),
    "rotate_10_expand": _rotate(10, True),
    "crop_area_70": _crop_area(0.70),
    "crop_area_50": _crop_area(0.50),
    "caption": _caption,
    "logo": _logo,
    "greyscale": _grey,
    "sepia": _sepia,
    "aspect_4x3_to_16x9": _aspect(4 / 3),
    "aspect_16x9_to_4x3": _aspect(3 / 4),
    "crop_area_70+greyscale": _then(_crop_area(0.70), _grey),
    "rotate_5+caption": _then(_rotate(5, False), _caption),
}
COPY_SETS = {"basic": BASIC, "extended": EXTENDED}
COPIES: dict[str, Any] = EXTENDED
#: photos whose left and right halves (no overlap) enter the set as distractors of each other;
#: they are not originals (a half is a crop of its photo)
HALVES = ("astronaut", "coffee", "rocket")
#: not an original: chessboard_GRAY is chessboard_RGB in grey, pixel for pixel (same luminance),
#: so counting the two as different originals would call true copies false
SKIPPED = ("chessboard_GRAY",)


def build_set(root: Path, n_cifar: int, n_distractors: int) -> dict[str, tuple[str, str]]:
    """Write originals, copies and distractors; returns path -> (original id, transform)."""
    split = cifar_split()
    per_class = max(1, n_cifar // len(split.classes))
    chosen, taken = [], defaultdict(int)
    rest = []
    for path, label in zip(split.db_paths, split.db_labels.tolist()):
        if taken[label] < per_class:
            chosen.append(path)
            taken[label] += 1
        else:
            rest.append(path)
    distractors = rest[:: max(1, len(rest) // max(n_distractors, 1))][:n_distractors]
    truth: dict[str, tuple[str, str]] = {}
    photos = [p for p in skimage_photos() if p.stem not in HALVES + SKIPPED]
    sources = [(f"sk-{p.stem}", p) for p in photos] + [(f"cifar-{p.parent.name}-{p.stem}", p) for p in chosen]
    for ident, src in sources:
        with Image.open(src) as opened:
            img = opened.convert("RGB")
        orig = root / "originals" / f"{ident}.png"
        orig.parent.mkdir(parents=True, exist_ok=True)
        img.save(orig)
        truth[str(orig)] = (ident, "original")
        for name, transform in COPIES.items():
            target = root / "copies" / name / f"{ident}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            quality = 30 if name == "jpeg_q30" else 90
            transform(img).convert("RGB").save(target, format="JPEG", quality=quality)
            truth[str(target)] = (ident, name)
    for p in skimage_photos():
        if p.stem in HALVES:
            with Image.open(p) as opened:
                img = opened.convert("RGB")
            w, h = img.size
            for side, box in (("left", (0, 0, w // 2, h)), ("right", (w - w // 2, 0, w, h))):
                target = root / "distractors" / f"sk-half-{p.stem}-{side}.png"
                target.parent.mkdir(parents=True, exist_ok=True)
                img.crop(box).save(target)
                truth[str(target)] = (f"distractor-{target.name}", "distractor")
    for p in distractors:
        target = root / "distractors" / f"{p.parent.name}-{p.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
        truth[str(target)] = (f"distractor-{target.name}", "distractor")
    return truth


def size_class(ident: str) -> str:
    """``photos`` (scikit-image's, 300-4000 px) or ``thumbnails`` (CIFAR-10's 32x32)."""
    return "photos" if ident.startswith(("sk-", "distractor-sk-")) else "thumbnails"


def score(groups: list[Any], truth: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """Scores over the whole set, and per size class (``by_size``): a pair is in a class when its
    first image is (copies are in their original's class; pairs across classes are false)."""
    out: dict[str, Any] = _score(groups, truth)
    # a group holding copies of two different originals (or a distractor beside an original)
    out["mixed_groups"] = sum(1 for g in groups if len({truth[p][0] for m in g.members for p in m.paths if p in truth}) > 1)
    out["by_size"] = {}
    for cls in ("photos", "thumbnails"):
        part = {p: t for p, t in truth.items() if size_class(t[0]) == cls}
        out["by_size"][cls] = _score(groups, truth, keep=set(part))
    return out


def _score(groups: list[Any], truth: dict[str, tuple[str, str]], keep: set[str] | None = None) -> dict[str, Any]:
    group_of: dict[str, int] = {}
    for g, group in enumerate(groups):
        for m in group.members:
            for p in m.paths:
                group_of[p] = g
    found_pairs = []
    members = defaultdict(list)
    for p, g in group_of.items():
        members[g].append(p)
    for paths in members.values():
        found_pairs += [(a, b) for a, b in combinations(sorted(paths), 2) if keep is None or a in keep]
    out: dict[str, Any] = {}
    originals = {ident: p for p, (ident, kind) in truth.items() if kind == "original"}
    for name in COPIES:
        copies = {ident: p for p, (ident, kind) in truth.items() if kind == name and (keep is None or p in keep)}
        hits = sum(1 for ident, c in copies.items() if c in group_of and group_of.get(originals[ident]) == group_of[c])
        involving = [(a, b) for a, b in found_pairs if truth.get(a, ("", ""))[1] == name or truth.get(b, ("", ""))[1] == name]
        true = sum(1 for a, b in involving if truth[a][0] == truth[b][0])
        out[name] = {
            "recall": hits / max(len(copies), 1),
            "precision": true / len(involving) if involving else 1.0,
            "pairs_found": len(involving),
        }
    all_true = sum(1 for a, b in found_pairs if truth[a][0] == truth[b][0])
    out["all"] = {"precision": all_true / len(found_pairs) if found_pairs else 1.0, "pairs_found": len(found_pairs)}
    return out


def forget_verdicts(store: ImageStore) -> None:
    """The geometric check's verdicts forgotten, in memory and in the store (each run does all its work)."""
    from sqlalchemy import delete

    from imgstore.models import PairVerdict

    store.ctx.part(PairVerdicts).known.clear()
    store.ctx.write(lambda conn: conn.execute(delete(PairVerdict)), doing="forget verdicts")


class CheckLog(logging.Handler):
    """Collects the geometric check's summary line (imgstore.dedup logs it) while active."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.stats: dict[str, Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("geometric check:"):
            keys = ("pairs", "copies", "different", "undecided", "images_read", "unreadable", "seconds", "kept")
            self.stats = dict(zip(keys, record.args))  # type: ignore[arg-type]

    def __enter__(self) -> CheckLog:
        log = logging.getLogger("imgstore.dedup")
        self._level = log.level
        log.setLevel(logging.INFO)
        log.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        log = logging.getLogger("imgstore.dedup")
        log.removeHandler(self)
        log.setLevel(self._level)


def direct_verdicts(truth: dict[str, tuple[str, str]]) -> dict[str, Any]:
    """The check alone on every (original, copy) pair of photos, no chaining through other copies:
    the share called a copy per edit, and what a pair and an image cost (files read from disk)."""
    from imgstore.decode import load_image
    from imgstore.geometry import COPY, WORK_SIDE, PairVerifier

    paths = sorted(truth)
    number = {p: i for i, p in enumerate(paths)}
    verifier = PairVerifier(lambda i: load_image(paths[i], draft_size=(WORK_SIDE, WORK_SIDE)).image)
    originals = {ident: p for p, (ident, kind) in truth.items() if kind == "original" and size_class(ident) == "photos"}
    out: dict[str, Any] = {}
    for name in COPIES:
        pairs = [(number[originals[ident]], number[p]) for p, (ident, kind) in truth.items() if kind == name and ident in originals]
        verdicts = verifier.verdicts([a for a, _ in pairs], [b for _, b in pairs])
        out[name] = round(float((verdicts == COPY).mean()), 3)
    st = verifier.stats
    out["cost"] = {"pairs": st.pairs, "images": st.images_read, "seconds": round(st.seconds, 2),
                   "ms_per_pair": round(1000 * st.seconds / max(st.pairs, 1), 1)}
    return out


def pairs(groups: list[Any]) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for g in groups:
        out |= set(combinations(sorted(p for m in g.members for p in m.paths), 2))
    return out


def time_all_pairs(sizes: tuple[int, ...] = (2_000, 5_000, 10_000, 20_000, 30_000)) -> dict[int, float]:
    """Seconds for the all-pairs source over n random 1280-d vectors (the work does not depend
    on the values: one cosine-matrix row chunk at a time, plus the signature matrix)."""
    from imgstore.dedup import AllPairs, Rule

    rng = np.random.default_rng(0)
    out = {}
    for n in sizes:
        vectors = rng.standard_normal((n, 1280)).astype(np.float32)
        sigs = rng.standard_normal((n, 63)).astype(np.float32)
        sigs /= np.linalg.norm(sigs, axis=1, keepdims=True)
        t0 = time.perf_counter()
        AllPairs(np.arange(1, n + 1, dtype=np.int64), vectors, sigs).edges(Rule(0.90, 0.95))
        out[n] = round(time.perf_counter() - t0, 2)
        print(f"all pairs, {n:,} images: {out[n]:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-originals", type=int, default=300)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--extractor", default=None)
    parser.add_argument("--workdir", default=None, help="keep the image set and store here and reuse them")
    parser.add_argument("--sweep", action="store_true", help="also sweep the signature cosine floor")
    parser.add_argument("--out", default="dedup", help="basename of the result files under benchmarks/results")
    parser.add_argument("--copies", choices=sorted(COPY_SETS), default="extended",
                        help="the edits: basic (the first six) or extended (issue 18's, with the basic six)")
    args = parser.parse_args()
    global COPIES
    COPIES = COPY_SETS[args.copies]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(args.workdir) if args.workdir else Path(tmp_name)
        tmp.mkdir(parents=True, exist_ok=True)
        root = tmp / "set"
        truth_file = tmp / "truth.json"
        if truth_file.exists():
            truth = {k: tuple(v) for k, v in json.loads(truth_file.read_text()).items()}
        else:
            truth = build_set(root, args.cifar_originals, args.distractors)
            truth_file.write_text(json.dumps(truth))
        with ImageStore(tmp / "dedup.db") as store:
            t0 = time.perf_counter()
            summary = store.ingest([root], extractor=args.extractor)
            summary.added = store.counts().images
            ingest_s = time.perf_counter() - t0
            index = next(i for i in store.indexes() if i.is_active)
            runs = {}
            for label, kwargs in (("default", {}),
                                  ("rule only (no geometric check)", {"geometry": False}),
                                  ("features only (no signature)", {"min_signature": 0.0}),
                                  ("features only, rule only", {"min_signature": 0.0, "geometry": False}),
                                  ("min_cosine 0.95", {"min_cosine": 0.95})):
                forget_verdicts(store)  # time the check's whole work every run
                t0 = time.perf_counter()
                with CheckLog() as check:
                    groups = store.find_duplicates(**kwargs)
                runs[label] = {"seconds": round(time.perf_counter() - t0, 2), "groups": len(groups), **score(groups, truth),
                               "geometric_check": check.stats}
            if args.sweep:
                import imgstore.dedup as dd

                saved = dd.SIGNATURE_COSINE_FLOOR
                for floor in (0.0, 0.2, 0.3, 0.4):
                    dd.SIGNATURE_COSINE_FLOOR = floor
                    groups = store.find_duplicates()
                    runs[f"signature cosine floor {floor}"] = {"groups": len(groups), **score(groups, truth)}
                dd.SIGNATURE_COSINE_FLOOR = saved
            # the same defaults without an index: every pair compared (what a store below the
            # automatic-index threshold, or one whose index was dropped, gets)
            with_index = pairs(store.find_duplicates())
            store.drop_index(index.id)
            forget_verdicts(store)
            t0 = time.perf_counter()
            groups = store.find_duplicates()
            runs["default, no index (all pairs)"] = {"seconds": round(time.perf_counter() - t0, 2), "groups": len(groups),
                                                     **score(groups, truth)}
            without = pairs(groups)
            no_index = {"pairs_with_index": len(with_index), "pairs_without_index": len(without),
                        "missed_by_all_pairs": len(with_index - without), "extra_from_all_pairs": len(without - with_index),
                        "extra_true": sum(1 for a, b in without - with_index if truth[a][0] == truth[b][0])}
            store.create_index(index.method, index.n_bits)  # leave the store as it was (for --workdir)
    all_pairs_cost = time_all_pairs()
    direct = direct_verdicts(truth)
    result = {"images": summary.added, "duplicates_by_bytes": summary.duplicates, "ingest_s": round(ingest_s, 1),
              "index": f"{index.method} {index.n_bits} bits, {index.n_bands} bands", "runs": runs,
              "no_index": no_index, "all_pairs_seconds": all_pairs_cost, "direct_photo_verdicts": direct}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Copy-detection set: {summary.added} images ({len([1 for k in truth.values() if k[1] == 'original'])} originals, "
             f"{len(COPIES)} copies each, distractors); index {result['index']}.", "",
             "Per size class: photos are scikit-image's (300-4000 px), thumbnails CIFAR-10's 32x32.", "",
             "| settings | transform | precision | recall | pairs found | photos: precision | recall | thumbnails: precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        by = run.get("by_size", {})
        for name in COPIES:
            r = run[name]
            cells = "".join(f" {by[c][name]['precision']:.3f} | {by[c][name]['recall']:.3f} |" if c in by else " | |" for c in ("photos", "thumbnails"))
            lines.append(f"| {label} | {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['pairs_found']} |{cells}")
        cells = "".join(f" {by[c]['all']['precision']:.3f} | |" if c in by else " | |" for c in ("photos", "thumbnails"))
        lines.append(f"| {label} | all pairs | {run['all']['precision']:.3f} | | {run['all']['pairs_found']} |{cells}")
    lines += ["", "Groups that mix two originals (or a distractor and an original), per run: "
              + ", ".join(f"{label} {run['mixed_groups']}" for label, run in runs.items() if "mixed_groups" in run) + "."]
    lines += ["", "Time and geometric check per run (pairs checked, images read from disk, seconds of the check):", ""]
    for label, run in runs.items():
        st = run.get("geometric_check")
        work = (f"{st['pairs']:,} pairs checked ({st['copies']:,} copies, {st['different']:,} different, "
                f"{st['undecided']:,} undecided), {st['images_read']:,} images read, {st['seconds']:.1f} s") if st else "no check"
        lines.append(f"- {label}: {run['seconds']:.1f} s in all; {work}")
    cost = direct["cost"]
    lines += ["", "The check alone on each (original, copy) pair of photos (no chaining through other copies): "
              "share called a copy per edit, " + ", ".join(f"{n} {direct[n]:.2f}" for n in COPIES)
              + f". Cost: {cost['pairs']} pairs, {cost['images']} images read, {cost['seconds']:.1f} s "
              f"({cost['ms_per_pair']:.1f} ms a pair, reading included; two threads)."]
    lines += ["", "Without an index (all pairs) against the index path, default settings: "
              f"{no_index['pairs_with_index']} pairs with the index, {no_index['pairs_without_index']} without; "
              f"pairs the index found that all pairs missed: {no_index['missed_by_all_pairs']}; extra pairs from all "
              f"pairs: {no_index['extra_from_all_pairs']} ({no_index['extra_true']} of them true copies).", "",
              "All-pairs cost (1280-d unit vectors, one process, `AllPairs.edges` at the default rule), seconds: "
              + ", ".join(f"{n:,} images {s:.1f}" for n, s in all_pairs_cost.items())
              + f". `imgstore.dedup.ALL_PAIRS_MAX` = {ALL_PAIRS_MAX}: above it a temporary in-memory index is used."]
    (RESULTS_DIR / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
