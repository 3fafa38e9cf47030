"""Learned ``deep`` hashing vs ITQ and LSH on CIFAR-10: mAP@ALL and P@10 of Hamming ranking.

Protocol as in bench_hashing.py: queries are the first 100 files of each class, the database
the other 900; relevance is same class; every hasher is fitted on the database features only
(the supervised one with the database labels), never on queries.

Also measures float re-ranking of Hamming candidates: the top ``--rerank-k`` (100) per query
by Hamming distance re-ordered by raw-feature cosine, the rest left in Hamming order. A
supervised index ranks by class; cosine on the raw features does not know the classes, so
re-ranking pulls the list back toward the float ceiling (exact cosine ~0.31-0.34 mAP here).

    python benchmarks/bench_deep.py                    # cached EfficientNet-Lite0 features
    python benchmarks/bench_deep.py --features F.npz   # any npz with q_feats, q_labels, db_feats, db_labels
    python benchmarks/bench_deep.py --bits 64 --out deep_quick

Writes benchmarks/results/<out>.json and <out>.md (default ``deep``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import imgstore.hashing.deep  # noqa: E402,F401  (registers "deep")
from imgstore.evaluation import average_precision_from_ranking, cosine_distances, rank_by_distance  # noqa: E402
from imgstore.hashing import Hasher, make_hasher  # noqa: E402
from imgstore.hashing.bits import as_words, hamming_distances_batch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
KEYS = ("q_feats", "q_labels", "db_feats", "db_labels")
# (label, method, supervised)
VARIANTS: list[tuple[str, str, bool]] = [
    ("deep supervised (db labels)", "deep", True),
    ("deep unsupervised", "deep", False),
    ("itq", "itq", False),
    ("lsh (centred)", "lsh", False),
]


def load_features(path: str | None) -> tuple[dict[str, np.ndarray], str]:
    if path is not None:
        with np.load(path) as f:
            return {k: f[k] for k in KEYS}, path
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import cifar_features  # type: ignore[import-not-found]

    feats = cifar_features("efficientnet-lite0")  # cached in ~/.cache/imgstore-bench
    source = f"benchmarks.common.cifar_features('efficientnet-lite0') at precision {feats.precision}"
    return {k: np.asarray(getattr(feats, k)) for k in KEYS}, source


def rerank_ranking(hamming: np.ndarray, cosine: np.ndarray, k: int) -> np.ndarray:
    """Hamming ranking whose first ``k`` entries per query are re-ordered by cosine distance."""
    ranking = rank_by_distance(hamming)
    top = ranking[:, :k]
    order = np.argsort(np.take_along_axis(cosine, top, axis=1), axis=1, kind="stable")
    ranking[:, :k] = np.take_along_axis(top, order, axis=1)
    return ranking


def measure(
    label: str, method: str, supervised: bool, n_bits: int, data: dict[str, np.ndarray],
    cosine: np.ndarray, rerank_k: int, seed: int, *, params: dict[str, Any] | None = None,
    extra_rows: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Fit on the database (plus ``extra_rows``: more training views (features, labels) of the
    database, e.g. of mirrored images), then score the queries against the database's codes."""
    hasher: Hasher = make_hasher(method, n_bits=n_bits, random_state=seed, **(params or {}))
    x, y = data["db_feats"], data["db_labels"]
    if extra_rows is not None:
        x, y = np.concatenate([x, extra_rows[0]]), np.concatenate([y, extra_rows[1]])
    started = time.perf_counter()
    hasher.fit(x, y if supervised else None)
    fit_s = time.perf_counter() - started
    hamming = hamming_distances_batch(as_words(hasher.encode(data["q_feats"])), as_words(hasher.encode(data["db_feats"])))
    plain = average_precision_from_ranking(rank_by_distance(hamming), data["q_labels"], data["db_labels"])
    rerank = average_precision_from_ranking(
        rerank_ranking(hamming, cosine, rerank_k), data["q_labels"], data["db_labels"]
    )
    row: dict[str, Any] = {
        "variant": label, "method": method, "n_bits": n_bits, "supervised": supervised,
        "mAP": plain.map_all, "P@10": plain.precision_at_10,
        "rerank_mAP": rerank.map_all, "rerank_P@10": rerank.precision_at_10,
        "fit_s": fit_s,
    }
    if hasattr(hasher, "loss_curve_"):
        row["epochs"] = int(len(hasher.loss_curve_))
        row["best_epoch"] = int(hasher.best_epoch_)
    print(
        f"{label:30s} {n_bits:4d} bits  mAP {plain.map_all:.3f}  P@10 {plain.precision_at_10:.3f}  "
        f"re-ranked mAP {rerank.map_all:.3f}  fit {fit_s:.1f} s" + (f"  epochs {row['epochs']}" if "epochs" in row else ""),
        flush=True,
    )
    return row


