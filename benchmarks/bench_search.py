"""Hamming search speed and recall: the database band prefilter, the in-memory cache, a full scan, and faiss.

Synthetic but structured 64-bit codes, identical in every run (numpy ``default_rng(12345)``,
drawn in this order): 10,000 cluster centres ~ N(0, I_128); 64 Gaussian projections (128, 64);
a fixed pool of 1,000,000 points (cluster label, then centre + 0.3 * N(0, I)); 1,000 held-out
queries from the same clusters. A database of size N holds the first N points of the pool, so
sizes are nested and comparable across runs. Codes are the signs of the projections, made by an
imgstore ``LSHHasher(center=False)`` whose ``projection_`` is the benchmark projection and whose
``mean_`` is zero (that hasher is what the ``hashers`` row stores).

Each (database, N) store is filled through the project's bulk path: a feature space row, image
rows, a ``hashers`` row (lsh, 64 bits, 4 bands of 16) and codes with their band buckets via
``bandindex.write_codes`` + ``write_new_buckets`` (what ``index create`` does) in one write transaction. SQLite is a WAL file in a temporary folder;
PostgreSQL a throwaway database ``imgstore_bench_<random>`` on ``--pg`` (dropped afterwards).
On PostgreSQL ``VACUUM ANALYZE codes, code_buckets`` follows the load (what autovacuum does on a default
server; this one runs with autovacuum off) unless ``--no-vacuum``.

Then, one thread, k=10, per database and N: queries/second (median of 3 passes over the 1,000
queries; passes interleave the methods), recall@10 against brute force (a returned id counts
when its true distance <= the true 10th distance) and mean candidates per query, for the SQL
path at probe radius 0 and 1 and exact, the cached path (same three), a full-table scan per
query (a subset of queries), and faiss IndexBinaryFlat / IndexBinaryMultiHash(4 x 16, nflip 0
and 1) on the same codes, one query per call, ``omp_set_num_threads(1)``. Exact results are
compared with brute force (ids and distances, ties by image id) on every query. At the largest
N, the SQL path at radius 1 is profiled stage by stage on each database (the row-per-candidate
query it replaced read the band columns that migration 0004 dropped; its last figures are in
the git history of benchmarks/results/search.md). The cached path's kernels are compiled (or
loaded from numba's disk cache) before timing starts.

    python benchmarks/bench_search.py                                   # 10k, 100k, 1M; both databases
    python benchmarks/bench_search.py --sizes 10000 --db sqlite         # quick run

Writes benchmarks/results/search.json, search.md, search.png (and search_profile_<db>.txt) and
prints the table.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import Connection, create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from imgstore import ImageStore  # noqa: E402
from imgstore.bandindex import SqlProbe, scan_codes, write_codes, write_new_buckets  # noqa: E402
from imgstore.hashing.bits import as_words, band_values  # noqa: E402
from imgstore.hashing.methods import LSHHasher  # noqa: E402
from imgstore.indexing import IndexInfo, list_indexes  # noqa: E402
from imgstore.models import HashIndex, Image  # noqa: E402
from imgstore.search import CodeCache, SqlSource, hamming_search, probe_values, rank  # noqa: E402
from imgstore.sqlhelpers import insert_ignore  # noqa: E402
from imgstore.vectors import get_or_create_space  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEED = 12345
DIM = 128
N_CENTRES = 10_000
NOISE = 0.3
N_BITS = 64
N_BANDS = 4
BAND_WIDTH = 16
POOL = 1_000_000
N_QUERIES = 1_000
K = 10
PASSES = 3
#: Target seconds per pass for methods too slow to run all queries (see ``measure``).
PASS_BUDGET_S = 6.0
MIN_QUERIES = 20
PROFILE_QUERIES = 300
#: Codes handed to write_codes at a time (bounds the row dicts in memory).
LOAD_BATCH = 50_000
DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/test"


# --- data ------------------------------------------------------------------------------------


def make_data(pool: int = POOL, n_queries: int = N_QUERIES) -> tuple[LSHHasher, npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The benchmark hasher, ``pool`` database codes (pool, 8) uint8 and query codes (n_queries, 8)."""
    rng = np.random.default_rng(SEED)
    centres = rng.standard_normal((N_CENTRES, DIM))
    projection = rng.standard_normal((DIM, N_BITS))
    hasher = LSHHasher(n_bits=N_BITS, random_state=SEED, center=False)
    hasher.mean_ = np.zeros(DIM)
    hasher.projection_ = projection
    hasher.n_features_in_ = DIM
    labels = rng.integers(0, N_CENTRES, size=pool)
    codes = np.empty((pool, N_BITS // 8), dtype=np.uint8)
    step = 100_000  # Generator.standard_normal in chunks draws the same stream as one call
    for start in range(0, pool, step):
        lab = labels[start : start + step]
        codes[start : start + len(lab)] = hasher.encode(centres[lab] + NOISE * rng.standard_normal((len(lab), DIM)))
    q_labels = rng.integers(0, N_CENTRES, size=n_queries)
    queries = hasher.encode(centres[q_labels] + NOISE * rng.standard_normal((n_queries, DIM)))
    return hasher, codes, queries


def brute_force(codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8], k: int = K) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """True top-k image ids (row + 1) and distances per query, ordered by (distance, id)."""
    words = as_words(codes)[:, 0]
    n = len(codes)
    ids = np.empty((len(queries), k), dtype=np.int64)
    dist = np.empty((len(queries), k), dtype=np.int64)
    for i, qw in enumerate(as_words(queries)[:, 0]):
        d = np.bitwise_count(words ^ qw).astype(np.int64)
        key = d * n + np.arange(n)
        top = np.argpartition(key, k - 1)[:k]
        top = top[np.argsort(key[top])]
        ids[i], dist[i] = top + 1, d[top]
    return ids, dist


# --- stores ----------------------------------------------------------------------------------


class Target:
    """One throwaway database: an SQLite file in a temp folder or a fresh PostgreSQL database."""

    def __init__(self, kind: str, pg_admin: str) -> None:
        self.kind = kind
        if kind == "sqlite":
            self.tmp = tempfile.mkdtemp(prefix="imgstore_bench_")
            self.url = os.path.join(self.tmp, "bench.db")
        else:
            admin = make_url(pg_admin).set(drivername="postgresql+psycopg")
            self.name = f"imgstore_bench_{secrets.token_hex(6)}"
            self.admin = create_engine(admin, isolation_level="AUTOCOMMIT")
            with self.admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{self.name}"'))
            self.url = admin.set(database=self.name).render_as_string(hide_password=False)

    def drop(self) -> None:
        if self.kind == "sqlite":
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            with self.admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            self.admin.dispose()


def load_store(store: ImageStore, hasher: LSHHasher, codes: npt.NDArray[np.uint8], vacuum: bool) -> tuple[int, dict[str, float]]:
    """Fill a fresh store through the bulk path; returns the hasher id and timings."""
    n = len(codes)
    ids = np.arange(1, n + 1, dtype=np.int64)
    timing: dict[str, float] = {}

    def images(conn: Connection) -> int:
        space_id = get_or_create_space(conn, "synthetic-gauss128", DIM, "bench-search-1")
        for start in range(0, n, LOAD_BATCH):
            rows = [
                {"id": i, "sha256": f"{i:064x}", "width": 1, "height": 1, "format": "synthetic", "byte_size": 0}
                for i in range(start + 1, min(start + LOAD_BATCH, n) + 1)
            ]
            insert_ignore(conn, Image.__table__, rows)  # type: ignore[arg-type]
        return space_id

    t0 = time.perf_counter()
    space_id = store.transaction(images, what="load images")
    timing["images_s"] = time.perf_counter() - t0

    def hasher_row(conn: Connection) -> int:
        table = HashIndex.__table__
        return int(
            conn.execute(
                table.insert()  # type: ignore[attr-defined]
                .values(uid=secrets.token_hex(16), space_id=space_id, method="lsh", n_bits=N_BITS, n_bands=N_BANDS, band_width=BAND_WIDTH,
                        params=hasher.to_bytes(), config={"benchmark": "bench_search", "seed": SEED},
                        is_active=True, n_fitted=0, generation=0)
                .returning(table.c.id)  # type: ignore[attr-defined]
            ).scalar_one()
        )

    hasher_id = store.transaction(hasher_row, what="store hasher")
    def load_codes(conn: Connection) -> None:
        new_codes: list[Any] = []  # a new index: buckets written once at the end, as in ``index create``
        for start in range(0, n, LOAD_BATCH):
            write_codes(conn, hasher_id, ids[start : start + LOAD_BATCH], codes[start : start + LOAD_BATCH], N_BANDS, BAND_WIDTH, defer=new_codes)
        write_new_buckets(conn, hasher_id, new_codes, N_BANDS, BAND_WIDTH)

    t0 = time.perf_counter()
    store.transaction(load_codes, what="load codes")
    timing["codes_s"] = time.perf_counter() - t0
    timing["codes_rows_per_s"] = n / timing["codes_s"]
    if vacuum and store.url.get_backend_name() == "postgresql":
        t0 = time.perf_counter()
        with store.engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM ANALYZE codes")
            conn.exec_driver_sql("VACUUM ANALYZE code_buckets")
        timing["vacuum_analyze_s"] = time.perf_counter() - t0
    return hasher_id, timing


# --- measuring -------------------------------------------------------------------------------


Searcher = Callable[[npt.NDArray[np.uint8]], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]]


