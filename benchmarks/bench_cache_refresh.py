"""Bringing an in-memory code cache up to date after an ingest batch: append against reload.

A long-running process (``imgstore serve``) keeps each index's codes in memory; every ingest
batch beside it bumps the index's generation. This measures, at N codes (``bench_search.py``'s
data, 64-bit codes, 4 bands), on SQLite and PostgreSQL, the time ``StoreContext.code_cache``
takes to answer again after another connection appended one batch of 64 codes: the append path
(new rows by id, a count, a merge into each band's sorted segment) against a full reload (what
every write cost before), in the same run, median of ``--repeats`` batches each.

    python benchmarks/bench_cache_refresh.py                  # 1M codes, both databases
    python benchmarks/bench_cache_refresh.py --n 100000 --db sqlite

Writes benchmarks/results/cache_refresh.json and .md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_search import BAND_WIDTH, DEFAULT_PG, N_BANDS, RESULTS, Target, load_store, make_data  # noqa: E402

from imgstore import ImageStore  # noqa: E402
from imgstore.bandindex import mark_changed, write_codes  # noqa: E402
from imgstore.indexing import find_index, list_indexes  # noqa: E402
from imgstore.models import Image  # noqa: E402
from imgstore.search import CodeCache  # noqa: E402
from imgstore.sqlhelpers import insert_ignore  # noqa: E402

BATCH = 64


def append_batch(writer: ImageStore, hasher_id: int, first_id: int, codes: np.ndarray) -> None:
    """What an ingest batch does to an index: new image rows, their codes and buckets, a bump."""
    ids = np.arange(first_id, first_id + len(codes), dtype=np.int64)

    def work(conn: Any) -> None:
        insert_ignore(conn, Image.__table__, [  # type: ignore[arg-type]
            {"id": int(i), "sha256": f"{int(i):064x}", "width": 1, "height": 1, "format": "synthetic", "byte_size": 0} for i in ids
        ])
        write_codes(conn, hasher_id, ids, codes, N_BANDS, BAND_WIDTH)
        mark_changed(conn, [hasher_id])

    writer.transaction(work, what="append a batch")


def run_db(kind: str, n: int, repeats: int, pg: str) -> dict[str, Any]:
    hasher, pool, _ = make_data()
    target = Target(kind, pg)
    try:
        with ImageStore(target.url) as writer, ImageStore(target.url, cache_codes=True) as reader:
            hasher_id, timing = load_store(writer, hasher, pool[:n], vacuum=True)
            extra = pool[n : n + BATCH * repeats] if len(pool) >= n + BATCH * repeats else pool[: BATCH * repeats]
            with reader.ctx.read("bench") as conn:
                index = find_index(list_indexes(conn), hasher_id)
                assert index is not None
                t0 = time.perf_counter()
                reader.ctx.code_cache(conn, index)
                first_load = time.perf_counter() - t0
            appends, reloads = [], []
            next_id = n + 1
            for r in range(repeats):
                append_batch(writer, hasher_id, next_id, extra[r * BATCH : (r + 1) * BATCH])
                next_id += BATCH
                with reader.ctx.read("bench") as conn:
                    t0 = time.perf_counter()
                    cache = reader.ctx.code_cache(conn, index)
                    appends.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    CodeCache.load(conn, index)  # what every refresh cost before
                    reloads.append(time.perf_counter() - t0)
                assert len(cache) == n + (r + 1) * BATCH
            assert reader.ctx.cache_refreshes == {"loads": 1, "appends": repeats}
    finally:
        target.drop()
    out = {"db": kind, "N": n, "batch": BATCH, "repeats": repeats, "first_load_s": first_load,
           "append_ms": [1000 * a for a in appends], "reload_ms": [1000 * r for r in reloads],
           "append_median_ms": 1000 * statistics.median(appends), "reload_median_ms": 1000 * statistics.median(reloads)}
    print(f"{kind} N={n:,}: append {out['append_median_ms']:.1f} ms, full reload {out['reload_median_ms']:.0f} ms "
          f"({out['reload_median_ms'] / out['append_median_ms']:.0f}x)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pg", default=DEFAULT_PG)
    args = parser.parse_args()
    runs = [run_db(kind, args.n - BATCH * args.repeats, args.repeats, args.pg) for kind in args.db.split(",")]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cache_refresh.json").write_text(json.dumps(runs, indent=2))
    lines = ["# Code cache refresh after one ingest batch of 64 codes: append against full reload", "",
             f"`python {' '.join(sys.argv)}`; median of {args.repeats} batches; one thread.", "",
             "| db | N | append, ms | full reload, ms | ratio |", "|---|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['db']} | {r['N']:,} | {r['append_median_ms']:.1f} | {r['reload_median_ms']:,.0f} | "
                     f"{r['reload_median_ms'] / r['append_median_ms']:.0f}x |")
    (RESULTS / "cache_refresh.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
