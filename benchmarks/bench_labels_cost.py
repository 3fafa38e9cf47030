"""What labels cost an ingest: the same ingest with labels on and off, and the time spent on them.

    python benchmarks/bench_labels_cost.py [--images 2000] [--rounds 5]

Each round ingests the first ``--images`` CIFAR-10 test JPEGs (the default extractor,
EfficientNet-Lite0 on the default runtime) into a new SQLite file twice, in alternating order:
with labels (as shipped) and without (``imgstore.labels.head_of`` returning None in this
process: no classifier head, so no label rows; this is the only change). Both in this process,
one ``ImageStore`` and one ``ingest`` each (each loads the model: the same cost on both sides).

Two figures, because a difference of a few percent drowns in a 2-core machine's noise:

- **on/off**: the median wall time of each, and their ratio (the floor: labels cost < 5%);
- **share**: the time spent inside ``labels.write_labels`` (the head's matmuls, softmax, top-k
  and the rows inserted) over the ingest's wall time, measured in the labels-on runs: a direct
  measure that noise scales, not hides.

Writes benchmarks/results/labels_cost.json and labels_cost.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from imgstore import ImageStore, labels

    import common

    paths = sorted(common.cifar_split().db_paths)[: args.images]
    shipped_head_of, shipped_write = labels.head_of, labels.write_labels
    spent = [0.0]

    def timed_write(*a: Any, **kw: Any) -> int:
        started = time.perf_counter()
        try:
            return shipped_write(*a, **kw)
        finally:
            spent[0] += time.perf_counter() - started

    labels.write_labels = timed_write  # type: ignore[assignment]
    walls: dict[str, list[float]] = {"on": [], "off": []}
    shares: list[float] = []
    n_labels = 0
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as link_dir:
        folder = Path(link_dir)
        for p in paths:  # one flat folder: the ingest walks only these files
            shutil.copy(p, folder / f"{p.parent.name}_{p.name}")
        for r in range(args.rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                labels.head_of = shipped_head_of if mode == "on" else (lambda ex: None)  # type: ignore[assignment]
                spent[0] = 0.0
                db = Path(tmp) / f"{mode}-{r}.db"
                with ImageStore(f"sqlite:///{db}") as store:
                    started = time.perf_counter()
                    summary = store.ingest([folder], auto_index=False)
                    wall = time.perf_counter() - started
                    if mode == "on":
                        n_labels = sum(c.images for c in store.label_counts())
                assert summary.added == len(paths), summary
                walls[mode].append(wall)
                if mode == "on":
                    shares.append(spent[0] / wall)
                print(f"round {r} labels {mode}: {wall:.1f} s ({len(paths) / wall:.1f} images/s)"
                      + (f", {spent[0]:.2f} s in labels" if mode == "on" else ""), flush=True)
                db.unlink()
    on, off = statistics.median(walls["on"]), statistics.median(walls["off"])
    res = {"images": len(paths), "rounds": args.rounds, "cores": len(os.sched_getaffinity(0)), "machine": platform.machine(),
           "load_avg": os.getloadavg(), "on_s": walls["on"], "off_s": walls["off"], "median_on_s": on, "median_off_s": off,
           "ratio_on_over_off": on / off, "labels_share": shares, "median_labels_share": statistics.median(shares),
           "label_rows_counted": n_labels}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "labels_cost.json").write_text(json.dumps(res, indent=2))
    md = ["# What labels cost an ingest", "",
          f"`python benchmarks/bench_labels_cost.py --images {args.images} --rounds {args.rounds}` on {res['cores']} cores "
          f"({res['machine']}), load average at the end {res['load_avg'][0]:.1f}; {len(paths):,} CIFAR-10 JPEGs into a new "
          "SQLite file per run, on and off alternating; medians.", "",
          "| | labels on | labels off |", "|---|---:|---:|",
          f"| ingest, s | {on:.1f} | {off:.1f} |",
          f"| images/s | {len(paths) / on:.1f} | {len(paths) / off:.1f} |", "",
          f"On over off: **{on / off:.3f}** (floor: under 1.05). Time inside the labels step (head, top-k, rows): "
          f"**{100 * res['median_labels_share']:.2f}%** of the ingest's wall time (rounds: "
          + ", ".join(f"{100 * s:.2f}%" for s in shares) + ")."]
    (RESULTS / "labels_cost.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
