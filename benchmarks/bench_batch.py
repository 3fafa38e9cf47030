"""Batch kNN and dedup pairs over shards: one process vs a Dask LocalCluster of 1 and 2 workers.

    python benchmarks/bench_batch.py [--sizes 1000000,10000000] [--k 10] [--radius 2] [--sample 10000]
                                     [--export-n 1000000] [--skip-export]

Codes: bench_scale's pool (64-bit LSH codes of 128-d Gaussian clusters, 10,000 centres; made
once under its cache), the first N as images 1..N, written as a shard set
(``imgstore.shards.write_arrays``, 4 shards: a worker has blocks to take) under the benchmark
cache. For each N:

- **kNN graph** (every code's k nearest other codes, exact, ``imgstore.batch.neighbours``) and
  **dedup pairs** (every pair within ``--radius`` bits, ``imgstore.batch.near_pairs``), each
  run in a new process: in that process (no Dask), ``local:1`` and ``local:2`` (LocalCluster
  worker processes, one thread each), each from an empty work folder. Seconds, codes per
  second, peak RSS of the process and of each worker (``VmHWM``).
- **Exactness**: for ``--sample`` codes drawn at random, the graph's row and the pairs holding
  that code against a full scan of all N codes (compiled popcount, ties by id): mismatches must
  be 0; and the three runs' outputs must be identical.
- **Shard export** (``--export-n`` codes in a store on SQLite and on PostgreSQL, loaded the way
  bench_scale loads its stores): codes per second of ``imgstore shards export``.

Writes benchmarks/results/batch.json and batch.md (a projection for 1B codes from the measured
per-code costs included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("IMGSTORE_BENCH_CACHE", Path.home() / ".cache" / "imgstore-bench")) / "batch"
MODES = ("one process", "local:1", "local:2")


def layout() -> Any:
    from datetime import datetime, timezone

    from imgstore.types import IndexInfo

    return IndexInfo(1, "bench-batch", "lsh", 64, 4, 16, "synthetic-gauss128", 1, True, 0, 0, 0, datetime.now(timezone.utc), {})


def shard_set(n: int) -> Path:
    """N codes as 4 shards: bench_scale's pool up to its 10.1M codes; past it the same model
    (64-bit LSH of 128-d Gaussian clusters, the same noise) with one centre per 100 codes, the
    crowding bench_scale's pool has at 1M (0.43 pairs within 2 bits a code): a crawl's copies
    of one picture do not grow with the crawl. (At bench_scale's 10,000 centres, 100M codes
    would put 10,000 codes on a centre: ~4e9 pairs within 2 bits, which no client holds.)"""
    import bench_scale

    from imgstore import shards

    folder = CACHE / f"shards-{n}"
    if (folder / "manifest.json").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    if n <= bench_scale.POOL:
        pool, _ = bench_scale.make_pool()
        codes = np.asarray(pool[:n])
    else:
        codes = big_pool(n)
    shards.write_arrays(folder, layout(), np.arange(1, n + 1, dtype=np.int64), codes, shard_codes=-(-n // 4))
    return folder


def big_pool(n: int) -> np.ndarray:
    import bench_search as bs

    hasher, _, _ = bs.make_data(pool=0, n_queries=1)
    rng = np.random.default_rng([bs.SEED, n])
    centres = rng.standard_normal((n // 100, bs.DIM))
    codes = np.empty((n, bs.N_BITS // 8), dtype=np.uint8)
    started = time.perf_counter()
    for start in range(0, n, 200_000):
        size = min(200_000, n - start)
        lab = rng.integers(0, len(centres), size=size)
        codes[start : start + size] = hasher.encode(centres[lab] + bs.NOISE * rng.standard_normal((size, bs.DIM)))
        if start % 10_000_000 == 0:
            print(f"  codes {start + size:,} of {n:,} ({time.perf_counter() - started:.0f} s)", flush=True)
    return codes


def warm_up() -> None:
    """Compile the kernels once (numba caches them on disk), so no timed run pays for it."""
    import tempfile

    from imgstore import batch, shards

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        got = shards.write_arrays(Path(tmp) / "s", layout(), np.arange(1, 201), rng.integers(0, 256, (200, 8), dtype=np.uint8),
                                  shard_codes=100)
        batch.neighbours(got, 3, workdir=Path(tmp) / "w")
        batch.near_pairs(got, 2, workdir=Path(tmp) / "w")


# --- one run, in its own process ------------------------------------------------------------------


def one(task: str, folder: str, mode: str, k: int, radius: int, out: str) -> None:
    from imgstore import batch, shards

    got = shards.read_manifest(folder)
    work = Path(out)
    shutil.rmtree(work, ignore_errors=True)
    cluster = None if mode == "one process" else mode
    workers_rss: list[float] = []
    client = close = None
    if cluster is not None:
        from imgstore.cluster import connect

        client, close, _ = connect(cluster)
        cluster = client
    started = time.perf_counter()
    if task == "knn":
        result = batch.neighbours(got, k, workdir=work, cluster=cluster)
        digest = _digest(result.neighbours, result.distances)
        saved = {"ids": result.image_ids, "nbr": result.neighbours, "dist": result.distances}
    else:
        pairs = batch.near_pairs(got, radius, workdir=work, cluster=cluster)
        digest = _digest(pairs.a, pairs.b, pairs.distances)
        saved = {"a": pairs.a, "b": pairs.b, "dist": pairs.distances}
    seconds = time.perf_counter() - started
    if client is not None:
        workers_rss = sorted(client.run(_peak_mb).values())
        assert close is not None
        close()
    np.savez(work / "result.npz", **saved)
    print(json.dumps({"seconds": seconds, "digest": digest, "peak_rss_mb": _peak_mb(),
                      "workers_peak_rss_mb": workers_rss, "n_pairs": int(len(saved.get("a", [])))}))


def _peak_mb() -> float:
    """This process's peak resident memory (``VmHWM``), MB. Not ``ru_maxrss``: Linux carries that
    over from the parent across fork and exec, so a child of a large process reads the parent's."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _digest(*arrays: np.ndarray) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def run_one(task: str, folder: Path, mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--one", task, "--folder", str(folder), "--mode", mode, "--k", str(args.k),
           "--radius", str(args.radius), "--work", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{task} {mode} failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# --- exactness --------------------------------------------------------------------------------------


