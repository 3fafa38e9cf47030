"""Dedup that remembers: `imgstore dedup` run twice on one store, each in a new process.

    python benchmarks/bench_dedup_remember.py [--cifar-originals 410] [--distractors 1000] [--rounds 2]

The store: bench_dedup's copy-detection set (scikit-image's photos and CIFAR-10 test images, each
with its extended set of edits: rotations, crops, captions, logos, greyscale, sepia, aspect
changes..., plus distractors) at about 10,000 images, ingested once with the default extractor
and index (kept under the benchmark cache; the ingest is resumable). Each round copies that store
(no stored verdicts), runs ``imgstore dedup --format json`` (the first run: every candidate pair
gets the geometric check, its verdict is stored in ``pair_verdicts``) and then the same command
again (the second run: the verdicts and the keeper's border measures are read back, only new pairs
would be checked, no file decoded), each a new
process timed from start to exit. The two runs' groups must be identical. Medians over rounds.

Writes benchmarks/results/dedup_remember.json and dedup_remember.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_dedup  # noqa: E402
from common import RESULTS_DIR, cache_dir  # noqa: E402

IMGSTORE = [sys.executable, "-m", "imgstore.cli"]


def run(db: Path, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run([*IMGSTORE, "--db", str(db), *args], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"imgstore {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def groups_of(out: str) -> list[tuple[str, ...]]:
    data = json.loads(out)
    groups = data["groups"] if isinstance(data, dict) else data
    return sorted(tuple(sorted(int(m["image_id"]) for m in g["members"])) for g in groups)


def verdicts(db: Path) -> int:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return int(conn.execute("select count(*) from pair_verdicts").fetchone()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cifar-originals", type=int, default=410)
    parser.add_argument("--distractors", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="dedup_remember")
    args = parser.parse_args()

    work = cache_dir() / f"dedup-remember-{args.cifar_originals}-{args.distractors}"
    images = work / "images"
    base = work / "store.db"
    if not (work / "built").exists():
        shutil.rmtree(images, ignore_errors=True)
        truth = bench_dedup.build_set(images, args.cifar_originals, args.distractors)
        (work / "built").write_text(str(len(truth)))
    n_files = int((work / "built").read_text())
    if not (work / "ingested").exists():
        seconds, _ = run(base, "ingest", str(images))
        (work / "ingested").write_text(f"{seconds:.1f}")
    run(base, "db", "upgrade")  # a store ingested by an older imgstore: its schema brought up to date
    print(f"store of {n_files} images at {base} (ingest took {(work / 'ingested').read_text()} s)", flush=True)

    load_before = os.getloadavg()[0]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        db = work / f"round{r}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        shutil.copy(base, db)
        assert verdicts(db) == 0, "the base store holds no verdicts"
        first_s, first_out = run(db, "dedup", "--format", "json")
        stored = verdicts(db)
        print(f"round {r + 1}: first run {first_s:.1f} s", flush=True)
        second_s, second_out = run(db, "dedup", "--format", "json")
        same = groups_of(first_out) == groups_of(second_out)
        rounds.append({"first_s": first_s, "second_s": second_s, "ratio": first_s / second_s,
                       "verdicts_stored": stored, "groups": len(groups_of(first_out)), "identical": same})
        print(f"round {r + 1}: first {first_s:.1f} s, second {second_s:.1f} s ({first_s / second_s:.1f}x), "
              f"{stored} verdicts stored, {len(groups_of(first_out))} groups, identical: {same}", flush=True)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)

    first = statistics.median(x["first_s"] for x in rounds)
    second = statistics.median(x["second_s"] for x in rounds)
    result = {"n_images": n_files, "rounds": rounds, "first_s": first, "second_s": second, "ratio": first / second,
              "all_identical": all(x["identical"] for x in rounds), "machine": platform.machine(),
              "cores": len(os.sched_getaffinity(0)),
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    md = [
        "# Dedup that remembers: the first and second `imgstore dedup` on one store",
        "",
        f"`python benchmarks/bench_dedup_remember.py` on {result['cores']} cores: bench_dedup's copy-detection set "
        f"at {n_files} images (scikit-image photos and CIFAR-10 test images with their edits, and distractors), "
        "SQLite, default extractor and index; each run a new process (`imgstore dedup --format json`), "
        f"medians of {len(rounds)} rounds, each on a fresh copy of the store without verdicts.",
        "",
        "| run | seconds |",
        "|---|---:|",
        f"| first (every candidate pair checked, verdicts stored) | {first:.1f} |",
        f"| second (verdicts and keeper border measures read back) | {second:.1f} |",
        f"| ratio | **{first / second:.1f}x** |",
        "",
        f"Verdicts stored by the first run: {rounds[0]['verdicts_stored']}; groups: {rounds[0]['groups']}; "
        f"the two runs' groups identical in every round: {result['all_identical']}. "
        f"Load average (1 min) at the start and the end: {result['load_average'][0]} / {result['load_average'][1]} "
        "(other work on the machine slows both runs).",
    ]
    (RESULTS_DIR / f"{args.out}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
