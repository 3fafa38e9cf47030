"""The handcrafted ``color`` extractor, version 2 (colour + shape + texture) against version 1
(colour + shape), in one run: CIFAR-10 retrieval quality and extraction speed.

    python benchmarks/bench_color.py

Version 1's descriptor is exactly version 2's first 384 values, L2-normalised again (version 2
appends the texture block and normalises the whole), so both are scored on the same extraction.
Quality: the CIFAR-10 protocol (exact cosine, mAP@ALL and P@10, raw and with the database mean
subtracted). Speed: the decode + extract pipeline (threads) on 1,000 CIFAR JPEGs and on 100
full-size photos (2000-4000 px); version 1 is timed as the same code with the texture block
skipped, interleaved with version 2, median of 3 passes. Writes benchmarks/results/color.json
and color.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import common  # noqa: E402

from imgstore.features import color, get_extractor  # noqa: E402

V1_DIM = 384


def _v1(feats: np.ndarray) -> np.ndarray:
    f = feats[:, :V1_DIM]
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def quality() -> list[dict[str, Any]]:
    f = common.cifar_features("color")
    rows = []
    for label, q, db in (("v1: colour + shape (384)", _v1(f.q_feats), _v1(f.db_feats)), ("v2: + texture (464)", f.q_feats, f.db_feats)):
        g = common.CifarFeatures(q, f.q_labels, db, f.db_labels, f.preprocess_version, "fp32", f.seconds)
        raw, centred = common.retrieval_scores(g), common.retrieval_scores(g, centre=True)
        rows.append({"descriptor": label, "mAP@ALL": raw.map_all, "P@10": raw.precision_at_10,
                     "mAP@ALL centred": centred.map_all, "P@10 centred": centred.precision_at_10})
        print(rows[-1], flush=True)
    return rows


def speed() -> list[dict[str, Any]]:
    split = common.cifar_split()
    cifar = split.db_paths[:: len(split.db_paths) // 1000][:1000]
    photos = common.photo_folder(100)
    ex = get_extractor("color")
    real = color._lbp_grid
    out = []
    for name, paths in (("CIFAR 32x32 JPEG", cifar), ("photos 2000-4000 px JPEG", photos)):
        common.extract_paths(ex, paths[:50])  # warm the file cache
        times: dict[str, list[float]] = {"v1": [], "v2": []}
        for _ in range(3):
            for version in ("v1", "v2"):
                color._lbp_grid = (lambda gray, r: np.ones(40, dtype=np.float32)) if version == "v1" else real
                t0 = time.perf_counter()
                common.extract_paths(ex, paths)
                times[version].append(len(paths) / (time.perf_counter() - t0))
        color._lbp_grid = real
        row = {"images": name, "v1 images/s": statistics.median(times["v1"]), "v2 images/s": statistics.median(times["v2"]),
               "passes": times}
        row["v2 / v1"] = row["v2 images/s"] / row["v1 images/s"]
        print(row, flush=True)
        out.append(row)
    return out


def main() -> None:
    result = {"command": "python benchmarks/bench_color.py", "quality": quality(), "speed": speed()}
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "color.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# The `color` extractor: version 2 (texture added) against version 1", "", f"`{result['command']}`", "",
             "## CIFAR-10 (1,000 queries, 9,000 database images, exact cosine)", "",
             "| descriptor | mAP@ALL | P@10 | mAP@ALL centred | P@10 centred |", "|---|---:|---:|---:|---:|"]
    for r in result["quality"]:
        lines.append(f"| {r['descriptor']} | {r['mAP@ALL']:.3f} | {r['P@10']:.3f} | {r['mAP@ALL centred']:.3f} | {r['P@10 centred']:.3f} |")
    lines += ["", "## Extraction speed (decode + extract pipeline, images/s, median of 3 interleaved passes)", "",
              "| images | v1 | v2 | v2 / v1 |", "|---|---:|---:|---:|"]
    for r in result["speed"]:
        lines.append(f"| {r['images']} | {r['v1 images/s']:.0f} | {r['v2 images/s']:.0f} | {r['v2 / v1']:.2f} |")
    (common.RESULTS_DIR / "color.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
