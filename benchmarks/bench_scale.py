"""Search as the store grows to ten million codes, on SQLite and PostgreSQL, against faiss and usearch.

Staged and resumable: every stage keeps what it made on disk and merges its figures into
benchmarks/results/scale.json (then rewrites scale.md and scale.png), so a long run can stop
and go on, and a stage can be rerun alone.

    python benchmarks/bench_scale.py --stage data                 # codes, queries, ground truth
    python benchmarks/bench_scale.py --stage load                 # the stores (kept between runs)
    python benchmarks/bench_scale.py --stage search               # every path and faiss per N and layout
    python benchmarks/bench_scale.py --stage usearch              # usearch's binary HNSW (builds are slow)
    python benchmarks/bench_scale.py --stage clients              # 1, 2, 4 client processes
    python benchmarks/bench_scale.py --stage writes               # appending while 2 clients query
    python benchmarks/bench_scale.py --stage report               # only rewrite scale.md / scale.png
    (--sizes 1000,...,10000000 and --db sqlite,postgresql narrow any stage)

Data. The recipe of ``bench_search.py`` extended to a pool of 10,100,000 codes, built in
blocks of 1,000,000 so that every N is a prefix of the same pool: block 0 is exactly
``bench_search.make_data()`` (its 1M codes and its 1,000 queries, drawn from the base seed, so the
1M figures here and there use the same data); block ``c >= 1`` draws labels and noise from
``default_rng([12345, c])`` around the same 10,000 centres, through the same projection. The
last 100,000 codes are only appended by the writes stage.

Stores. One store per (database, N) holds the images and one index per band layout: 4 bands
of 16 bits (the layout of bench_search and of faiss' MultiHash there) and, at 1M and 10M, 3 and
5 bands too (the automatic choice, ``default_n_bands(64, N)``, is 3 at both). Codes and buckets
go in through ``write_codes(new_index=True)`` + ``write_new_buckets``, the path of ``index
create``, one transaction per index; the load rate is N / that time. PostgreSQL then runs
``VACUUM ANALYZE`` (timed apart). Size on disk per code is each index's share: the growth of
the codes and code_buckets tables (with their indexes) while it loaded. SQLite files and
PostgreSQL databases ``imgstore_bench_scale_<N>`` stay until ``--drop``.

Search. One thread, k=10, the 1,000 queries; q/s = median of 3 passes (methods interleaved
within a pass; a slow method runs on fewer queries, about 4 s a pass); recall@10 against brute
force (an id counts when its true distance <= the true 10th). Per store and layout: the SQL path
at probe radius 0, 1, 2 and exact; the in-memory cache (loaded from the SQLite store; the same
arrays whatever the database) at the same four. Exact modes are then checked against brute force
on every query, untimed. faiss (one thread): IndexBinaryFlat, IndexBinaryMultiHash 4x16 with
nflip 0 and 1, and in the automatic layout at 1M and 10M. usearch: binary HNSW (b1, Hamming,
connectivity 16, expansion_add 128, two threads to build), searched one query per call at
several expansion_search values; the index is saved beside the stores.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_search as bs  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from imgstore import ImageStore  # noqa: E402
from imgstore.bandindex import mark_changed, write_codes, write_new_buckets  # noqa: E402
from imgstore.hashing.bits import band_layout, default_n_bands  # noqa: E402
from imgstore.indexing import IndexInfo, list_indexes  # noqa: E402
from imgstore.models import HashIndex  # noqa: E402
from imgstore.search import CodeCache, SqlSource, hamming_search  # noqa: E402
from imgstore.vectors import get_or_create_space  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
OUT_JSON = RESULTS / "scale.json"
CACHE = Path(os.environ.get("IMGSTORE_BENCH_CACHE", Path.home() / ".cache" / "imgstore-bench" / "scale"))
BLOCK = 1_000_000
POOL = 10_100_000
APPEND = 100_000
SIZES = (1_000, 10_000, 100_000, 1_000_000, 10_000_000)
K = bs.K
RADII = (0, 1, 2)
bs.PASS_BUDGET_S = 4.0


# --- data ------------------------------------------------------------------------------------


def make_pool() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The pool (POOL, 8) and the queries (1000, 8), made once and kept under CACHE."""
    CACHE.mkdir(parents=True, exist_ok=True)
    pool_f, q_f = CACHE / "pool.npy", CACHE / "queries.npy"
    if pool_f.exists() and q_f.exists():
        return np.load(pool_f, mmap_mode="r"), np.load(q_f)
    t0 = time.perf_counter()
    hasher, first, queries = bs.make_data()
    rng = np.random.default_rng(bs.SEED)
    centres = rng.standard_normal((bs.N_CENTRES, bs.DIM))  # the first draw of make_data
    pool = np.empty((POOL, bs.N_BITS // 8), dtype=np.uint8)
    pool[:BLOCK] = first
    for c, start in enumerate(range(BLOCK, POOL, BLOCK), start=1):
        size = min(BLOCK, POOL - start)
        r = np.random.default_rng([bs.SEED, c])
        labels = r.integers(0, bs.N_CENTRES, size=size)
        for s in range(0, size, 100_000):
            lab = labels[s : s + 100_000]
            pool[start + s : start + s + len(lab)] = hasher.encode(centres[lab] + bs.NOISE * r.standard_normal((len(lab), bs.DIM)))
        print(f"  pool block {c}: {start + size:,} codes ({time.perf_counter() - t0:.0f} s)", flush=True)
    np.save(pool_f, pool)
    np.save(q_f, queries)
    return np.load(pool_f, mmap_mode="r"), queries


def ground_truth(n: int, pool: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    f = CACHE / f"gt_{n}.npz"
    if f.exists():
        z = np.load(f)
        return z["ids"], z["dist"]
    t0 = time.perf_counter()
    ids, dist = bs.brute_force(np.ascontiguousarray(pool[:n]), queries)
    np.savez(f, ids=ids, dist=dist)
    print(f"  ground truth N={n:,}: {time.perf_counter() - t0:.0f} s, mean 10th distance {dist[:, -1].mean():.2f}", flush=True)
    return ids, dist


def layouts(n: int) -> list[int]:
    """Band counts built at N: the fixed 4 x 16, the automatic choice, and 3/4/5 at 1M and up."""
    out = {4, default_n_bands(bs.N_BITS, n)}
    if n >= 1_000_000:
        out |= {3, 4, 5}
    return sorted(out)


# --- results file ----------------------------------------------------------------------------


def load_results() -> dict[str, Any]:
    if OUT_JSON.exists():
        return json.loads(OUT_JSON.read_text())
    return {"rows": [], "loads": [], "clients": [], "writes": [], "runs": []}


def save_results(res: dict[str, Any], stage: str) -> None:
    res["runs"].append({"stage": stage, "command": "python benchmarks/bench_scale.py " + " ".join(sys.argv[1:]),
                        "git": _git(), "at": time.strftime("%Y-%m-%d %H:%M:%S")})
    res["machine"] = f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores (shared)"
    OUT_JSON.write_text(json.dumps(res, indent=1, default=float))
    (RESULTS / "scale.md").write_text(markdown(res))
    plot(res, RESULTS / "scale.png")


def upsert(rows: list[dict[str, Any]], new: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Replace the row with the same key fields, or add it."""
    for i, r in enumerate(rows):
        if all(r.get(k) == new.get(k) for k in keys):
            rows[i] = new
            return
    rows.append(new)


def _git() -> str:
    """The commit this process started from (a long stage may end after later commits)."""
    return _GIT_AT_START


_GIT_AT_START = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip()


# --- stores ----------------------------------------------------------------------------------


def store_url(kind: str, n: int, pg: str) -> str:
    if kind == "sqlite":
        return str(CACHE / f"sqlite_{n}.db")
    return make_url(pg).set(drivername="postgresql+psycopg", database=f"imgstore_bench_scale_{n}").render_as_string(hide_password=False)


def _pg_admin(pg: str) -> Any:
    return create_engine(make_url(pg).set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")


def drop_store(kind: str, n: int, pg: str) -> None:
    if kind == "sqlite":
        for suffix in ("", "-wal", "-shm"):
            Path(store_url(kind, n, pg) + suffix).unlink(missing_ok=True)
        return
    eng = _pg_admin(pg)
    with eng.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "imgstore_bench_scale_{n}" WITH (FORCE)'))
    eng.dispose()


def create_store(kind: str, n: int, pg: str) -> None:
    drop_store(kind, n, pg)
    if kind == "postgresql":
        eng = _pg_admin(pg)
        with eng.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "imgstore_bench_scale_{n}"'))
        eng.dispose()


def table_bytes(conn: Any) -> dict[str, int]:
    """Bytes of the codes and code_buckets tables, each with its indexes."""
    if conn.dialect.name == "postgresql":
        return {t: int(conn.exec_driver_sql(f"SELECT pg_total_relation_size('{t}')").scalar_one()) for t in ("codes", "code_buckets")}
    rows = conn.exec_driver_sql("SELECT name, tbl_name FROM sqlite_master WHERE tbl_name IN ('codes', 'code_buckets')").all()
    out = {"codes": 0, "code_buckets": 0}
    for name, tbl in rows:
        out[tbl] += int(conn.exec_driver_sql("SELECT coalesce(sum(pgsize), 0) FROM dbstat WHERE name = ?", (name,)).scalar_one())
    return out


def load_images(store: ImageStore, n: int) -> float:
    """Image rows 1..n (the codes' foreign key), in bulk; returns seconds."""
    t0 = time.perf_counter()

    def work(conn: Any) -> None:
        get_or_create_space(conn, "synthetic-gauss128", bs.DIM, "bench-search-1")
        raw = conn.connection.dbapi_connection
        if conn.dialect.name == "postgresql":
            with raw.cursor() as cur, cur.copy("COPY images (id, sha256, width, height, format, byte_size, ingested_at, meta) FROM STDIN") as cp:
                for a in range(1, n + 1, BLOCK):
                    cp.write("".join(f"{i}\t{i:064x}\t1\t1\tsynthetic\t0\t2026-01-01 00:00:00+00\t{{}}\n" for i in range(a, min(a + BLOCK, n + 1))))
            conn.exec_driver_sql("SELECT setval(pg_get_serial_sequence('images', 'id'), %s)", (n,))
        else:
            sql = "INSERT INTO images (id, sha256, width, height, format, byte_size, ingested_at, meta) VALUES (?, ?, 1, 1, 'synthetic', 0, '2026-01-01 00:00:00', '{}')"
            for a in range(1, n + 1, BLOCK):
                conn.exec_driver_sql(sql, [(i, f"{i:064x}") for i in range(a, min(a + BLOCK, n + 1))])

    store.transaction(work, what="load images")
    return time.perf_counter() - t0


def load_index(store: ImageStore, hasher: Any, codes: npt.NDArray[np.uint8], n_bands: int) -> dict[str, Any]:
    """One index over codes 1..n, through the path of ``index create``; returns its load figures."""
    n = len(codes)
    width = band_layout(bs.N_BITS, n_bands)
    with store.engine.connect() as conn:
        before = table_bytes(conn)
        conn.rollback()

    def work(conn: Any) -> int:
        space_id = get_or_create_space(conn, "synthetic-gauss128", bs.DIM, "bench-search-1")
        t = HashIndex.__table__
        hid = int(conn.execute(t.insert().values(  # type: ignore[attr-defined]
            uid=secrets.token_hex(16), space_id=space_id, method="lsh", n_bits=bs.N_BITS, n_bands=n_bands, band_width=width,
            params=hasher.to_bytes(), config={"benchmark": "bench_scale"}, is_active=n_bands == 4, n_fitted=0, generation=0,
        ).returning(t.c.id)).scalar_one())  # type: ignore[attr-defined]
        deferred: list[Any] = []
        for a in range(0, n, BLOCK):
            ids = np.arange(a + 1, min(a + BLOCK, n) + 1, dtype=np.int64)
            write_codes(conn, hid, ids, np.asarray(codes[a : a + BLOCK]), n_bands, width, defer=deferred, new_index=True)
        write_new_buckets(conn, hid, deferred, n_bands, width)
        return hid

    t0 = time.perf_counter()
    hid = store.transaction(work, what="load index")
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"hasher_id": hid, "n_bands": n_bands, "band_width": width, "load_s": load_s, "codes_per_s": n / load_s}
    with store.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.commit()
            ac = conn.execution_options(isolation_level="AUTOCOMMIT")
            t0 = time.perf_counter()
            ac.exec_driver_sql("VACUUM ANALYZE codes")
            ac.exec_driver_sql("VACUUM ANALYZE code_buckets")
            out["vacuum_analyze_s"] = time.perf_counter() - t0
        after = table_bytes(conn)
        conn.rollback()
    out["bytes_codes"] = after["codes"] - before["codes"]
    out["bytes_buckets"] = after["code_buckets"] - before["code_buckets"]
    out["bytes_per_code"] = (out["bytes_codes"] + out["bytes_buckets"]) / n
    return out


def stage_load(args: argparse.Namespace, res: dict[str, Any]) -> None:
    pool, _ = make_pool()
    hasher = bs.make_data(pool=1, n_queries=1)[0]  # the benchmark's LSH hasher (its rows are stored)
    for n in args.sizes:
        for kind in args.db:
            have = {ld["n_bands"] for ld in res["loads"] if ld["db"] == kind and ld["N"] == n}
            want = layouts(n)
            if have >= set(want) and not args.rebuild and _store_exists(kind, n, args.pg):
                print(f"{kind} N={n:,}: store kept (layouts {sorted(have)})", flush=True)
                continue
            print(f"{kind} N={n:,}: building (layouts {want})", flush=True)
            create_store(kind, n, args.pg)
            res["loads"] = [ld for ld in res["loads"] if not (ld["db"] == kind and ld["N"] == n)]
            with ImageStore(store_url(kind, n, args.pg)) as store:
                images_s = load_images(store, n)
                for m in want:
                    ld = load_index(store, hasher, pool[:n], m)
                    ld.update(db=kind, N=n, images_s=images_s)
                    res["loads"].append(ld)
                    print(f"  {m} bands x {ld['band_width']}: {ld['codes_per_s']:,.0f} codes/s ({ld['load_s']:.1f} s), "
                          f"{ld['bytes_per_code']:.0f} bytes/code", flush=True)
            save_results(res, "load")


def _store_exists(kind: str, n: int, pg: str) -> bool:
    if kind == "sqlite":
        return Path(store_url(kind, n, pg)).exists()
    eng = _pg_admin(pg)
    with eng.connect() as conn:
        ok = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :d"), {"d": f"imgstore_bench_scale_{n}"}).first() is not None
    eng.dispose()
    return ok


def indexes_of(conn: Any) -> dict[int, IndexInfo]:
    """The store's indexes by band count (without counting their codes: callers know N)."""
    return {i.n_bands: i for i in list_indexes(conn, with_counts=False)}


# --- search ----------------------------------------------------------------------------------


def _via(source: Any, **kw: Any) -> bs.Searcher:
    def fn(q: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
        r = hamming_search(q, source.index, K, source, **kw)
        return r.image_ids, r.distances, r.n_candidates
    return fn


def search_methods(prefix: str, source: Any, n: int) -> dict[str, bs.Searcher]:
    """Probe radii 0-2 (and 3 up to 100k codes, where the 10th neighbour lies farther) and exact."""
    radii = RADII + ((3,) if n <= 100_000 else ())
    out = {f"{prefix} r{r}": _via(source, probe_radius=r) for r in radii if r <= source.index.band_width}
    out[f"{prefix} exact"] = _via(source, exact=True)
    return out


def exact_check(fn: bs.Searcher, queries: npt.NDArray[np.uint8], gt_ids: npt.NDArray[np.int64], gt_dist: npt.NDArray[np.int64]) -> int:
    """Queries whose exact answer differs from brute force (ids and distances, ties by id)."""
    bad = 0
    for i, q in enumerate(queries):
        ids, dist, _ = fn(q)
        bad += int(not (np.array_equal(ids, gt_ids[i]) and np.array_equal(dist, gt_dist[i])))
    return bad


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def stage_search(args: argparse.Namespace, res: dict[str, Any]) -> None:
    pool, queries = make_pool()
    for n in args.sizes:
        codes = np.ascontiguousarray(pool[:n])
        gt_ids, gt_dist = ground_truth(n, pool, queries)
        if "faiss" in args.paths:
            for row in run_faiss(n, codes, queries, gt_ids, gt_dist):
                upsert(res["rows"], row, ("db", "N", "method", "n_bands"))
                _print(row)
            save_results(res, "search " + ",".join(sorted(args.paths)))
        for kind in args.db:
            if "sql" not in args.paths and kind != "sqlite":
                continue
            with ImageStore(store_url(kind, n, args.pg)) as store, store.engine.connect() as conn:
                for m, index in sorted(indexes_of(conn).items()):
                    methods = search_methods("sql", SqlSource(conn, index, n_codes=n), n) if "sql" in args.paths else {}
                    cache_info: dict[str, Any] = {}
                    if "cache" in args.paths:
                        r0, t0 = rss_bytes(), time.perf_counter()
                        cache = CodeCache.load(conn, index)
                        cache_info = {"cache_load_s": time.perf_counter() - t0}
                        if kind == "sqlite":  # measured once: the cache is the same arrays whatever the database
                            cache_info.update(cache_rss_per_code=(rss_bytes() - r0) / n, cache_array_bytes_per_code=cache.nbytes / n)
                            methods.update(search_methods("cache", cache, n))
                    measured = bs.measure(methods, {k: queries for k in methods})
                    for name, meas in measured.items():
                        row = dict(db=kind, N=n, n_bands=m, band_width=index.band_width,
                                   **bs.summarise(name, meas, queries, codes, gt_ids, gt_dist))
                        row.pop("exact_mismatches", None)
                        if name.endswith("exact"):
                            row["exact_mismatches_all"] = exact_check(methods[name], queries, gt_ids, gt_dist)
                        if name.startswith("cache") or name == "sql r0":
                            row.update(cache_info)
                        upsert(res["rows"], row, ("db", "N", "method", "n_bands"))
                        _print(row)
                    conn.rollback()
                    save_results(res, "search " + ",".join(sorted(args.paths)))


def _print(row: dict[str, Any]) -> None:
    print(f"    {row['db']:<10} N={row['N']:>10,} {row.get('n_bands', '-')}b {row['method']:<28} {row['qps']:>10,.0f} q/s  "
          f"recall {row['recall@10']:.4f}  cand {row['candidates']:>10,.0f}", flush=True)


def run_faiss(n: int, codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8],
              gt_ids: npt.NDArray[np.int64], gt_dist: npt.NDArray[np.int64]) -> list[dict[str, Any]]:
    import faiss

    faiss.omp_set_num_threads(1)
    stats = faiss.cvar.indexBinaryHash_stats
    rows = []
    specs: list[tuple[str, Callable[[], Any], int]] = [("faiss flat", lambda: faiss.IndexBinaryFlat(bs.N_BITS), 0)]
    for m in sorted({4, default_n_bands(bs.N_BITS, n)} if n >= 1_000_000 else {4}):
        w = band_layout(bs.N_BITS, m)
        for nflip in (0, 1):
            def make(m: int = m, w: int = w, nflip: int = nflip) -> Any:
                mh = faiss.IndexBinaryMultiHash(bs.N_BITS, m, w)
                mh.nflip = nflip
                return mh
            specs.append((f"faiss multihash {m}x{w} nflip={nflip}", make, m))
    for name, make, m in specs:
        index = make()
        t0 = time.perf_counter()
        index.add(codes)
        build_s = time.perf_counter() - t0

        def fn(q: npt.NDArray[np.uint8], index: Any = index) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
            d, lab = index.search(q.reshape(1, -1), K)
            keep = lab[0] >= 0
            return lab[0][keep] + 1, d[0][keep].astype(np.int64), -1

        stats.reset()
        meas = bs.measure({name: fn}, {name: queries})[name]
        cands = float(n) if name == "faiss flat" else stats.ndis / max(stats.nq, 1)
        row = dict(db="memory", N=n, n_bands=m, **bs.summarise(name, meas, queries, codes, gt_ids, gt_dist, candidates=cands))
        row["build_s"] = build_s
        if name == "faiss flat":
            row["exact_mismatches_all"] = sum(int(not np.array_equal(fn(q)[1], gt_dist[i])) for i, q in enumerate(queries))
        row.pop("exact_mismatches", None)
        rows.append(row)
        del index
    return rows


def stage_usearch(args: argparse.Namespace, res: dict[str, Any]) -> None:
    from usearch.index import Index

    pool, queries = make_pool()
    for n in args.sizes:
        codes = np.ascontiguousarray(pool[:n])
        gt_ids, gt_dist = ground_truth(n, pool, queries)
        path = CACHE / f"usearch_{n}.usearch"
        index = Index(ndim=bs.N_BITS, metric="hamming", dtype="b1", connectivity=16, expansion_add=128)
        build_s = None
        if path.exists():
            index.load(str(path))
            build = next((r.get("build_s") for r in res["rows"] if r["N"] == n and r["method"].startswith("usearch") and r.get("build_s")), None)
            build_s = build
        else:
            t0 = time.perf_counter()
            index.add(np.arange(1, n + 1, dtype=np.uint64), codes, threads=2)
            build_s = time.perf_counter() - t0
            index.save(str(path))
            print(f"  usearch N={n:,}: built in {build_s:.0f} s (2 threads)", flush=True)
        methods = {}
        for ef in args.ef:
            def fn(q: npt.NDArray[np.uint8], ef: int = ef) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], int]:
                index.expansion_search = ef
                mt = index.search(q, K)
                return np.asarray(mt.keys, dtype=np.int64), np.asarray(mt.distances, dtype=np.int64), -1
            methods[f"usearch hnsw ef={ef}"] = fn
        measured = bs.measure(methods, {k: queries for k in methods})
        for name, meas in measured.items():
            row = dict(db="memory", N=n, n_bands=0, **bs.summarise(name, meas, queries, codes, gt_ids, gt_dist, candidates=float("nan")))
            row.pop("exact_mismatches", None)
            row["build_s"] = build_s
            row["memory_bytes_per_code"] = index.memory_usage / n
            upsert(res["rows"], row, ("db", "N", "method", "n_bands"))
            _print(row)
        save_results(res, "usearch")


# --- clients ---------------------------------------------------------------------------------


def _client(url: str, n: int, n_bands: int, radius: int, queries: npt.NDArray[np.uint8], offset: int, start: Any, stop_at: Any, out: Any) -> None:
    """One client process: its own engine and connection, the SQL path; counts queries answered
    between the shared start and stop times."""
    with ImageStore(url) as store, store.engine.connect() as conn:
        index = indexes_of(conn)[n_bands]
        source = SqlSource(conn, index, n_codes=n)
        for q in queries[:50]:  # warm: prepared statements, caches
            hamming_search(q, index, K, source, probe_radius=radius)
        start.wait()
        done, i = 0, offset
        t_end = stop_at.value
        while time.time() < t_end:
            hamming_search(queries[i % len(queries)], index, K, source, probe_radius=radius)
            done += 1
            i += 1
            if done % 32 == 0:
                t_end = stop_at.value  # the writes stage moves the stop time when its appends end
        out.put(done)


class Clients:
    """``procs`` client processes (:func:`_client`), started and warm, waiting for :meth:`go`."""

    def __init__(self, url: str, n: int, n_bands: int, radius: int, queries: npt.NDArray[np.uint8], procs: int) -> None:
        ctx = mp.get_context("spawn")
        self.start, self.stop_at, self.out = ctx.Event(), ctx.Value("d", 0.0), ctx.Queue()
        self.ps = [ctx.Process(target=_client, args=(url, n, n_bands, radius, queries, 137 * i, self.start, self.stop_at, self.out))
                   for i in range(procs)]
        for p in self.ps:
            p.start()
        time.sleep(3.0 + 1.0 * procs)  # every client connected and warm (they wait on start)

    def go(self, seconds: float) -> None:
        """Start querying; stop after ``seconds`` (or at :meth:`stop`)."""
        self.stop_at.value = time.time() + seconds
        self.start.set()

    def stop(self) -> int:
        """Stop now (the clients re-read the stop time); the queries answered in all."""
        self.stop_at.value = time.time()
        return self.total()

    def total(self) -> int:
        done = sum(self.out.get(timeout=600) for _ in self.ps)
        for p in self.ps:
            p.join()
        return done


def run_clients(url: str, n: int, n_bands: int, radius: int, queries: npt.NDArray[np.uint8], procs: int, seconds: float) -> float:
    clients = Clients(url, n, n_bands, radius, queries, procs)
    clients.go(seconds)
    return clients.total() / seconds


def best_probe(res: dict[str, Any], kind: str, n: int, m: int) -> int:
    """The smallest SQL probe radius with recall >= 0.99 for this store and layout (else 1)."""
    for r in (*RADII, 3):
        row = next((x for x in res["rows"] if x["db"] == kind and x["N"] == n and x.get("n_bands") == m and x["method"] == f"sql r{r}"), None)
        if row and row["recall@10"] >= 0.99:
            return r
    return 1


def stage_clients(args: argparse.Namespace, res: dict[str, Any]) -> None:
    _, queries = make_pool()
    n = max(args.sizes)
    for kind in args.db:
        m = args.bands or default_n_bands(bs.N_BITS, n)
        radius = best_probe(res, kind, n, m)
        passes: dict[int, list[float]] = {p: [] for p in args.procs}
        for _ in range(3):  # interleaved passes
            for p in args.procs:
                qps = run_clients(store_url(kind, n, args.pg), n, m, radius, queries, p, args.seconds)
                passes[p].append(qps)
                print(f"  {kind} N={n:,} {m} bands r{radius}: {p} client(s) {qps:,.0f} q/s", flush=True)
        one = statistics.median(passes[min(args.procs)])
        for p, v in passes.items():
            upsert(res["clients"], {"db": kind, "N": n, "n_bands": m, "radius": radius, "procs": p, "qps_passes": v,
                                    "qps": statistics.median(v), "vs_one": statistics.median(v) / one, "seconds": args.seconds},
                   ("db", "N", "procs"))
        save_results(res, "clients")


# --- writes while reading --------------------------------------------------------------------


def stage_writes(args: argparse.Namespace, res: dict[str, Any]) -> None:
    """Append APPEND codes (ids N+1..) in ingest-sized transactions through the ingest path
    (``write_codes`` appending to the buckets, ``mark_changed``) while 2 clients query; then
    measure the bucket table and what VACUUM does, and take the appended codes out again."""
    pool, queries = make_pool()
    n = max(args.sizes)
    for kind in args.db:
        url = store_url(kind, n, args.pg)
        m = args.bands or default_n_bands(bs.N_BITS, n)
        radius = best_probe(res, kind, n, m)
        with ImageStore(url) as store:
            _remove_appended(store, n)  # an earlier run stopped before taking them out
            if kind == "postgresql":  # dead rows of earlier runs would slow the "before" figure
                with store.engine.connect() as conn:
                    conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM code_buckets")
            with store.engine.connect() as conn:
                index = indexes_of(conn)[m]
                size0 = table_bytes(conn)
                conn.rollback()
            if kind == "postgresql" and args.fillfactor:
                with store.engine.connect() as conn:
                    ac = conn.execution_options(isolation_level="AUTOCOMMIT")
                    ac.exec_driver_sql(f"ALTER TABLE code_buckets SET (fillfactor = {int(args.fillfactor)})")
                    t0 = time.perf_counter()
                    ac.exec_driver_sql("VACUUM FULL code_buckets")
                    print(f"  fillfactor {args.fillfactor}: VACUUM FULL {time.perf_counter() - t0:.0f} s", flush=True)
                    size0 = table_bytes(conn)
            before = run_clients(url, n, m, radius, queries, 2, args.seconds)
            clients = Clients(url, n, m, radius, queries, 2)
            clients.go(10_000)  # until the appends end
            t_start = time.time()
            new = np.asarray(pool[n : n + APPEND])

            def images(conn: Any) -> None:
                raw = conn.connection.dbapi_connection
                rows = [(i, f"{i:064x}") for i in range(n + 1, n + APPEND + 1)]
                ph = "%s" if kind == "postgresql" else "?"
                sql = (f"INSERT INTO images (id, sha256, width, height, format, byte_size, ingested_at, meta) VALUES ({ph}, {ph}, 1, 1, "
                       "'synthetic', 0, '2026-01-01 00:00:00', '{}')")
                cur = raw.cursor()
                cur.executemany(sql, rows)
                cur.close()
            store.transaction(images, what="append images")
            t0 = time.perf_counter()
            for a in range(0, APPEND, args.write_size):
                ids = np.arange(n + 1 + a, n + 1 + min(a + args.write_size, APPEND), dtype=np.int64)

                def batch(conn: Any, ids: npt.NDArray[np.int64] = ids, a: int = a) -> None:
                    write_codes(conn, index.id, ids, new[a : a + len(ids)], index.n_bands, index.band_width)
                    mark_changed(conn, [index.id])
                store.transaction(batch, what="append codes")
            append_s = time.perf_counter() - t0
            during_total = clients.stop()
            during = during_total / max(time.time() - t_start, 1e-9)
            with store.engine.connect() as conn:
                size1 = table_bytes(conn)
                conn.rollback()
            row: dict[str, Any] = {"db": kind, "N": n, "n_bands": m, "radius": radius, "appended": APPEND, "write_size": args.write_size,
                                   "fillfactor": args.fillfactor or None, "append_s": append_s, "append_codes_per_s": APPEND / append_s,
                                   "qps_before_2_clients": before, "qps_during_2_clients": during,
                                   "bytes_buckets_before": size0["code_buckets"], "bytes_buckets_after": size1["code_buckets"]}
            if kind == "postgresql":
                with store.engine.connect() as conn:
                    ac = conn.execution_options(isolation_level="AUTOCOMMIT")
                    row["dead_tuples"] = int(ac.exec_driver_sql("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'code_buckets'").scalar_one())
                    t0 = time.perf_counter()
                    ac.exec_driver_sql("VACUUM code_buckets")
                    row["vacuum_s"] = time.perf_counter() - t0
                    row["bytes_buckets_after_vacuum"] = table_bytes(conn)["code_buckets"]
                row["qps_after_vacuum_2_clients"] = run_clients(url, n, m, radius, queries, 2, args.seconds)
            print(f"  {kind}: {json.dumps(row, default=float)}", flush=True)
            upsert(res["writes"], row, ("db", "N", "fillfactor"))
            save_results(res, "writes")
            _remove_appended(store, n)  # back to N codes


def _remove_appended(store: ImageStore, n: int) -> None:
    """Take out images above id N with their codes and bucket entries (what the writes stage added)."""
    from imgstore.bandindex import remove_codes

    def undo(conn: Any) -> int:
        gone = [int(r[0]) for r in conn.exec_driver_sql(f"SELECT id FROM images WHERE id > {n}")]
        if gone:
            remove_codes(conn, gone)
            conn.exec_driver_sql(f"DELETE FROM images WHERE id > {n}")
        return len(gone)
    t0 = time.perf_counter()
    removed = store.transaction(undo, what="remove appended")
    if removed:
        print(f"  removed {removed:,} appended images with their codes ({time.perf_counter() - t0:.0f} s)", flush=True)


# --- report ----------------------------------------------------------------------------------


def _f(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    if isinstance(x, float) and x < 10 and digits == 0:
        return f"{x:.2f}"
    return f"{x:,.{digits}f}"


def markdown(res: dict[str, Any]) -> str:
    runs = res.get("runs", [])
    lines = ["# Search as the store grows: 1k to 10M codes, SQLite and PostgreSQL, faiss and usearch", "",
             f"{res.get('machine', '')}; one thread per client; k={K}; 1,000 queries; q/s = median of 3 passes. "
             "Data and method: the docstring of `benchmarks/bench_scale.py`. Runs (stage, command, commit, when it saved; "
             "a later run of a stage replaces the rows it measured):", ""]
    done = set()
    for r in runs:  # each stage run once (a stage saves after every store), in order
        key = (r["stage"], r["command"], r["git"])
        if key not in done:
            done.add(key)
            lines.append(f"- {r['stage']}: `{r['command']}` at {r['git']}, {r['at']}")
    lines += ["", "## Search (per store, layout and path)", "",
              "| N | db | layout | method | q/s | recall@10 | candidates/query | exact: differ / 1000 | cache load s | build s |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(res["rows"], key=lambda r: (r["N"], r["db"], r.get("n_bands", 0), r["method"])):
        lay = f"{r['n_bands']} x {r.get('band_width', 64 // r['n_bands'])}" if r.get("n_bands") else ""
        ex = r.get("exact_mismatches_all")
        lines.append(f"| {r['N']:,} | {r['db']} | {lay} | {r['method']} | {_f(r['qps'])} | {r['recall@10']:.4f} | {_f(r['candidates'])} | "
                     f"{'' if ex is None else ex} | {_f(r.get('cache_load_s'), 1) if r.get('cache_load_s') else ''} | {_f(r.get('build_s'), 1) if r.get('build_s') else ''} |")
    lines += ["", "## Best q/s at recall@10 >= 0.99 (smallest probe reaching it)", "",
              "| N | db | layout | SQL path | cache | faiss multihash (same layout) |", "|---:|---|---|---|---|---|"]
    for (n, db, m), best in sorted(best_rows(res).items()):
        lines.append(f"| {n:,} | {db} | {m} x {64 // m} | {best.get('sql', '')} | {best.get('cache', '')} | {best.get('faiss', '')} |")
    if res["loads"]:
        lines += ["", "## Loading (codes and band buckets through `index create`'s path, one transaction per index)", "",
                  "| N | db | layout | codes/s | load s | VACUUM ANALYZE s | images s | bytes/code: codes table | buckets | total |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for ld in sorted(res["loads"], key=lambda x: (x["N"], x["db"], x["n_bands"])):
            lines.append(f"| {ld['N']:,} | {ld['db']} | {ld['n_bands']} x {ld['band_width']} | {ld['codes_per_s']:,.0f} | {ld['load_s']:.1f} | "
                         f"{_f(ld.get('vacuum_analyze_s'), 1)} | {ld['images_s']:.1f} | {ld['bytes_codes'] / ld['N']:.0f} | "
                         f"{ld['bytes_buckets'] / ld['N']:.0f} | {ld['bytes_per_code']:.0f} |")
    cache_rows = [r for r in res["rows"] if r["method"] == "cache r0" and r.get("cache_array_bytes_per_code")]
    if cache_rows:
        lines += ["", "## The cache's memory per code (its arrays; the process's RSS growth, also in scale.json, "
                  "was confounded by memory freed from the previous layout's cache)", "",
                  "| N | layout | bytes/code |", "|---:|---|---:|"]
        for r in sorted(cache_rows, key=lambda r: (r["N"], r["n_bands"])):
            lines.append(f"| {r['N']:,} | {r['n_bands']} x {r['band_width']} | {r['cache_array_bytes_per_code']:.0f} |")
    if res["clients"]:
        lines += ["", "## Concurrent client processes (SQL path, one connection each)", "",
                  "| N | db | layout | probe | processes | q/s (median) | passes | vs one |", "|---:|---|---|---|---:|---:|---|---:|"]
        for c in sorted(res["clients"], key=lambda c: (c["N"], c["db"], c["procs"])):
            lines.append(f"| {c['N']:,} | {c['db']} | {c['n_bands']} bands | r{c['radius']} | {c['procs']} | {c['qps']:,.0f} | "
                         f"{', '.join(f'{v:,.0f}' for v in c['qps_passes'])} | {c['vs_one']:.2f}x |")
    if res["writes"]:
        lines += ["", "## Appending while 2 clients query", "",
                  "| N | db | fillfactor | appended | codes/txn | append codes/s | q/s before | during | after VACUUM | buckets MB before | after | after VACUUM | dead rows | VACUUM s |",
                  "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for w in res["writes"]:
            mb = lambda k: _f(w[k] / 2**20, 0) if w.get(k) is not None else ""  # noqa: E731
            lines.append(f"| {w['N']:,} | {w['db']} | {w.get('fillfactor') or 'default'} | {w['appended']:,} | {w['write_size']} | "
                         f"{w['append_codes_per_s']:,.0f} | {w['qps_before_2_clients']:,.0f} | {w['qps_during_2_clients']:,.0f} | "
                         f"{_f(w.get('qps_after_vacuum_2_clients'))} | {mb('bytes_buckets_before')} | {mb('bytes_buckets_after')} | "
                         f"{mb('bytes_buckets_after_vacuum')} | {_f(w.get('dead_tuples'))} | {_f(w.get('vacuum_s'), 1)} |")
    return "\n".join(lines) + "\n"


def best_rows(res: dict[str, Any]) -> dict[tuple[int, str, int], dict[str, str]]:
    """Per (N, db, layout): the fastest SQL / cache method with recall >= 0.99, and faiss'."""
    out: dict[tuple[int, str, int], dict[str, str]] = {}
    for r in res["rows"]:
        if not r.get("n_bands") or r["recall@10"] < 0.99:
            continue
        kind = "sql" if r["method"].startswith("sql") else "cache" if r["method"].startswith("cache") else "faiss"
        dbs = [r["db"]] if r["db"] != "memory" else sorted({x["db"] for x in res["rows"] if x["db"] != "memory" and x["N"] == r["N"]})
        for db in dbs:
            key = (r["N"], db, r["n_bands"])
            cur = out.setdefault(key, {})
            label = f"{r['qps']:,.0f} q/s ({r['method'].split()[-1]}, recall {r['recall@10']:.3f})"
            if kind not in cur or float(cur[kind].split()[0].replace(",", "")) < r["qps"]:
                cur[kind] = label
    return out


def _family(r: dict[str, Any]) -> str:
    m = r["method"]
    if m.startswith("sql"):
        return f"SQL, {r['db']}"
    if m.startswith("cache"):
        return "in-memory cache"
    return {"faiss flat": "faiss flat"}.get(m, "faiss MultiHash" if m.startswith("faiss") else "usearch HNSW")


def plot(res: dict[str, Any], path: Path) -> None:
    """Two panels over N: the best q/s at recall@10 >= 0.99 of each path (over the layouts and
    probe radii built at that N), and exact search (equal to brute force)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    if not rows:
        return
    style = {"SQL, sqlite": ("tab:blue", "o", "-"), "SQL, postgresql": ("tab:green", "s", "-"), "in-memory cache": ("tab:purple", "D", "-"),
             "faiss MultiHash": ("tab:red", "^", ":"), "faiss flat": ("black", "x", ":"), "usearch HNSW": ("tab:orange", "v", "-.")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    panels = (("best at recall@10 >= 0.99 (any layout and probe radius built)", lambda r: r["recall@10"] >= 0.99),
              ("exact (equal to brute force on every query)", lambda r: r["method"].endswith("exact") or r["method"] == "faiss flat"))
    for ax, (title, keep) in zip(axes, panels):
        best: dict[str, dict[int, float]] = {}
        for r in rows:
            if keep(r) and (r["db"] != "postgresql" or r["method"].startswith("sql")):
                fam = _family(r)
                best.setdefault(fam, {})
                best[fam][r["N"]] = max(best[fam].get(r["N"], 0.0), r["qps"])
        for fam, pts in sorted(best.items()):
            xs = sorted(pts)
            colour, marker, ls = style.get(fam, ("grey", "o", "-"))
            ax.plot(xs, [pts[x] for x in xs], ls, color=colour, marker=marker, lw=1.5, label=fam)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("codes in the store (N)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("queries / second, one thread, k=10")
    fig.suptitle("Hamming kNN over 64-bit codes: imgstore's SQL and cached paths, faiss, usearch (benchmarks/bench_scale.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", required=True, choices=["data", "load", "search", "usearch", "clients", "writes", "report"])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--db", default="sqlite,postgresql")
    ap.add_argument("--pg", default=os.environ.get("IMGSTORE_TEST_PG_URL", bs.DEFAULT_PG))
    ap.add_argument("--rebuild", action="store_true", help="load: rebuild stores that exist")
    ap.add_argument("--drop", action="store_true", help="with --stage load: drop the stores of --sizes/--db and stop")
    ap.add_argument("--paths", default="sql,cache,faiss", help="search: which of sql, cache, faiss to measure")
    ap.add_argument("--ef", default="16,32,64,128", help="usearch expansion_search values")
    ap.add_argument("--procs", default="1,2,4", help="clients: process counts")
    ap.add_argument("--seconds", type=float, default=8.0, help="clients/writes: seconds per measurement")
    ap.add_argument("--bands", type=int, default=0, help="clients/writes: the layout (default: the automatic choice at N)")
    ap.add_argument("--write-size", type=int, default=256, help="writes: codes per transaction")
    ap.add_argument("--fillfactor", type=int, default=0,
                    help="writes, PostgreSQL: set code_buckets' fillfactor and rewrite it (VACUUM FULL) first; 100 is the default's")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.db = [d for d in args.db.split(",") if d]
    args.ef = [int(x) for x in args.ef.split(",") if x]
    args.paths = set(args.paths.split(","))
    args.procs = [int(x) for x in args.procs.split(",") if x]
    if any(n > POOL - APPEND or n < 1 for n in args.sizes):
        ap.error(f"sizes must be between 1 and {POOL - APPEND:,}")
    if any(d not in ("sqlite", "postgresql") for d in args.db):
        ap.error("--db takes sqlite and/or postgresql")
    if any(p not in ("sql", "cache", "faiss") for p in args.paths):
        ap.error("--paths takes sql, cache and/or faiss")
    RESULTS.mkdir(parents=True, exist_ok=True)
    res = load_results()
    if args.stage == "data":
        pool, queries = make_pool()
        for n in args.sizes:
            ground_truth(n, pool, queries)
    elif args.stage == "load" and args.drop:
        for n in args.sizes:
            for kind in args.db:
                drop_store(kind, n, args.pg)
    elif args.stage == "load":
        stage_load(args, res)
    elif args.stage in ("search", "clients", "writes") and (missing := [f"{k} N={n:,}" for n in args.sizes for k in args.db
                                                                      if not _store_exists(k, n, args.pg)]):
        ap.error(f"no store for {', '.join(missing)}: run --stage load with the same --sizes/--db first")
    elif args.stage == "search":
        stage_search(args, res)
    elif args.stage == "usearch":
        stage_usearch(args, res)
    elif args.stage == "clients":
        stage_clients(args, res)
    elif args.stage == "writes":
        stage_writes(args, res)
    else:
        (RESULTS / "scale.md").write_text(markdown(res))
        plot(res, RESULTS / "scale.png")
    print((RESULTS / "scale.md").read_text() if (RESULTS / "scale.md").exists() else "")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
