"""`imgstore ingest` of full-size photos against decoding alone, and against another checkout.

    .venv/bin/python benchmarks/bench_ingest_photos.py                          # this checkout
    .venv/bin/python benchmarks/bench_ingest_photos.py --before /tmp/before     # and an older one, interleaved
    .venv/bin/python benchmarks/bench_ingest_photos.py --heic --out ingest_heic  # the photos as a phone's HEICs

Issue 27 ("a real photo library on a laptop"): bench_runtime's photo row compares a whole
`imgstore ingest` (a new process: start-up, model load, database creation, then the work) with
decoding alone measured inside a warm process. This splits the command's wall time into its
start-up and its ingest proper, so each part can be compared with its ceiling:

* decoding alone: the ingest pipeline's reading, decoding and preprocessing on the same threads,
  no model (bench_runtime's ``decode_alone``), in this process;
* the model alone: EfficientNet-Lite0 on ONNX Runtime, one batch of 64 of these photos;
* the ceiling of an ingest on shared cores: decoding and the model one after the other,
  ``1 / (1/decode + 1/model)`` images/s;
* each checkout's `imgstore ingest FOLDER --json` into a new SQLite file, a new process timed from
  start to exit (wall), and the summary's own ``elapsed_s`` (from the walk to the last write).

Checkouts alternate round by round (``PYTHONPATH`` names the other one's root; same interpreter
and packages); medians. The stores the two checkouts make must hold the same rows (features,
codes, labels, signatures, sizes, capture times, paths): checked at the end, byte for byte.

``--heic``: the same photos cropped to 4:3 (3:4 when upright), as a phone shoots them, and
written as HEIC (quality 90) with the 320-px thumbnail a phone embeds. Their stores differ
between checkouts when one reads the thumbnails and the other does not.

Writes benchmarks/results/ingest_photos.json and ingest_photos.md (``--out`` names others).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore.decode import load_image
from imgstore.features import get_extractor
from imgstore.features.pipeline import default_workers

import common
from bench_runtime import decode_alone

REPO = Path(__file__).resolve().parent.parent

#: the rows an ingest writes that must not depend on how fast it ran (ingested_at, first_seen_at
#: and last_seen_at are clock times; ids follow the content hash order within a batch)
COMPARED = {
    "images": "SELECT sha256, width, height, format, byte_size, captured_at, meta, signature, border_fraction, "
              "border_version FROM images ORDER BY sha256",
    "features": "SELECT i.sha256, f.vector FROM features f JOIN images i ON i.id = f.image_id ORDER BY i.sha256",
    "labels": "SELECT i.sha256, l.rank, l.class_id, l.prob FROM labels l JOIN images i ON i.id = l.image_id "
              "ORDER BY i.sha256, l.rank",
    "label_norms": "SELECT i.sha256, n.logsumexp FROM label_norms n JOIN images i ON i.id = n.image_id ORDER BY i.sha256",
    "paths": "SELECT p.path, i.sha256, p.file_size, p.mtime_ns, p.is_current, p.root FROM image_paths p "
             "JOIN images i ON i.id = p.image_id ORDER BY p.path",
}


def ingest_once(root: Path | None, folder: Path, db: Path,
                extractor: str = "efficientnet-lite0") -> tuple[float, float, dict[str, Any]]:
    """Wall seconds and peak RSS (MB, read by GNU time) of one `imgstore ingest` (a new process)
    with ``root``'s code (None: this checkout), and its --json summary."""
    env = dict(os.environ)
    if root is not None:
        env["PYTHONPATH"] = str(root) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "imgstore.cli", "--db", str(db), "ingest", str(folder), "--extractor", extractor,
           "--no-progress", "--json"]
    with tempfile.NamedTemporaryFile(suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], capture_output=True, text=True,
                              env=env, cwd=tempfile.gettempdir())
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-600:]}")
        peak_mb = float(Path(report.name).read_text().split()[-1]) / 1024
    return wall, peak_mb, json.loads(proc.stdout)


