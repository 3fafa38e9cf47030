"""What runs the CNN: PyTorch fp32 against ONNX Runtime fp32 (the default on a CPU), side by side.

    .venv/bin/python benchmarks/bench_runtime.py                 # everything (~20 min on 2 cores)
    .venv/bin/python benchmarks/bench_runtime.py --skip-map      # speed and cold starts only

Every figure compares the runtimes in the same run on the same machine, interleaved round by round
(medians): the model alone on CIFAR-10 batches; end-to-end `imgstore ingest` of a CIFAR-10 subset
and of full-size photos; decoding alone on the same cores (the ceiling of an ingest of photos);
each runtime's cold start to its first batch (time, peak memory); the cold CLI (a photo query on
each runtime, a query by id, `info`: wall and peak RSS, median of 5); CIFAR-10 mAP@ALL (float
cosine and ITQ-64) of each runtime's features and how far the two runtimes' features are apart.
Writes benchmarks/results/runtime.json and runtime.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore.decode import DecodedImage, load_image
from imgstore.evaluation import cosine_distances, evaluate_distances
from imgstore.features import get_extractor
from imgstore.features.pipeline import default_workers, extract_stream
from imgstore.hashing import make_hasher
from imgstore.hashing.bits import as_words, hamming_distances_batch

import common

log = logging.getLogger("bench_runtime")
RUNTIMES = ("torch", "onnx")
EXTRACTOR = "efficientnet-lite0"


def build(runtime: str) -> Any:
    return get_extractor(EXTRACTOR, runtime=runtime, precision="fp32")


def model_alone(extractors: dict[str, Any], batch: npt.NDArray[np.uint8], rounds: int) -> dict[str, float]:
    """Images/s of ``extract_arrays`` on one preprocessed batch, runtimes interleaved per round."""
    for ex in extractors.values():
        ex.extract_arrays(batch[:8])  # warm-up: kernels chosen, memory arenas grown
    rates: dict[str, list[float]] = {name: [] for name in extractors}
    for _ in range(rounds):
        for name, ex in extractors.items():
            start = time.perf_counter()
            ex.extract_arrays(batch)
            rates[name].append(len(batch) / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def measured(cmd: Sequence[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one command, read by GNU time: the command is started by
    that small process, so its peak is its own (a child forked from this big benchmark process
    would report this process's memory, shared at the fork, as its peak)."""
    with tempfile.NamedTemporaryFile(suffix=".time") as report:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", report.name, *cmd], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
        peak_kb = float(Path(report.name).read_text().split()[-1])
    return wall, peak_kb / 1024


def imgstore_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "imgstore.cli", *args]


def ingest_rounds(folder: Path, n_files: int, rounds: int, work: Path) -> dict[str, Any]:
    """`imgstore --runtime R ingest FOLDER` into a new SQLite file, runtimes interleaved per round."""
    walls: dict[str, list[float]] = {r: [] for r in RUNTIMES}
    for i in range(rounds):
        for runtime in RUNTIMES:
            db = work / f"ingest-{runtime}-{i}.db"
            wall, _ = measured(imgstore_cmd("--db", str(db), "--runtime", runtime, "ingest", str(folder), "--no-progress"))
            walls[runtime].append(wall)
            db.unlink()
            log.info("ingest %s round %d: %.1f s (%.1f images/s)", runtime, i, wall, n_files / wall)
    return {r: {"seconds": statistics.median(w), "images_per_s": n_files / statistics.median(w), "all_s": w}
            for r, w in walls.items()}


