"""A change's cost, measured side by side: ``bench_serve.py`` (search by id over HTTP) and
``bench_search.py`` (the Hamming search paths) on a base revision and on the working tree,
interleaved round by round on the same machine, each figure the median of its rounds.

The base revision is checked out in a temporary git worktree; each side runs its own copy of
the benchmark with its own package first on ``PYTHONPATH`` (the server that ``bench_serve``
starts included), against the same kept stores (``bench_serve`` builds them once; the schema
must be the same on both sides). Machines here differ by 3x from run to run, so only the
ratios new / base of one run mean anything.

    python benchmarks/bench_before_after.py --base d9b4f85            # 3 rounds of each
    python benchmarks/bench_before_after.py --base HEAD~3 --rounds 2 --no-search --out shape

Writes benchmarks/results/OUT.json and OUT.md (default ``before_after``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True).stdout.strip()


def _run(tree: Path, script: str, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    with log.open("w") as out:
        done = subprocess.run([sys.executable, str(tree / "benchmarks" / script), *args], cwd=tree, env=env,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode:
        raise SystemExit(f"{script} failed in {tree} (exit {done.returncode}); see {log}")


def serve_rows(path: Path) -> dict[str, float]:
    """Requests/s of search by id per (database, clients) in one bench_serve result."""
    report = json.loads(path.read_text())
    return {f"{r['db']} search by id, {r['clients']} clients": float(r["rps"])
            for r in report["search"] if r["endpoint"] == "search by id" and r["variant"] == "serve"}


def search_rows(path: Path) -> dict[str, float]:
    """Queries/s per (database, method) in one bench_search result."""
    report = json.loads(path.read_text())
    return {f"{r['db']} {r['method']}": float(r["qps"]) for r in report["rows"] if r.get("db")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the revision to compare with (a commit, tag or HEAD~N)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=100_000, help="codes in the stores of both benchmarks")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per bench_serve row")
    ap.add_argument("--no-serve", action="store_true")
    ap.add_argument("--no-search", action="store_true")
    ap.add_argument("--out", default="before_after")
    args = ap.parse_args(argv)
    base_rev = _git("rev-parse", "--short", args.base)
    work = Path(tempfile.mkdtemp(prefix="imgstore-before-after-"))
    base_tree = work / "base"
    _git("worktree", "add", "--detach", str(base_tree), base_rev)
    sides = {"base": base_tree, "new": ROOT}
    figures: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
    # bench_search also rewrites its stage profiles of the largest size: keep this tree's as they are
    kept = {p: p.read_bytes() for p in RESULTS.glob("search_profile_*.txt")}
    started = time.time()
    try:
        for round_no in range(1, args.rounds + 1):
            for side, tree in sides.items():
                if not args.no_serve:
                    out = work / f"serve_{side}_{round_no}"
                    print(f"round {round_no}: bench_serve on {side}", flush=True)
                    _run(tree, "bench_serve.py", ["--n", str(args.n), "--db", "both", "--no-uploads", "--no-profile",
                                                  "--duration", str(args.duration), "--out", str(out)], work / f"{out.name}.log")
                    for key, value in serve_rows(out.with_suffix(".json")).items():
                        figures[side].setdefault(key, []).append(value)
                if not args.no_search:
                    name = f"before_after_{side}_{round_no}"
                    print(f"round {round_no}: bench_search on {side}", flush=True)
                    _run(tree, "bench_search.py", ["--sizes", str(args.n), "--db", "sqlite,postgresql", "--no-faiss",
                                                   "--out", name], work / f"{name}.log")
                    for key, value in search_rows(tree / "benchmarks" / "results" / f"{name}.json").items():
                        figures[side].setdefault(key, []).append(value)
                    for suffix in (".json", ".md", ".png"):  # per-round files: not results to keep
                        (tree / "benchmarks" / "results" / f"{name}{suffix}").unlink(missing_ok=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
        for path, data in kept.items():
            path.write_bytes(data)
    rows = []
    for key in figures["new"]:
        if key in figures["base"]:
            b, n = statistics.median(figures["base"][key]), statistics.median(figures["new"][key])
            rows.append({"row": key, "base": b, "new": n, "ratio": n / b,
                         "base_rounds": figures["base"][key], "new_rounds": figures["new"][key]})
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_before_after.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "base": base_rev, "new": _git("describe", "--always", "--dirty"), "rounds": args.rounds, "n": args.n,
        "minutes": round((time.time() - started) / 60, 1), "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Before and after: {report['base']} -> {report['new']}", "",
             f"`{report['command']}`: {args.rounds} rounds interleaved (base, new, base, ...), {args.n:,} codes, "
             f"{report['minutes']} minutes. Figures are medians of the rounds (requests/s for search by id over HTTP, "
             "queries/s for the search paths); the ratio is new / base.", "",
             "| row | base | new | new / base | base rounds | new rounds |", "|---|---:|---:|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['base']:,.0f} | {r['new']:,.0f} | {r['ratio']:.3f} | "
                     f"{', '.join(f'{v:,.0f}' for v in r['base_rounds'])} | {', '.join(f'{v:,.0f}' for v in r['new_rounds'])} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
