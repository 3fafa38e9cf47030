"""Watched folders: from a file's close to searchable through a running server.

``imgstore serve --watch FOLDER`` runs as a process over a store that already holds a collection
with its index (the codes in the server's memory). This process copies photos into the watched
folder (each copy a new file, written and closed) while a client searches the server by stored
id at a steady rate. A poller reads the store every 0.1 s; once a copy's path is stored it asks
the server's own search for that image (``GET /api/search?id=``: its code must be in the
server's memory, merged by the refresher) until the image comes back. Per file: close ->
stored (committed) and close -> searchable, medians and p95; none may be lost. Five copies go
through first, unmeasured: the server's first search compiles its kernels and the watcher's
first batch loads the model (a server that has run a while has done both).

Runs: ``paced`` (``--rate`` files a second, a camera or phone import), ``burst`` (copied as fast
as the disk takes them: then the latency is the backlog, throughput decides), and, with
``--burst-files N``, an absorption check: N small files in one burst into a store of 5 images,
every one stored and searchable.

    python benchmarks/bench_watch.py                                  # 1,000 files, both databases
    python benchmarks/bench_watch.py --db sqlite --files 200 --rate 5
    python benchmarks/bench_watch.py --runs burst10k --burst-files 10000 --extractor color

The photos are CIFAR-10 test images (real, all different) scaled up to ``--size`` and saved as
JPEG (quality 90), made once under the benchmark cache. Writes benchmarks/results/watch.json and
watch.md (runs of an earlier invocation are kept unless run again) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from sqlalchemy import create_engine, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore import ImageStore
from imgstore.db import resolve_url
from imgstore.models import ImagePath
from imgstore.paths import from_stored, to_stored

from common import RESULTS_DIR, cache_dir, cifar_root

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
EXE = str(Path(sys.executable).with_name("imgstore"))
#: A copy not searchable this long after the last copy counts as lost.
DEADLINE_S = 900.0
SEARCH_RATE = 20.0  # the searching client's requests a second
WARMUP = 5  # copies that go through before the clock starts


def photos(n: int, size: tuple[int, int], skip: int = 0) -> list[Path]:
    """``n`` JPEGs of ``size``: CIFAR-10 test images from the ``skip``-th on (sorted by path),
    scaled up (bicubic), quality 90; made once."""
    folder = cache_dir() / f"watch-{size[0]}x{size[1]}-{skip}-{n}"
    files = sorted(folder.glob("*.jpg"))
    if len(files) == n:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(cifar_root().rglob("*.jpg"))[skip : skip + n]
    if len(sources) < n:
        raise SystemExit(f"CIFAR-10 has {len(sources)} images from {skip}; ask for fewer")
    out = []
    for i, src in enumerate(sources):
        target = folder / f"photo_{skip + i:05d}.jpg"
        with Image.open(src) as img:
            img.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        out.append(target)
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


class Server:
    """``imgstore serve --port 0 --watch FOLDER`` as a process; stderr read by a thread."""

    def __init__(self, db: str, folder: Path) -> None:
        self.command = [EXE, "--db", db, "serve", "--port", "0", "--watch", str(folder)]
        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        port = None
        while port is None:
            found = [m for line in list(self.lines) if (m := re.search(r"open http://[^:]+:(\d+)/", line))]
            port = int(found[0].group(1)) if found else None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start:\n" + "".join(self.lines))
            time.sleep(0.05)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        while not self.answers() or not any("rescanned" in line for line in list(self.lines)):  # up, rescan done
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the watcher did not start:\n" + "".join(self.lines))
            time.sleep(0.05)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.http.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=120)
        finally:
            self.proc.kill()

    def answers(self) -> bool:
        try:
            return self.http.get("/api/info").status_code == 200
        except httpx.TransportError:
            return False

    def finds(self, image_id: int) -> bool:
        response = self.http.get("/api/search", params={"id": image_id, "k": 10})
        return response.status_code == 200 and image_id in [hit["image_id"] for hit in response.json()]


def run(name: str, db: str, sources: list[Path], base: list[Path], warmup: list[Path], *, rate: float | None,
        extractor: str, workdir: Path) -> dict[str, Any]:
    folder = workdir / "watched"
    folder.mkdir()
    (workdir / "base").mkdir()
    for src in base:
        shutil.copyfile(src, workdir / "base" / src.name)
    with ImageStore(db) as store:  # its feature space is the one the server searches, and so watches with
        store.ingest([workdir / "base"], extractor=extractor)  # (the default index comes at 256 images)
        base_ids = [store.image(str(workdir / "base" / p.name)).id for p in base]
    load_before = os.getloadavg()[0]
    engine = create_engine(resolve_url(db))
    server = Server(db, folder)
    closed: dict[str, float] = {}
    stored: dict[str, float] = {}
    searchable: dict[str, float] = {}
    image_of: dict[str, int] = {}
    search_ms: list[float] = []
    search_errors: list[str] = []
    done = threading.Event()

    def copier() -> None:
        start = time.monotonic()
        for i, src in enumerate(sources):
            if rate:
                time.sleep(max(0.0, start + i / rate - time.monotonic()))
            target = folder / f"album{i % 10}" / src.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, target)  # written and closed when it returns
            closed[str(target)] = time.monotonic()

    def searcher() -> None:
        while not done.is_set() and base_ids:
            t0 = time.monotonic()
            response = server.http.get("/api/search", params={"id": random.choice(base_ids), "k": 10})
            search_ms.append((time.monotonic() - t0) * 1000)
            if response.status_code != 200:
                search_errors.append(f"{response.status_code} {response.text[:200]}")
            done.wait(max(0.0, 1 / SEARCH_RATE - (time.monotonic() - t0)))

    lo = to_stored(str(folder)) + os.sep
    hi = lo[:-1] + chr(ord(os.sep) + 1)
    stmt = select(ImagePath.path, ImagePath.image_id).where(ImagePath.is_current.is_(True), ImagePath.path >= lo,
                                                            ImagePath.path < hi)

    def poller() -> None:  # when each copy is stored (committed), every 0.1 s
        while not done.is_set():
            now = time.monotonic()
            with engine.connect() as conn:
                rows = conn.execute(stmt).all()
            seen = time.monotonic()
            for path, image_id in rows:
                path = from_stored(path)
                if path not in stored:
                    image_of[path] = int(image_id)
                    stored[path] = seen
            done.wait(max(0.0, 0.1 - (time.monotonic() - now)))

    def checker() -> None:  # when the server's own search finds each stored copy
        while not done.is_set():
            now = time.monotonic()
            for path in [p for p in list(stored) if p not in searchable]:
                if server.finds(image_of[path]):
                    searchable[path] = time.monotonic()
            done.wait(max(0.0, 0.05 - (time.monotonic() - now)))

    helpers = [threading.Thread(target=poller, daemon=True), threading.Thread(target=checker, daemon=True)]
    for t in helpers:
        t.start()
    # warm-up, not measured: the server's first search compiles its kernels, the watcher's first
    # batch loads the model; a few copies go through before the clock starts
    for src in warmup:
        shutil.copyfile(src, folder / src.name)
    deadline = time.monotonic() + DEADLINE_S
    while not all(str(folder / src.name) in searchable for src in warmup):
        if server.proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the warm-up copies never became searchable:\n" + "".join(server.lines))
        time.sleep(0.05)
    n_warm_lines = len(server.lines)
    copy_thread, search_thread = threading.Thread(target=copier), threading.Thread(target=searcher, daemon=True)
    started = time.monotonic()
    copy_thread.start()
    search_thread.start()
    copy_thread.join()
    deadline = time.monotonic() + DEADLINE_S
    while not all(p in searchable for p in closed) and time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise SystemExit("the server exited:\n" + "".join(server.lines))
        time.sleep(0.05)
    finished = time.monotonic()
    done.set()
    for t in helpers:
        t.join()
    server.stop()
    engine.dispose()
    verify = subprocess.run([EXE, "--db", db, "verify", "--json", "--no-files"], capture_output=True, text=True)
    to_stored_s = [stored[p] - closed[p] for p in closed if p in stored]
    to_search_s = [searchable[p] - closed[p] for p in closed if p in searchable]
    batches = [line for line in server.lines[n_warm_lines:] if line.startswith("watch: ") and "added" in line]
    copy_s = max(closed.values()) - min(closed.values()) if closed else 0.0
    return {
        "run": name, "db": "postgresql" if db.startswith("postgresql") else "sqlite", "files": len(sources),
        "base_images": len(base), "rate_asked": rate, "copy_s": round(copy_s, 1),
        "copy_rate": round(len(closed) / copy_s, 1) if copy_s else None,
        "stored": sum(p in stored for p in closed), "searchable": sum(p in searchable for p in closed),
        "lost": len(sources) - sum(p in searchable for p in closed),
        "close_to_stored_s": {"median": round(statistics.median(to_stored_s), 2), "p95": round(pct(to_stored_s, 95), 2),
                              "max": round(max(to_stored_s), 2)},
        "close_to_searchable_s": {"median": round(statistics.median(to_search_s), 2),
                                  "p95": round(pct(to_search_s, 95), 2), "max": round(max(to_search_s), 2)},
        "files_per_s": round(sum(p in searchable for p in closed) / (finished - min(closed.values())), 1),
        "watch_batches": len(batches),
        "searches": len(search_ms), "search_errors": search_errors[:5],
        "search_ms": {"median": round(statistics.median(search_ms), 1), "p95": round(pct(search_ms, 95), 1)}
        if search_ms else None,
        "verify_ok": verify.returncode == 0 and json.loads(verify.stdout)["ok"],
        "elapsed_s": round(finished - started, 1), "load_average_before": round(load_before, 2),
    }


def database(kind: str, workdir: Path) -> tuple[str, Any]:
    """A new database: an SQLite file, or a fresh PostgreSQL database (dropped by the cleanup)."""
    if kind == "sqlite":
        return str(workdir / "store.db"), lambda: None
    name = f"imgstore_bench_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return f"postgresql://postgres@127.0.0.1:5432/{name}", drop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--runs", default="paced,burst", help="paced, burst, burst10k (comma-separated)")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--base", type=int, default=300, help="images in the store before (with an index)")
    parser.add_argument("--rate", type=float, default=10.0, help="files a second in the paced run")
    parser.add_argument("--size", default="1600x1200", help="the copied photos' size")
    parser.add_argument("--burst-files", type=int, default=10000, help="files of the burst10k run (320x240)")
    parser.add_argument("--extractor", default="efficientnet-lite0")
    parser.add_argument("--report", action="store_true", help="only rewrite watch.md from watch.json")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    assert len(size) == 2
    results_path = RESULTS_DIR / "watch.json"
    previous = json.loads(results_path.read_text()) if results_path.exists() else {}
    results: list[dict[str, Any]] = []
    command = "python benchmarks/bench_watch.py " + " ".join(sys.argv[1:])
    for kind in [] if args.report else args.db.split(","):
        for name in args.runs.split(","):
            if name == "burst10k":  # into a store of 5 images (their feature space: the extractor's)
                sources, rate, extractor = photos(args.burst_files, (320, 240)), None, args.extractor
                base = photos(2 * WARMUP, (330, 250))[WARMUP:]  # other bytes than the burst's own photos
                warmup = photos(2 * WARMUP, (330, 250))[:WARMUP]
            else:
                base = photos(args.base, size)  # type: ignore[arg-type]
                sources = photos(args.files, size, skip=args.base)  # type: ignore[arg-type]
                warmup = photos(WARMUP, size, skip=args.base + args.files)  # type: ignore[arg-type]
                rate, extractor = (args.rate if name == "paced" else None), args.extractor
            with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
                db, cleanup = database(kind, Path(tmp))
                try:
                    result = run(name, db, sources, base, warmup, rate=rate, extractor=extractor, workdir=Path(tmp))
                finally:
                    cleanup()
            result["extractor"] = extractor
            result["command"] = command
            result["photo_size"] = "320x240" if name == "burst10k" else args.size
            print(json.dumps(result), flush=True)
            results.append(result)
    keep = {(r["run"], r["db"], r["extractor"]) for r in results}
    merged = [r for r in previous.get("runs", []) if (r["run"], r["db"], r["extractor"]) not in keep] + results
    payload = {"commands": sorted({r["command"] for r in merged}), "cpus": os.cpu_count(), "runs": merged}
    if not args.report:
        results_path.write_text(json.dumps(payload, indent=2) + "\n")
    report = write_report(payload)
    print(report)


def write_report(payload: dict[str, Any]) -> str:
    """benchmarks/results/watch.md from the runs of watch.json."""
    lines = [
        "# Watched folders: file close to searchable through `imgstore serve --watch`", "",
        "Commands: " + ", ".join(f"`{c.strip()}`" for c in payload["commands"]) + f"; {payload['cpus']} CPUs, shared "
        "with other work (the load average when a run began is in watch.json). Photos: CIFAR-10 test images "
        "scaled up, JPEG q90, copied into the watched folder (10 sub-folders) while a client searched the server by id at "
        f"{SEARCH_RATE:.0f}/s. A copy is *searchable* once the server's own search by its id returns it (its code "
        f"merged into the server's memory); {WARMUP} copies go through before the clock starts (the server's first "
        "search compiles its kernels, the watcher's first batch loads the model). Floor: p95 close -> searchable "
        "<= 5 s, none lost.", "",
        "| run | db | extractor | files | photo | copy rate, files/s | close -> stored, median / p95 s | "
        "close -> searchable, median / p95 / max s | lost | files/s absorbed | batches | searches, median / p95 ms |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["runs"]:
        st, se, sm = r["close_to_stored_s"], r["close_to_searchable_s"], r["search_ms"]
        lines.append(f"| {r['run']} | {r['db']} | {r['extractor']} | {r['files']:,} | {r['photo_size']} | {r['copy_rate']} | "
                     f"{st['median']} / {st['p95']} | {se['median']} / {se['p95']} / {se['max']} | {r['lost']} | "
                     f"{r['files_per_s']} | {r['watch_batches']} | "
                     f"{'-' if not sm else str(sm['median']) + ' / ' + str(sm['p95'])} |")
    lines += [
        "",
        "*paced*: files arrive slower than the ingest takes them (a camera or phone import); the time to searchable "
        "is the watcher's own: the close event, a batch (0.2 s gathering), one transaction, the refresher. *burst*: "
        "all copies within a second or two, so a file waits for those before it: the last one is searchable after "
        "files / throughput, and the p95 is set by the ingest's rate (decoding and the model), not by the watcher. "
        "*burst10k*: 10,000 copies absorbed, each stored and then found by the server's search, none lost; there the "
        "searchable column also waits for this benchmark's own checker, which searches once per stored file "
        "(about 100 searches a second on this machine), so *stored* is the watcher's figure.",
    ]
    text = "\n".join(lines) + "\n"
    (RESULTS_DIR / "watch.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