class _NoModel:
    """The extractor's preprocessing without its model: decoding + resizing alone, on the same threads."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.name, self.dim, self.draft_size = real.name, 1, real.draft_size
        self.preprocess_version = real.preprocess_version

    def preprocess(self, img: Any) -> Any:
        return self.real.preprocess(img)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        return np.zeros((len(batch), 1), np.float32)


def decode_alone(paths: list[Path], extractor: Any, rounds: int) -> float:
    """Images/s of decoding + preprocessing through the ingest pipeline with no model."""
    no_model = _NoModel(extractor)

    def load(p: Path) -> DecodedImage:
        return load_image(p, draft_size=no_model.draft_size)

    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = sum(len(b) for b in extract_stream(paths, load, no_model, batch_size=64))  # type: ignore[arg-type]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def cold_start(runtime: str, rounds: int) -> dict[str, float]:
    """A new process: build the extractor and run its first batch of 16; wall and peak RSS."""
    code = ("import numpy as np\nfrom imgstore.features import get_extractor\n"
            f"ex = get_extractor({EXTRACTOR!r}, runtime={runtime!r}, precision='fp32')\n"
            "ex.extract_arrays(np.zeros((16, 224, 224, 3), np.uint8))\n")
    results = [measured([sys.executable, "-c", code]) for _ in range(rounds)]
    return {"seconds": statistics.median(r[0] for r in results), "peak_rss_mb": statistics.median(r[1] for r in results)}


def cold_cli(db: Path, photo: Path, rounds: int) -> dict[str, dict[str, float]]:
    commands = {
        "photo query (onnx, default)": imgstore_cmd("--db", str(db), "query", str(photo), "-k", "10"),
        "photo query (--runtime torch)": imgstore_cmd("--db", str(db), "--runtime", "torch", "query", str(photo), "-k", "10"),
        "query by id": imgstore_cmd("--db", str(db), "query", "1", "-k", "10"),
        "info": imgstore_cmd("--db", str(db), "info"),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            runs[name].append(measured(cmd))
    return {name: {"seconds": statistics.median(r[0] for r in rs), "peak_rss_mb": statistics.median(r[1] for r in rs)}
            for name, rs in runs.items()}


def cifar_feats(runtime: str, split: common.CifarSplit) -> tuple[npt.NDArray[np.float32], float]:
    """Features of the 10,000 protocol images on ``runtime``, cached per runtime (and timed when made)."""
    ex = build(runtime)
    path = common.cache_dir() / f"features-{EXTRACTOR}-{runtime}-fp32.npz"
    if path.exists():
        with np.load(path) as z:
            if str(z["preprocess_version"]) == ex.preprocess_version:
                return z["feats"], float(z["seconds"])
    start = time.perf_counter()
    feats = common.extract_paths(ex, split.q_paths + split.db_paths)
    seconds = time.perf_counter() - start
    np.savez(path.with_suffix(".tmp.npz"), feats=feats, seconds=np.array(seconds),
             preprocess_version=np.array(ex.preprocess_version))
    path.with_suffix(".tmp.npz").replace(path)
    return feats, seconds


def retrieval(feats: npt.NDArray[np.float32], split: common.CifarSplit) -> dict[str, float]:
    n_q = len(split.q_paths)
    q, db = feats[:n_q], feats[n_q:]
    cos = evaluate_distances(cosine_distances(q, db), split.q_labels, split.db_labels)
    hasher = make_hasher("itq", n_bits=64, random_state=0).fit(db)
    ham = hamming_distances_batch(as_words(hasher.encode(q)), as_words(hasher.encode(db)))
    itq = evaluate_distances(ham, split.q_labels, split.db_labels)
    return {"mAP_float": cos.map_all, "mAP_itq64": itq.map_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ingest-rounds", type=int, default=3)
    parser.add_argument("--ingest-n", type=int, default=2000, help="CIFAR-10 images in the ingest test")
    parser.add_argument("--photos", type=int, default=60, help="full-size photos in the ingest test")
    parser.add_argument("--skip-map", action="store_true")
    parser.add_argument("--out", default="runtime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    split = common.cifar_split()
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "decode_workers": default_workers(), "python": platform.python_version()},
        "command": " ".join(["benchmarks/bench_runtime.py", *sys.argv[1:]]),
    }
    extractors = {r: build(r) for r in RUNTIMES}
    batch = np.stack([extractors["onnx"].preprocess(load_image(p).image) for p in split.db_paths[:64]])
    result["model_alone_images_per_s"] = model_alone(extractors, batch, args.rounds)
    log.info("model alone: %s", result["model_alone_images_per_s"])
    result["cold_start"] = {r: cold_start(r, 3) for r in RUNTIMES}
    log.info("cold start: %s", result["cold_start"])

    with tempfile.TemporaryDirectory(prefix="bench-runtime-") as tmp:
        work = Path(tmp)
        per_class = max(1, args.ingest_n // len(split.classes))
        cifar_dir = work / "cifar"
        chosen: list[Path] = []
        for name in split.classes:
            files = [p for p in split.db_paths if p.parent.name == name][:per_class]
            (cifar_dir / name).mkdir(parents=True)
            for p in files:
                shutil.copy(p, cifar_dir / name / p.name)
            chosen += files
        result["ingest_cifar"] = ingest_rounds(cifar_dir, len(chosen), args.ingest_rounds, work)
        result["ingest_cifar"]["n_images"] = len(chosen)

        photos = common.photo_folder(args.photos)
        photo_dir = work / "photos"
        photo_dir.mkdir()
        for p in photos:
            shutil.copy(p, photo_dir / p.name)
        result["ingest_photos"] = ingest_rounds(photo_dir, len(photos), args.ingest_rounds, work)
        result["ingest_photos"]["n_images"] = len(photos)
        result["ingest_photos"]["megapixels_median"] = statistics.median(
            load_image(p).image.width * load_image(p).image.height / 1e6 for p in photos[:10])
        result["decode_alone_photos_images_per_s"] = decode_alone(photos, extractors["onnx"], args.ingest_rounds)

        demo = work / "demo"
        subprocess.run([sys.executable, "-m", "imgstore.samples", str(demo)], check=True, capture_output=True)
        db = work / "demo.db"
        measured(imgstore_cmd("--db", str(db), "ingest", str(demo), "--no-progress"))
        result["cold_cli"] = cold_cli(db, demo / "originals" / "chelsea.png", args.rounds)
        log.info("cold CLI: %s", result["cold_cli"])

    if not args.skip_map:
        feats = {r: cifar_feats(r, split) for r in RUNTIMES}
        a, b = feats["torch"][0], feats["onnx"][0]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        result["features"] = {"cosine_torch_onnx_min": float(cos.min()), "cosine_torch_onnx_mean": float(cos.mean()),
                              "n_images": len(a)}
        result["retrieval"] = {r: {**retrieval(f, split), "extract_s_10k": s} for r, (f, s) in feats.items()}
        log.info("retrieval: %s", result["retrieval"])

    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (common.RESULTS_DIR / f"{args.out}.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    m = r["model_alone_images_per_s"]
    ic, ip = r["ingest_cifar"], r["ingest_photos"]
    lines = [
        "# Inference runtime: PyTorch fp32 vs ONNX Runtime fp32 (EfficientNet-Lite0)",
        "",
        f"`{r['command']}` on {r['machine']['cores']} cores ({r['machine']['cpu']}), every pair measured in the same "
        "run, interleaved round by round; medians.",
        "",
        "| | torch fp32 | ONNX Runtime fp32 | ratio |",
        "|---|---:|---:|---:|",
        f"| model alone, images/s (batch 64, CIFAR-10) | {m['torch']:.1f} | {m['onnx']:.1f} | {m['onnx'] / m['torch']:.2f}x |",
        f"| `imgstore ingest` of {ic['n_images']} CIFAR-10 JPEGs, images/s | {ic['torch']['images_per_s']:.1f} | "
        f"{ic['onnx']['images_per_s']:.1f} | {ic['onnx']['images_per_s'] / ic['torch']['images_per_s']:.2f}x |",
        f"| `imgstore ingest` of {ip['n_images']} photos ({ip['megapixels_median']:.1f} MP median), images/s | "
        f"{ip['torch']['images_per_s']:.2f} | {ip['onnx']['images_per_s']:.2f} | "
        f"{ip['onnx']['images_per_s'] / ip['torch']['images_per_s']:.2f}x |",
        f"| cold start to the first batch, s | {r['cold_start']['torch']['seconds']:.2f} | "
        f"{r['cold_start']['onnx']['seconds']:.2f} | |",
        f"| cold start peak RSS, MB | {r['cold_start']['torch']['peak_rss_mb']:.0f} | "
        f"{r['cold_start']['onnx']['peak_rss_mb']:.0f} | |",
    ]
    if "retrieval" in r:
        rt = r["retrieval"]
        lines += [
            f"| CIFAR-10 mAP@ALL, float cosine | {rt['torch']['mAP_float']:.4f} | {rt['onnx']['mAP_float']:.4f} | |",
            f"| CIFAR-10 mAP@ALL, ITQ-64 | {rt['torch']['mAP_itq64']:.4f} | {rt['onnx']['mAP_itq64']:.4f} | |",
        ]
    decode = r["decode_alone_photos_images_per_s"]
    lines += [
        "",
        f"Photos: decoding and preprocessing alone (the same pipeline and threads, no model) run {decode:.2f} images/s; "
        f"an ingest on ONNX Runtime reaches {ip['onnx']['images_per_s'] / decode:.2f} of that "
        f"(torch {ip['torch']['images_per_s'] / decode:.2f}).",
    ]
    if "features" in r:
        f = r["features"]
        lines += ["", f"Features of the {f['n_images']} CIFAR-10 images: cosine between the runtimes min "
                  f"{f['cosine_torch_onnx_min']:.7f}, mean {f['cosine_torch_onnx_mean']:.7f} (one feature space)."]
    lines += ["", "## Cold CLI (a new process each, median of the rounds; the ONNX export already cached)", "",
              "| command | wall, s | peak RSS, MB |", "|---|---:|---:|"]
    for name, v in r["cold_cli"].items():
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
