"""Ingest throughput: images/second into SQLite and PostgreSQL next to the model-alone rate.

    python benchmarks/bench_ingest.py [--limit N] [--db sqlite,postgresql] [--extractor NAME]

Sets: the CIFAR-10 test images (10,000 small JPEGs; ``--limit`` takes the first N by path) and
a folder of 100 full-size photos (2000-4000 px JPEGs). Model alone = ``extract_arrays`` on
already-preprocessed batches (median over batches), measured in the same run. Ingest = the
whole job (walk, read, hash, decode, preprocess, model, database writes, index codes) through
``ImageStore.ingest``, batch 64. Writes benchmarks/results/ingest.json and ingest.md.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS_DIR, cifar_root, photo_folder  # noqa: E402
from imgstore import ImageStore  # noqa: E402
from imgstore.decode import load_image  # noqa: E402
from imgstore.features import get_extractor  # noqa: E402

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def model_alone_rate(extractor, paths: list[Path], batch_size: int = 64, repeats: int = 5) -> float:
    """Images/second of the model on preprocessed batches (decode excluded), median of repeats."""
    arrays = [extractor.preprocess(load_image(p, draft_size=extractor.draft_size).image) for p in paths[:batch_size]]
    batch = np.stack(arrays)
    extractor.extract_arrays(batch)  # warm-up
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        extractor.extract_arrays(batch)
        rates.append(len(batch) / (time.perf_counter() - t0))
    return statistics.median(rates)


def link_folder(files: list[Path], folder: Path) -> Path:
    """``folder/<parent name>/<file name>`` for each file, hard-linked (copied across devices):
    a folder of symlinks would be skipped, ingest does not follow them."""
    for f in files:
        target = folder / f.parent.name / f.name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.hardlink_to(f)
        except OSError:
            target.write_bytes(f.read_bytes())
    return folder


class PgDatabase:
    def __init__(self) -> None:
        self.name = f"imgstore_bench_{secrets.token_hex(4)}"
        self.admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{self.name}"'))
        self.url = PG_ADMIN.rsplit("/", 1)[0] + f"/{self.name}"

    def drop(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self.admin.dispose()


def ingest_rate(db: str, folder: Path | list[Path], extractor: str) -> dict[str, float]:
    with ImageStore(db) as store:
        roots = folder if isinstance(folder, list) else [folder]
        summary = store.ingest(roots, extractor=extractor, batch_size=64)
    return {"added": summary.added, "failed": summary.failed, "seconds": summary.elapsed_s, "images_per_s": summary.images_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="use only the first N CIFAR files")
    parser.add_argument("--db", default="sqlite,postgresql")
    parser.add_argument("--extractor", default="efficientnet-lite0")
    parser.add_argument("--photos", type=int, default=100)
    args = parser.parse_args()

    extractor = get_extractor(args.extractor)
    cifar = sorted(cifar_root().rglob("*.jpg"))
    if args.limit:
        cifar = cifar[: args.limit]
    photos = photo_folder(args.photos)
    rows = []
    for set_name, files in (("cifar10-test", cifar), ("full-size photos", photos)):
        alone = model_alone_rate(extractor, files)
        with tempfile.TemporaryDirectory() as tmp:
            folder = link_folder(files, Path(tmp) / "set")
            for backend in args.db.split(","):
                pg = None
                if backend == "sqlite":
                    url = str(Path(tmp) / "bench.db")
                else:
                    pg = PgDatabase()
                    url = pg.url
                try:
                    result = ingest_rate(url, folder, args.extractor)
                finally:
                    if pg is not None:
                        pg.drop()
                row = {"set": set_name, "files": len(files), "database": backend, "model_alone_per_s": round(alone, 1),
                       **{k: round(v, 2) for k, v in result.items()}, "ratio": round(result["images_per_s"] / alone, 3)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "ingest.json").write_text(json.dumps({"extractor": args.extractor, "rows": rows}, indent=2))
    lines = ["| set | files | database | model alone img/s | ingest img/s | ratio |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['set']} | {r['files']} | {r['database']} | {r['model_alone_per_s']} | {r['images_per_s']} | {r['ratio']:.2f} |" for r in rows]
    (RESULTS_DIR / "ingest.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
