"""Time to first byte of the duplicates page and of ``/api/duplicates`` while the search runs.

    python benchmarks/bench_dedup_page.py [--rounds 3] [--interval 0.25] [--baseline SRC]

The demo collection (``python -m imgstore.samples``: scikit-image's photos and their transformed
copies, 300 images) is ingested once with the default extractor into an SQLite store kept under
the benchmark cache. Each round copies that store (no verdicts stored in it: the duplicate
search is a first one, the slow case), starts ``imgstore serve`` on the copy in a process of
its own, as a user runs it, and requests, each on a new loopback connection:

* ``GET /duplicates`` once: the first visit, which starts the search;
* while the search runs, every ``--interval`` seconds in turn: ``GET /duplicates`` (a reload, or
  a second visitor), ``GET /api/duplicates`` and ``GET /api/jobs/{id}`` (what the page polls);
* once it is done: ``GET /duplicates``, the groups.

Time to first byte is from sending the request to receiving the first byte of the answer;
medians (and the 90th percentile and maximum) over every request made while the search ran.
The search's own duration is what the page's first byte cost before the search moved to the
background (the page answered after it); ``--baseline SRC`` measures that directly, interleaved
with the rounds: the first ``GET /duplicates`` of a server started from another source tree
(e.g. ``git archive <commit> imgstore | tar -x -C SRC``) on a fresh copy of the same store.

Writes benchmarks/results/dedup_page.json and dedup_page.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore import ImageStore
from imgstore.samples import write_samples

from common import RESULTS_DIR, cache_dir

ROUTES = ("/duplicates", "/api/duplicates", "/api/jobs/{id}")


def store_once() -> Path:
    """The demo collection, ingested once with the default extractor (kept, reused)."""
    root = cache_dir() / "dedup-page"
    photos, db = root / "photos", root / "demo.db"
    done = root / ".ingested"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        write_samples(photos)
        subprocess.run([sys.executable, "-c", "from imgstore.cli import cli; cli()", "--db", str(db), "ingest", str(photos)],
                       check=True)
        done.write_text("")
    return db


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def timed_get(port: int, path: str, accept: str) -> tuple[float, float, int, bytes]:
    """(seconds to the first byte, seconds to the last, status, body) of one GET on a new connection."""
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
        started = time.perf_counter()
        conn.sendall(request)
        data = conn.recv(1)
        first = time.perf_counter() - started
        chunks = [data]
        while chunk := conn.recv(65536):
            chunks.append(chunk)
        last = time.perf_counter() - started
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    return first, last, int(head.split(b" ", 2)[1]), body


class Server:
    """``imgstore serve`` on a copy of the store, in a process of its own (``src``: another
    source tree put first on the import path)."""

    def __init__(self, db: Path, src: Path | None = None) -> None:
        self.port = free_port()
        env = dict(os.environ)
        if src is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from imgstore.cli import cli; cli()", "--db", str(db), "serve", "--port", str(self.port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=str(db.parent))
        deadline = time.monotonic() + 120
        while True:
            try:
                if timed_get(self.port, "/api/info", "application/json")[2] == 200:
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.1)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def fresh_copy(db: Path, name: str) -> Path:
    work = db.parent / "rounds"
    work.mkdir(exist_ok=True)
    target = work / f"{name}.db"
    for leftover in work.glob(f"{name}.db*"):
        leftover.unlink()
    shutil.rmtree(work / f"{name}.db.thumbs", ignore_errors=True)
    shutil.copy(db, target)
    return target


def one_round(db: Path, interval_s: float) -> dict[str, Any]:
    server = Server(fresh_copy(db, "now"))
    try:
        port = server.port
        first, _, status, body = timed_get(port, "/duplicates", "text/html")
        found = re.search(rb'data-job="(\d+)"', body)
        if status != 202 or found is None:
            raise RuntimeError(f"the first visit answered {status}, not the page that follows the search")
        job_id = int(found.group(1))
        during: dict[str, list[float]] = {route: [] for route in ROUTES}
        statuses: dict[str, list[int]] = {route: [] for route in ROUTES}
        progress: list[str] = []
        turn = 0
        while True:
            route = ROUTES[turn % len(ROUTES)]
            turn += 1
            accept = "text/html" if route == "/duplicates" else "application/json"
            ttfb, _, status, body = timed_get(port, route.format(id=job_id), accept)
            if route == "/api/jobs/{id}":
                job = json.loads(body)
                if job["state"] in ("done", "failed"):
                    break
                progress.append(job["message"])
            during[route].append(ttfb)
            statuses[route].append(status)
            time.sleep(interval_s)
        if job["state"] != "done":
            raise RuntimeError(f"the search failed: {job['error']}")
        groups_first, groups_last, groups_status, _ = timed_get(port, "/duplicates", "text/html")
        return {"first_visit_s": first, "search_s": job["finished_at"] - job["created_at"], "during_s": during,
                "statuses": statuses, "groups_page_first_byte_s": groups_first, "groups_page_s": groups_last,
                "groups_page_status": groups_status, "groups": job["result"]["groups"], "progress_seen": progress}
    finally:
        server.stop()


def baseline_round(db: Path, src: Path) -> dict[str, Any]:
    server = Server(fresh_copy(db, "before"), src)
    try:
        first, last, status, _ = timed_get(server.port, "/duplicates", "text/html")
        return {"first_visit_s": first, "page_s": last, "status": status}
    finally:
        server.stop()


def summary(values: list[float]) -> dict[str, float | int]:
    ordered = sorted(values)
    return {"n": len(ordered), "median_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "max_ms": 1000 * ordered[-1]}


def figures(rounds: list[dict[str, Any]], before: list[dict[str, Any]]) -> dict[str, Any]:
    """The summaries of the rounds. A request counts as made while the search ran when its
    answer says so: 202 from the page and ``/api/duplicates`` (the one sent just after the
    search ended, before the job was seen done, got the groups: 200), a running job."""
    def running(r: dict[str, Any], route: str) -> list[float]:
        return [t for t, status in zip(r["during_s"][route], r["statuses"][route])
                if status == 202 or route == "/api/jobs/{id}"]

    return {
        "first_visit": summary([r["first_visit_s"] for r in rounds]),
        "during_search": {route: summary([t for r in rounds for t in running(r, route)]) for route in ROUTES},
        "statuses_during": {route: [202] if route != "/api/jobs/{id}" else [200] for route in ROUTES},
        "search_s_median": statistics.median(r["search_s"] for r in rounds),
        "groups_page_first_byte": summary([r["groups_page_first_byte_s"] for r in rounds]),
        "groups_page_whole": summary([r["groups_page_s"] for r in rounds]),
        "before": ({"first_visit": summary([b["first_visit_s"] for b in before]),
                    "statuses": sorted({b["status"] for b in before})} if before else None),
    }


def ms(seconds_as_ms: float) -> str:
    return f"{seconds_as_ms / 1000:.2f} s" if seconds_as_ms >= 1000 else f"{seconds_as_ms:.1f} ms"


def write_report(out: dict[str, Any]) -> str:
    """benchmarks/results/dedup_page.md from the figures (also ``--report``: again, from the JSON)."""
    before = out["before"]
    lines = [
        "# Duplicates page: first byte while the search runs",
        "",
        f"`{out['command']}`: {len(out['rounds'])} rounds on the demo collection ({out['store']['images']} images, "
        "SQLite), each on a fresh copy of the store (a first search: no verdicts stored), served by `imgstore serve` "
        f"in a process of its own; {out['machine']['cpus']} CPUs, load average {out['machine']['load_avg_at_start'][0]:.1f} "
        "at the start (other work was running). Time to first byte on a new loopback connection per request; while the "
        f"search ran, one request every {out['interval_s']} s, the three routes in turn.",
        "",
        "| request | when | n | median | p90 | max | status |",
        "|---|---|---:|---:|---:|---:|---|",
    ]

    def row(name: str, when: str, s: dict[str, Any], statuses: list[int]) -> str:
        return (f"| {name} | {when} | {s['n']} | {ms(s['median_ms'])} | {ms(s['p90_ms'])} | {ms(s['max_ms'])} | "
                f"{', '.join(map(str, statuses))} |")

    lines.append(row("`GET /duplicates` (starts the search)", "first visit", out["first_visit"], [202]))
    for route in ROUTES:
        lines.append(row(f"`GET {route}`", "while the search runs", out["during_search"][route],
                         out["statuses_during"][route]))
    lines.append(row("`GET /duplicates`, the groups: first byte", "search done", out["groups_page_first_byte"], [200]))
    lines.append(row("`GET /duplicates`, the groups: whole page", "search done", out["groups_page_whole"], [200]))
    if before:
        lines.append(row(f"before ({out['baseline']}): `GET /duplicates`", "first visit, runs the search",
                         before["first_visit"], before["statuses"]))
    seen = out["rounds"][0]["progress_seen"]
    lines += [
        "",
        f"The search itself ran {out['search_s_median']:.1f} s (median of the rounds); the page that followed it said, "
        f"e.g., \"{seen[len(seen) // 2]}\" and \"{seen[-1]}\". Floor (issue 27): first byte under 200 ms while the "
        "job runs.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between requests while the search runs")
    parser.add_argument("--baseline", type=Path, help="a source tree to compare with (its page blocks for the search)")
    parser.add_argument("--baseline-label", default="the page before", help="what --baseline is, for the report")
    parser.add_argument("--report", action="store_true", help="only write the report again from the JSON")
    args = parser.parse_args()
    if args.report:
        out = json.loads((RESULTS_DIR / "dedup_page.json").read_text())
        out |= figures(out["rounds"], out["before_rounds"])
        (RESULTS_DIR / "dedup_page.json").write_text(json.dumps(out, indent=1))
        (RESULTS_DIR / "dedup_page.md").write_text(write_report(out))
        return
    db = store_once()
    with ImageStore(str(db)) as store:
        n_images = store.image_count()
    load = os.getloadavg()
    rounds, before = [], []
    for i in range(args.rounds):
        if args.baseline is not None:
            before.append(baseline_round(db, args.baseline))
            print(f"round {i + 1} before: first byte {before[-1]['first_visit_s']:.2f} s", flush=True)
        rounds.append(one_round(db, args.interval))
        r = rounds[-1]
        print(f"round {i + 1}: first visit {1000 * r['first_visit_s']:.1f} ms, search {r['search_s']:.1f} s, "
              f"{sum(len(v) for v in r['during_s'].values())} requests while it ran", flush=True)
    command = f"python benchmarks/bench_dedup_page.py --rounds {args.rounds} --interval {args.interval}"
    if args.baseline is not None:
        command += " --baseline SRC"
    out = {
        "command": command,
        "machine": {"cpus": os.cpu_count(), "load_avg_at_start": load, "python": platform.python_version()},
        "store": {"images": n_images, "collection": "imgstore.samples (demo)", "database": "sqlite"},
        "interval_s": args.interval,
        "baseline": args.baseline_label if before else None,
        **figures(rounds, before),
        "rounds": rounds,
        "before_rounds": before,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dedup_page.json").write_text(json.dumps(out, indent=1))
    report = write_report(out)
    (RESULTS_DIR / "dedup_page.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
