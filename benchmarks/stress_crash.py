"""Crash safety under kill -9, on SQLite and PostgreSQL.

    python benchmarks/stress_crash.py [--kills 20] [--db sqlite,postgresql] [--extractor color]

For each database: a folder of real images (scikit-image photos and transformed copies, plus a
few corrupt files) is ingested by a subprocess that is killed with SIGKILL at a random moment
(uniform over a clean run's duration, so kills land during decoding, model work, write
transactions and the automatic index build); a quarter of the kills hit `imgstore index create`
instead. After every kill the store must pass `ImageStore.verify()` (every image has its
features and a code in every index; nothing dangling), and the same command run again must
complete the set: no image lost, none duplicated. Writes benchmarks/results/crash.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore import ImageStore  # noqa: E402
from imgstore.samples import write_samples  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

INGEST = """
import sys
from imgstore import ImageStore
with ImageStore(sys.argv[1]) as store:
    store.ingest([sys.argv[2]], extractor=sys.argv[3], batch_size=16)
"""

INDEX = """
import sys
from imgstore import ImageStore
with ImageStore(sys.argv[1]) as store:
    store.create_index("itq", 32, extractor=sys.argv[2])
"""


def fresh_database(kind: str, tmp: Path, n: int) -> tuple[str, object]:
    if kind == "sqlite":
        return str(tmp / f"crash{n}.db"), None
    name = f"imgstore_crash_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    return PG_ADMIN.rsplit("/", 1)[0] + f"/{name}", (admin, name)


def drop(handle: object) -> None:
    if handle is None:
        return
    admin, name = handle  # type: ignore[misc]
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def run_and_kill(script: str, args: list[str], delay: float) -> bool:
    """Start the script, SIGKILL it after ``delay`` seconds; True if it was still running."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--extractor", default="color")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "photos"
        write_samples(folder)
        (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
        (folder / "notes.png").write_text("not an image")
        for kind in args.db.split(","):
            # a clean run: the expected counts and how long the job takes
            url, handle = fresh_database(kind, tmp, -1)
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", INGEST, url, str(folder), args.extractor], check=True)
            clean_s = time.perf_counter() - t0
            with ImageStore(url) as store:
                expected = store.counts().as_dict()
            drop(handle)
            runs = []
            for n in range(args.kills):
                url, handle = fresh_database(kind, tmp, n)
                try:
                    with ImageStore(url):
                        pass
                    during_index = n % 4 == 3
                    if during_index:
                        # ingest fully without an index, then kill the index build
                        subprocess.run([sys.executable, "-c", INGEST.replace("batch_size=16", "batch_size=16, auto_index=False"),
                                        url, str(folder), args.extractor], check=True)
                        delay = rng.uniform(0.05, 2.0)
                        killed = run_and_kill(INDEX, [url, args.extractor], delay)
                    else:
                        delay = rng.uniform(0.5, clean_s)
                        killed = run_and_kill(INGEST, [url, str(folder), args.extractor], delay)
                    with ImageStore(url) as store:
                        after_kill = store.verify(check_files=False)
                        partial = store.counts().as_dict()
                    subprocess.run([sys.executable, "-c", INGEST, url, str(folder), args.extractor], check=True)
                    with ImageStore(url) as store:
                        final = store.counts().as_dict()
                        report = store.verify(check_files=False)
                    run = {
                        "kill_at_s": round(delay, 2), "killed": killed, "during": "index create" if during_index else "ingest",
                        "consistent_after_kill": after_kill.ok, "images_after_kill": partial["images"],
                        "indexes_after_kill": partial["indexes"], "final_images": final["images"], "final_paths": final["paths"],
                        "lost": expected["images"] - final["images"] if final["images"] <= expected["images"] else 0,
                        "duplicated": max(0, final["images"] - expected["images"]) + max(0, final["paths"] - expected["paths"]),
                        "consistent_final": report.ok,
                    }
                    runs.append(run)
                    print(kind, json.dumps(run), flush=True)
                finally:
                    drop(handle)
            results[kind] = {
                "expected": expected, "clean_run_s": round(clean_s, 2), "runs": runs,
                "kills": sum(r["killed"] for r in runs),
                "inconsistent": sum(not (r["consistent_after_kill"] and r["consistent_final"]) for r in runs),
                "lost": sum(r["lost"] for r in runs), "duplicated": sum(r["duplicated"] for r in runs),
            }
            print(kind, {k: v for k, v in results[kind].items() if k != "runs"}, flush=True)
    out = Path(__file__).resolve().parent / "results" / "crash.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
