"""Hashing quality on CIFAR-10: mAP@ALL and P@10 of Hamming ranking, per method and code length.

Protocol (/work/shared/datasets/README.md): queries are the first 100 files of each class sorted
by name, the database the other 900; relevance is same class; hashers are fitted on the
database features only. Exact cosine kNN on the float features (raw and database-mean-centred)
is the ceiling to compare against. Also times fit and encode.

    python benchmarks/bench_hashing.py                    # EfficientNet-Lite0 features via benchmarks/common.py
    python benchmarks/bench_hashing.py --features F.npz   # any npz with q_feats, q_labels, db_feats, db_labels

Writes benchmarks/results/hashing.json and hashing.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from imgstore.evaluation import cosine_distances, evaluate_distances  # noqa: E402
from imgstore.hashing import make_hasher  # noqa: E402
from imgstore.hashing.bits import as_words, hamming_distances_batch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BITS = (16, 32, 64, 128)
# (label, method, params): every variant measured at every code length.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [
    ("lsh (uncentred)", "lsh", {"center": False}),
    ("lsh (centred, default)", "lsh", {"center": True}),
    ("pca-sign", "pca", {}),
    ("itq", "itq", {}),
    ("centres (supervised, db labels)", "centres", {}),
]


def load_features(path: str | None, extractor: str, precision: str) -> tuple[dict[str, np.ndarray], str]:
    if path is not None:
        src = path
        with np.load(path) as f:
            return {k: f[k] for k in ("q_feats", "q_labels", "db_feats", "db_labels")}, src
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cifar_features  # type: ignore[import-not-found]

    feats = cifar_features(extractor, precision=precision)  # cached in ~/.cache/imgstore-bench
    keys = ("q_feats", "q_labels", "db_feats", "db_labels")
    source = f"benchmarks.common.cifar_features({extractor!r}) at precision {feats.precision}"
    return {k: np.asarray(getattr(feats, k)) for k in keys}, source


def hamming_scores(
    method: str, params: dict[str, Any], n_bits: int, data: dict[str, np.ndarray], seed: int
) -> dict[str, float]:
    hasher = make_hasher(method, n_bits=n_bits, random_state=seed, **params)
    t0 = time.perf_counter()
    hasher.fit(data["db_feats"], data["db_labels"] if hasher.needs_labels else None)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    db_codes = hasher.encode(data["db_feats"])
    encode_s = time.perf_counter() - t0
    q_codes = hasher.encode(data["q_feats"])
    dist = hamming_distances_batch(as_words(q_codes), as_words(db_codes))
    s = evaluate_distances(dist, data["q_labels"], data["db_labels"])
    return {
        "mAP@ALL": s.map_all,
        "P@10": s.precision_at_10,
        "fit_s": fit_s,
        "encode_us_per_vector": 1e6 * encode_s / len(db_codes),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", help="npz with q_feats, q_labels, db_feats, db_labels")
    ap.add_argument("--extractor", default="efficientnet-lite0")
    ap.add_argument("--precision", default="auto", help="extractor precision for cached features (auto|fp32|bf16)")
    ap.add_argument("--seeds", type=int, default=3, help="random_state values 0..seeds-1, averaged")
    ap.add_argument("--out", default=str(RESULTS / "hashing"), help="output path without suffix")
    args = ap.parse_args(argv)

    data, source = load_features(args.features, args.extractor, args.precision)
    q, db = data["q_feats"].astype(np.float32), data["db_feats"].astype(np.float32)
    print(f"features: {source}: {len(q)} queries, {len(db)} database, dim {db.shape[1]}", flush=True)

    rows: list[dict[str, Any]] = []
    for label, qq, dd in (
        ("exact cosine (raw)", q, db),
        ("exact cosine (centred on db mean)", q - db.mean(axis=0), db - db.mean(axis=0)),
    ):
        s = evaluate_distances(cosine_distances(qq, dd), data["q_labels"], data["db_labels"])
        rows.append({"method": label, "n_bits": None, "mAP@ALL": s.map_all, "P@10": s.precision_at_10})
        print(f"{label:40s} mAP {s.map_all:.3f}  P@10 {s.precision_at_10:.3f}", flush=True)

    for label, method, params in VARIANTS:
        for n_bits in BITS:
            runs = [hamming_scores(method, params, n_bits, data, seed) for seed in range(args.seeds)]
            row: dict[str, Any] = {"method": label, "hasher": method, "params": params, "n_bits": n_bits}
            for key in runs[0]:
                vals = np.array([r[key] for r in runs])
                row[key] = float(vals.mean())
                if key in ("mAP@ALL", "P@10"):
                    row[key + "_std"] = float(vals.std())
            rows.append(row)
            print(
                f"{label:28s} {n_bits:4d} bits  mAP {row['mAP@ALL']:.3f}±{row['mAP@ALL_std']:.3f}  "
                f"P@10 {row['P@10']:.3f}  fit {row['fit_s']:.2f}s  "
                f"encode {row['encode_us_per_vector']:.1f} us/vec",
                flush=True,
            )

    meta = {
        "features": source,
        "n_queries": int(len(q)),
        "n_db": int(len(db)),
        "dim": int(db.shape[1]),
        "seeds": args.seeds,
        "numpy": np.__version__,
        "machine": platform.platform(),
        "command": "python benchmarks/bench_hashing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    md = render_markdown(meta, rows)
    out.with_suffix(".md").write_text(md)
    print()
    print(md)
    return 0


def render_markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Hashing quality on CIFAR-10",
        "",
        f"Features: {meta['features']} ({meta['dim']}-d); {meta['n_queries']} queries, "
        f"{meta['n_db']} database images; hashers fitted on the database only; "
        f"Hamming ranking (ties in database order), mean over {meta['seeds']} random_state(s) "
        "(± std of mAP).",
        "",
        f"Command: `{meta['command'].strip()}`",
        "",
        "| method | " + " | ".join(f"{b} bits mAP / P@10" for b in BITS) + " | fit s (64 bits) | encode µs/vec (64 bits) |",
        "|---|" + "---|" * (len(BITS) + 2),
    ]
    for r in rows:
        if r["n_bits"] is None:
            lines.append(f"| {r['method']} | float: {r['mAP@ALL']:.3f} / {r['P@10']:.2f} |" + " |" * (len(BITS) + 1))
    by_method: dict[str, dict[int, dict[str, Any]]] = {}
    for r in rows:
        if r["n_bits"] is not None:
            by_method.setdefault(r["method"], {})[r["n_bits"]] = r
    for label, cells in by_method.items():
        parts = [
            f"{cells[b]['mAP@ALL']:.3f}±{cells[b]['mAP@ALL_std']:.3f} / {cells[b]['P@10']:.2f}" if b in cells else "-"
            for b in BITS
        ]
        r64 = cells.get(64, {})
        lines.append(
            f"| {label} | " + " | ".join(parts)
            + f" | {r64.get('fit_s', float('nan')):.2f} | {r64.get('encode_us_per_vector', float('nan')):.1f} |"
        )
    lines.append("")
    lines.append(f"numpy {meta['numpy']}, {meta['machine']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
