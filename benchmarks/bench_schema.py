"""Schema 0003 (codes with eight band columns and their covering indexes) against 0004 (codes
and band buckets only), at N codes, on SQLite and PostgreSQL, old and new in one run.

For each database, two throwaway stores get the same images and the same codes as
``bench_search.py`` (its data, seed and layout: 64-bit LSH codes, 4 bands of 16 bits):

* **old**: created at head and downgraded to 0003 while empty, so its schema is exactly what
  0003 shipped. Codes are written the way the last 0003 release wrote them (each ``codes`` row
  with its band values, :func:`write_codes_0003`), then the same bucket writer as today.
* **new**: at head, written through ``bandindex.write_codes`` + ``write_new_buckets`` (what
  ``index create`` does).

Then, per store: load rate (codes and buckets, one transaction), size on disk (the whole
database and per relation, indexes included; PostgreSQL after ``VACUUM ANALYZE``), and the SQL
search path (``SqlSource`` over the buckets, which both schemas hold alike) at probe radius 0
and 1: q/s (median of 3 passes, old and new interleaved in each pass) and recall@10 against
brute force. Finally the old store is upgraded to 0004 in place (timed) and its size measured
again after ``VACUUM`` (SQLite) or ``VACUUM FULL`` (PostgreSQL), which give the dropped columns'
space back.

    python benchmarks/bench_schema.py                       # 1M codes, both databases
    python benchmarks/bench_schema.py --n 100000 --db sqlite

Writes benchmarks/results/schema.json and schema.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_search import (  # noqa: E402
    BAND_WIDTH,
    DEFAULT_PG,
    DIM,
    K,
    LOAD_BATCH,
    N_BANDS,
    N_BITS,
    RESULTS,
    SEED,
    Target,
    brute_force,
    make_data,
    measure,
    recall_at_k,
)
from sqlalchemy import Connection, text  # noqa: E402

from imgstore import ImageStore  # noqa: E402
from imgstore.bandindex import write_codes, write_new_buckets  # noqa: E402
from imgstore.hashing.bits import band_values  # noqa: E402
from imgstore.indexing import IndexInfo  # noqa: E402
from imgstore.models import Image  # noqa: E402
from imgstore.search import SqlSource, hamming_search  # noqa: E402
from imgstore.sqlhelpers import WRITE_CHUNK, chunks, insert_ignore  # noqa: E402
from imgstore.vectors import get_or_create_space  # noqa: E402

OLD_BAND_COLUMNS = 8


def write_codes_0003(conn: Connection, hasher_id: int, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8],
                     deferred: list[Any]) -> None:
    """Codes rows as revision 0003 stored them: the code plus its band values (unused bands
    NULL), one statement of arrays per chunk on PostgreSQL, executemany on SQLite."""
    bands = band_values(codes, N_BANDS, BAND_WIDTH)
    if conn.dialect.name == "postgresql":
        cols = ", ".join(f"band_{j}" for j in range(N_BANDS))
        sql = (f"INSERT INTO codes (hasher_id, image_id, code, {cols}) SELECT %s, * FROM unnest(%s::bigint[], %s::bytea[], "
               f"{', '.join(['%s::bigint[]'] * N_BANDS)}) ON CONFLICT DO NOTHING")
        for start in range(0, len(ids), WRITE_CHUNK):
            stop = start + WRITE_CHUNK
            conn.exec_driver_sql(sql, (hasher_id, ids[start:stop].tolist(), [c.tobytes() for c in codes[start:stop]],
                                       *(bands[start:stop, j].tolist() for j in range(N_BANDS))))
    else:
        names = ", ".join(f"band_{j}" for j in range(OLD_BAND_COLUMNS))
        sql = f"INSERT INTO codes (hasher_id, image_id, code, {names}) VALUES (?, ?, ?, {', '.join(['?'] * OLD_BAND_COLUMNS)}) ON CONFLICT DO NOTHING"
        rows = [(hasher_id, int(i), c.tobytes(), *b, *([None] * (OLD_BAND_COLUMNS - N_BANDS)))
                for i, c, b in zip(ids.tolist(), codes, bands.tolist())]
        for part in chunks(rows):
            conn.exec_driver_sql(sql, list(part))
    deferred.append((ids, codes))


def load(store: ImageStore, schema: str, hasher: Any, codes: npt.NDArray[np.uint8]) -> tuple[int, dict[str, float]]:
    """Images, the index row, then codes and buckets in one transaction (timed)."""
    n = len(codes)
    ids = np.arange(1, n + 1, dtype=np.int64)

    def images(conn: Connection) -> int:
        space_id = get_or_create_space(conn, "synthetic-gauss128", DIM, "bench-search-1")
        for start in range(0, n, LOAD_BATCH):
            insert_ignore(conn, Image.__table__, [  # type: ignore[arg-type]
                {"id": i, "sha256": f"{i:064x}", "width": 1, "height": 1, "format": "synthetic", "byte_size": 0}
                for i in range(start + 1, min(start + LOAD_BATCH, n) + 1)
            ])
        uid_col, uid_val = (", uid", ", :uid") if schema == "new" else ("", "")
        return int(conn.execute(text(
            f"INSERT INTO hashers (space_id, method, n_bits, n_bands, band_width, params, config, is_active, n_fitted, "
            f"generation, created_at{uid_col}) VALUES (:s, 'lsh', :b, :m, :w, :p, '{{}}', true, 0, 0, CURRENT_TIMESTAMP{uid_val}) "
            "RETURNING id"), {"s": space_id, "b": N_BITS, "m": N_BANDS, "w": BAND_WIDTH, "p": hasher.to_bytes(),
                             "uid": secrets.token_hex(16)}).scalar_one())

    t0 = time.perf_counter()
    hasher_id = store.transaction(images, what="load images")
    timing = {"images_s": time.perf_counter() - t0}

    def fill(conn: Connection) -> None:
        deferred: list[Any] = []
        for start in range(0, n, LOAD_BATCH):
            part_ids, part_codes = ids[start : start + LOAD_BATCH], codes[start : start + LOAD_BATCH]
            if schema == "old":
                write_codes_0003(conn, hasher_id, part_ids, part_codes, deferred)
            else:
                write_codes(conn, hasher_id, part_ids, part_codes, N_BANDS, BAND_WIDTH, defer=deferred)
        write_new_buckets(conn, hasher_id, deferred, N_BANDS, BAND_WIDTH)

    t0 = time.perf_counter()
    store.transaction(fill, what="load codes")
    timing["codes_s"] = time.perf_counter() - t0
    timing["codes_rows_per_s"] = n / timing["codes_s"]
    return hasher_id, timing


def vacuum(store: ImageStore, full: bool = False) -> float:
    t0 = time.perf_counter()
    with store.engine.connect() as conn:
        if store.url.get_backend_name() == "postgresql":
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            conn.exec_driver_sql("VACUUM FULL ANALYZE" if full else "VACUUM ANALYZE")
        elif full:
            conn.connection.dbapi_connection.execute("VACUUM")  # type: ignore[union-attr]
    return time.perf_counter() - t0


def sizes(store: ImageStore) -> dict[str, Any]:
    """Bytes on disk: the database, and per table with its indexes."""
    with store.engine.connect() as conn:
        if store.url.get_backend_name() == "postgresql":
            total = conn.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one()
            tables = {t: conn.exec_driver_sql(f"SELECT pg_total_relation_size('{t}')").scalar_one() for t in ("codes", "code_buckets", "images")}
            heap = {t: conn.exec_driver_sql(f"SELECT pg_relation_size('{t}')").scalar_one() for t in ("codes", "code_buckets")}
            shared = conn.exec_driver_sql("SHOW shared_buffers").scalar_one()
            return {"database": int(total), "tables": {k: int(v) for k, v in tables.items()},
                    "heap": {k: int(v) for k, v in heap.items()}, "shared_buffers": shared}
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        total = conn.exec_driver_sql("SELECT page_count * page_size FROM pragma_page_count(), pragma_page_size()").scalar_one()
        per = dict(conn.exec_driver_sql("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name").all())
        index_of = {r[0]: r[1] for r in conn.exec_driver_sql("SELECT name, tbl_name FROM sqlite_master WHERE type = 'index'").all()}
        tables: dict[str, int] = {}
        for name, size in per.items():
            tables[index_of.get(name, name)] = tables.get(index_of.get(name, name), 0) + int(size)
        return {"database": int(total), "tables": {t: tables.get(t, 0) for t in ("codes", "code_buckets", "images")}}


def run_db(kind: str, args: argparse.Namespace, hasher: Any, codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8],
           kth: npt.NDArray[np.int64]) -> dict[str, Any]:
    old_t, new_t = Target(kind, args.pg), Target(kind, args.pg)
    out: dict[str, Any] = {"db": kind}
    try:
        with ImageStore(old_t.url) as fresh:
            fresh.downgrade("0003")
        old = ImageStore(old_t.url, check_schema=False)
        new = ImageStore(new_t.url)
        try:
            for label, store, schema in (("old", old, "old"), ("new", new, "new")):
                hasher_id, timing = load(store, schema, hasher, codes)
                timing["vacuum_analyze_s"] = vacuum(store)
                out[label] = {"load": timing, "size": sizes(store), "hasher_id": hasher_id}
                print(f"  {kind} {label}: {timing['codes_rows_per_s']:,.0f} codes/s, {out[label]['size']['database'] / 1e6:,.0f} MB",
                      flush=True)
            conns = {label: store.engine.connect() for label, store in (("old", old), ("new", new))}
            try:
                methods = {}
                for label, conn in conns.items():
                    info = IndexInfo(id=out[label]["hasher_id"], uid="bench", method="lsh", n_bits=N_BITS, n_bands=N_BANDS,
                                     band_width=BAND_WIDTH, extractor="synthetic", space_id=1, is_active=True, n_codes=len(codes),
                                     n_fitted=0, generation=0, created_at=None, config={})  # type: ignore[arg-type]
                    source = SqlSource(conn, info)
                    for radius in (0, 1):
                        def fn(q: Any, source: Any = source, info: Any = info, radius: int = radius) -> Any:
                            r = hamming_search(q, info, K, source, probe_radius=radius)
                            return r.image_ids, r.distances, r.n_candidates
                        methods[f"{label} sql r{radius}"] = fn
                measured = measure(methods, {name: queries for name in methods})
            finally:
                for conn in conns.values():
                    conn.close()
            for name, m in measured.items():
                label, method = name.split(" ", 1)
                out[label][method] = {"qps": m["qps"], "qps_passes": m["qps_passes"], "n_queries": m["n_queries"],
                                      "recall": recall_at_k([r[0] for r in m["results"]], queries[: m["n_queries"]], codes, kth),
                                      "candidates": float(np.mean([r[2] for r in m["results"]]))}
                print(f"  {kind} {name}: {m['qps']:,.0f} q/s", flush=True)
            old.close()
            upgrade = ImageStore(old_t.url, check_schema=False)
            t0 = time.perf_counter()
            upgrade.upgrade()
            out["upgrade_s"] = time.perf_counter() - t0
            out["upgrade_vacuum_s"] = vacuum(upgrade, full=True)
            out["upgraded_size"] = sizes(upgrade)
            upgrade.close()
            print(f"  {kind} upgrade 0003 -> 0004: {out['upgrade_s']:.1f} s, then {out['upgraded_size']['database'] / 1e6:,.0f} MB", flush=True)
        finally:
            old.close()
            new.close()
    finally:
        old_t.drop()
        new_t.drop()
    return out


def markdown(report: dict[str, Any]) -> str:
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    lines = [
        "# Schema 0003 (band columns) against 0004 (buckets only)", "",
        f"`{report['command']}`  ",
        f"{report['machine']}; N = {report['N']:,} codes, 64-bit, 4 bands x 16 bits; k=10; {report['queries']} queries; "
        f"q/s = median of 3 passes, old and new interleaved. Library commit {report['commit']}.", "",
        "| db | schema | codes + buckets load, codes/s | database MB | codes table + indexes MB | code_buckets MB | "
        "SQL r0 q/s | SQL r1 q/s | r1 recall@10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        for label, name in (("old", "0003"), ("new", "0004")):
            s = r[label]
            lines.append(f"| {r['db']} | {name} | {s['load']['codes_rows_per_s']:,.0f} | {mb(s['size']['database'])} | "
                         f"{mb(s['size']['tables']['codes'])} | {mb(s['size']['tables']['code_buckets'])} | "
                         f"{s['sql r0']['qps']:,.0f} | {s['sql r1']['qps']:,.0f} | {s['sql r1']['recall']:.4f} |")
    lines += ["", "| db | new / old: load rate | database size | SQL r1 q/s | upgrade 0003 -> 0004 in place | size after upgrade + VACUUM |",
              "|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        o, n = r["old"], r["new"]
        lines.append(f"| {r['db']} | {n['load']['codes_rows_per_s'] / o['load']['codes_rows_per_s']:.2f}x | "
                     f"{n['size']['database'] / o['size']['database']:.2f}x | {n['sql r1']['qps'] / o['sql r1']['qps']:.2f}x | "
                     f"{r['upgrade_s']:.1f} s (+ {r['upgrade_vacuum_s']:.1f} s VACUUM) | {mb(r['upgraded_size']['database'])} MB |")
    for r in report["runs"]:
        if r["db"] == "postgresql":
            n = r["new"]["size"]
            lines += ["", f"PostgreSQL working set of a probe at 0004: code_buckets {mb(n['tables']['code_buckets'])} MB with its "
                      f"primary key (heap {mb(n['heap']['code_buckets'])} MB); shared_buffers {n['shared_buffers']} (server default "
                      f"unless tuned). At 0003 the codes table and its covering band indexes added "
                      f"{mb(r['old']['size']['tables']['codes'])} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--pg", default=DEFAULT_PG)
    args = parser.parse_args()
    hasher, pool, queries = make_data()  # the 1M pool and queries of bench_search, whatever N
    codes = pool[: args.n]
    gt_ids, gt_dist = brute_force(codes, queries)
    runs = [run_db(kind, args, hasher, codes, queries, gt_dist[:, K - 1]) for kind in args.db.split(",")]
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    report = {"command": "python " + " ".join(sys.argv).replace(str(Path.cwd()) + "/", ""), "N": args.n, "queries": len(queries),
              "machine": f"{platform.machine()}, {platform.system()}", "commit": commit, "seed": SEED, "runs": runs}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "schema.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (RESULTS / "schema.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