def recall_at_k(returned: list[npt.NDArray[np.int64]], queries: npt.NDArray[np.uint8], codes: npt.NDArray[np.uint8], kth: npt.NDArray[np.int64]) -> float:
    """Mean over queries of |{returned id with true distance <= true k-th distance}| / k."""
    words = as_words(codes)[:, 0]
    qwords = as_words(queries)[:, 0]
    hits = 0
    for i, ids in enumerate(returned):
        ids = ids[ids > 0]
        d = np.bitwise_count(words[ids - 1] ^ qwords[i])
        hits += int(np.count_nonzero(d <= kth[i]))
    return hits / (K * len(returned))


def measure(methods: dict[str, Searcher], query_sets: dict[str, npt.NDArray[np.uint8]]) -> dict[str, dict[str, Any]]:
    """Run every method over its queries PASSES times, interleaving methods within a pass.

    A slow method (the full scan; exact search on a small, sparse store) runs on the first
    ``n`` queries only, ``n`` chosen from a 20-query warm-up so one pass takes about
    PASS_BUDGET_S (at least MIN_QUERIES); recall and candidates are then over those ``n``.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, fn in methods.items():
        qs = query_sets[name]
        warm = qs[:MIN_QUERIES]
        fn(warm[0])  # first call: compiles or loads the cache's kernels, prepares statements
        t0 = time.perf_counter()
        for q in warm:
            fn(q)
        est = len(warm) / max(time.perf_counter() - t0, 1e-9)
        n = int(min(len(qs), max(min(MIN_QUERIES, len(qs)), PASS_BUDGET_S * est)))
        out[name] = {"times": [], "queries": qs[:n]}
    for _ in range(PASSES):
        for name, fn in methods.items():
            qs = out[name]["queries"]
            t0 = time.perf_counter()
            res = [fn(q) for q in qs]
            out[name]["times"].append(time.perf_counter() - t0)
            out[name]["results"] = res
    for name, o in out.items():
        n = len(o.pop("queries"))
        o["n_queries"] = n
        o["qps_passes"] = [n / t for t in o["times"]]
        o["qps"] = statistics.median(o["qps_passes"])
    return out


def db_methods(conn: Connection, index: IndexInfo, cache: CodeCache) -> dict[str, Searcher]:
    sql = SqlSource(conn, index)  # what ImageStore.search_many builds once per batch

    def via(source: Any, **kw: Any) -> Searcher:
        def fn(q: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
            r = hamming_search(q, index, K, source, **kw)
            return r.image_ids, r.distances, r.n_candidates
        return fn

    def scan(q: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        ids, codes = scan_codes(conn, index)
        top, dist = rank(ids, codes, q, K)
        return top, dist, len(ids)

    return {
        "sql r0": via(sql, probe_radius=0),
        "sql r1": via(sql, probe_radius=1),
        "sql exact": via(sql, exact=True),
        "cache r0": via(cache, probe_radius=0),
        "cache r1": via(cache, probe_radius=1),
        "cache exact": via(cache, exact=True),
        "full scan": scan,
    }


def faiss_methods(codes: npt.NDArray[np.uint8]) -> tuple[dict[str, Searcher], dict[str, Callable[[], None]], dict[str, Callable[[], float]]]:
    import faiss

    faiss.omp_set_num_threads(1)
    flat = faiss.IndexBinaryFlat(N_BITS)
    flat.add(codes)
    multi = {}
    for nflip in (0, 1):
        mh = faiss.IndexBinaryMultiHash(N_BITS, N_BANDS, BAND_WIDTH)
        mh.nflip = nflip
        mh.add(codes)
        multi[nflip] = mh
    stats = faiss.cvar.indexBinaryHash_stats

    def via(index: Any, counts: bool) -> Searcher:
        def fn(q: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
            d, lab = index.search(q.reshape(1, -1), K)
            keep = lab[0] >= 0
            return lab[0][keep] + 1, d[0][keep].astype(np.int64), len(codes) if not counts else -1
        return fn

    methods = {
        "faiss flat": via(flat, False),
        "faiss multihash nflip=0": via(multi[0], True),
        "faiss multihash nflip=1": via(multi[1], True),
    }
    resets = {name: stats.reset for name in methods}
    cands = {name: (lambda: stats.ndis / max(stats.nq, 1)) for name in methods}
    return methods, resets, cands


def summarise(name: str, m: dict[str, Any], queries: npt.NDArray[np.uint8], codes: npt.NDArray[np.uint8],
              gt_ids: npt.NDArray[np.int64], gt_dist: npt.NDArray[np.int64], candidates: float | None = None) -> dict[str, Any]:
    res = m["results"]
    n = m["n_queries"]
    row: dict[str, Any] = {
        "method": name,
        "qps": m["qps"],
        "qps_passes": m["qps_passes"],
        "n_queries": n,
        "recall@10": recall_at_k([r[0] for r in res], queries[:n], codes, gt_dist[:n, -1]),
        "candidates": candidates if candidates is not None else float(np.mean([r[2] for r in res])),
    }
    if "exact" in name or name in ("full scan", "faiss flat"):
        bad = sum(
            1 for i, r in enumerate(res)
            if len(r[0]) != K or not np.array_equal(np.asarray(r[1]), gt_dist[i]) or
            (name != "faiss flat" and not np.array_equal(np.asarray(r[0]), gt_ids[i]))
        )
        row["exact_mismatches"] = bad  # faiss flat: distances only (its tie order is its own)
    return row


def profile_sql(conn: Connection, index: IndexInfo, queries: npt.NDArray[np.uint8], radius: int, out_txt: Path) -> dict[str, Any]:
    """Where one query's time goes on the SQL path: the steps of SqlProbe.fetch, timed apart,
    then cProfile."""
    sql = SqlProbe(index)
    stages = {"probes+params": [], "execute": [], "rows (fetchall)": [], "numpy ids/codes/unique": [], "rank": []}
    n_rows = []
    pg = conn.dialect.name == "postgresql"
    for q in queries[:PROFILE_QUERIES]:
        t0 = time.perf_counter()
        bands = band_values(q.reshape(1, -1), index.n_bands, index.band_width)[0]
        probes = [probe_values(int(b), index.band_width, 0, radius) for b in bands]
        text_, params = sql.statement(conn.dialect.name, probes)  # what SqlProbe.fetch runs
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        t1 = time.perf_counter()
        if pg:
            cursor.execute(text_, params, prepare=True)
        else:
            cursor.execute(text_, params)
        t2 = time.perf_counter()
        rows = cursor.fetchall()
        cursor.close()
        t3 = time.perf_counter()
        ids = np.frombuffer(b"".join([r[0] for r in rows]), dtype="<i8")
        codes = np.frombuffer(b"".join([r[1] for r in rows]), dtype=np.uint8).reshape(len(ids), -1)
        ids, first = np.unique(ids, return_index=True)
        codes = codes[first]
        t4 = time.perf_counter()
        rank(ids, codes, q, K)
        t5 = time.perf_counter()
        for key, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
            stages[key].append(dt)
        n_rows.append(len(rows))
    per_query_us = {k: 1e6 * statistics.median(v) for k, v in stages.items()}
    mean_us = {k: 1e6 * statistics.fmean(v) for k, v in stages.items()}

    plan_probes = [probe_values(int(b), index.band_width, 0, radius) for b in band_values(queries[:1], index.n_bands, index.band_width)[0]]
    plan_sql, plan_args = sql.statement(conn.dialect.name, plan_probes)
    if pg:
        with conn.connection.driver_connection.cursor() as c:  # type: ignore[union-attr]
            c.execute("EXPLAIN (ANALYZE, BUFFERS) " + plan_sql, plan_args)
            plan = "\n".join(r[0] for r in c.fetchall())
    else:
        c = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        c.execute("EXPLAIN QUERY PLAN " + plan_sql, plan_args)
        plan = "\n".join(str(r) for r in c.fetchall())
        c.close()

    source = SqlSource(conn, index)
    prof = cProfile.Profile()
    prof.enable()
    for q in queries[:PROFILE_QUERIES]:
        hamming_search(q, index, K, source, probe_radius=radius)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
    out_txt.write_text(
        f"SQL path, probe radius {radius}, {PROFILE_QUERIES} queries, N={index.n_codes}, {conn.dialect.name}\n\n"
        f"stage medians (us/query): {json.dumps(per_query_us, indent=1)}\n\nplan:\n{plan}\n\n"
        + buf.getvalue()
    )
    return {
        "radius": radius,
        "n_queries": PROFILE_QUERIES,
        "rows_per_query": statistics.fmean(n_rows),
        "stage_median_us": per_query_us,
        "stage_mean_us": mean_us,
        "total_mean_us": sum(mean_us.values()),
        "plan": plan,
        "cprofile": str(out_txt.relative_to(ROOT)),
    }


def n_scan_queries(n: int) -> int:
    return int(min(N_QUERIES, max(5, 5_000_000 // n)))


def run_db(kind: str, n: int, hasher: LSHHasher, codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8],
           gt_ids: npt.NDArray[np.int64], gt_dist: npt.NDArray[np.int64], args: argparse.Namespace, profile: bool) -> dict[str, Any]:
    target = Target(kind, args.pg)
    try:
        with ImageStore(target.url) as store:
            hasher_id, load = load_store(store, hasher, codes, vacuum=not args.no_vacuum)
            print(f"  {kind} N={n}: codes {load['codes_rows_per_s']:,.0f} rows/s "
                  f"({load['codes_s']:.1f} s)", flush=True)
            with store.engine.connect() as conn:
                index = next(i for i in list_indexes(conn) if i.id == hasher_id)
                t0 = time.perf_counter()
                cache = CodeCache.load(conn, index)
                load["cache_load_s"] = time.perf_counter() - t0
                methods = db_methods(conn, index, cache)
                sets = {name: queries for name in methods}
                sets["full scan"] = queries[: n_scan_queries(n)]
                measured = measure(methods, sets)
                rows = [dict(db=kind, N=n, **summarise(name, m, queries, codes, gt_ids, gt_dist)) for name, m in measured.items()]
                prof = None
                if profile:
                    prof = profile_sql(conn, index, queries, 1, RESULTS / f"search_profile_{kind}.txt")
                conn.rollback()
        return {"rows": rows, "load": load, "profile": prof}
    finally:
        target.drop()


def run_faiss(n: int, codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8],
              gt_ids: npt.NDArray[np.int64], gt_dist: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
    methods, resets, cands = faiss_methods(codes)
    rows = []
    for name, fn in methods.items():
        resets[name]()
        m = measure({name: fn}, {name: queries})[name]
        c = float(n) if name == "faiss flat" else cands[name]()
        rows.append(dict(db="memory", N=n, **summarise(name, m, queries, codes, gt_ids, gt_dist, candidates=c)))
    return rows


# --- reporting -------------------------------------------------------------------------------


def floors(rows: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The issue's floors at the largest N (meant for 1M)."""
    at = {(r["db"], r["method"]): r for r in rows if r["N"] == n}
    out = []
    for db in ("sqlite", "postgresql"):
        r1 = at.get((db, "sql r1"))
        if r1:
            out.append({"floor": f"{db} sql r1: recall >= 0.99 and >= 500 q/s",
                        "value": f"recall {r1['recall@10']:.4f}, {r1['qps']:,.0f} q/s",
                        "holds": r1["recall@10"] >= 0.99 and r1["qps"] >= 500})
        ex, sc = at.get((db, "sql exact")), at.get((db, "full scan"))
        if ex and sc:
            out.append({"floor": f"{db} sql exact: equals brute force, >= 10x full scan",
                        "value": f"{ex['exact_mismatches']} mismatches / {ex['n_queries']}, {ex['qps'] / sc['qps']:,.0f}x scan",
                        "holds": ex["exact_mismatches"] == 0 and ex["qps"] >= 10 * sc["qps"]})
        for c, f in (("cache r0", "faiss multihash nflip=0"), ("cache r1", "faiss multihash nflip=1")):
            a, b = at.get((db, c)), at.get(("memory", f))
            if a and b:
                out.append({"floor": f"{db} {c} >= {f} q/s at the same recall",
                            "value": f"{a['qps']:,.0f} vs {b['qps']:,.0f} q/s; recall {a['recall@10']:.4f} vs {b['recall@10']:.4f}",
                            "holds": a["qps"] >= b["qps"] and a["recall@10"] >= b["recall@10"] - 1e-9})
    return out