def check(folder: Path, work: Path, task: str, args: argparse.Namespace) -> dict[str, int]:
    from imgstore import kernels
    from imgstore.hashing.bits import as_words
    from imgstore.shards import load_shard, read_manifest

    got = read_manifest(folder)
    ids = np.concatenate([np.asarray(load_shard(got, s)[0]) for s in got.shards])
    words = np.ascontiguousarray(as_words(np.concatenate([np.asarray(load_shard(got, s)[1]) for s in got.shards])))
    rng = np.random.default_rng(7)
    sample = rng.choice(len(ids), size=min(args.sample, len(ids)), replace=False)
    with np.load(work / "result.npz") as z:  # each z[name] reads the whole array again: once here
        res = {name: z[name] for name in z.files}
    mismatches = 0
    if task == "knn":
        for row in sample:
            rows, dist = kernels.scan_rank(words, words[row], args.k + 1)
            keep = ids[rows] != ids[row]
            want_ids, want_dist = ids[rows][keep][: args.k], dist[keep][: args.k]
            if not (np.array_equal(res["nbr"][row], want_ids) and np.array_equal(res["dist"][row].astype(np.int64), want_dist)):
                mismatches += 1
    else:
        a, b = res["a"], res["b"]
        me = ids[sample]
        found: dict[int, set[int]] = {int(i): set() for i in me}
        for x, y in ((a, b), (b, a)):  # the pairs that hold a sampled code, either side
            hit = np.isin(x, me)
            for i, j in zip(x[hit].tolist(), y[hit].tolist()):
                found[i].add(j)
        rows_s, rows_d = _within(words[:, 0], np.ascontiguousarray(words[sample, 0]), args.radius)
        want: dict[int, set[int]] = {int(i): set() for i in me}
        for s_row, d_row in zip(rows_s.tolist(), rows_d.tolist()):
            if ids[d_row] != me[s_row]:
                want[int(me[s_row])].add(int(ids[d_row]))
        mismatches = sum(found[i] != want[i] for i in want)
    return {"sampled": int(len(sample)), "mismatches": mismatches}


