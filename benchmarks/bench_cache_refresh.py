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
from imgstore.codecache import CodeCache, caches  # noqa: E402
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


#: During-ingest run: a batch of 64 codes every WRITE_EVERY_S for DURING_S, searches meanwhile.
WRITE_EVERY_S = 0.5
DURING_S = 15.0


def during_ingest(url: str, writer: ImageStore, hasher_id: int, first_id: int, pool: np.ndarray, mode: str) -> dict[str, float]:
    """Latency of one cached search (the cache check included) while a writer appends a batch
    every WRITE_EVERY_S: refreshed in the request ("inline", as without a refresher) or by the
    store's background refresher ("background", what `imgstore serve` runs)."""
    import threading

    from imgstore.search import hamming_search

    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.wait(WRITE_EVERY_S):
            append_batch(writer, hasher_id, first_id + i * BATCH, pool[(i * BATCH) % (len(pool) - BATCH):][:BATCH])
            i += 1

    with ImageStore(url, cache_codes=True) as reader:
        with reader.ctx.read("bench") as conn:
            index = find_index(list_indexes(conn), hasher_id)
            assert index is not None
            warm = caches(reader.ctx).code_cache(conn, index)
            hamming_search(pool[0], index, 10, warm, probe_radius=1)  # the compiled kernels load once per process
        if mode == "background":
            reader.start_refresher(interval_s=0.1)
        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        times = []
        deadline = time.perf_counter() + DURING_S
        q = 0
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            with reader.ctx.read("bench") as conn:  # one read transaction per search, as search_many
                cache = caches(reader.ctx).code_cache(conn, index)
                hamming_search(pool[q % len(pool)], index, 10, cache, probe_radius=1)
            times.append(time.perf_counter() - t0)
            q += 1
        stop.set()
        thread.join()
        reader.stop_refresher()
    ms = np.array(times) * 1000
    out = {"queries": len(ms), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
           "max_ms": float(ms.max()), "refreshes": dict(reader.cache_refreshes)}
    print(f"  during ingest, {mode}: p50 {out['p50_ms']:.2f} ms, p99 {out['p99_ms']:.1f} ms, max {out['max_ms']:.0f} ms "
          f"over {len(ms):,} searches", flush=True)
    return out


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
                caches(reader.ctx).code_cache(conn, index)
                first_load = time.perf_counter() - t0
            appends, reloads = [], []
            next_id = n + 1
            for r in range(repeats):
                append_batch(writer, hasher_id, next_id, extra[r * BATCH : (r + 1) * BATCH])
                next_id += BATCH
                with reader.ctx.read("bench") as conn:
                    t0 = time.perf_counter()
                    cache = caches(reader.ctx).code_cache(conn, index)
                    appends.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    CodeCache.load(conn, index)  # what every refresh cost before
                    reloads.append(time.perf_counter() - t0)
                assert len(cache) == n + (r + 1) * BATCH
            assert reader.cache_refreshes == {"loads": 1, "appends": repeats}
            latency = {mode: during_ingest(target.url, writer, hasher_id, next_id + (i * 10_000), extra, mode)
                       for i, mode in enumerate(("inline", "background"))}
            next_id += 20_000
    finally:
        target.drop()
    out = {"db": kind, "N": n, "batch": BATCH, "repeats": repeats, "first_load_s": first_load, "during_ingest": latency,
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
    lines += ["", f"Cached search (radius 1, k=10, the cache check included) while a writer appends a batch of 64 "
              f"codes every {WRITE_EVERY_S} s for {DURING_S:.0f} s, same run: refreshed in the request (inline) or by "
              "the store's background refresher (0.1 s interval, what `imgstore serve` runs).", "",
              "| db | refresh | searches | p50, ms | p99, ms | max, ms |", "|---|---|---:|---:|---:|---:|"]
    for r in runs:
        for mode, d in r["during_ingest"].items():
            lines.append(f"| {r['db']} | {mode} | {d['queries']:,} | {d['p50_ms']:.2f} | {d['p99_ms']:.1f} | {d['max_ms']:.0f} |")
    (RESULTS / "cache_refresh.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
