"""Filtered Hamming search: queries/second, recall@10, exactness and result counts under filters
of selectivity 50%, 10%, 1% and 0.1%, on the SQL path and the in-memory path, both databases.

Data: ``bench_search.make_data()`` (the same 1,000,000 clustered 64-bit codes and 1,000 held-out
queries, 4 bands of 16 bits), the first N codes stored as images 1..N. Each image also draws
``u ~ U(0, 1)`` (``default_rng(12345 + 1)``, independent of its code) and gets the tags of every
selectivity it falls under: ``s50`` when u < 0.5, ``s10`` when u < 0.1, ``s1`` when u < 0.01,
``s01`` when u < 0.001 (nested sets, stored in ``images.meta`` as the ``tags`` list ingest
writes). A filter is ``SearchFilter(tags="s1")`` and so on: the JSON-list path of the filter SQL.

Each (database, N) store is filled as bench_search fills it (images with their metadata, a
``hashers`` row, codes and band buckets in bulk; PostgreSQL VACUUM ANALYZE after). Then, one
thread, k=10, per filter: the allowed set is read once (timed: "set read"), and every query
then goes through what a filtered search runs: ``FilterSets.allowed`` (its freshness check
against the database: PRAGMA data_version on SQLite, pg_current_snapshot() on PostgreSQL,
then the kept set) and, in memory, ``CodeCache.allowing`` (the kept row mask), then
``hamming_search`` over ``SqlSource(allowed=...)`` or the narrowed cache, at probe radius 1
("r1", the default) and exact. Unfiltered rows are the same calls without a filter.

Reported per row: q/s (median of 3 passes; slow methods on the first n queries, as
bench_search does), recall@10 against brute force over the allowed images (a returned id counts
when it is allowed and its true distance <= the true 10th allowed distance), exact mismatches
(ids and distances against that brute force, ties by id; must be 0), results short of
min(k, allowed) (must be 0), returned ids not allowed (must be 0), and candidates per query.

    python benchmarks/bench_filters.py                       # 1M, both databases
    python benchmarks/bench_filters.py --size 100000 --db sqlite

Writes benchmarks/results/filters.json and filters.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from imgstore import ImageStore, SearchFilter  # noqa: E402
from imgstore.bandindex import write_codes, write_new_buckets  # noqa: E402
from imgstore.codecache import CodeCache  # noqa: E402
from imgstore.filters import allowed_ids, filter_sets  # noqa: E402
from imgstore.hashing.bits import as_words  # noqa: E402
from imgstore.hashing.methods import LSHHasher  # noqa: E402
from imgstore.indexing import IndexInfo, list_indexes  # noqa: E402
from imgstore.models import HashIndex, Image  # noqa: E402
from imgstore.search import SqlSource, hamming_search  # noqa: E402
from imgstore.sqlhelpers import insert_ignore  # noqa: E402
from imgstore.vectors import get_or_create_space  # noqa: E402
from sqlalchemy import Connection  # noqa: E402

import bench_search as bs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
K = bs.K
#: tag -> selectivity (nested: an image tagged s1 is tagged s10 and s50 too)
TAGS = {"s50": 0.5, "s10": 0.1, "s1": 0.01, "s01": 0.001}
LABEL = {None: "none", "s50": "50%", "s10": "10%", "s1": "1%", "s01": "0.1%"}
ATTRIBUTE_SEED = bs.SEED + 1


def attribute(n: int) -> npt.NDArray[np.float64]:
    """The synthetic attribute u ~ U(0, 1) of images 1..n (independent of the codes)."""
    return np.random.default_rng(ATTRIBUTE_SEED).random(bs.POOL)[:n]


def tags_of(u: float) -> list[str]:
    return [tag for tag, p in TAGS.items() if u < p]


def load(store: ImageStore, hasher: LSHHasher, codes: npt.NDArray[np.uint8], u: npt.NDArray[np.float64],
         vacuum: bool) -> tuple[int, dict[str, float]]:
    """bench_search's bulk load, with each image's tags in its metadata."""
    n = len(codes)
    ids = np.arange(1, n + 1, dtype=np.int64)
    timing: dict[str, float] = {}

    def images(conn: Connection) -> int:
        space_id = get_or_create_space(conn, "synthetic-gauss128", bs.DIM, "bench-search-1")
        for start in range(0, n, bs.LOAD_BATCH):
            rows = []
            for i in range(start + 1, min(start + bs.LOAD_BATCH, n) + 1):
                tags = tags_of(float(u[i - 1]))
                rows.append({"id": i, "sha256": f"{i:064x}", "width": 1, "height": 1, "format": "synthetic", "byte_size": 0,
                             "meta": {"tags": tags} if tags else {}})
            insert_ignore(conn, Image.__table__, rows)  # type: ignore[arg-type]
        return space_id

    t0 = time.perf_counter()
    space_id = store.transaction(images, what="load images")
    timing["images_s"] = time.perf_counter() - t0

    def hasher_row(conn: Connection) -> int:
        table = HashIndex.__table__
        return int(conn.execute(
            table.insert()  # type: ignore[attr-defined]
            .values(uid=secrets.token_hex(16), space_id=space_id, method="lsh", n_bits=bs.N_BITS, n_bands=bs.N_BANDS,
                    band_width=bs.BAND_WIDTH, params=hasher.to_bytes(), config={"benchmark": "bench_filters"},
                    is_active=True, n_fitted=0, generation=0)
            .returning(table.c.id)  # type: ignore[attr-defined]
        ).scalar_one())

    hasher_id = store.transaction(hasher_row, what="store hasher")

    def load_codes(conn: Connection) -> None:
        new_codes: list[Any] = []
        for start in range(0, n, bs.LOAD_BATCH):
            write_codes(conn, hasher_id, ids[start : start + bs.LOAD_BATCH], codes[start : start + bs.LOAD_BATCH],
                        bs.N_BANDS, bs.BAND_WIDTH, defer=new_codes)
        write_new_buckets(conn, hasher_id, new_codes, bs.N_BANDS, bs.BAND_WIDTH)

    t0 = time.perf_counter()
    store.transaction(load_codes, what="load codes")
    timing["codes_s"] = time.perf_counter() - t0
    if vacuum and store.url.get_backend_name() == "postgresql":
        t0 = time.perf_counter()
        with store.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            for table in ("images", "codes", "code_buckets"):
                conn.exec_driver_sql(f"VACUUM ANALYZE {table}")
        timing["vacuum_analyze_s"] = time.perf_counter() - t0
    return hasher_id, timing


def truth(codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], rows: npt.NDArray[np.int64]
          ) -> tuple[list[npt.NDArray[np.int64]], list[npt.NDArray[np.int64]]]:
    """Brute force over the allowed rows: per query the true top-k ids (row + 1) and distances,
    ordered by (distance, id)."""
    words = as_words(codes[rows])[:, 0]
    ids_all = rows + 1
    out_ids, out_dist = [], []
    k = min(K, len(rows))
    for qw in as_words(queries)[:, 0]:
        d = np.bitwise_count(words ^ qw).astype(np.int64)
        key = d * (bs.POOL + 1) + ids_all
        top = np.argpartition(key, k - 1)[:k] if len(rows) > k else np.arange(len(rows))
        top = top[np.argsort(key[top])]
        out_ids.append(ids_all[top])
        out_dist.append(d[top])
    return out_ids, out_dist


def score(name: str, m: dict[str, Any], queries: npt.NDArray[np.uint8], codes: npt.NDArray[np.uint8],
          allowed_mask: npt.NDArray[np.bool_], n_allowed: int, gt_ids: list[npt.NDArray[np.int64]],
          gt_dist: list[npt.NDArray[np.int64]]) -> dict[str, Any]:
    res = m["results"]
    n = m["n_queries"]
    words = as_words(codes)[:, 0]
    qwords = as_words(queries)[:, 0]
    want = min(K, n_allowed)
    hits = short = outside = 0
    for i, (ids, _dist, _c) in enumerate(res):
        ids = np.asarray(ids)
        ok = allowed_mask[ids - 1]
        outside += int((~ok).sum())
        if len(ids) < want:
            short += 1
        kth = gt_dist[i][-1] if len(gt_dist[i]) else -1
        d = np.bitwise_count(words[ids[ok] - 1] ^ qwords[i])
        hits += int(np.count_nonzero(d <= kth))
    row: dict[str, Any] = {
        "method": name, "qps": m["qps"], "qps_passes": m["qps_passes"], "n_queries": n,
        "recall@10": hits / max(want * n, 1), "candidates": float(np.mean([r[2] for r in res])),
        "short": short, "not_allowed": outside, "returned_mean": float(np.mean([len(r[0]) for r in res])),
    }
    if "exact" in name:
        row["exact_mismatches"] = sum(
            1 for i, r in enumerate(res)
            if not (np.array_equal(np.asarray(r[0]), gt_ids[i]) and np.array_equal(np.asarray(r[1]), gt_dist[i])))
    return row


def methods_for(store: ImageStore, conn: Connection, index: IndexInfo, cache: CodeCache, tag: str | None) -> dict[str, Any]:
    """The searches of one filter (or none), each doing per query what a filtered search does:
    the kept set (and row mask) after the freshness check, then the Hamming search. The
    "served" ones run as under ``imgstore serve``, whose refresher makes that check in the
    background (``FilterSets.background``), so a search makes none."""
    sets = filter_sets(store.ctx)
    search_filter = SearchFilter(tags=tag) if tag else None
    sql = SqlSource(conn, index)  # what search_many builds once per batch

    def via(path: str, served: bool = False, **kw: Any) -> Any:
        def fn(q: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
            source: Any
            if search_filter is None:
                source = sql if path == "sql" else cache
            else:
                sets.background = served
                allow = sets.allowed(conn, search_filter)
                if path == "sql":
                    sql.allowed = allow
                    source = sql
                else:
                    source = cache.allowing(allow.ids, allow.serial)
            r = hamming_search(q, index, K, source, **kw)
            return r.image_ids, r.distances, r.n_candidates
        return fn

    methods = {"sql r1": via("sql", probe_radius=1), "sql exact": via("sql", exact=True),
               "cache r1": via("cache", probe_radius=1), "cache exact": via("cache", exact=True)}
    if search_filter is not None:
        methods |= {"cache r1 served": via("cache", served=True, probe_radius=1),
                    "cache exact served": via("cache", served=True, exact=True)}
    return methods


def run_db(kind: str, n: int, hasher: LSHHasher, codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8],
           u: npt.NDArray[np.float64], args: argparse.Namespace) -> dict[str, Any]:
    target = bs.Target(kind, args.pg)
    rows: list[dict[str, Any]] = []
    sets_info: list[dict[str, Any]] = []
    try:
        with ImageStore(target.url) as store:
            hasher_id, timing = load(store, hasher, codes, u, vacuum=not args.no_vacuum)
            print(f"  {kind} N={n:,}: images {timing['images_s']:.1f} s, codes {timing['codes_s']:.1f} s", flush=True)
            with store.engine.connect() as conn:
                index = next(i for i in list_indexes(conn) if i.id == hasher_id)
                t0 = time.perf_counter()
                cache = CodeCache.load(conn, index)
                timing["cache_load_s"] = time.perf_counter() - t0
                for tag in (None, *TAGS):
                    if tag is None:
                        mask = np.ones(n, dtype=bool)
                    else:
                        t0 = time.perf_counter()
                        ids = allowed_ids(conn, SearchFilter(tags=tag))
                        read_s = time.perf_counter() - t0
                        t0 = time.perf_counter()
                        cache.allowing(ids, -1)  # a row mask, as the first filtered cached search makes it
                        mask_s = time.perf_counter() - t0
                        mask = np.zeros(n, dtype=bool)
                        mask[ids - 1] = True
                        assert np.array_equal(mask, u < TAGS[tag]), "the filter SQL selects what was tagged"
                    allowed_rows = np.flatnonzero(mask)
                    t0 = time.perf_counter()
                    gt_ids, gt_dist = truth(codes, queries, allowed_rows)
                    print(f"    {LABEL[tag]}: {len(allowed_rows):,} allowed; brute force {time.perf_counter() - t0:.1f} s",
                          flush=True)
                    if tag is not None:
                        sets_info.append({"db": kind, "N": n, "filter": LABEL[tag], "allowed": len(allowed_rows),
                                          "set_read_s": read_s, "mask_s": mask_s})
                    methods = methods_for(store, conn, index, cache, tag)
                    measured = bs.measure(methods, {name: queries for name in methods})
                    for name, m in measured.items():
                        row = dict(db=kind, N=n, filter=LABEL[tag], allowed=len(allowed_rows),
                                   **score(name, m, queries, codes, mask, len(allowed_rows), gt_ids, gt_dist))
                        rows.append(row)
                        print(f"      {name:<12} {row['qps']:>9,.0f} q/s  recall {row['recall@10']:.4f}  "
                              f"cand {row['candidates']:>9,.0f}  short {row['short']}  "
                              f"exact-mismatch {row.get('exact_mismatches', '-')}", flush=True)
                conn.rollback()
        return {"rows": rows, "sets": sets_info, "load": dict(db=kind, N=n, **timing)}
    finally:
        target.drop()


def floors(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    at = {(r["db"], r["filter"], r["method"]): r for r in rows}
    for db in sorted({r["db"] for r in rows}):
        base = at.get((db, "none", "cache r1"))
        for method in ("cache r1 served", "cache r1"):
            one = at.get((db, "1%", method))
            if one and base:
                how = "as served (refresher)" if "served" in method else "each search checking the database itself"
                out.append({"floor": f"{db} cache r1 at 1%, {how}: recall@10 >= 0.99 and >= 0.5x unfiltered q/s",
                            "value": f"recall {one['recall@10']:.4f}, {one['qps']:,.0f} vs {base['qps']:,.0f} q/s "
                                     f"({one['qps'] / base['qps']:.2f}x)",
                            "holds": one["recall@10"] >= 0.99 and one["qps"] >= 0.5 * base["qps"]})
        one_sql = at.get((db, "1%", "sql r1"))
        if one_sql:
            out.append({"floor": f"{db} sql r1 at 1%: recall@10 >= 0.99", "value": f"recall {one_sql['recall@10']:.4f}",
                        "holds": one_sql["recall@10"] >= 0.99})
        mine = [r for r in rows if r["db"] == db]
        bad = sum(r.get("exact_mismatches", 0) for r in mine)
        out.append({"floor": f"{db}: exact mode equals brute force over the allowed images", "value": f"{bad} mismatches",
                    "holds": bad == 0})
        short = sum(r["short"] for r in mine) + sum(r["not_allowed"] for r in mine)
        out.append({"floor": f"{db}: k results whenever k allowed images exist, every one allowed",
                    "value": f"{short} queries short or with an image the filter leaves out", "holds": short == 0})
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Filtered search: selectivity 50% to 0.1%, SQL and in-memory paths",
        "",
        f"`{report['command']}`  ",
        f"{report['machine']}; one thread; k={K}; {bs.N_QUERIES} queries; q/s = median of {bs.PASSES} passes "
        f"(slow methods on the first n queries: the q column); 64-bit codes, 4 bands x 16 bits; filter = one tag "
        f"of the metadata's tags list. Every filtered query looks up its allowed set (and row mask); the plain ones "
        f"first check the database for commits (PRAGMA data_version / pg_current_snapshot(): what a search without "
        f"a refresher does), the \"served\" ones do not (under `imgstore serve` the refresher checks, in the "
        f"background). Library commit {report['git']}.",
        "",
        "| N | db | filter | allowed | method | q/s | q | recall@10 | candidates/query | exact check | short of k |",
        "|---:|---|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        ex = f"{r['exact_mismatches']} / {r['n_queries']} differ" if "exact_mismatches" in r else ""
        lines.append(f"| {r['N']:,} | {r['db']} | {r['filter']} | {r['allowed']:,} | {r['method']} | {bs._qps(r['qps'])} | "
                     f"{r['n_queries']} | {r['recall@10']:.4f} | {r['candidates']:,.0f} | {ex} | {r['short']} |")
    lines += ["", "## Reading a filter's allowed set (once per filter while the store is unchanged)", "",
              "| N | db | filter | allowed | set read s | row mask s |", "|---:|---|---|---:|---:|---:|"]
    for s in report["sets"]:
        lines.append(f"| {s['N']:,} | {s['db']} | {s['filter']} | {s['allowed']:,} | {s['set_read_s']:.2f} | {s['mask_s']:.4f} |")
    lines += ["", "## Load", "", "| N | db | images s | codes s | cache load s |", "|---:|---|---:|---:|---:|"]
    for ld in report["loads"]:
        lines.append(f"| {ld['N']:,} | {ld['db']} | {ld['images_s']:.1f} | {ld['codes_s']:.1f} | {ld['cache_load_s']:.2f} |")
    lines += ["", "## Floors", "", "| floor | measured | holds |", "|---|---|---|"]
    for f in report["floors"]:
        lines.append(f"| {f['floor']} | {f['value']} | {'yes' if f['holds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=bs.POOL, help="codes in the store (<= 1,000,000)")
    ap.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    ap.add_argument("--pg", default=os.environ.get("IMGSTORE_TEST_PG_URL", bs.DEFAULT_PG))
    ap.add_argument("--no-vacuum", action="store_true")
    ap.add_argument("--out", default="filters")
    args = ap.parse_args(argv)
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if args.size > bs.POOL or any(d not in ("sqlite", "postgresql") for d in dbs):
        ap.error(f"size must be <= {bs.POOL:,}; databases sqlite and/or postgresql")
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    hasher, pool, queries = bs.make_data()
    codes = np.ascontiguousarray(pool[: args.size])
    u = attribute(args.size)
    print(f"data: {args.size:,} codes + {len(queries)} queries in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    sets: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    for kind in dbs:
        got = run_db(kind, args.size, hasher, codes, queries, u, args)
        rows += got["rows"]
        sets += got["sets"]
        loads.append(got["load"])
    report = {
        "command": "python benchmarks/bench_filters.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "data": {"seed": bs.SEED, "attribute_seed": ATTRIBUTE_SEED, "tags": TAGS, "n": args.size, "k": K},
        "git": subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True).stdout.strip(),
        "rows": rows, "sets": sets, "loads": loads, "floors": floors(rows),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1, default=float))
    md = markdown(report)
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