def _within(words: np.ndarray, sample: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
    """Every (sample row, row of ``words``) within ``radius`` bits: one compiled pass over all
    codes for the whole sample (a full scan per sampled code, as brute force is)."""
    import numba

    @numba.njit(cache=False, nogil=True)
    def scan(words: np.ndarray, sample: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray]:
        out_s, out_d = [], []
        for d in range(len(words)):
            w = words[d]
            for s in range(len(sample)):
                x = w ^ sample[s]
                c = 0
                while x:
                    x &= x - numba.uint64(1)
                    c += 1
                    if c > radius:
                        break
                if c <= radius:
                    out_s.append(s)
                    out_d.append(d)
        return np.array(out_s, dtype=np.int64), np.array(out_d, dtype=np.int64)

    return scan(words, sample, radius)  # type: ignore[no-any-return]


# --- kNN cost on a sample of queries (sizes whose whole graph takes hours here) ----------------------


def knn_sample(n: int, sample: int, k: int, checked: int = 200) -> dict[str, Any]:
    """``sample`` codes drawn at random from all N against every data shard, in this process
    (the blocks' own code: ``batch.shard_cache`` and ``batch.knn_codes``): seconds per query and
    block (CPU time of the search, the cache's build apart), the blocks' tops merged, and
    ``checked`` of them against a full compiled scan of all N codes. The sample's queries are
    spread over the whole set, so neighbouring queries share fewer buckets than a whole shard's
    do: the per-query figure is on the pessimistic side."""
    from imgstore import batch, kernels, shards
    from imgstore.hashing.bits import as_words

    got = shards.read_manifest(shard_set(n))
    rng = np.random.default_rng(11)
    pick = np.sort(rng.choice(n, size=sample, replace=False))
    q_ids, q_codes, offset = [], [], 0
    for s in got.shards:
        ids, codes = shards.load_shard(got, s)
        mine = pick[(pick >= offset) & (pick < offset + len(ids))] - offset
        q_ids.append(np.asarray(ids)[mine])
        q_codes.append(np.asarray(codes)[mine])
        offset += len(ids)
    qi, qc = np.concatenate(q_ids), np.ascontiguousarray(np.concatenate(q_codes))
    blocks, parts = [], []
    for s in got.shards:
        started = time.process_time()
        cache = batch.shard_cache(got, s)
        built = time.process_time() - started
        batch.knn_codes(cache, qi[:10], qc[:10], k, exclude_self=True)  # the compiled kernels loaded, not timed
        started = time.process_time()
        parts.append(batch.knn_codes(cache, qi, qc, k, exclude_self=True))  # a query's own id is in one shard only
        searched = time.process_time() - started
        blocks.append({"shard": s.name, "codes": len(cache), "build_s": built, "us_per_query": searched / sample * 1e6})
        print(f"  {n:,} kNN sample: shard {s.name} ({len(cache):,} codes): cache {built:.1f} s, "
              f"{searched / sample * 1e6:.1f} us a query", flush=True)
        del cache
    nbr, dist = batch.merge_knn(parts, k)
    words = np.ascontiguousarray(as_words(np.concatenate([np.asarray(shards.load_shard(got, s)[1]) for s in got.shards])))
    all_ids = np.concatenate([np.asarray(shards.load_shard(got, s)[0]) for s in got.shards])
    mismatches = 0
    qw = as_words(qc)
    for i in rng.choice(sample, size=min(checked, sample), replace=False):
        rows, d = kernels.scan_rank(words, qw[i], k + 1)
        keep = all_ids[rows] != qi[i]
        if not (np.array_equal(nbr[i], all_ids[rows][keep][:k]) and np.array_equal(dist[i].astype(np.int64), d[keep][:k])):
            mismatches += 1
    per_block = float(np.mean([b["us_per_query"] for b in blocks]))
    builds = len(blocks) ** 2 * float(np.mean([b["build_s"] for b in blocks]))  # a cache per block at worst
    return {"n": n, "sample": sample, "blocks": blocks, "us_per_query_block": per_block,
            "projected_one_core_s": n * len(blocks) * per_block / 1e6 + builds,
            "exact": {"sampled": int(min(checked, sample)), "mismatches": mismatches}}


# --- shard export from a store ------------------------------------------------------------------------


def export_rates(n: int) -> dict[str, Any]:
    import bench_scale

    from imgstore import ImageStore

    pool, _ = bench_scale.make_pool()
    codes = np.asarray(pool[:n])
    out: dict[str, Any] = {}
    for kind in ("sqlite", "postgresql"):
        url = bench_scale.store_url(kind, n, "postgresql://postgres@127.0.0.1:5432/postgres") if kind == "postgresql" \
            else f"sqlite:///{CACHE / f'export-{n}.db'}"
        if kind == "sqlite":
            (CACHE / f"export-{n}.db").unlink(missing_ok=True)
        else:
            bench_scale.drop_store(kind, n, "postgresql://postgres@127.0.0.1:5432/postgres")
            bench_scale.create_store(kind, n, "postgresql://postgres@127.0.0.1:5432/postgres")
        with ImageStore(url) as store:
            bench_scale.load_images(store, n)
            _load_index(store, codes)
            folder = CACHE / f"export-{kind}"
            shutil.rmtree(folder, ignore_errors=True)
            started = time.perf_counter()
            done = store.export_shards(folder, shard_codes=-(-n // 4))
            seconds = time.perf_counter() - started
            started = time.perf_counter()
            again = store.export_shards(folder)
            again_s = time.perf_counter() - started
        out[kind] = {"codes": done.shards.n_codes, "seconds": seconds, "codes_per_s": n / seconds,
                     "again_unchanged_s": again_s, "again_written": again.written}
        print(f"export {kind}: {n / seconds:,.0f} codes/s ({seconds:.1f} s); again with nothing changed {again_s:.1f} s", flush=True)
        if kind == "sqlite":
            (CACHE / f"export-{n}.db").unlink(missing_ok=True)
        else:
            bench_scale.drop_store(kind, n, "postgresql://postgres@127.0.0.1:5432/postgres")
    return out


def _load_index(store: Any, codes: np.ndarray) -> None:
    import secrets

    import bench_search as bs

    from imgstore.bandindex import write_codes, write_new_buckets
    from imgstore.models import HashIndex
    from imgstore.vectors import get_or_create_space

    def work(conn: Any) -> None:
        space_id = get_or_create_space(conn, "synthetic-gauss128", bs.DIM, "bench-search-1")
        t = HashIndex.__table__
        hid = int(conn.execute(t.insert().values(  # type: ignore[attr-defined]
            uid=secrets.token_hex(16), space_id=space_id, method="lsh", n_bits=64, n_bands=4, band_width=16,
            params=b"", config={"benchmark": "bench_batch"}, is_active=True, n_fitted=0, generation=0,
        ).returning(t.c.id)).scalar_one())  # type: ignore[attr-defined]
        deferred: list[Any] = []
        for a in range(0, len(codes), 1_000_000):
            ids = np.arange(a + 1, min(a + 1_000_000, len(codes)) + 1, dtype=np.int64)
            write_codes(conn, hid, ids, codes[a : a + 1_000_000], 4, 16, defer=deferred, new_index=True)
        write_new_buckets(conn, hid, deferred, 4, 16)

    store.transaction(work, what="load index")


# --- report -------------------------------------------------------------------------------------------


def measured_at() -> str:
    """The day and the commit a row was measured at (rows of earlier runs stay in the table)."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "?"
    return f"{time.strftime('%Y-%m-%d')} {rev}"


def report(res: dict[str, Any]) -> str:
    lines = ["# Batch kNN and dedup pairs over shards (imgstore.batch)", "",
             f"`python benchmarks/bench_batch.py` on {res['cores']} cores ({res['machine']}), bench_scale's 64-bit codes "
             "(4 bands of 16 bits), 4 shards per size; each run a new process from an empty work folder; "
             f"k = {res['k']}, pairs within {res['radius']} bits. One run per cell (these take minutes). Rows come "
             "from several runs, on machines that differ: compare speeds only within one run (the same day and "
             "commit); the speed-up is over the local:1 row of the same size and task.", "",
             "| codes | task | where | seconds | codes/s | speed-up over local:1 | peak RSS, MB (process / workers) | exact (sampled) "
             "| measured |",
             "|---:|---|---|---:|---:|---:|---|---|---|"]
    order = {m: i for i, m in enumerate(MODES)}
    for row in sorted(res["runs"], key=lambda r: (r["n"], r["task"], order.get(r["mode"], 99))):
        base = next((r for r in res["runs"] if r["n"] == row["n"] and r["task"] == row["task"] and r["mode"] == "local:1"), None)
        up = f"{base['seconds'] / row['seconds']:.2f}x" if base else ""
        rss = f"{row['peak_rss_mb']:.0f}" + (f" / {', '.join(f'{w:.0f}' for w in row['workers_peak_rss_mb'])}"
                                               if row["workers_peak_rss_mb"] else "")
        ex = row.get("exact")
        exact = f"{ex['mismatches']} mismatches in {ex['sampled']:,}" if ex else "same output as the checked run" if row["same"] else "DIFFERENT"
        lines.append(f"| {row['n']:,} | {row['task']} | {row['mode']} | {row['seconds']:.1f} | {row['n'] / row['seconds']:,.0f} | "
                     f"{up} | {rss} | {exact} | {row.get('measured', 'an earlier session')} |")
    if res.get("export"):
        lines += ["", "Shard export of a store's index (`ImageStore.export_shards`, 4 shards; again with nothing changed "
                  "re-reads only the open last range):", "", "| database | codes | codes/s | again, s |", "|---|---:|---:|---:|"]
        for kind, e in res["export"].items():
            lines.append(f"| {kind} | {e['codes']:,} | {e['codes_per_s']:,.0f} | {e['again_unchanged_s']:.1f} |")
    ks = res.get("knn_sample")
    if ks:
        lines += ["", f"kNN graph of {ks['n']:,} codes on a sample ({ks['sample']:,} queries drawn from all of them, every "
                  "data shard, one process, CPU time; `--knn-sample`): the whole graph takes hours on these 2 cores.", "",
                  "| data shard | codes | cache build, s | us a query |", "|---|---:|---:|---:|"]
        lines += [f"| {b['shard']} | {b['codes']:,} | {b['build_s']:.1f} | {b['us_per_query']:.1f} |" for b in ks["blocks"]]
        ex = ks["exact"]
        lines += ["", f"Merged tops: {ex['mismatches']} mismatches in {ex['sampled']:,} checked against a full scan. "
                  f"The whole graph on one core: ~{ks['projected_one_core_s'] / 3600:.1f} h (queries x blocks x the "
                  "figure above, plus a cache build per block)."]
    notes = [f"- {row['n']:,} {row['task']}, {row['mode']}: {row['note']}" for row in res["runs"] if row.get("note")]
    if notes:
        lines += ["", "Notes on single rows:", "", *notes]
    ab = res.get("join_ab")
    if ab:
        lines += ["", f"The join itself, before and after sets of equal bands ({ab['what']}): before {ab['before_s']:.2f} s, "
                  f"after {ab['after_s']:.2f} s (medians of {ab['rounds']}, interleaved; the same pairs, digest "
                  f"{ab['digest']}): {ab['before_s'] / ab['after_s']:.1f}x."]
    proj = res.get("projection")
    if proj:
        lines += ["", "## 1B codes, projected from these figures", "", proj]
    return "\n".join(lines) + "\n"


def projection(res: dict[str, Any]) -> str:
    """Core-hours for 1B codes in 20M-code shards, from the per-(query, block) cost measured on one
    worker at each size (a shard is N/4 codes), extrapolated by the growth seen between sizes."""
    out = []
    for task in ("knn", "pairs"):
        pts = sorted((r["n"] // 4, r["seconds"] / (r["n"] * 4 if task == "knn" else r["n"] * 2.5))
                     for r in res["runs"] if r["task"] == task and r["mode"] == "local:1")
        ks = res.get("knn_sample")
        if task == "knn" and ks:  # the sampled size: CPU time of the search alone, so a little below a run's wall time
            pts = sorted([*pts, (ks["n"] // 4, ks["us_per_query_block"] / 1e6)])
        if not pts:
            continue
        shard, cost = pts[-1]
        alpha = float(np.log(pts[-1][1] / pts[0][1]) / np.log(pts[-1][0] / pts[0][0])) if len(pts) > 1 else 1.0
        target = 20_000_000
        per = cost * (target / shard) ** max(alpha, 0.0)
        blocks_per_query = 50 if task == "knn" else 25.5
        core_h = 1e9 * blocks_per_query * per / 3600
        growth = (f"cost grows as shard size^{alpha:.2f} between the sizes measured" if len(pts) > 1
                  else "one size measured, so the cost is taken as growing with the shard (a full scan's bound)")
        out.append(f"- {task}: {cost * 1e6:.2f} us per code and block at {shard:,}-code shards; {growth}, "
                   f"so ~{per * 1e6:.1f} us at 20M-code shards; 1B codes = 50 shards, "
                   f"{blocks_per_query:g} blocks per code: ~{core_h:,.0f} core-hours, ~{core_h / (20 * 16):,.1f} h on 20 machines "
                   "of 16 cores.")
    out.append("- memory: a worker holds one data shard's cache at a time (~90 B a code: 20M codes ~ 1.8 GB) and the "
               "memory-mapped query shard; the client holds one block at a time and merges the graph one query shard "
               "at a time into memory-mapped files (kNN: 10 bytes x k per code on disk, 100 GB at 1B codes and k = 10); "
               "pairs are held whole (their number, not the codes', sets the size).")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--radius", type=int, default=2)
    parser.add_argument("--sample", type=int, default=10_000)
    parser.add_argument("--modes", default=",".join(MODES), help="of: " + ", ".join(MODES))
    parser.add_argument("--export-n", type=int, default=1_000_000)
    parser.add_argument("--skip-export", action="store_true")
    parser.add_argument("--tasks", default="pairs,knn")
    parser.add_argument("--knn-sample", default=None, metavar="N:QUERIES",
                        help="also time the kNN blocks of N codes on a sample of queries (sizes whose whole graph takes hours)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.folder, args.mode, args.k, args.radius, args.work)
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    warm_up()
    res: dict[str, Any] = {"k": args.k, "radius": args.radius, "cores": len(os.sched_getaffinity(0)),
                           "machine": platform.machine(), "runs": []}
    out_json = RESULTS / "batch.json"
    if out_json.exists():  # rows of other sizes and tasks stay; this run replaces its own
        old = json.loads(out_json.read_text())
        res["runs"] = old.get("runs", [])
        res["export"] = old.get("export")
        res["knn_sample"] = old.get("knn_sample")
    for n in [int(s) for s in args.sizes.split(",") if s]:  # --sizes "" with --knn-sample: the sample alone
        folder = shard_set(n)
        for task in args.tasks.split(","):
            digests = {}
            for mode in [m for m in MODES if m in args.modes.split(",")]:
                work = CACHE / f"work-{n}-{task}-{mode.replace(':', '')}".replace(" ", "-")
                r = run_one(task, folder, mode, args, work)
                row = {"n": n, "task": task, "mode": mode, "measured": measured_at(), **r}
                digests[mode] = r["digest"]
                first = next(iter(digests))
                if mode == first:  # the first mode run is checked against brute force, the others against it
                    row["exact"] = check(folder, work, task, args)
                row["same"] = r["digest"] == digests[first]
                res["runs"] = [x for x in res["runs"] if (x["n"], x["task"], x["mode"]) != (n, task, mode)] + [row]
                print(f"{n:,} {task} {mode}: {r['seconds']:.1f} s ({n / r['seconds']:,.0f} codes/s), peak {r['peak_rss_mb']:.0f} MB "
                      f"workers {r['workers_peak_rss_mb']}, {row.get('exact', 'same' if row['same'] else 'DIFFERENT')}", flush=True)
                shutil.rmtree(work, ignore_errors=True)
                res["projection"] = projection(res)  # saved after every run: a long one is not lost to a later one
                out_json.write_text(json.dumps(res, indent=2))
                (RESULTS / "batch.md").write_text(report(res))
    if args.knn_sample:
        n_s, q_s = (int(x) for x in args.knn_sample.split(":"))
        res["knn_sample"] = knn_sample(n_s, q_s, args.k)
        res["projection"] = projection(res)
        out_json.write_text(json.dumps(res, indent=2))
        (RESULTS / "batch.md").write_text(report(res))
    if not args.skip_export:
        res["export"] = export_rates(args.export_n)
    out_json.write_text(json.dumps(res, indent=2))
    (RESULTS / "batch.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
