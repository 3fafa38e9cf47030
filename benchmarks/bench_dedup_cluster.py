"""Duplicate finding through a Dask cluster against one process: the same groups, and the time of each.

    python benchmarks/bench_dedup_cluster.py [--originals 2000] [--cluster local:2] [--rounds 1]

The set and store are bench_dedup_scale's (``build``: CIFAR-10 originals and nine edits of
each; ingested once into a SQLite store under the benchmark cache, reused, resumable; the
automatic index gives the candidates). ``ImageStore.find_duplicates`` then runs in one process
and with ``cluster=`` (candidate pairs over the index's shards on the workers,
:func:`imgstore.batch.near_pairs`, and the geometric check's comparisons there too,
``check_cluster``), with the default ``geometry=True`` and with ``geometry=False``, interleaved
(the order of the two modes alternates by round), each ``--rounds`` times; medians are reported.

Every run starts from the same state: its own copy of the built store file (no stored
verdicts, no border measures, no shards, no finished blocks) and its own process (no warm
caches; the peak RSS is that run's). A local cluster (``local:N``) is started afresh for each
run, its start timed apart from the search, so its workers' peak RSS is theirs for that run
too; with a scheduler address the workers' peaks are over their lifetimes.

Compared between the two modes, per geometry setting: the groups (as sets of frozensets of
image ids, and in full: kind, keeper, keeper path, members with distances and cosines), the
pairs inside groups, the verdicts the check stored (by pair of contents) and the check's counts.

Writes benchmarks/results/dedup_cluster.json and dedup_cluster.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from contextlib import closing
from itertools import combinations
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore import ImageStore
from imgstore.cluster import connect

import bench_dedup
from bench_dedup_scale import EDITS, build
from common import RESULTS_DIR, cache_dir

ONE = "one process"
#: The check's summary (bench_dedup.CheckLog) fields compared between the modes.
VERDICT_COUNTS = ("pairs", "copies", "different", "undecided", "unreadable", "kept")


def prepare(work: Path, n_originals: int) -> dict[str, Any]:
    """bench_dedup_scale's set and store (built and ingested once, then reused)."""
    t0 = time.perf_counter()
    truth = build(work / "set", n_originals)
    print(f"set: {len(truth):,} files ({time.perf_counter() - t0:.0f} s)", flush=True)
    with ImageStore(work / "dedup.db") as store:
        t0 = time.perf_counter()
        store.ingest([work / "set"])
        counts = store.counts()
        active = [i for i in store.indexes(with_counts=False) if i.is_active]
    print(f"ingest: {counts.images:,} images, {counts.codes:,} codes ({time.perf_counter() - t0:.0f} s this run)", flush=True)
    if not active:
        raise SystemExit("the store has no active index: the cluster's candidates need one")
    return {"files": len(truth), "images": counts.images, "codes": counts.codes,
            "index": {"method": active[0].method, "n_bits": active[0].n_bits, "n_bands": active[0].n_bands}}