def rows(db: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(db) as conn:
        out = {name: conn.execute(sql).fetchall() for name, sql in COMPARED.items()}
        codes = conn.execute("SELECT i.sha256, c.code FROM codes c JOIN images i ON i.id = c.image_id "
                             "ORDER BY i.sha256").fetchall() if _has_table(conn, "codes") else []
    out["codes"] = codes
    return out


def _has_table(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def differences(a: dict[str, list[tuple[Any, ...]]], b: dict[str, list[tuple[Any, ...]]]) -> dict[str, int]:
    """Rows that differ between two stores, per table (0 everywhere: the same store)."""
    return {name: sum(x != y for x, y in zip(a[name], b[name])) + abs(len(a[name]) - len(b[name])) for name in a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=100, help="full-size photos (benchmarks/common.py photo_folder)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", type=Path, default=None, help="root of another checkout to compare with")
    parser.add_argument("--note", default="", help="what the checkouts differ in, for the report")
    parser.add_argument("--out", default="ingest_photos")
    parser.add_argument("--extractor", default="efficientnet-lite0",
                        help="what the ingests and the model-alone row use (efficientnet-lite0-int8: the int8 model)")
    parser.add_argument("--heic", action="store_true", help="the photos as a phone's HEICs (4:3, a 320-px thumbnail)")
    args = parser.parse_args()

    photos = heic_folder(common.photo_folder(args.photos)) if args.heic else common.photo_folder(args.photos)
    trees: dict[str, Path | None] = {"this checkout": None}
    if args.before is not None:
        trees = {"before": args.before.resolve(), "after": None}
    extractor = get_extractor(args.extractor)
    load_before = os.getloadavg()[0]
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "decode_workers": default_workers(), "python": platform.python_version()},
        "command": " ".join(["benchmarks/bench_ingest_photos.py", *(a for a in sys.argv[1:] if a != args.note)]),
        "n_photos": len(photos),
        "format": "HEIC, 4:3, 320-px thumbnail" if args.heic else "JPEG",
        "extractor": args.extractor,
        "note": args.note,
        "megapixels_median": statistics.median(
            (lambda im: im.width * im.height / 1e6)(load_image(p).image) for p in photos[:10]),
    }
    batch = np.stack([extractor.preprocess(load_image(p, draft_size=extractor.draft_size,
                                                      thumbnail_size=extractor.thumbnail_size).image) for p in photos[:64]])
    extractor.extract_arrays(batch[:8])  # warm-up
    walls: dict[str, list[float]] = {name: [] for name in trees}
    inner: dict[str, list[float]] = {name: [] for name in trees}
    peaks: dict[str, list[float]] = {name: [] for name in trees}
    decode_rates: list[float] = []
    model_rates: list[float] = []
    stores: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-photos-") as tmp:
        work = Path(tmp)
        folder = work / "photos"
        folder.mkdir()
        for p in photos:
            shutil.copy(p, folder / p.name)
        for i in range(args.rounds):
            decode_rates.append(decode_alone(photos, extractor, 1))
            start = time.perf_counter()
            extractor.extract_arrays(batch)
            model_rates.append(len(batch) / (time.perf_counter() - start))
            for name, root in (trees.items() if i % 2 == 0 else reversed(trees.items())):
                db = work / f"{name.replace(' ', '-')}-{i}.db"
                wall, peak, summary = ingest_once(root, folder, db, args.extractor)
                if summary["added"] != len(photos):
                    raise RuntimeError(f"{name}: added {summary['added']} of {len(photos)}: {summary.get('errors')}")
                walls[name].append(wall)
                inner[name].append(float(summary["elapsed_s"]))
                peaks[name].append(peak)
                if name in stores:
                    db.unlink()
                else:
                    stores[name] = db
                print(f"round {i} {name}: {wall:.2f} s wall, {summary['elapsed_s']:.2f} s ingest "
                      f"({len(photos) / wall:.1f} images/s), peak RSS {peak:.0f} MB", flush=True)
        if len(stores) == 2:
            a, b = (rows(stores[name]) for name in trees)
            result["rows_compared"] = {name: len(v) for name, v in a.items()}
            result["rows_differing"] = differences(a, b)
    decode = statistics.median(decode_rates)
    model = statistics.median(model_rates)
    n = len(photos)
    result["decode_alone_images_per_s"] = decode
    result["model_alone_images_per_s"] = model
    result["shared_cores_ceiling_images_per_s"] = 1 / (1 / decode + 1 / model)
    result["ingest"] = {
        name: {"wall_s": statistics.median(walls[name]), "images_per_s": n / statistics.median(walls[name]),
               "ingest_s": statistics.median(inner[name]), "ingest_images_per_s": n / statistics.median(inner[name]),
               "startup_and_exit_s": statistics.median(w - s for w, s in zip(walls[name], inner[name])),
               "peak_rss_mb": statistics.median(peaks[name]),
               "all_wall_s": [round(w, 3) for w in walls[name]], "all_ingest_s": [round(s, 3) for s in inner[name]]}
        for name in trees
    }
    result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (common.RESULTS_DIR / f"{args.out}.md").write_text(report(result))
    print(report(result))


