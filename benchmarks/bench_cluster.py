"""Ingest past one process: a Dask LocalCluster against one local ingest, and what one
PostgreSQL server absorbs from concurrent writers.

    python benchmarks/bench_cluster.py                       # both parts, CIFAR-10's 10,000 files
    python benchmarks/bench_cluster.py --part throughput --limit 2000
    python benchmarks/bench_cluster.py --part writers --n 40000

throughput: the CIFAR-10 test set ingested into a fresh PostgreSQL database by one local
``imgstore ingest`` process and by ``imgstore ingest --cluster local:2`` (two worker processes,
each writing its own batches), on the same cores, in one run; images/s of the whole command
(cluster start-up and model loads included) and the ratio.

writers: precomputed 1280-d features (random unit vectors, as a CNN's) written by 1, 2, 4 and 8
concurrent writer processes through the real write path (``Ingester.write_results``: images,
paths, features, codes of a 64-bit index with 8 bands, bucket appends, index bump), each its
own batches of 64, written ``--write-size`` images per transaction (64: what a local ingest
commits; 256: what a cluster worker commits, its whole partition); aggregate images/s, and the
transactions retried after a conflict.
Writes benchmarks/results/cluster.json and cluster.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, cifar_root  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PG_BASE = "postgresql://postgres@127.0.0.1:5432/"
DIM = 1280


def fresh_db(tag: str) -> str:
    name = f"imgstore_bench_{tag}_{secrets.token_hex(3)}"
    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return name


def drop_db(name: str) -> None:
    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


def cpu_seconds() -> float:
    """CPU time of this machine's processes (user + system), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[0]) + int(fields[1]) + int(fields[2])) / ticks


# --- throughput --------------------------------------------------------------------------------


def run_ingest(folder: Path, cluster: str | None) -> dict[str, Any]:
    name = fresh_db("cl" if cluster else "lo")
    url = PG_BASE + name
    command = [sys.executable, "-m", "imgstore.cli", "--db", url, "ingest", str(folder), "--json", "--no-progress",
               "--no-auto-index"] + (["--cluster", cluster] if cluster else [])
    try:
        started, cpu0 = time.perf_counter(), cpu_seconds()
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu0
        summary = json.loads(out.stdout)
        return {"mode": f"cluster {cluster}" if cluster else "local", "added": summary["added"], "failed": summary["failed"],
                "wall_s": round(wall, 1), "images_per_s": round(summary["added"] / wall, 1),
                "ingest_images_per_s": summary["images_per_s"], "cpu_busy": round(cpu / wall / (os.cpu_count() or 1), 2),
                "retries": summary.get("retries", 0)}
    finally:
        drop_db(name)


def throughput(limit: int | None, repeats: int) -> list[dict[str, Any]]:
    root = cifar_root()
    if limit:  # a folder of links to the first N files (sorted), so both runs see the same set
        files = sorted(root.rglob("*.jpg"))[:limit]
        folder = Path(f"/tmp/imgstore-bench-cluster-{limit}")
        if not folder.exists():
            folder.mkdir(parents=True)
            for f in files:
                target = folder / f.parent.name / f.name
                target.parent.mkdir(exist_ok=True)
                os.symlink(f, target)
        source = folder
    else:
        source = root
    rows = []
    for _ in range(repeats):  # interleaved, so a noisy minute hits both
        rows.append(run_ingest(source, None))
        rows.append(run_ingest(source, "local:2"))
        print(rows[-2], rows[-1], flush=True)
    return rows


# --- writers -----------------------------------------------------------------------------------


def _writer(url: str, space_id: int, first: int, count: int, seed: int, write_size: int, start: Any, out: Any) -> None:
    from imgstore import ImageStore
    from imgstore.decode import DecodedImage
    from imgstore.features import get_extractor
    from imgstore.features.pipeline import StreamResult
    from imgstore.ingest import Ingester, IngestSummary, Task

    rng = np.random.default_rng(seed)
    store = ImageStore(url)
    job = Ingester(store.ctx, get_extractor("color"), space_id, preload_known=False, write_size=write_size)  # the extractor is not used
    batches = []
    for b in range(first, first + count, 64):
        batch = []
        for i in range(b, min(b + 64, first + count)):
            v = rng.standard_normal(DIM).astype(np.float32)
            v /= np.linalg.norm(v)
            task = Task(f"/bench/writer/{i:08d}.jpg", 1000 + i, i, root="/bench", data_sha256=f"{i:064x}", byte_size=1000 + i)
            batch.append(StreamResult(task, DecodedImage(None, 32, 32, "JPEG", None), None, v))  # type: ignore[arg-type]
        batches.append(batch)
    start.wait()
    t0 = time.perf_counter()
    summary = job.write_results(batches, count, IngestSummary(), t0)
    out.put((time.perf_counter() - t0, summary.added, summary.retries))
    store.close()


