"""Browsing a large collection: milliseconds per page of ``ImageStore.browse``, sorted by folder
(and, for reference, by date taken), a first page and deep pages, on a real SQLite file (and a
PostgreSQL database with ``--pg``).

Data (``--images N``, default 200,000), inserted with SQL in a few seconds, no image file: each
image has a capture time (none for every 10th), one current file in one of N/100 folders
(``/photos/<year>/<event>/IMG_<n>.jpg``, folders shuffled against the ids, so folder order is not
id order), every 10th a second current file under ``/backup/``, every 20th an older path that is
no longer current, every 100th only paths that are no longer current (stale: left out), and every
1000th no path at all (added without a file: sorted last). Before measuring, SQLite gets
``ANALYZE`` and PostgreSQL ``VACUUM ANALYZE``.

Per page: the median of ``--repeat`` calls (after one warm-up call) in one process, of
``browse(sort=..., order=..., page=P, per_page=60)``: P = 1, the middle page and the last page,
ascending and descending. ``--baseline SRC`` runs the same measurement with another source tree's
``imgstore`` (a ``git worktree`` of the commit before) in a subprocess on the same database
files, interleaved (after, before, after, before; each keeps the lower of its two medians), and
checks that both return the same images on every page measured.

    python benchmarks/bench_browse.py                              # 200k images, SQLite
    python benchmarks/bench_browse.py --baseline /tmp/wt --pg postgresql://postgres@127.0.0.1:5432/test

Writes benchmarks/results/browse.json and browse.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PER_PAGE = 60
#: (sort, order) pairs measured; "taken" is the reference a folder sort is compared with
SORTS = (("folder", "asc"), ("folder", "desc"), ("taken", "desc"))
START = datetime(2015, 1, 1, tzinfo=timezone.utc)


def _cache() -> Path:
    path = Path(os.environ.get("IMGSTORE_BENCH_CACHE") or Path.home() / ".cache" / "imgstore-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fill(url: str, n: int) -> float:
    """Store ``n`` synthetic images with their paths (module docstring); seconds taken."""
    import numpy as np
    from imgstore import ImageStore
    from imgstore.models import Image, ImagePath
    from sqlalchemy import insert

    rng = np.random.default_rng(7)
    n_folders = max(1, n // 100)
    folder_of = rng.permutation(n) % n_folders  # image i -> folder, shuffled against the ids
    t0 = time.perf_counter()
    with ImageStore(url) as store:
        def load(conn: Any) -> None:
            for start in range(0, n, 20_000):
                ids = range(start + 1, min(start + 20_000, n) + 1)
                conn.execute(insert(Image), [
                    {"id": i, "sha256": f"{i:064x}", "width": 640, "height": 480, "format": "jpeg", "byte_size": 1000,
                     "meta": {}, "ingested_at": START + timedelta(seconds=i),
                     "captured_at": None if i % 10 == 0 else START + timedelta(minutes=int(rng.integers(0, 5_000_000)))}
                    for i in ids])
                paths: list[dict[str, Any]] = []
                for i in ids:
                    if i % 1000 == 0:
                        continue  # added without a file
                    f = int(folder_of[i - 1])
                    main = f"/photos/{2015 + f % 10}/event-{f:05d}/IMG_{i:07d}.jpg"
                    current = i % 100 != 0
                    paths.append({"path": main, "image_id": i, "file_size": 1000, "mtime_ns": 1, "is_current": current})
                    if i % 10 == 0 and current:
                        paths.append({"path": f"/backup/{f % 97:02d}/IMG_{i:07d}.jpg", "image_id": i, "file_size": 1000,
                                      "mtime_ns": 1, "is_current": True})
                    if i % 20 == 0:
                        paths.append({"path": f"/old/{f:05d}/IMG_{i:07d}.jpg", "image_id": i, "file_size": 1000,
                                      "mtime_ns": 1, "is_current": False})
                conn.execute(insert(ImagePath), paths)

        store.transaction(load, what="load synthetic images")
        with store.engine.connect() as conn:
            if store.url.get_backend_name() == "postgresql":
                conn = conn.execution_options(isolation_level="AUTOCOMMIT")
                conn.exec_driver_sql("VACUUM ANALYZE images")
                conn.exec_driver_sql("VACUUM ANALYZE image_paths")
            else:
                conn.exec_driver_sql("ANALYZE")
                conn.commit()
    return time.perf_counter() - t0


def measure(url: str, repeat: int) -> dict[str, Any]:
    """Per (sort, order, page): median milliseconds and the ids returned (this process's imgstore)."""
    from imgstore import ImageStore

    out: dict[str, Any] = {}
    with ImageStore(url) as store:
        pages = store.browse(sort="taken", per_page=PER_PAGE).pages
        for sort, order in SORTS:
            for page in sorted({1, (pages + 1) // 2, pages}):
                store.browse(sort=sort, order=order, page=page, per_page=PER_PAGE)  # warm the database's cache
                times, ids = [], []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    got = store.browse(sort=sort, order=order, page=page, per_page=PER_PAGE)
                    times.append((time.perf_counter() - t0) * 1000)
                    ids = [item.image_id for item in got.items]
                out[f"{sort} {order} p{page}"] = {"sort": sort, "order": order, "page": page, "pages": pages,
                                                  "total": got.total, "ms": statistics.median(times),
                                                  "ms_all": [round(t, 2) for t in times], "ids": ids}
    return out


def baseline(src: Path, url: str, repeat: int) -> dict[str, Any]:
    """:func:`measure` with ``src``'s imgstore, in a new process."""
    code = (f"import sys, json; sys.path.insert(0, {str(src)!r}); sys.path.insert(1, {str(ROOT / 'benchmarks')!r})\n"
            "import imgstore, bench_browse\n"
            f"assert imgstore.__file__.startswith({str(src)!r}), imgstore.__file__\n"
            f"print(json.dumps(bench_browse.measure({url!r}, {repeat})))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(src)})
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Browse: ms per page of {PER_PAGE} ({report['images']:,} images)", "",
             f"`{report['command']}` on {report['machine']}; median of {report['repeat']} calls after a warm-up.", ""]
    for db, runs in report["databases"].items():
        after, before = runs["after"], runs.get("before")
        lines += [f"## {db}", "", "| sort | page | before (ms) | after (ms) | speed-up | same images |",
                  "|---|---|---|---|---|---|"]
        for key, row in after.items():
            old = before.get(key) if before else None
            was = f"{old['ms']:.1f}" if old else "-"
            ratio = f"{old['ms'] / row['ms']:.1f}x" if old else "-"
            same = ("yes" if old["ids"] == row["ids"] else "**no**") if old else "-"
            lines.append(f"| {row['sort']} {row['order']} | {row['page']:,} of {row['pages']:,} | {was} | "
                         f"{row['ms']:.1f} | {ratio} | {same} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--db", type=Path, default=None, help="the SQLite file [default: in the benchmark cache]")
    parser.add_argument("--pg", default=None, metavar="URL",
                        help="also a PostgreSQL server (a maintenance database URL): a new database, dropped after")
    parser.add_argument("--baseline", type=Path, default=None, help="a source tree to compare with (the code before)")
    parser.add_argument("--out", default="browse")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    db = args.db or _cache() / f"browse-{args.images}.db"
    databases: dict[str, str] = {"sqlite": str(db)}
    fill_s: dict[str, float] = {}
    if not db.exists():
        fill_s["sqlite"] = fill(str(db), args.images)
    admin = None
    if args.pg:
        admin = make_url(args.pg).set(drivername="postgresql+psycopg")
        name = f"imgstore_bench_browse_{secrets.token_hex(4)}"
        with create_engine(admin, isolation_level="AUTOCOMMIT").connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        databases["postgresql"] = admin.set(database=name).render_as_string(hide_password=False)
        fill_s["postgresql"] = fill(databases["postgresql"], args.images)
    report: dict[str, Any] = {"images": args.images, "repeat": args.repeat, "per_page": PER_PAGE, "fill_s": fill_s,
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                              "command": "python benchmarks/bench_browse.py" + (" --baseline SRC" if args.baseline else "")
                              + (" --pg URL" if args.pg else ""), "databases": {}}
    try:
        for kind, url in databases.items():
            # after, before, after, before: a busy spell of the machine shows in both; each keeps
            # the lower of its two medians
            runs: dict[str, Any] = {}
            for _ in range(2 if args.baseline is not None else 1):
                rounds = {"after": measure(url, args.repeat)}
                if args.baseline is not None:
                    rounds["before"] = baseline(args.baseline, url, args.repeat)
                for which, got in rounds.items():
                    if which not in runs:
                        runs[which] = got
                        continue
                    for key, row in got.items():
                        runs[which][key]["ms"] = min(runs[which][key]["ms"], row["ms"])
                        runs[which][key]["ms_all"] += row["ms_all"]
            report["databases"][kind] = runs
    finally:
        if admin is not None:
            with create_engine(admin, isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{databases["postgresql"].rsplit("/", 1)[1]}" WITH (FORCE)'))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1, default=str))
    md = markdown(report)
    (RESULTS / f"{args.out}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