def _qps(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.2f}"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Hamming search: database band prefilter, in-memory cache, full scan, faiss",
        "",
        f"`{report['command']}`  ",
        f"{report['machine']}; one thread; k={K}; {N_QUERIES} queries; q/s = median of {PASSES} passes; "
        f"64-bit codes, 4 bands x 16 bits. Slow methods run on the first n queries (n = the q column; "
        f"about {PASS_BUDGET_S:.0f} s a pass; full scan at most 5e6 / N). PostgreSQL: VACUUM ANALYZE after loading: "
        f"{report['pg_vacuum_analyze']}. Library commit {report['git']}.",
        "",
        "| N | db | method | q/s | q | recall@10 | candidates/query | exact check |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        ex = ""
        if "exact_mismatches" in r:
            ex = f"{r['exact_mismatches']} / {r['n_queries']} differ"
        lines.append(f"| {r['N']:,} | {r['db']} | {r['method']} | {_qps(r['qps'])} | {r['n_queries']} | {r['recall@10']:.4f} | {r['candidates']:,.0f} | {ex} |")
    lines += ["", "## Bulk load (write_codes: codes and band buckets, one transaction)", "",
              "| N | db | codes rows/s | codes s | images s | VACUUM ANALYZE s | cache load s |",
              "|---:|---|---:|---:|---:|---:|---:|"]
    for ld in report["loads"]:
        lines.append(f"| {ld['N']:,} | {ld['db']} | {ld['codes_rows_per_s']:,.0f} | {ld['codes_s']:.1f} | "
                     f"{ld['images_s']:.1f} | {ld.get('vacuum_analyze_s', float('nan')):.1f} | {ld['cache_load_s']:.2f} |")
    if report["profiles"]:
        lines += ["", "## Where time goes: SQL path, probe radius 1, largest N (median us/query)", ""]
        for db, p in report["profiles"].items():
            st = ", ".join(f"{k} {v:,.0f}" for k, v in p["stage_median_us"].items())
            lines.append(f"- **{db}** ({p['rows_per_query']:,.0f} bucket rows/query): {st}. cProfile: `{p['cprofile']}`")
    if report["floors"]:
        lines += ["", f"## Floors at N={report['floors_N']:,}", "", "| floor | measured | holds |", "|---|---|---|"]
        for f in report["floors"]:
            lines.append(f"| {f['floor']} | {f['value']} | {'yes' if f['holds'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["N"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 5), squeeze=False)
    colours = {"sqlite": "tab:blue", "postgresql": "tab:green", "memory": "tab:red"}
    markers = {"sql r0": "o", "sql r1": "s", "sql exact": "D", "cache r0": "o", "cache r1": "s", "cache exact": "D",
               "full scan": "X", "faiss flat": "D", "faiss multihash nflip=0": "o", "faiss multihash nflip=1": "s"}
    for ax, n in zip(axes[0], sizes):
        for r in (r for r in rows if r["N"] == n):
            cached = r["method"].startswith("cache")
            ax.scatter(r["recall@10"], r["qps"], edgecolors=colours[r["db"]], marker=markers[r["method"]],
                       facecolors="none" if cached else colours[r["db"]], s=60)
            ax.annotate(f"{r['db'][:2]} {r['method']}".replace("me faiss", "faiss"), (r["recall@10"], r["qps"]),
                        fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("recall@10")
        ax.set_ylabel("queries / second (one thread)")
        ax.set_title(f"N = {n:,}")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("Hamming kNN, 64-bit codes, k=10: sqlite (blue), postgresql (green), faiss (red); hollow = cached")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated database sizes (<= 1,000,000)")
    ap.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    ap.add_argument("--pg", default=os.environ.get("IMGSTORE_TEST_PG_URL", DEFAULT_PG), help="PostgreSQL server and maintenance database")
    ap.add_argument("--no-vacuum", action="store_true", help="skip VACUUM ANALYZE on PostgreSQL after loading")
    ap.add_argument("--no-faiss", action="store_true")
    ap.add_argument("--out", default="search", help="basename of the result files under benchmarks/results")
    ap.add_argument("--replot", action="store_true", help="only rewrite <out>.md and <out>.png from <out>.json")
    args = ap.parse_args(argv)
    if args.replot:
        report = json.loads((RESULTS / f"{args.out}.json").read_text())
        (RESULTS / f"{args.out}.md").write_text(markdown(report))
        plot(report["rows"], RESULTS / f"{args.out}.png")
        print(markdown(report))
        return 0
    sizes = [int(s) for s in args.sizes.split(",") if s]
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    if max(sizes) > POOL or any(d not in ("sqlite", "postgresql") for d in dbs):
        ap.error(f"sizes must be <= {POOL:,}; databases sqlite and/or postgresql")
    RESULTS.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    hasher, pool, queries = make_data()
    print(f"data: {POOL:,} codes + {N_QUERIES} queries in {time.perf_counter() - t0:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    loads: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for n in sizes:
        codes = np.ascontiguousarray(pool[:n])
        t0 = time.perf_counter()
        gt_ids, gt_dist = brute_force(codes, queries)
        print(f"N={n:,}: brute force {time.perf_counter() - t0:.1f} s; mean 10th distance {gt_dist[:, -1].mean():.2f}", flush=True)
        if not args.no_faiss:
            rows += run_faiss(n, codes, queries, gt_ids, gt_dist)
        for kind in dbs:
            got = run_db(kind, n, hasher, codes, queries, gt_ids, gt_dist, args, profile=n == max(sizes))
            rows += got["rows"]
            loads.append(dict(db=kind, N=n, **got["load"]))
            if got["profile"]:
                profiles[kind] = got["profile"]
            for r in got["rows"]:
                print(f"    {r['method']:<24} {r['qps']:>10,.0f} q/s  recall {r['recall@10']:.4f}  cand {r['candidates']:>10,.0f}", flush=True)
    big = max(sizes)
    import faiss
    import sqlalchemy

    report = {
        "command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
        "versions": {"python": platform.python_version(), "numpy": np.__version__, "sqlalchemy": sqlalchemy.__version__,
                     "faiss": faiss.__version__, "sqlite": __import__("sqlite3").sqlite_version},
        "data": {"seed": SEED, "dim": DIM, "centres": N_CENTRES, "noise": NOISE, "n_bits": N_BITS, "n_bands": N_BANDS,
                 "band_width": BAND_WIDTH, "pool": POOL, "queries": N_QUERIES, "k": K, "passes": PASSES},
        "pg_vacuum_analyze": not args.no_vacuum,
        "git": __import__("subprocess").run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                                            capture_output=True, text=True).stdout.strip(),
        "rows": rows,
        "loads": loads,
        "profiles": profiles,
        "floors_N": big,
        "floors": floors(rows, big),
    }
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1, default=float))
    md = markdown(report)
    (RESULTS / f"{args.out}.md").write_text(md)
    plot(rows, RESULTS / f"{args.out}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