def heic_folder(photos: list[Path]) -> list[Path]:
    """The photos cropped to 4:3 (3:4 when upright) and written as HEIC with a 320-px thumbnail,
    made once (see the module doc)."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    folder = common.cache_dir() / f"heic-{photos[0].parent.name}"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for p in photos:
        target = folder / f"{p.stem}.heic"
        if not target.exists():
            with Image.open(p) as im:
                w, h = im.size
                cw, ch = (min(w, h * 4 // 3), min(h, w * 3 // 4)) if w >= h else (min(w, h * 3 // 4), min(h, w * 4 // 3))
                left, top = (w - cw) // 2, (h - ch) // 2
                tmp = target.with_suffix(".part")
                im.convert("RGB").crop((left, top, left + cw, top + ch)).save(tmp, format="HEIF", quality=90, thumbnails=[320])
                os.replace(tmp, target)
        out.append(target)
    return out


def report(r: dict[str, Any]) -> str:
    decode = r["decode_alone_images_per_s"]
    lines = [
        "# `imgstore ingest` of full-size photos (issue 27)",
        "",
        f"`{r['command']}` on {r['machine']['cores']} cores ({r['machine']['cpu']}): {r['n_photos']} "
        f"{r.get('format', 'JPEG')} photos "
        f"({r['megapixels_median']:.1f} MP median) into a new SQLite file with {r.get('extractor', 'efficientnet-lite0')}, "
        "each run a new process; checkouts "
        f"interleaved round by round, medians. 1-minute load average {r['load_average_1min'][0]} at the start, "
        f"{r['load_average_1min'][1]} at the end.",
        *(["", r["note"]] if r.get("note") else []),
        "",
        f"Ceilings in this process: decoding and preprocessing alone {decode:.1f} images/s, the model alone "
        f"{r['model_alone_images_per_s']:.1f} images/s (batch 64), both on the same cores one after the other "
        f"{r['shared_cores_ceiling_images_per_s']:.1f} images/s.",
        "",
        "| checkout | whole command, s | images/s | of decoding alone | ingest proper, s | images/s | of decoding alone "
        "| start-up and exit, s | peak RSS, MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, v in r["ingest"].items():
        lines.append(f"| {name} | {v['wall_s']:.2f} | {v['images_per_s']:.1f} | {v['images_per_s'] / decode:.2f} | "
                     f"{v['ingest_s']:.2f} | {v['ingest_images_per_s']:.1f} | {v['ingest_images_per_s'] / decode:.2f} | "
                     f"{v['startup_and_exit_s']:.2f} | {v['peak_rss_mb']:.0f} |")
    if "rows_differing" in r:
        same = not any(r["rows_differing"].values())
        lines += ["", f"Stores compared row by row ({', '.join(f'{k} {v}' for k, v in r['rows_compared'].items())}): "
                  + ("identical." if same else f"DIFFERENT: {r['rows_differing']}")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
