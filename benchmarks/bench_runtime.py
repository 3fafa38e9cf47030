"""What runs the CNN, and in what precision: EfficientNet-Lite0 in fp32 on PyTorch ("torch") and on
ONNX Runtime ("onnx", the default on a CPU), and efficientnet-lite0-int8 on ONNX Runtime ("int8",
a feature space of its own), side by side.

    .venv/bin/python benchmarks/bench_runtime.py                         # everything (~30 min on 2 cores)
    .venv/bin/python benchmarks/bench_runtime.py --skip-map              # speed and cold starts only
    .venv/bin/python benchmarks/bench_runtime.py --contenders onnx int8  # some of the contenders only

Every figure compares the contenders in the same run on the same machine, interleaved round by
round (medians): the model alone on CIFAR-10 batches; end-to-end `imgstore ingest` of a CIFAR-10
subset and of full-size photos (`imgstore --runtime R ingest [--extractor efficientnet-lite0-int8]
FOLDER`); decoding alone on the same cores (the ceiling of an ingest of photos); each contender's
cold start to its first batch (time, peak memory); the cold CLI (a photo query on each runtime of a
store ingested with efficientnet-lite0, a photo query of a store ingested with the int8 extractor, a
query by id, `info`: wall and peak RSS, median of the rounds); CIFAR-10 mAP@ALL (float cosine and
ITQ-64) of each contender's features, how far the two fp32 runtimes' features are apart (one feature
space) and how far int8's are from fp32's (its own feature space). The machine's int8 dot-product
flags and its 1-minute load average at the start and the end are recorded beside the figures.
Writes benchmarks/results/runtime.json and runtime.md (--out chooses the name).
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
from imgstore.features.int8 import cpu_int8_flags, exact_int8_cpu
from imgstore.features.pipeline import default_workers, extract_stream
from imgstore.hashing import make_hasher
from imgstore.hashing.bits import as_words, hamming_distances_batch

import common

log = logging.getLogger("bench_runtime")
EXTRACTOR = "efficientnet-lite0"
INT8 = "efficientnet-lite0-int8"
#: contender -> (extractor, runtime): the fp32 model on each runtime, and the int8 model (its own feature space)
CONTENDERS: dict[str, tuple[str, str]] = {"torch": (EXTRACTOR, "torch"), "bf16": (EXTRACTOR, "torch"),
                                          "onnx": (EXTRACTOR, "onnx"), "int8": (INT8, "onnx")}
#: the precision asked of each (None: the extractor's own, int8); every command of a contender
#: runs with IMGSTORE_PRECISION set to it, so "torch" is fp32 even on a CPU where auto means bf16
PRECISIONS: dict[str, str | None] = {"torch": "fp32", "bf16": "bf16", "onnx": "fp32", "int8": None}
#: measured unless --contenders says otherwise (bf16: where the CPU computes it natively)
DEFAULT_CONTENDERS = ("torch", "onnx", "int8")
#: how the report names each contender's column
LABELS = {"torch": "torch fp32", "bf16": "torch bf16", "onnx": "ONNX Runtime fp32", "int8": "ONNX Runtime int8"}
#: the ratio columns of the report: (numerator, denominator)
RATIOS = (("bf16", "torch"), ("onnx", "torch"), ("int8", "torch"), ("int8", "onnx"))
#: issue 27's floors for the default runtime (reported for int8 too): a CIFAR-10 ingest at least this many times torch fp32's ...
FLOOR_CIFAR_VS_TORCH = 2.5
#: ... and an ingest of photos at least this fraction of decoding alone
FLOOR_PHOTOS_VS_DECODE = 0.8


def build(contender: str) -> Any:
    extractor, runtime = CONTENDERS[contender]
    precision = PRECISIONS[contender]
    return get_extractor(extractor, runtime=runtime, **({"precision": precision} if precision else {}))


def model_alone(extractors: dict[str, Any], batch: npt.NDArray[np.uint8], rounds: int) -> dict[str, float]:
    """Images/s of ``extract_arrays`` on one preprocessed batch, contenders interleaved per round."""
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


def precision_env(contender: str) -> dict[str, str]:
    """IMGSTORE_PRECISION for a command of ``contender`` (none for int8, whose precision is its own)."""
    precision = PRECISIONS[contender]
    return {"IMGSTORE_PRECISION": precision} if precision else {}


def ingest_cmd(db: Path, contender: str, folder: Path) -> list[str]:
    """`imgstore --db DB --runtime R ingest [--extractor NAME] FOLDER --no-progress` for ``contender``
    (--extractor only for another extractor than the default, efficientnet-lite0)."""
    extractor, runtime = CONTENDERS[contender]
    chosen = ["--extractor", extractor] if extractor != EXTRACTOR else []
    return imgstore_cmd("--db", str(db), "--runtime", runtime, "ingest", *chosen, str(folder), "--no-progress")


def ingest_rounds(folder: Path, n_files: int, rounds: int, work: Path, contenders: Sequence[str]) -> dict[str, Any]:
    """`imgstore ingest FOLDER` of each contender into a new SQLite file, contenders interleaved per round."""
    walls: dict[str, list[float]] = {c: [] for c in contenders}
    for i in range(rounds):
        for contender in contenders:
            db = work / f"ingest-{contender}-{i}.db"
            wall, _ = measured(ingest_cmd(db, contender, folder), env=precision_env(contender))
            walls[contender].append(wall)
            db.unlink()
            log.info("ingest %s round %d: %.1f s (%.1f images/s)", contender, i, wall, n_files / wall)
    return {c: {"seconds": statistics.median(w), "images_per_s": n_files / statistics.median(w), "all_s": w}
            for c, w in walls.items()}


class _NoModel:
    """The extractor's preprocessing without its model: decoding + resizing alone, on the same threads."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.name, self.dim, self.draft_size, self.thumbnail_size = real.name, 1, real.draft_size, real.thumbnail_size
        self.preprocess_version = real.preprocess_version

    def preprocess(self, img: Any) -> Any:
        return self.real.preprocess(img)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        return np.zeros((len(batch), 1), np.float32)


