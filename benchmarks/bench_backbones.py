"""The two offline ImageNet CNN extractors side by side: retrieval quality against cost.

Quality on the CIFAR-10 protocol (benchmarks/common.py: per class the first 100 files are
queries, the other 900 the database; relevance is same class; mAP over the whole ranked
database, mAP@ALL): exact cosine on the raw float features, ITQ, deep unsupervised and deep
supervised (database labels) hashing, every hasher fitted on the database features only.
Cost, measured in this run with the extractors taking turns: the model alone (``extract_arrays``
on one preprocessed batch of CIFAR images, median of ``--repeats`` calls) and the whole
``ImageStore.ingest`` of the same ``--ingest-files`` CIFAR files into a fresh SQLite store in a
temporary folder (median of ``--ingest-repeats`` runs, each extractor in turn).

``--flip-views NAMES`` adds, for those extractors, the supervised deep hasher trained on the
database plus the database's left-right mirrored images as extra rows (same labels); the
mirrored features are extracted once and cached (common.cifar_flipped_db_features). Queries and the ranked database
stay the plain images.

    python benchmarks/bench_backbones.py                     # both extractors, quality and cost
    python benchmarks/bench_backbones.py --flip-views efficientnet-lite0   # plus mirrored training views
    python benchmarks/bench_backbones.py --skip-cost         # quality only (cached features)
    python benchmarks/bench_backbones.py --extractors efficientnet-lite0 --bits 32

Features come from common.cifar_features (cached under ~/.cache/imgstore-bench; the first run
extracts all 10,000 images per extractor). Writes benchmarks/results/<out>.json and <out>.md
(default ``backbones``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_deep import measure  # noqa: E402
from bench_extractors import interleaved_seconds  # noqa: E402
from bench_hashing import hamming_scores  # noqa: E402
from bench_ingest import ingest_rate, link_folder  # noqa: E402
from common import RESULTS_DIR, cifar_features, cifar_flipped_db_features, cifar_split, retrieval_scores  # noqa: E402
from imgstore.decode import load_image  # noqa: E402
from imgstore.evaluation import cosine_distances  # noqa: E402
from imgstore.features import get_extractor  # noqa: E402

KEYS = ("q_feats", "q_labels", "db_feats", "db_labels")


def quality(name: str, n_bits: int, seed: int, flip_views: bool) -> dict[str, Any]:
    """Every retrieval figure of one extractor's cached features."""
    feats = cifar_features(name)
    data = {k: np.asarray(getattr(feats, k)) for k in KEYS}
    exact = retrieval_scores(feats)
    print(f"{name}: {feats.precision}, {data['db_feats'].shape[1]}-d; exact cosine mAP {exact.map_all:.3f} "
          f"P@10 {exact.precision_at_10:.3f}", flush=True)
    itq = hamming_scores("itq", {}, n_bits, data, seed)
    print(f"{'itq':30s} {n_bits:4d} bits  mAP {itq['mAP@ALL']:.3f}  P@10 {itq['P@10']:.3f}", flush=True)
    cosine = cosine_distances(data["q_feats"], data["db_feats"])
    out: dict[str, Any] = {
        "extractor": name, "precision": feats.precision, "dim": int(data["db_feats"].shape[1]),
        "extract_all_s": feats.seconds,
        "cosine": {"mAP": exact.map_all, "P@10": exact.precision_at_10},
        "itq": {"mAP": itq["mAP@ALL"], "P@10": itq["P@10"], "fit_s": itq["fit_s"]},
        "deep_unsupervised": measure("deep unsupervised", "deep", False, n_bits, data, cosine, 100, seed),
        "deep_supervised": measure("deep supervised (db labels)", "deep", True, n_bits, data, cosine, 100, seed),
    }
    if flip_views:
        flipped = cifar_flipped_db_features(name)
        out["deep_supervised_flip"] = measure(
            "deep supervised + mirrored db", "deep", True, n_bits, data, cosine, 100, seed,
            extra_rows=(flipped, data["db_labels"]),
        )
    return out


def model_alone(names: list[str], paths: list[Path], batch: int, repeats: int) -> dict[str, float]:
    """Images/s of each model on one preprocessed batch of ``paths`` (decode and resize excluded)."""
    extractors = {n: get_extractor(n) for n in names}
    calls = {}
    for n, ex in extractors.items():
        arrays = np.stack([ex.preprocess(load_image(p, draft_size=ex.draft_size).image) for p in paths[:batch]])
        calls[n] = partial(ex.extract_arrays, arrays)
    times = interleaved_seconds(calls, repeats)
    return {n: batch / statistics.median(t) for n, t in times.items()}


