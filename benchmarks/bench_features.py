"""Feature extraction: throughput (model alone, and decode + extract pipeline) and retrieval quality.

    .venv/bin/python benchmarks/bench_features.py                 # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/bench_features.py --only quality  # CIFAR-10 mAP table only
    .venv/bin/python benchmarks/bench_features.py --only speed    # throughput only

Writes benchmarks/results/features.json and benchmarks/results/features.md. CIFAR features are
cached under ~/.cache/imgstore-bench/ (see common.py), so a rerun of the quality part is fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from imgstore.decode import load_image  # noqa: E402
from imgstore.features import get_extractor  # noqa: E402

logger = logging.getLogger("bench_features")

# (label, extractor, precision, options): the first row is the shipped default
QUALITY_CONFIGS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("squash 224 bilinear (default)", "efficientnet-lite0", "bf16", {"resample": "bilinear"}),
    ("squash 224 bicubic (reference preprocessing)", "efficientnet-lite0", "bf16", {"resample": "bicubic"}),
    ("squash 224 bicubic (reference preprocessing)", "efficientnet-lite0", "fp32", {"resample": "bicubic"}),
    ("shorter side 256, centre crop 224, bicubic", "efficientnet-lite0", "bf16", {"resize": "crop875", "resample": "bicubic"}),
    ("colour + gradient histograms", "color", "fp32", {}),
]


def _timed_stream(extractor: Any, paths: list[Path], *, draft: bool, batch_size: int = 64) -> float:
    start = time.perf_counter()
    feats = common.extract_paths(extractor, paths, batch_size=batch_size, draft=draft)
    seconds = time.perf_counter() - start
    assert feats.shape == (len(paths), extractor.dim)
    return len(paths) / seconds


def _model_alone(extractor: Any, paths: list[Path], batch_size: int = 64, repeats: int = 3) -> float:
    batch = np.stack([extractor.preprocess(load_image(p).image) for p in paths[:batch_size]])
    extractor.extract_arrays(batch[:8])  # warm-up (oneDNN primitive creation)
    start = time.perf_counter()
    for _ in range(repeats):
        extractor.extract_arrays(batch)
    return repeats * len(batch) / (time.perf_counter() - start)


def run_speed(n_cifar: int, n_photos: int) -> list[dict[str, Any]]:
    split = common.cifar_split()
    # a class-balanced sample of the database images
    cifar = split.db_paths[:: max(1, len(split.db_paths) // n_cifar)][:n_cifar]
    photos = common.photo_folder(n_photos)
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16"):
        ex = get_extractor("efficientnet-lite0", precision=precision)
        _model_alone(ex, cifar, batch_size=16, repeats=1)
        row = {
            "extractor": "efficientnet-lite0",
            "precision": precision,
            "model alone, batch 64 (img/s)": _model_alone(ex, cifar),
            "pipeline, CIFAR 32x32 JPEG (img/s)": _timed_stream(ex, cifar, draft=True),
            "pipeline, photos 2000-4000 px JPEG (img/s)": _timed_stream(ex, photos, draft=True),
            "pipeline, photos, no JPEG draft (img/s)": _timed_stream(ex, photos, draft=False),
        }
        logger.info("%s", row)
        rows.append(row)
    ex = get_extractor("color")
    rows.append({
        "extractor": "color",
        "precision": "-",
        "model alone, batch 64 (img/s)": "-",  # all its work is in preprocess
        "pipeline, CIFAR 32x32 JPEG (img/s)": _timed_stream(ex, cifar, draft=True),
        "pipeline, photos 2000-4000 px JPEG (img/s)": _timed_stream(ex, photos, draft=True),
        "pipeline, photos, no JPEG draft (img/s)": _timed_stream(ex, photos, draft=False),
    })
    return rows


def run_quality() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for label, name, precision, options in QUALITY_CONFIGS:
        f = common.cifar_features(name, precision=precision, **options)
        raw = common.retrieval_scores(f)
        centred = common.retrieval_scores(f, centre=True)
        row = {
            "preprocessing": label,
            "extractor": name,
            "precision": f.precision,
            "preprocess_version": f.preprocess_version,
            "mAP@ALL raw": raw.map_all,
            "P@10 raw": raw.precision_at_10,
            "mAP@ALL centred": centred.map_all,
            "P@10 centred": centred.precision_at_10,
        }
        if f.seconds:
            row["extraction img/s (10,000 CIFAR, pipeline)"] = 10000 / f.seconds
        logger.info("%s", row)
        rows.append(row)
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = []
        for k in keys:
            v = r.get(k, "")
            cells.append(f"{v:.3f}" if isinstance(v, float) and v < 10 else f"{v:.1f}" if isinstance(v, float) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["speed", "quality"])
    ap.add_argument("--n-cifar", type=int, default=1000, help="CIFAR images for the pipeline timing")
    ap.add_argument("--n-photos", type=int, default=100)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    out_json = common.RESULTS_DIR / "features.json"
    results: dict[str, Any] = json.loads(out_json.read_text()) if out_json.exists() else {}
    import torch

    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch": torch.__version__,
        "loadavg": round(os.getloadavg()[0], 2),
    }
    if args.only in (None, "speed"):
        results["throughput"] = run_speed(args.n_cifar, args.n_photos)
    if args.only in (None, "quality"):
        results["quality"] = run_quality()
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    print(write_report(results))


def write_report(results: dict[str, Any]) -> str:
    md = [
        "# Feature extraction benchmark",
        "",
        f"Machine: {results['machine']}. Command: `.venv/bin/python benchmarks/bench_features.py`.",
        "",
        "Throughput depends on how busy the cores are: `loadavg` above is the 1-minute load average",
        "when the run started (other jobs sharing the cores slow every figure down).",
        "",
        "## Throughput (EfficientNet-Lite0 at 224x224; pipeline = read + decode + resize in threads, model on batches of 64)",
        "",
        _markdown(results.get("throughput", [])),
        "",
        "## CIFAR-10 retrieval quality (1,000 queries vs 9,000 database images, exact cosine kNN)",
        "",
        _markdown(results.get("quality", [])),
        "",
    ]
    text = "\n".join(md)
    (common.RESULTS_DIR / "features.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
