"""Near-duplicate detection quality: precision and recall of duplicate pairs, per transformation.

    python benchmarks/bench_dedup.py [--cifar-originals 300] [--distractors 1000]

Copy-detection set, built from real photos: scikit-image's bundled photos and CIFAR-10 test
images (taken from the database part of the protocol split) are the originals; each gets one
copy per transformation (resize to half, JPEG quality 30, crop 90%, horizontal flip, brightness
+20%, rotation 5 degrees); other CIFAR-10 images are distractors with no copy. Everything is
ingested into a fresh SQLite store with the default extractor and default index, then
``ImageStore.find_duplicates`` runs with default settings (and other ``min_cosine`` and
``min_signature`` values, to show the trade-off).

A found pair is two images in one group. For transformation t: recall = share of
(original, t-copy) pairs found; precision = share of found pairs involving a t-copy that are
true (both derive from the same original). Writes benchmarks/results/dedup.json and dedup.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from itertools import combinations
from pathlib import Path

from PIL import Image, ImageEnhance

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, cifar_split  # noqa: E402
from imgstore import ImageStore  # noqa: E402
from imgstore.samples import TRANSFORMS, skimage_photos  # noqa: E402

COPIES = {
    "resize_half": TRANSFORMS["resize_half"],
    "jpeg_q30": TRANSFORMS["jpeg_q30"],
    "crop_90": TRANSFORMS["crop_90"],
    "flip": TRANSFORMS["flip"],
    "brighter_20": lambda img: ImageEnhance.Brightness(img).enhance(1.2),
    "rotate_5": TRANSFORMS["rotate_5"],
}


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
    sources = [(f"sk-{p.stem}", p) for p in skimage_photos()] + [(f"cifar-{p.parent.name}-{p.stem}", p) for p in chosen]
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
    for p in distractors:
        target = root / "distractors" / f"{p.parent.name}-{p.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(p.read_bytes())
        truth[str(target)] = (f"distractor-{target.name}", "distractor")
    return truth


def score(groups: list[dict], truth: dict[str, tuple[str, str]]) -> dict[str, dict[str, float]]:
    group_of: dict[str, int] = {}
    for g, group in enumerate(groups):
        for m in group["members"]:
            for p in m["paths"]:
                group_of[p] = g
    found_pairs = []
    members = defaultdict(list)
    for p, g in group_of.items():
        members[g].append(p)
    for paths in members.values():
        found_pairs += list(combinations(sorted(paths), 2))
    out = {}
    originals = {ident: p for p, (ident, kind) in truth.items() if kind == "original"}
    for name in COPIES:
        copies = {ident: p for p, (ident, kind) in truth.items() if kind == name}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-originals", type=int, default=300)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--extractor", default=None)
    parser.add_argument("--workdir", default=None, help="keep the image set and store here and reuse them")
    parser.add_argument("--sweep", action="store_true", help="also sweep the signature cosine floor")
    args = parser.parse_args()
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
            summary.added = store.counts()["images"]
            ingest_s = time.perf_counter() - t0
            index = next(i for i in store.indexes() if i.is_active)
            runs = {}
            for label, kwargs in (("default", {}),
                                  ("features only (no signature)", {"min_signature": 0.0}),
                                  ("min_signature 0.90", {"min_signature": 0.90}),
                                  ("min_signature 0.97", {"min_signature": 0.97}),
                                  ("min_cosine 0.85", {"min_cosine": 0.85}),
                                  ("min_cosine 0.95", {"min_cosine": 0.95}),
                                  ("codes only (no float check)", {"min_cosine": 0.0})):
                t0 = time.perf_counter()
                groups = store.find_duplicates(**kwargs)
                runs[label] = {"seconds": round(time.perf_counter() - t0, 2), "groups": len(groups), **score(groups, truth)}
            if args.sweep:
                import imgstore.dedup as dd

                saved = dd.SIGNATURE_COSINE_FLOOR
                for floor in (0.0, 0.2, 0.3, 0.4):
                    dd.SIGNATURE_COSINE_FLOOR = floor
                    groups = store.find_duplicates()
                    runs[f"signature cosine floor {floor}"] = {"groups": len(groups), **score(groups, truth)}
                dd.SIGNATURE_COSINE_FLOOR = saved
    result = {"images": summary.added, "duplicates_by_bytes": summary.duplicates, "ingest_s": round(ingest_s, 1),
              "index": f"{index.method} {index.n_bits} bits, {index.n_bands} bands", "runs": runs}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dedup.json").write_text(json.dumps(result, indent=2))
    lines = [f"Copy-detection set: {summary.added} images ({len([1 for k in truth.values() if k[1] == 'original'])} originals, "
             f"{len(COPIES)} copies each, distractors); index {result['index']}.", "",
             "| settings | transform | precision | recall | pairs found |", "|---|---|---|---|---|"]
    for label, run in runs.items():
        for name in COPIES:
            r = run[name]
            lines.append(f"| {label} | {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['pairs_found']} |")
        lines.append(f"| {label} | all pairs | {run['all']['precision']:.3f} | | {run['all']['pairs_found']} |")
    (RESULTS_DIR / "dedup.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