def ingest(names: list[str], paths: list[Path], repeats: int) -> dict[str, dict[str, Any]]:
    """``ImageStore.ingest`` of ``paths`` into a fresh SQLite store per run, extractors in turn."""
    runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_folder(paths, Path(tmp) / "set")
        for i in range(repeats):
            for n in names:
                db = Path(tmp) / f"{n}-{i}.db"
                result = ingest_rate(str(db), folder, n)
                db.unlink()
                if result["failed"] or result["added"] != len(paths):
                    raise RuntimeError(f"{n}: ingest added {result['added']} of {len(paths)}, {result['failed']} failed")
                print(f"ingest {n}: {result['images_per_s']:.1f} images/s ({result['seconds']:.1f} s)", flush=True)
                runs[n].append(result)
    return {n: {"images_per_s": statistics.median(r["images_per_s"] for r in rs), "runs": rs} for n, rs in runs.items()}


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    b = meta["bits"]
    cost = "model_alone_per_s" in rows[0]
    lines = [
        "# EfficientNet-Lite0 against -Lite2 on CIFAR-10 (`benchmarks/bench_backbones.py`)",
        "",
        f"{meta['n_queries']} queries, {meta['n_db']} database images (common.cifar_split); mAP@ALL / P@10; "
        f"hashers fitted on the database only (supervised: database labels), {b} bits, random_state "
        f"{meta['seed']}, torch threads {meta['threads']}; deep fit seconds in brackets.",
    ]
    if cost:
        lines.append(
            f"Model alone: `extract_arrays` on one preprocessed batch of {meta['batch']} CIFAR images, median of "
            f"{meta['repeats']} interleaved calls. Ingest: `ImageStore.ingest` of the same {meta['ingest_files']} "
            f"CIFAR files (100 per class) into a fresh SQLite store, median of {meta['ingest_repeats']} runs, "
            "extractors in turn."
        )
    lines += ["", f"Command: `{meta['command']}`", ""]
    flip = any("deep_supervised_flip" in r for r in rows)
    head = ["extractor", "input", "precision", "exact cosine", f"ITQ {b}", f"deep unsup. {b}", f"deep sup. {b}"]
    if flip:
        head.append(f"deep sup. {b} + mirrored db")
    if cost:
        head += ["model alone img/s", "ingest img/s", "cost vs first"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(s: dict[str, Any]) -> str:
        fit = f" ({s['fit_s']:.0f} s)" if "epochs" in s else ""
        return f"{s['mAP']:.3f} / {s['P@10']:.2f}{fit}"

    for r in rows:
        cells = [r["extractor"], str(r["image_size"]), r["precision"], cell(r["cosine"]), cell(r["itq"]),
                 cell(r["deep_unsupervised"]), cell(r["deep_supervised"])]
        if flip:
            cells.append(cell(r["deep_supervised_flip"]) if "deep_supervised_flip" in r else "")
        if cost:
            cells += [f"{r['model_alone_per_s']:.1f}", f"{r['ingest_per_s']:.1f}",
                      f"{rows[0]['ingest_per_s'] / r['ingest_per_s']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"numpy {np.__version__}, torch {meta['torch']}, {platform.platform()}, {meta['cpus']} CPUs, "
              f"1-minute load average {meta['load_average_1min_at_end']:.1f} at the end of the run.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extractors", default="efficientnet-lite0,efficientnet-lite2", help="comma-separated, the baseline first")
    ap.add_argument("--bits", type=int, default=64, help="code length of every hasher")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    ap.add_argument("--flip-views", default="", help="comma-separated extractors whose supervised deep hasher "
                    "is also trained with mirrored database rows")
    ap.add_argument("--skip-cost", action="store_true", help="quality only: no model-alone or ingest timing")
    ap.add_argument("--batch", type=int, default=64, help="model-alone batch size")
    ap.add_argument("--repeats", type=int, default=7, help="model-alone calls per extractor")
    ap.add_argument("--ingest-files", type=int, default=1000, help="CIFAR files per ingest (100 per class at 1000)")
    ap.add_argument("--ingest-repeats", type=int, default=2)
    ap.add_argument("--out", default="backbones", help="results file stem under benchmarks/results/")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    names = [n for n in args.extractors.split(",") if n]
    meta: dict[str, Any] = {
        "command": " ".join(["python benchmarks/bench_backbones.py", *(sys.argv[1:] if argv is None else argv)]),
        "bits": args.bits, "seed": args.seed, "threads": args.threads, "torch": torch.__version__,
        "cpus": os.cpu_count(), "batch": args.batch, "repeats": args.repeats,
        "ingest_files": args.ingest_files, "ingest_repeats": args.ingest_repeats,
    }
    rows: list[dict[str, Any]] = []
    for n in names:
        torch.set_num_threads(args.threads)  # an extractor built earlier may have changed it
        row = quality(n, args.bits, args.seed, n in args.flip_views.split(","))
        row["image_size"] = getattr(get_extractor(n), "image_size", None)
        rows.append(row)
    split = cifar_split()
    meta["n_queries"], meta["n_db"] = len(split.q_paths), len(split.db_paths)
    if not args.skip_cost:
        # 100 files per class at 1000: the queries, then the database
        paths = (split.q_paths + split.db_paths)[: args.ingest_files]
        alone = model_alone(names, paths, args.batch, args.repeats)
        for r in rows:
            r["model_alone_per_s"] = alone[r["extractor"]]
            print(f"model alone {r['extractor']}: {alone[r['extractor']]:.1f} images/s", flush=True)
        rates = ingest(names, paths, args.ingest_repeats)
        for r in rows:
            r["ingest_per_s"] = rates[r["extractor"]]["images_per_s"]
            r["ingest_runs"] = rates[r["extractor"]]["runs"]
    meta["load_average_1min_at_end"] = os.getloadavg()[0]  # >2 on 2 cores: other work shared the machine
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    table = markdown(rows, meta)
    (RESULTS_DIR / f"{args.out}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
