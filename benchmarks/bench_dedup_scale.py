"""Duplicate finding at 100k images: the time with and without the geometric check, same store.

    python benchmarks/bench_dedup_scale.py [--originals 10000] [--repeats 2]

The set: every CIFAR-10 test image (10,000 originals, 32x32) and nine edits of each (resize to
half, JPEG quality 30, crop 90%, mirror, brightness +20%, rotation 5 degrees, a centred crop
keeping 70% of the area, a caption band, greyscale): 100,000 files, ingested once into a SQLite
store with the default extractor and index (kept under the benchmark cache, reused; the ingest
is resumable). Then ``ImageStore.find_duplicates`` runs with ``geometry=False`` (the rule alone,
what dedup was before the check) and with the default ``geometry=True``, interleaved, each
``--repeats`` times; medians are reported with the precision and recall of both (a found pair is
two images in one group; true when both come from one original).

Writes benchmarks/results/dedup_scale.json and dedup_scale.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_dedup  # noqa: E402
from common import RESULTS_DIR, cache_dir, cifar_split  # noqa: E402
from imgstore import ImageStore  # noqa: E402

EDITS = ("resize_half", "jpeg_q30", "crop_90", "flip", "brighter_20", "rotate_5", "crop_area_70", "caption", "greyscale")


def build(root: Path, n_originals: int) -> dict[str, tuple[str, str]]:
    """Write the originals and their edits under ``root`` (skipping files already there)."""
    split = cifar_split()
    sources = sorted(split.q_paths + split.db_paths)[:n_originals]
    truth: dict[str, tuple[str, str]] = {}
    for src in sources:
        ident = f"{src.parent.name}-{src.stem}"
        orig = root / "originals" / f"{ident}.png"
        img = None
        if not orig.exists():
            orig.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as opened:
                img = opened.convert("RGB")
            img.save(orig)
        truth[str(orig)] = (ident, "original")
        for name in EDITS:
            target = root / "copies" / name / f"{ident}.jpg"
            truth[str(target)] = (ident, name)
            if target.exists():
                continue
            if img is None:
                with Image.open(src) as opened:
                    img = opened.convert("RGB")
            target.parent.mkdir(parents=True, exist_ok=True)
            bench_dedup.EXTENDED[name](img).convert("RGB").save(target, format="JPEG", quality=30 if name == "jpeg_q30" else 90)
    return truth


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="where the set and store live [default: the benchmark cache]")
    parser.add_argument("--out", default="dedup_scale")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("sqlalchemy", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(args.workdir) if args.workdir else cache_dir() / f"dedup-scale-{args.originals}"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    truth = build(work / "set", args.originals)
    print(f"set: {len(truth):,} files ({time.perf_counter() - t0:.0f} s)", flush=True)
    bench_dedup.COPIES = {name: bench_dedup.EXTENDED[name] for name in EDITS}
    with ImageStore(work / "dedup.db") as store:
        t0 = time.perf_counter()
        store.ingest([work / "set"])
        ingest_s = time.perf_counter() - t0
        n_images = store.counts().images
        print(f"ingest: {n_images:,} images in the store ({ingest_s:.0f} s this run)", flush=True)
        runs: dict[str, Any] = {"rule only (geometry=False)": {"seconds": []}, "default (geometry=True)": {"seconds": []}}
        for _ in range(args.repeats):
            for label, geometry in (("rule only (geometry=False)", False), ("default (geometry=True)", True)):
                bench_dedup.forget_verdicts(store)  # time the check's whole work every run (memory and stored)
                t0 = time.perf_counter()
                groups = store.find_duplicates(geometry=geometry)
                seconds = time.perf_counter() - t0
                runs[label]["seconds"].append(round(seconds, 1))
                runs[label].update(groups=len(groups), **bench_dedup._score(groups, truth))
                print(f"{label}: {seconds:.1f} s, {len(groups):,} groups, precision {runs[label]['all']['precision']:.3f}", flush=True)
    old, new = (statistics.median(runs[k]["seconds"]) for k in runs)
    result = {"images": n_images, "edits": list(EDITS), "runs": runs, "median_seconds": {"rule only": old, "default": new},
              "ratio": round(new / old, 2)}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Duplicate finding over {n_images:,} images ({args.originals:,} CIFAR-10 originals and {len(EDITS)} edits "
             f"each), SQLite, default extractor and index; `python benchmarks/bench_dedup_scale.py`.", "",
             f"Median of {args.repeats} interleaved runs: rule only {old:.1f} s, with the geometric check {new:.1f} s "
             f"(**{new / old:.2f}x**).", "",
             "| settings | edit | precision | recall | pairs found |", "|---|---|---|---|---|"]
    for label, run in runs.items():
        for name in EDITS:
            lines.append(f"| {label} | {name} | {run[name]['precision']:.3f} | {run[name]['recall']:.3f} | {run[name]['pairs_found']} |")
        lines.append(f"| {label} | all pairs | {run['all']['precision']:.3f} | | {run['all']['pairs_found']} |")
    (RESULTS_DIR / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