# --- one run, in its own process ------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident memory since it started (``VmHWM``: ``ru_maxrss`` would count
    the RSS of the parent it was forked from, which after an ingest is larger than a search)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(db: Path, mode: str, geometry: bool, out: Path) -> None:
    """One search on ``db`` (a fresh copy): timed, its groups and stored verdicts written to ``out``."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    client = close = None
    start_s = 0.0
    if mode != ONE:
        t0 = time.perf_counter()
        client, close, _ = connect(mode)
        start_s = time.perf_counter() - t0
    phases: dict[str, list[float]] = {}
    started = time.perf_counter()

    def progress(phase: str, done: int, total: int) -> None:
        now = time.perf_counter() - started
        span = phases.setdefault(phase, [now, now])
        span[1] = now

    with ImageStore(db) as store, bench_dedup.CheckLog() as log:
        t0 = time.perf_counter()
        groups = store.find_duplicates(geometry=geometry, cluster=client, progress=progress)
        seconds = time.perf_counter() - t0
    workers_rss: list[float] = []
    if client is not None:
        workers_rss = sorted(client.run(peak_rss_mb).values())
        assert close is not None
        close()
    with closing(sqlite3.connect(db)) as conn:
        verdicts = conn.execute("SELECT sha_a, sha_b, verdict FROM pair_verdicts ORDER BY sha_a, sha_b").fetchall()
    out.write_text(json.dumps({
        "seconds": seconds, "cluster_start_seconds": start_s, "phases": phases,
        "peak_rss_mb": peak_rss_mb(), "workers_peak_rss_mb": workers_rss,
        "check": log.stats, "groups": [g.as_dict() for g in groups], "verdicts": verdicts,
    }))


def run_one(built: Path, work: Path, mode: str, geometry: bool) -> dict[str, Any]:
    """A fresh copy of the built store, then one search on it in a child process."""
    runs = work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    runs.mkdir(parents=True)
    db = runs / "run.db"
    with closing(sqlite3.connect(f"file:{built}?mode=ro", uri=True)) as src, closing(sqlite3.connect(db)) as dst:
        src.backup(dst)  # the whole store, its write-ahead log included
    out = runs / "result.json"
    cmd = [sys.executable, __file__, "--one", str(db), "--mode", mode, "--result", str(out)]
    if not geometry:
        cmd.append("--no-geometry")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} geometry={geometry} failed: {done.stderr[-3000:]}")
    return json.loads(out.read_text())  # type: ignore[no-any-return]


# --- comparing ------------------------------------------------------------------------------------


def id_sets(groups: list[dict[str, Any]]) -> set[frozenset[int]]:
    return {frozenset(m["image_id"] for m in g["members"]) for g in groups}


def inside_pairs(groups: list[dict[str, Any]]) -> set[tuple[int, int]]:
    return {p for g in groups for p in combinations(sorted(m["image_id"] for m in g["members"]), 2)}


def canonical(groups: list[dict[str, Any]], digits: int | None = None) -> list[Any]:
    """Every field of every group, in a fixed order (members by id); cosines rounded to ``digits``."""
    def cosine(value: float | None) -> float | None:
        return value if value is None or digits is None else round(value, digits)

    out = []
    for g in groups:
        members = sorted((m["image_id"], tuple(m["paths"]), m["width"], m["height"], m["distance"], cosine(m["cosine"]))
                         for m in g["members"])
        out.append((g["kind"], g["keeper"], g["keeper_path"], tuple(members)))
    return sorted(out, key=repr)


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    sa, sb = id_sets(a["groups"]), id_sets(b["groups"])
    pa, pb = inside_pairs(a["groups"]), inside_pairs(b["groups"])
    va = {(x, y): v for x, y, v in a["verdicts"]}
    vb = {(x, y): v for x, y, v in b["verdicts"]}
    # the verdict counts; images read differ by design (a cluster task reads its own images)
    check_a = {k: v for k, v in (a["check"] or {}).items() if k in VERDICT_COUNTS}
    check_b = {k: v for k, v in (b["check"] or {}).items() if k in VERDICT_COUNTS}
    return {
        "groups_identical": sa == sb,
        "groups": [len(sa), len(sb)],
        "groups_only_one_process": len(sa - sb),
        "groups_only_cluster": len(sb - sa),
        "groups_identical_in_full": canonical(a["groups"]) == canonical(b["groups"]),
        "groups_identical_in_full_cosine_6_digits": canonical(a["groups"], 6) == canonical(b["groups"], 6),
        "pairs_identical": pa == pb,
        "pairs": [len(pa), len(pb)],
        "verdicts_identical": va == vb,
        "verdicts": [len(va), len(vb)],
        "verdicts_differing": sum(1 for k in va.keys() & vb.keys() if va[k] != vb[k]),
        "verdict_counts_identical": check_a == check_b,
        "verdict_counts": [check_a, check_b],
    }


def examples(a: dict[str, Any], b: dict[str, Any], n: int = 5) -> dict[str, Any]:
    """A few groups that only one mode found (sorted ids), for a difference to be followed up."""
    sa, sb = id_sets(a["groups"]), id_sets(b["groups"])
    return {"only_one_process": [sorted(g) for g in sorted(sa - sb, key=min)[:n]],
            "only_cluster": [sorted(g) for g in sorted(sb - sa, key=min)[:n]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--originals", type=int, default=2000)
    parser.add_argument("--cluster", default="local:2", help="ADDRESS or local[:N] [default: local:2]")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--workdir", default=None,
                        help="where the set and store live [default: bench_dedup_scale's, in the cache]")
    parser.add_argument("--out", default="dedup_cluster")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=ONE, help=argparse.SUPPRESS)
    parser.add_argument("--no-geometry", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(Path(args.one), args.mode, not args.no_geometry, Path(args.result))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("sqlalchemy", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    work = Path(args.workdir) if args.workdir else cache_dir() / f"dedup-scale-{args.originals}"
    work.mkdir(parents=True, exist_ok=True)
    store = prepare(work, args.originals)
    modes = (ONE, args.cluster)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    loads: list[str] = []
    for r in range(args.rounds):
        for geometry in (True, False):
            for mode in modes if r % 2 == 0 else modes[::-1]:
                got = run_one(work / "dedup.db", work, mode, geometry)
                loads.append(Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else "")
                runs.setdefault(f"geometry={geometry}", {}).setdefault(mode, []).append(got)
                print(f"round {r + 1}, geometry={geometry}, {mode}: {got['seconds']:.1f} s, {len(got['groups']):,} groups, "
                      f"check {got['check']}, load {loads[-1]}", flush=True)
    result: dict[str, Any] = {"store": store, "edits": list(EDITS), "cluster": args.cluster, "rounds": args.rounds,
                              "cores": len(os.sched_getaffinity(0)), "loadavg_after_each_run": loads, "settings": {}}
    for setting, by_mode in runs.items():
        first = {mode: got[0] for mode, got in by_mode.items()}
        comparisons = [compare(by_mode[ONE][i], by_mode[args.cluster][i]) for i in range(args.rounds)]
        same_mode = {mode: all(compare(got[0], g)["groups_identical_in_full"] for g in got[1:]) for mode, got in by_mode.items()}
        result["settings"][setting] = {
            "seconds": {mode: [round(g["seconds"], 1) for g in got] for mode, got in by_mode.items()},
            "median_seconds": {mode: round(statistics.median(g["seconds"] for g in got), 1) for mode, got in by_mode.items()},
            "cluster_start_seconds": [round(g["cluster_start_seconds"], 1) for g in by_mode[args.cluster]],
            "phases_first_run": {mode: {p: [round(t, 1) for t in span] for p, span in g["phases"].items()}
                                 for mode, g in first.items()},
            "peak_rss_mb": {mode: [round(g["peak_rss_mb"]) for g in got] for mode, got in by_mode.items()},
            "workers_peak_rss_mb": [[round(x) for x in g["workers_peak_rss_mb"]] for g in by_mode[args.cluster]],
            "check": {mode: g["check"] for mode, g in first.items()},
            "comparison_by_round": comparisons,
            "each_mode_repeats_itself": same_mode,
            "differences": examples(first[ONE], first[args.cluster]),
        }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"Duplicate finding over {store['images']:,} images ({args.originals:,} CIFAR-10 originals and {len(EDITS)} edits "
             f"each; bench_dedup_scale's set), SQLite, default extractor and index ({store['index']['method']}, "
             f"{store['index']['n_bits']} bits, {store['index']['n_bands']} bands), in one process and through `{args.cluster}` "
             f"(candidates and the geometric check on its workers); {result['cores']} cores shared with other work; "
             f"`python benchmarks/bench_dedup_cluster.py --originals {args.originals} --cluster {args.cluster} "
             f"--rounds {args.rounds}`. Each run: a fresh copy of the store, its own process, a fresh cluster "
             "(its start not in the time).", "",
             "| settings | one process s | cluster s | cluster start s | groups identical | in full | pairs identical "
             "| verdicts identical | verdict counts identical | groups | pairs | verdicts stored | peak RSS MB (one / client) "
             "| workers' peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, s in result["settings"].items():
        c = s["comparison_by_round"]
        lines.append(
            f"| {setting} | {s['median_seconds'][ONE]} | {s['median_seconds'][args.cluster]} "
            f"| {statistics.median(s['cluster_start_seconds'])} | {all(x['groups_identical'] for x in c)} "
            f"| {all(x['groups_identical_in_full'] for x in c)} | {all(x['pairs_identical'] for x in c)} "
            f"| {all(x['verdicts_identical'] for x in c)} | {all(x['verdict_counts_identical'] for x in c)} "
            f"| {c[0]['groups'][0]:,} | {c[0]['pairs'][0]:,} | {c[0]['verdicts'][0]:,} "
            f"| {max(s['peak_rss_mb'][ONE])} / {max(s['peak_rss_mb'][args.cluster])} "
            f"| {', '.join(str(x) for x in s['workers_peak_rss_mb'][0])} |")
    times = {k: v["seconds"] for k, v in result["settings"].items()}
    checks = {k: v["check"][ONE] for k, v in result["settings"].items()}
    lines += ["", f"Medians of {args.rounds} round(s); every time: {json.dumps(times)}.",
              f"Check counts (one process, first round): {json.dumps(checks)}.",
              f"Load average after each run: {'; '.join(loads)}.",
              "", "Where the time went (first round; seconds from the search's start to the first and the last "
              "progress report of each phase: the check runs inside the candidate and layout phases and again in "
              "grouping):", ""]
    for setting, s in result["settings"].items():
        for mode, spans in s["phases_first_run"].items():
            lines.append(f"- {setting}, {mode}: " + ", ".join(f"{p} {a}-{b}" for p, (a, b) in spans.items()))
    (RESULTS_DIR / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