def _seed_store(url: str) -> int:
    """A feature space and a fitted 64-bit ITQ index (8 bands), as after a first ingest."""
    from imgstore import ImageStore
    from imgstore.indexing import create_index
    from imgstore.models import Image
    from imgstore.vectors import features_table, get_or_create_space, vector_to_bytes

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((2000, DIM)).astype(np.float32)

    def seed(conn: Any) -> int:
        space_id = get_or_create_space(conn, "bench-writers", DIM, "v1")
        conn.execute(Image.__table__.insert(), [
            {"sha256": f"seed{i:060x}", "width": 1, "height": 1, "format": "JPEG", "byte_size": 1} for i in range(2000)])
        ids = [r[0] for r in conn.execute(text("SELECT id FROM images ORDER BY id"))]
        conn.execute(features_table.insert(), [
            {"space_id": space_id, "image_id": i, "vector": vector_to_bytes(v)} for i, v in zip(ids, vectors)])
        create_index(conn, space_id, method="itq", n_bits=64, n_bands=8, sample=2000)
        return space_id

    with ImageStore(url) as store:
        return int(store.transaction(seed))


def writers(n: int, counts: list[int], write_sizes: list[int]) -> list[dict[str, Any]]:
    from imgstore import ImageStore

    rows = []
    for ws, k in [(ws, k) for ws in write_sizes for k in counts]:
        name = fresh_db(f"w{k}")
        url = PG_BASE + name
        try:
            space_id = _seed_store(url)
            ctx = mp.get_context("spawn")
            start, out = ctx.Event(), ctx.Queue()
            per = n // k
            procs = [ctx.Process(target=_writer, args=(url, space_id, 10_000_000 + w * per, per, w, ws, start, out)) for w in range(k)]
            for p in procs:
                p.start()
            time.sleep(8 + 2 * k)  # every writer has built its batches and connected
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            start.set()
            results = [out.get(timeout=1800) for _ in procs]
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            for p in procs:
                p.join()
            added = sum(r[1] for r in results)
            with ImageStore(url) as store:
                ok = store.verify(check_files=False).ok
            row = {"writers": k, "write_size": ws, "images": added, "wall_s": round(wall, 2), "images_per_s": round(added / wall),
                   "retries": sum(r[2] for r in results), "cpu_busy": round(cpu / wall / (os.cpu_count() or 1), 2),
                   "verify_ok": ok}
            print(row, flush=True)
            rows.append(row)
        finally:
            drop_db(name)
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = ["# Ingest past one process (`benchmarks/bench_cluster.py`)", "",
             f"Machine: {os.cpu_count()} cores; PostgreSQL 15 on the same machine, default configuration.", ""]
    if report.get("throughput"):
        lines += ["## CIFAR-10 test set: one local ingest against a 2-worker LocalCluster", "",
                  "| mode | images | wall s | images/s (whole command) | CPU busy | retries |", "|---|---|---|---|---|---|"]
        for r in report["throughput"]:
            lines.append(f"| {r['mode']} | {r['added']:,} | {r['wall_s']} | {r['images_per_s']} | {r['cpu_busy']} | {r['retries']} |")
        local = [r["images_per_s"] for r in report["throughput"] if r["mode"] == "local"]
        clus = [r["images_per_s"] for r in report["throughput"] if r["mode"] != "local"]
        lines += ["", f"Ratio cluster / local (median of {len(local)}): **{np.median(clus) / np.median(local):.2f}** (floor 0.85).", ""]
    if report.get("writers"):
        lines += ["## Concurrent writers into one PostgreSQL server", "",
                  "| images per transaction | writers | images | wall s | images/s | retries | CPU busy | verify |", "|---|---|---|---|---|---|---|---|"]
        for r in report["writers"]:
            lines.append(f"| {r.get('write_size', 64)} | {r['writers']} | {r['images']:,} | {r['wall_s']} | {r['images_per_s']:,} | {r['retries']} | {r['cpu_busy']} | {'ok' if r['verify_ok'] else 'FAILED'} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["throughput", "writers", "both"], default="both")
    parser.add_argument("--limit", type=int, default=None, help="CIFAR files for the throughput part (default: all 10,000)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--n", type=int, default=40_000, help="images written in the writers part")
    parser.add_argument("--writers", default="1,2,4,8")
    parser.add_argument("--write-size", default="64,256", help="images per write transaction, one set of rows each")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    path = RESULTS_DIR / "cluster.json"
    if path.exists():
        report = json.loads(path.read_text())
    if args.part in ("throughput", "both"):
        report["throughput"] = throughput(args.limit, args.repeats)
    if args.part in ("writers", "both"):
        report["writers"] = writers(args.n, [int(x) for x in args.writers.split(",")], [int(x) for x in args.write_size.split(",")])
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    (RESULTS_DIR / "cluster.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