def markdown(rows: list[dict[str, Any]], bits: list[int], meta: dict[str, Any]) -> str:
    lines = [
        "# Deep (learned) hashing on CIFAR-10",
        "",
        f"Features: {meta['source']} ({meta['dim']}-d); {meta['n_queries']} queries, {meta['n_db']} database "
        f"images; hashers fitted on the database only (supervised: database labels); Hamming ranking, ties in "
        f"database order; random_state {meta['seed']}; torch threads {meta['torch_threads']}.",
        f"Cells: mAP@ALL / P@10, then mAP when the top {meta['rerank_k']} Hamming candidates are re-ranked by "
        f"raw-feature cosine; fit seconds (deep: epochs run / kept).",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| method | " + " | ".join(f"{b} bits mAP / P@10 | re-ranked mAP | fit s" for b in bits) + " |",
        "|---|" + "---|---|---|" * len(bits),
        f"| exact cosine (raw, float) | {meta['cosine_mAP']:.3f} / {meta['cosine_P@10']:.2f} |"
        + " |" * (3 * len(bits) - 1),
    ]
    for label in dict.fromkeys(r["variant"] for r in rows):
        cells = []
        for b in bits:
            r = next((r for r in rows if r["variant"] == label and r["n_bits"] == b), None)
            if r is None:
                cells += ["", "", ""]
                continue
            fit = f"{r['fit_s']:.1f}" + (f" ({r['epochs']}/{r['best_epoch']})" if "epochs" in r else "")
            cells += [f"{r['mAP']:.3f} / {r['P@10']:.2f}", f"{r['rerank_mAP']:.3f}", fit]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"numpy {np.__version__}, torch {meta['torch']}, {platform.platform()}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", help="npz with q_feats, q_labels, db_feats, db_labels")
    parser.add_argument("--bits", default="16,32,64,128", help="comma-separated code lengths")
    parser.add_argument("--only", default="", help="comma-separated substrings of variant names to run")
    parser.add_argument("--rerank-k", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads for training")
    parser.add_argument("--out", default="deep", help="results file stem under benchmarks/results/")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import torch

    torch.set_num_threads(args.threads)
    bits = [int(b) for b in args.bits.split(",")]
    data, source = load_features(args.features)
    cosine = cosine_distances(data["q_feats"], data["db_feats"])
    exact = average_precision_from_ranking(rank_by_distance(cosine), data["q_labels"], data["db_labels"])
    variants = [v for v in VARIANTS if not args.only or any(s in v[0] for s in args.only.split(","))]
    rows: list[dict[str, Any]] = []
    meta = {
        "source": source, "dim": int(data["db_feats"].shape[1]), "n_queries": int(len(data["q_feats"])),
        "n_db": int(len(data["db_feats"])), "seed": args.seed, "rerank_k": args.rerank_k,
        "torch_threads": args.threads, "torch": torch.__version__,
        "command": " ".join(["python benchmarks/bench_deep.py", *(sys.argv[1:] if argv is None else argv)]),
        "cosine_mAP": exact.map_all, "cosine_P@10": exact.precision_at_10,
        "deep_params": make_hasher("deep").get_params(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    for b in bits:  # code length outer, so a stopped run still has every method at the first lengths
        for label, method, sup in variants:
            rows.append(measure(label, method, sup, b, data, cosine, args.rerank_k, args.seed))
            (RESULTS / f"{args.out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
            table = markdown(rows, sorted(bits), meta)
            (RESULTS / f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