def decode_alone(paths: list[Path], extractor: Any, rounds: int) -> float:
    """Images/s of decoding + preprocessing through the ingest pipeline with no model."""
    no_model = _NoModel(extractor)

    def load(p: Path) -> DecodedImage:
        return load_image(p, draft_size=no_model.draft_size, thumbnail_size=no_model.thumbnail_size)

    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        n = sum(len(b) for b in extract_stream(paths, load, no_model, batch_size=64))  # type: ignore[arg-type]
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def cold_start(contender: str, rounds: int) -> dict[str, float]:
    """A new process: build the contender's extractor (its model already cached) and run its first
    batch of 16; wall and peak RSS."""
    extractor, runtime = CONTENDERS[contender]
    precision = PRECISIONS[contender]
    options = f"runtime={runtime!r}" + (f", precision={precision!r}" if precision is not None else "")
    code = ("import numpy as np\nfrom imgstore.features import get_extractor\n"
            f"ex = get_extractor({extractor!r}, {options})\n"
            "ex.extract_arrays(np.zeros((16, 224, 224, 3), np.uint8))\n")
    results = [measured([sys.executable, "-c", code]) for _ in range(rounds)]
    return {"seconds": statistics.median(r[0] for r in results), "peak_rss_mb": statistics.median(r[1] for r in results)}


