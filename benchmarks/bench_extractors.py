"""The CNN extractors' cost side by side: model-alone images/s at one batch size.

Each extractor embeds the same decoded images (scikit-image's sample photos, repeated to
``--batch``) ``--repeats`` times after one warm-up call, in this process, at the precision the
machine picks (``auto``: bfloat16 where the CPU has it); the extractors are timed interleaved,
so a noisy minute hits both. Writes benchmarks/results/extractors.json and .md.

    python benchmarks/bench_extractors.py
    python benchmarks/bench_extractors.py --extractors efficientnet-lite0,efficientnet-lite2 --batch 16 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR  # noqa: E402


def sample_images(n: int) -> list:  # type: ignore[type-arg]
    import skimage

    from imgstore.decode import load_image

    folder = Path(skimage.__file__).parent / "data"
    photos = [load_image(p).image for p in sorted(folder.glob("*.png")) + sorted(folder.glob("*.jpg"))]
    photos = [p for p in photos if min(p.size) >= 128]
    return [photos[i % len(photos)] for i in range(n)]


def interleaved_seconds(calls: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each call, ``repeats`` rounds after one warm-up call each; the calls take turns
    within a round, so a noisy minute on a shared machine hits all of them."""
    for call in calls.values():
        call()  # warm-up
    times: dict[str, list[float]] = {n: [] for n in calls}
    for _ in range(repeats):
        for n, call in calls.items():
            t0 = time.perf_counter()
            call()
            times[n].append(time.perf_counter() - t0)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractors", default="efficientnet-lite0,efficientnet-lite2")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    from imgstore.features import get_extractor

    images = sample_images(args.batch)
    names = [n for n in args.extractors.split(",") if n]
    extractors = {n: get_extractor(n) for n in names}
    times = interleaved_seconds({n: partial(ex.extract, images) for n, ex in extractors.items()}, args.repeats)
    rows = [{"extractor": n, "image_size": getattr(extractors[n], "image_size", None),
             "precision": getattr(extractors[n], "precision", None), "batch": args.batch,
             "images_per_s": args.batch / statistics.median(times[n]), "seconds": times[n]} for n in names]
    base = rows[0]["images_per_s"]
    lines = ["# CNN extractors, model alone (`benchmarks/bench_extractors.py`)", "",
             f"{platform.machine()}, batch {args.batch}, median of {args.repeats} interleaved calls.", "",
             "| extractor | input | precision | images/s | cost against the first |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['extractor']} | {r['image_size']} | {r['precision']} | {r['images_per_s']:.1f} | "
                     f"{base / r['images_per_s']:.2f}x |")
    md = "\n".join(lines) + "\n"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "extractors.json").write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    (RESULTS_DIR / "extractors.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