def cold_cli(db: Path, db_int8: Path | None, photo: Path, rounds: int,
             contenders: Sequence[str]) -> dict[str, dict[str, float]]:
    """Wall and peak RSS of new CLI processes, commands interleaved per round: a photo query of
    ``db`` (ingested with efficientnet-lite0) on each fp32 runtime chosen, a photo query of
    ``db_int8`` (ingested with the int8 extractor, which the query then uses by itself), a query by
    id and `info` of ``db``."""
    commands: dict[str, list[str]] = {}
    if "onnx" in contenders:
        commands["photo query (onnx, default)"] = imgstore_cmd("--db", str(db), "query", str(photo), "-k", "10")
    if "torch" in contenders:
        commands["photo query (--runtime torch)"] = imgstore_cmd("--db", str(db), "--runtime", "torch", "query",
                                                                 str(photo), "-k", "10")
    if db_int8 is not None:
        commands["photo query (int8 store)"] = imgstore_cmd("--db", str(db_int8), "query", str(photo), "-k", "10")
    commands["query by id"] = imgstore_cmd("--db", str(db), "query", "1", "-k", "10")
    commands["info"] = imgstore_cmd("--db", str(db), "info")
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            runs[name].append(measured(cmd))
    return {name: {"seconds": statistics.median(r[0] for r in rs), "peak_rss_mb": statistics.median(r[1] for r in rs)}
            for name, rs in runs.items()}


def cifar_feats(contender: str, split: common.CifarSplit) -> tuple[npt.NDArray[np.float32], float]:
    """Features of the 10,000 protocol images by ``contender``, cached per contender (and timed
    when made); the int8 contender's cache also holds its model's file name, which changes with its
    ranges, quantisation settings and onnxruntime version."""
    extractor, runtime = CONTENDERS[contender]
    precision = PRECISIONS[contender]
    ex = build(contender)
    model = Path(ex.path).name if precision is None else ""
    path = common.cache_dir() / f"features-{extractor}-{runtime}{'-' + precision if precision else ''}.npz"
    if path.exists():
        with np.load(path) as z:
            if (str(z["preprocess_version"]) == ex.preprocess_version
                    and (str(z["model"]) if "model" in z else "") == model):
                return z["feats"], float(z["seconds"])
    start = time.perf_counter()
    feats = common.extract_paths(ex, split.q_paths + split.db_paths)
    seconds = time.perf_counter() - start
    np.savez(path.with_suffix(".tmp.npz"), feats=feats, seconds=np.array(seconds),
             preprocess_version=np.array(ex.preprocess_version), model=np.array(model))
    path.with_suffix(".tmp.npz").replace(path)
    return feats, seconds


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> dict[str, float]:
    """Min and mean cosine between the rows of ``a`` and ``b`` (the same images' features)."""
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"min": float(cos.min()), "mean": float(cos.mean())}


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
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS), default=list(DEFAULT_CONTENDERS),
                        metavar="NAME", help=f"which to measure, of {', '.join(CONTENDERS)} "
                             f"[default: {' '.join(DEFAULT_CONTENDERS)}]")
    parser.add_argument("--skip-map", action="store_true")
    parser.add_argument("--out", default="runtime")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    contenders = [c for c in CONTENDERS if c in args.contenders]  # the table's order, each once
    if "int8" in contenders and exact_int8_cpu() is False:  # the model is refused on such a CPU (UnsupportedCpuError)
        if args.contenders != list(DEFAULT_CONTENDERS):
            parser.error("int8: this CPU has no int8 dot-product instructions (VNNI, AMX): imgstore refuses the model here")
        log.info("int8 left out: this CPU has no int8 dot-product instructions (VNNI, AMX), where imgstore refuses it")
        contenders.remove("int8")

    split = common.cifar_split()
    result: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "decode_workers": default_workers(), "python": platform.python_version(),
                    "cpu_int8_flags": cpu_int8_flags(), "load_1min_start": os.getloadavg()[0]},
        "command": " ".join(["benchmarks/bench_runtime.py", *sys.argv[1:]]),
        "contenders": {c: {"extractor": CONTENDERS[c][0], "runtime": CONTENDERS[c][1],
                           "precision": PRECISIONS[c] or "int8"} for c in contenders},
    }
    # built here first, so that any model missing from the cache is made (exported, quantised)
    # before anything is timed: the cold starts and the CLI find every model cached
    extractors = {c: build(c) for c in contenders}
    first = extractors[contenders[0]]  # every contender preprocesses alike (224 pixels, the same resizing)
    batch = np.stack([first.preprocess(load_image(p).image) for p in split.db_paths[:64]])
    result["model_alone_images_per_s"] = model_alone(extractors, batch, args.rounds)
    log.info("model alone: %s", result["model_alone_images_per_s"])
    result["cold_start"] = {c: cold_start(c, 3) for c in contenders}
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
        result["ingest_cifar"] = ingest_rounds(cifar_dir, len(chosen), args.ingest_rounds, work, contenders)
        result["ingest_cifar"]["n_images"] = len(chosen)

        photos = common.photo_folder(args.photos)
        photo_dir = work / "photos"
        photo_dir.mkdir()
        for p in photos:
            shutil.copy(p, photo_dir / p.name)
        result["ingest_photos"] = ingest_rounds(photo_dir, len(photos), args.ingest_rounds, work, contenders)
        result["ingest_photos"]["n_images"] = len(photos)
        result["ingest_photos"]["megapixels_median"] = statistics.median(
            load_image(p).image.width * load_image(p).image.height / 1e6 for p in photos[:10])
        result["decode_alone_photos_images_per_s"] = decode_alone(photos, first, args.ingest_rounds)

        demo = work / "demo"
        subprocess.run([sys.executable, "-m", "imgstore.samples", str(demo)], check=True, capture_output=True)
        db = work / "demo.db"
        measured(imgstore_cmd("--db", str(db), "ingest", str(demo), "--no-progress"))
        db_int8: Path | None = None
        if "int8" in contenders:
            db_int8 = work / "demo-int8.db"
            measured(ingest_cmd(db_int8, "int8", demo))
        result["cold_cli"] = cold_cli(db, db_int8, demo / "originals" / "chelsea.png", args.rounds, contenders)
        log.info("cold CLI: %s", result["cold_cli"])

    if not args.skip_map:
        feats = {c: cifar_feats(c, split) for c in contenders}
        n_images = len(next(iter(feats.values()))[0])
        result["features"] = {"n_images": n_images}
        if "torch" in feats and "onnx" in feats:
            cos = cosines(feats["torch"][0], feats["onnx"][0])
            result["features"] |= {"cosine_torch_onnx_min": cos["min"], "cosine_torch_onnx_mean": cos["mean"]}
        if "onnx" in feats and "int8" in feats:
            cos = cosines(feats["onnx"][0], feats["int8"][0])
            result["features"] |= {"cosine_onnx_int8_min": cos["min"], "cosine_onnx_int8_mean": cos["mean"]}
        result["retrieval"] = {c: {**retrieval(f, split), "extract_s_10k": s} for c, (f, s) in feats.items()}
        log.info("retrieval: %s", result["retrieval"])

    result["machine"]["load_1min_end"] = os.getloadavg()[0]
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (common.RESULTS_DIR / f"{args.out}.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    contenders = [c for c in CONTENDERS if c in r["model_alone_images_per_s"]]
    ratios = [(a, b) for a, b in RATIOS if a in contenders and b in contenders]
    m = r["model_alone_images_per_s"]
    ic, ip = r["ingest_cifar"], r["ingest_photos"]
    machine = r["machine"]
    flags = machine["cpu_int8_flags"]
    flag_words = "unknown" if flags is None else (", ".join(flags) or "none")

    def row(label: str, values: dict[str, float], fmt: str, with_ratios: bool = True) -> str:
        cells = [format(values[c], fmt) for c in contenders]
        cells += [f"{values[a] / values[b]:.2f}x" if with_ratios else "" for a, b in ratios]
        return f"| {label} | " + " | ".join(cells) + " |"

    lines = [
        "# Inference runtime and precision: PyTorch fp32, ONNX Runtime fp32 and int8 (EfficientNet-Lite0)",
        "",
        f"`{r['command']}` on {machine['cores']} cores ({machine['cpu']}; int8 dot-product flags: {flag_words}), "
        "every contender measured in the same run, interleaved round by round; medians. Load average (1 min) "
        f"{machine['load_1min_start']:.2f} at the start, {machine['load_1min_end']:.2f} at the end.",
        "",
        "| | " + " | ".join(LABELS[c] for c in contenders) + "".join(f" | {a}/{b}" for a, b in ratios) + " |",
        "|---|" + "---:|" * (len(contenders) + len(ratios)),
        row("model alone, images/s (batch 64, CIFAR-10)", m, ".1f"),
        row(f"`imgstore ingest` of {ic['n_images']} CIFAR-10 JPEGs, images/s",
            {c: ic[c]["images_per_s"] for c in contenders}, ".1f"),
        row(f"`imgstore ingest` of {ip['n_images']} photos ({ip['megapixels_median']:.1f} MP median), images/s",
            {c: ip[c]["images_per_s"] for c in contenders}, ".2f"),
        row("cold start to the first batch, s", {c: r["cold_start"][c]["seconds"] for c in contenders}, ".2f",
            with_ratios=False),
        row("cold start peak RSS, MB", {c: r["cold_start"][c]["peak_rss_mb"] for c in contenders}, ".0f",
            with_ratios=False),
    ]
    if "retrieval" in r:
        rt = r["retrieval"]
        lines += [
            row("CIFAR-10 mAP@ALL, float cosine", {c: rt[c]["mAP_float"] for c in contenders}, ".4f", with_ratios=False),
            row("CIFAR-10 mAP@ALL, ITQ-64", {c: rt[c]["mAP_itq64"] for c in contenders}, ".4f", with_ratios=False),
        ]
    decode = r["decode_alone_photos_images_per_s"]
    reached = ", ".join(f"{LABELS[c]} {ip[c]['images_per_s'] / decode:.2f}" for c in contenders)
    lines += [
        "",
        f"Photos: decoding and preprocessing alone (the same pipeline and threads, no model) run {decode:.2f} images/s; "
        f"an ingest reaches, of that: {reached}.",
    ]
    floors = []
    for c in (c for c in ("onnx", "int8") if c in contenders):
        parts = []
        if "torch" in contenders:
            x = ic[c]["images_per_s"] / ic["torch"]["images_per_s"]
            parts.append(f"CIFAR-10 ingest {x:.2f}x torch fp32 ({'met' if x >= FLOOR_CIFAR_VS_TORCH else 'not met'})")
        share = ip[c]["images_per_s"] / decode
        parts.append(f"photos {share:.2f} of decoding alone ({'met' if share >= FLOOR_PHOTOS_VS_DECODE else 'not met'})")
        floors.append(f"{LABELS[c]}{' (the default)' if c == 'onnx' else ''}: " + ", ".join(parts))
    if floors:
        lines += ["", f"Issue 27's floors (the default's ingest of CIFAR-10 >= {FLOOR_CIFAR_VS_TORCH}x torch fp32's; "
                  f"of photos >= {FLOOR_PHOTOS_VS_DECODE} of decoding alone): " + "; ".join(floors) + "."]
    if "features" in r:
        f = r["features"]
        if "cosine_torch_onnx_min" in f:
            lines += ["", f"Features of the {f['n_images']} CIFAR-10 images: cosine between the fp32 runtimes min "
                      f"{f['cosine_torch_onnx_min']:.7f}, mean {f['cosine_torch_onnx_mean']:.7f} (one feature space)."]
        if "cosine_onnx_int8_min" in f:
            lines += ["", f"Features of the {f['n_images']} CIFAR-10 images: cosine between ONNX Runtime fp32 and int8 "
                      f"min {f['cosine_onnx_int8_min']:.4f}, mean {f['cosine_onnx_int8_mean']:.4f} (int8 is its own "
                      "feature space: a store keeps its features apart from fp32's)."]
    lines += ["", "## Cold CLI (a new process each, median of the rounds; every model already cached)", "",
              "| command | wall, s | peak RSS, MB |", "|---|---:|---:|"]
    for name, v in r["cold_cli"].items():
        lines.append(f"| {name} | {v['seconds']:.2f} | {v['peak_rss_mb']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
