"""Int8 EfficientNet-Lite0 on ONNX Runtime: which static quantisation keeps CIFAR-10 mAP within
0.01 of fp32 (issue 27: an int8 model is offered only as its own feature space, and only then),
and how much faster than the fp32 model it runs.

    .venv/bin/python benchmarks/bench_int8.py --rounds 9       # everything (32 min on 2 cores at load 4-6)
    .venv/bin/python benchmarks/bench_int8.py --only int8-channel-percentile --calibration-offset 50 \
        --out /tmp/int8-other-calibration                       # one variant, calibrated on other images
    .venv/bin/python benchmarks/bench_int8.py --subset 1000 --calibration-n 50 --rounds 1 --out /tmp/x   # a smoke test

The fp32 model is the one imgstore exports and caches (built through ``get_extractor``, never
exported here). Its int8 variants are made with ``onnxruntime.quantization`` (static, QDQ format,
after ``quant_pre_process``) and written under the benchmark cache
(``~/.cache/imgstore-bench/int8/``, IMGSTORE_BENCH_CACHE elsewhere), never into the repository:

- per-tensor weights, MinMax calibration, uint8 activations (U8S8): the earlier experiment's model;
- per-channel weights;
- per-channel with the stem (first convolution) and the head (last convolution, pooling, classifier)
  left in fp32;
- the same with 7-bit weights (``reduce_range``, for CPUs without VNNI) and with int8 activations (S8S8);
- both per-channel U8S8 variants again with Percentile and Entropy calibration instead of MinMax
  (see ``activation_ranges`` for how they are set).

Calibration uses CIFAR-10 *database* images (the first ``--calibration-n / 10`` of each class's
database part), never the protocol's queries, preprocessed exactly as the extractor does (uint8
NHWC, ``extractor.preprocess`` of ``load_image`` with the extractor's JPEG draft size, the
ingest pipeline's own steps). For every variant, in the same run: model-alone images/s at batch
16 and 64, interleaved round by round with the fp32 model (medians, ``bench_runtime.model_alone``);
feature cosine to fp32 on the 10,000 protocol images; CIFAR-10 mAP@ALL with float cosine and
ITQ-64 (``bench_runtime.retrieval``), and their differences to fp32's.
Writes benchmarks/results/int8.json and int8.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    create_calibrator,
    quant_pre_process,
    quantize_static,
)
from onnxruntime.quantization.calibrate import save_tensors_data
from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore.decode import load_image
from imgstore.features import get_extractor
from imgstore.features.onnxrt import INPUT_NAME, OnnxExtractor, open_session, thread_count

import bench_runtime
import common

log = logging.getLogger("bench_int8")
EXTRACTOR = "efficientnet-lite0"
#: the issue's bar: an int8 model is offered only if its mAP is within this of fp32's
MAX_MAP_DELTA = 0.01
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
CALIBRATIONS = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy}


@dataclass(frozen=True)
class Variant:
    """One int8 model: how its weights and activations are quantised and which nodes stay fp32."""

    name: str
    per_channel: bool
    reduce_range: bool = False
    activations: str = "uint8"  # "uint8": U8S8 (uint8 activations, int8 weights); "int8": S8S8
    fp32_ends: bool = False  # the stem convolution and everything from the last convolution on stay fp32
    calibration: str = "minmax"  # a key of CALIBRATIONS

    def describe(self) -> str:
        parts = ["per-channel" if self.per_channel else "per-tensor", "S8S8" if self.activations == "int8" else "U8S8"]
        if self.reduce_range:
            parts.append("reduce_range (7-bit weights)")
        if self.fp32_ends:
            parts.append("stem + head fp32")
        parts.append(f"{self.calibration} calibration")
        return ", ".join(parts)


FIRST_VARIANTS = (
    Variant("int8-tensor", per_channel=False),
    Variant("int8-channel", per_channel=True),
    Variant("int8-channel-ends", per_channel=True, fp32_ends=True),
    Variant("int8-channel-ends-rr", per_channel=True, fp32_ends=True, reduce_range=True),
    Variant("int8-channel-ends-s8s8", per_channel=True, fp32_ends=True, activations="int8"),
)
#: the variants the other calibration methods are tried on: the per-channel U8S8 ones, the kind
#: ONNX Runtime recommends for x86 (on a VNNI CPU reduce_range only loses precision, and S8S8
#: runs slower than fp32 on x86: both measured in the first quick runs here)
CALIBRATION_CANDIDATES = ("int8-channel", "int8-channel-ends")


class _Calibration(CalibrationDataReader):  # type: ignore[misc]
    """Feeds the calibration pixels (n, s, s, 3) uint8 in batches; ``set_range`` lets the
    quantiser collect a few batches at a time (CalibStridedMinMax), so the intermediate tensors of
    every calibration image never sit in memory together."""

    def __init__(self, pixels: npt.NDArray[np.uint8], batch_size: int) -> None:
        self.batches = [pixels[i:i + batch_size] for i in range(0, len(pixels), batch_size)]
        self.set_range(0, len(self.batches))

    def get_next(self) -> dict[str, npt.NDArray[np.uint8]] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: np.ascontiguousarray(batch)}

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._batches = iter(self.batches[start_index:end_index])


class _Model:
    """An ONNX model file on the library's own session options (threads, no spinning): the
    ``extract_arrays`` of :class:`OnnxExtractor` without its preprocessing."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._session = open_session(path)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        arr = np.ascontiguousarray(batch, dtype=np.uint8)
        return np.asarray(self._session.run(["features"], {INPUT_NAME: arr})[0], dtype=np.float32)


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def cpu_info() -> dict[str, Any]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": model, "cores": os.cpu_count(), "flags": {f: f in flags for f in CPU_FLAGS}}


def protocol_pixels(ex: OnnxExtractor, split: common.CifarSplit) -> npt.NDArray[np.uint8]:
    """The 10,000 protocol images (queries, then database) as the extractor's model input
    (10000, s, s, 3) uint8, made once per preprocessing version and kept in the benchmark cache."""
    path = common.cache_dir() / f"cifar10-pixels-{ex.preprocess_version}.npy"
    paths = split.q_paths + split.db_paths
    if not path.exists():
        log.info("preprocessing %d CIFAR-10 images into %s", len(paths), path)
        pixels = np.stack([ex.preprocess(load_image(p, draft_size=ex.draft_size).image) for p in paths])
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, pixels)
        tmp.replace(path)
    pixels = np.load(path, mmap_mode="r")
    if pixels.shape != (len(paths), ex.image_size, ex.image_size, 3):
        raise RuntimeError(f"{path} has shape {pixels.shape}; delete it to make it again")
    return pixels  # type: ignore[no-any-return]


def subset(split: common.CifarSplit, pixels: npt.NDArray[np.uint8], n: int) -> tuple[common.CifarSplit, npt.NDArray[np.uint8]]:
    """The first n / 100 queries and 9 n / 100 database images of every class (a quick check, not the protocol)."""
    n_q, k = len(split.q_paths), len(split.classes)
    q_rows = np.concatenate([np.flatnonzero(split.q_labels == c)[:n // (10 * k)] for c in range(k)])
    db_rows = np.concatenate([np.flatnonzero(split.db_labels == c)[:9 * n // (10 * k)] for c in range(k)])
    small = common.CifarSplit(split.classes, [split.q_paths[i] for i in q_rows], split.q_labels[q_rows],
                              [split.db_paths[i] for i in db_rows], split.db_labels[db_rows])
    return small, np.asarray(pixels[np.concatenate([q_rows, n_q + db_rows])])


def calibration_indices(split: common.CifarSplit, n: int, offset: int = 0) -> npt.NDArray[np.int64]:
    """Rows of :func:`protocol_pixels` to calibrate on: ``n / classes`` database images of every
    class (never a query), the first ones after ``offset``."""
    per_class = n // len(split.classes)
    n_q = len(split.q_paths)
    rows = [n_q + np.flatnonzero(split.db_labels == label)[offset:offset + per_class] for label in range(len(split.classes))]
    return np.concatenate(rows)


def ends_to_keep_fp32(model_path: Path) -> list[str]:
    """Names of the stem convolution (the first Conv) and of the head: the last Conv (320 -> 1280
    channels) and every node after it (pooling, flatten, the classifier's Gemm)."""
    nodes = list(onnx.load(str(model_path), load_external_data=False).graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == "Conv"]
    names = [nodes[convs[0]].name, *(n.name for n in nodes[convs[-1]:])]
    if not all(names):
        raise RuntimeError(f"{model_path} has unnamed nodes; nodes_to_exclude needs names")
    return names


def activation_ranges(prepared: Path, reader: _Calibration, method: str, cache: Path) -> Path:
    """Calibrate the activations of ``prepared`` with ``method`` on the reader's images, a few
    batches at a time (the intermediate tensors of every image never sit in memory together), and
    write the ranges to ``cache`` (ONNX Runtime's calibration cache, which ``quantize_static``
    reads); done once per method, as the ranges do not depend on how the weights are quantised.

    Percentile is two-sided (0.0005% cut at each end) instead of ONNX Runtime's default of
    absolute values, and Entropy uses TensorRT's 2048 bins instead of 128 (with 128 bins its search
    has one threshold to choose from: MinMax). Entropy's thresholds are symmetric (-t, t): they are
    clamped to the values seen, as ONNX Runtime does for Percentile, or a tensor that is never
    negative (a ReLU6 output) would spend half of its uint8 codes below zero."""
    if cache.exists():
        return cache
    per_method: dict[str, dict[str, Any]] = {
        "minmax": {}, "percentile": {"symmetric": False, "num_bins": 2048, "percentile": 99.999},
        "entropy": {"num_bins": 2048, "num_quantized_bins": 128}}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        calibrator = create_calibrator(prepared, sorted(set(QLinearOpsRegistry) | set(QDQRegistry)),
                                       augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=CALIBRATIONS[method], extra_options=per_method[method])
        stride = next(s for s in range(5, 0, -1) if len(reader) % s == 0)
        for first in range(0, len(reader), stride):
            reader.set_range(first, first + stride)
            calibrator.collect_data(reader)
        ranges = calibrator.compute_data()
        if method == "entropy":
            for name, data in ranges.items():
                seen_min, seen_max = calibrator.collector.histogram_dict[name][2:4]
                data.lowest = np.maximum(data.lowest, seen_min).astype(data.lowest.dtype)
                data.highest = np.minimum(data.highest, seen_max).astype(data.highest.dtype)
    save_tensors_data(ranges, cache)
    log.info("%s calibration on %d batches: %.0f s", method, len(reader), time.perf_counter() - start)
    return cache


def quantise(variant: Variant, prepared: Path, ranges: Path, work: Path) -> tuple[Path, list[str]]:
    """Write ``variant`` of the pre-processed fp32 model to ``work`` with the activation ranges
    in ``ranges``; returns its path and the nodes left in fp32."""
    out = work / f"{variant.name}.onnx"
    excluded = ends_to_keep_fp32(prepared) if variant.fp32_ends else []
    quantize_static(
        prepared, out, None, quant_format=QuantFormat.QDQ, per_channel=variant.per_channel,
        reduce_range=variant.reduce_range,
        activation_type=QuantType.QInt8 if variant.activations == "int8" else QuantType.QUInt8,
        weight_type=QuantType.QInt8, nodes_to_exclude=excluded, calibrate_method=CALIBRATIONS[variant.calibration],
        calibration_cache_path=ranges,
    )
    log.info("%s (%s): %.1f MB", variant.name, variant.describe(), out.stat().st_size / 1e6)
    return out, excluded


#: the variant imgstore offers as efficientnet-lite0-int8 (imgstore/features/int8.py quantises the same way)
SHIPPED = "int8-channel-percentile"
SHIPPED_CALIBRATION = "percentile"


def ship(ranges: Path, fp32: Path) -> None:
    """Copy ``ranges`` to imgstore's data folder and write the reference features of the model
    imgstore makes from them (on this CPU, which must have int8 dot products)."""
    import shutil

    from imgstore.features import int8

    if not int8.cpu_int8_flags():
        raise SystemExit("--ship needs a CPU with int8 dot products (VNNI, AMX): the reference is what such CPUs give")
    shutil.copyfile(ranges, int8.RANGES)
    with tempfile.TemporaryDirectory(prefix="bench-int8-ship-") as tmp:
        model = Path(tmp) / "int8.onnx"
        int8.quantise(fp32, int8.RANGES, model, Path(tmp))
        doc = int8.write_reference(model)
    log.info("shipped %s and %s (onnxruntime %s, CPU flags %s)", int8.RANGES, int8.REFERENCE, doc["onnxruntime"],
             doc["cpu_flags"])


def features(model: Any, pixels: npt.NDArray[np.uint8], batch_size: int = 64) -> tuple[npt.NDArray[np.float32], float]:
    """Features (n, 1280) float32 of preprocessed pixels, and the seconds they took."""
    start = time.perf_counter()
    feats = np.concatenate([model.extract_arrays(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    return feats, time.perf_counter() - start


def cosines(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    norms = np.linalg.norm(a, axis=1).astype(np.float64) * np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(1, dtype=np.float64) / np.maximum(norms, 1e-12), dtype=np.float64)


def quality(feats: npt.NDArray[np.float32], fp32: npt.NDArray[np.float32], split: common.CifarSplit) -> dict[str, float]:
    """Cosine to fp32 per image (min, 1st percentile, mean), mAP@ALL (float, ITQ-64), and the
    float mAP of this variant's queries against fp32's database (what mixing the two spaces would give)."""
    cos = cosines(feats, fp32)
    n_q = len(split.q_paths)
    mixed = np.concatenate([feats[:n_q], fp32[n_q:]])
    return {"cosine_min": float(cos.min()), "cosine_p01": float(np.percentile(cos, 1)), "cosine_mean": float(cos.mean()),
            **bench_runtime.retrieval(feats, split),
            "mAP_float_queries_vs_fp32_db": bench_runtime.retrieval(mixed, split)["mAP_float"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="speed rounds per batch size (interleaved)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--calibration-n", type=int, default=500, help="CIFAR-10 database images to calibrate on")
    parser.add_argument("--calibration-batch", type=int, default=10)
    parser.add_argument("--calibration-offset", type=int, default=0,
                        help="skip this many database images of each class before the calibration images (another set)")
    parser.add_argument("--only", nargs="+", metavar="VARIANT", help="measure only these int8 variants (and fp32)")
    parser.add_argument("--subset", type=int, default=0,
                        help="a quick check: only this many protocol images (a tenth of them queries); 0: all 10,000")
    parser.add_argument("--out", default="int8")
    parser.add_argument("--ship", action="store_true",
                        help="also write what imgstore's efficientnet-lite0-int8 is made from: the ranges of "
                             f"{SHIPPED} into imgstore/data, and the reference features of the model made from them")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger().setLevel(logging.INFO)

    split = common.cifar_split()
    ex = get_extractor(EXTRACTOR, runtime="onnx", precision="fp32")
    if not isinstance(ex, OnnxExtractor):
        raise RuntimeError(f"expected the ONNX Runtime extractor, got {ex!r}")
    result: dict[str, Any] = {
        "machine": {**cpu_info(), "python": platform.python_version(), "onnxruntime": ort.__version__,
                    "onnx": onnx.__version__, "threads": thread_count(None)},
        "command": " ".join(["benchmarks/bench_int8.py", *sys.argv[1:]]),
        "fp32_model": str(ex.path), "preprocess_version": ex.preprocess_version,
        "loadavg": {"start": loadavg()},
    }
    pixels = protocol_pixels(ex, split)
    if args.subset:
        split, pixels = subset(split, pixels, args.subset)
    calib_rows = calibration_indices(split, args.calibration_n, args.calibration_offset)
    per_class, skip = len(calib_rows) // len(split.classes), args.calibration_offset
    result["n_images"] = {"queries": len(split.q_paths), "database": len(split.db_paths)}
    result["calibration"] = {
        "n_images": len(calib_rows), "batch": args.calibration_batch, "offset": skip,
        "images": (f"database images {skip + 1} to {skip + per_class} of each class" if skip
                   else f"the first {per_class} database images of each class") + ", no query"}
    reader = _Calibration(np.asarray(pixels[calib_rows]), args.calibration_batch)

    work = common.cache_dir() / "int8" / ex.path.stem
    work.mkdir(parents=True, exist_ok=True)
    prepared = work / "fp32-prepared.onnx"
    if not prepared.exists():
        quant_pre_process(str(ex.path), str(prepared))
    calib_key = f"{len(calib_rows)}x{args.calibration_batch}+{args.calibration_offset}"

    fp32_feats, fp32_s = features(ex, pixels)
    result["fp32"] = {"file_mb": ex.path.stat().st_size / 1e6, "features_s": fp32_s,
                      **bench_runtime.retrieval(fp32_feats, split)}
    log.info("fp32: %s", result["fp32"])

    made: dict[str, dict[str, Any]] = {}
    models: dict[str, Path] = {}

    def run(variant: Variant) -> None:
        ranges = activation_ranges(prepared, reader, variant.calibration,
                                   work / f"ranges-{calib_key}-{variant.calibration}.json")
        path, excluded = quantise(variant, prepared, ranges, work)
        model = _Model(path)
        feats, seconds = features(model, pixels)
        made[variant.name] = {"settings": {**asdict(variant), "description": variant.describe()},
                              "nodes_kept_fp32": excluded, "file_mb": path.stat().st_size / 1e6,
                              "features_s": seconds, **quality(feats, fp32_feats, split)}
        models[variant.name] = path
        log.info("%s: %s", variant.name,
                 {k: v for k, v in made[variant.name].items() if k not in ("settings", "nodes_kept_fp32")})

    variants = [*FIRST_VARIANTS, *(replace(base, name=f"{base.name}-{method}", calibration=method)
                                   for base in FIRST_VARIANTS if base.name in CALIBRATION_CANDIDATES
                                   for method in ("percentile", "entropy"))]
    if args.only:
        unknown = set(args.only) - {v.name for v in variants}
        if unknown:
            parser.error(f"unknown variants {', '.join(sorted(unknown))}; known: {', '.join(v.name for v in variants)}")
        variants = [v for v in variants if v.name in args.only]
    for variant in variants:
        run(variant)
    if args.ship:
        ship(work / f"ranges-{calib_key}-{SHIPPED_CALIBRATION}.json", ex.path)
    result["loadavg"]["after_quality"] = loadavg()

    speed: dict[str, dict[str, float]] = {}
    for size in args.batch_sizes:
        rows = np.arange(len(split.q_paths), len(split.q_paths) + size)  # the first database images, as bench_runtime
        batch = np.ascontiguousarray(pixels[rows])
        contenders: dict[str, Any] = {"fp32": ex, **{name: _Model(p) for name, p in models.items()}}
        for model in contenders.values():
            model.extract_arrays(batch)  # arenas grown for this batch size
        speed[str(size)] = bench_runtime.model_alone(contenders, batch, args.rounds)
        log.info("batch %d: %s", size, speed[str(size)])
        result["loadavg"][f"after_speed_{size}"] = loadavg()
    result["model_alone_images_per_s"] = speed
    for name, r in made.items():
        r["speed_ratio_to_fp32"] = {size: s[name] / s["fp32"] for size, s in speed.items()}
        r["delta_mAP_float"] = r["mAP_float"] - result["fp32"]["mAP_float"]
        r["delta_mAP_itq64"] = r["mAP_itq64"] - result["fp32"]["mAP_itq64"]
        r["qualifies"] = abs(r["delta_mAP_float"]) <= MAX_MAP_DELTA and abs(r["delta_mAP_itq64"]) <= MAX_MAP_DELTA
    result["variants"] = made
    result["models_folder"] = str(work)

    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / f"{args.out}.json").write_text(json.dumps(result, indent=2))
    (common.RESULTS_DIR / f"{args.out}.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    m, fp, n = r["machine"], r["fp32"], r["n_images"]
    sizes = list(r["model_alone_images_per_s"])
    speed = r["model_alone_images_per_s"]
    flags = ", ".join(f for f, on in m["flags"].items() if on) or "none of " + ", ".join(m["flags"])
    load = r["loadavg"]
    lines = [
        "# Int8 EfficientNet-Lite0 on ONNX Runtime: speed and retrieval against fp32",
        "",
        f"`{r['command']}` on {m['cores']} cores ({m['cpu']}; {flags}), onnxruntime {m['onnxruntime']}, "
        f"{m['threads']} threads a session. Static QDQ quantisation (`onnxruntime.quantization`) of the fp32 model "
        f"imgstore exports, calibrated on {r['calibration']['n_images']} CIFAR-10 images "
        f"({r['calibration']['images']}). Speed: the model alone on CIFAR-10 batches, every variant interleaved "
        f"round by round with fp32 in the same run, medians. Quality: {n['queries'] + n['database']:,} CIFAR-10 images "
        f"({n['queries']:,} queries, {n['database']:,} database). Load average (1/5/15 min) at the start "
        f"{'/'.join(f'{x:.2f}' for x in load['start'])}, after the quality runs "
        f"{'/'.join(f'{x:.2f}' for x in load['after_quality'])}, after the speed runs "
        f"{'/'.join(f'{x:.2f}' for x in load[f'after_speed_{sizes[-1]}'])} (a shared machine).",
        "",
        "| model | settings | " + " | ".join(f"images/s, batch {s} (x fp32)" for s in sizes)
        + " | cosine to fp32 min / mean | mAP float (delta) | mAP ITQ-64 (delta) | within 0.01 |",
        "|---|---|" + "---:|" * len(sizes) + "---:|---:|---:|:---:|",
        "| fp32 | the exported model (the default runtime) | " + " | ".join(f"{speed[s]['fp32']:.1f}" for s in sizes)
        + f" | 1 / 1 | {fp['mAP_float']:.4f} | {fp['mAP_itq64']:.4f} | |",
    ]
    for name, v in r["variants"].items():
        lines.append(
            f"| {name} | {v['settings']['description']} | "
            + " | ".join(f"{speed[s][name]:.1f} ({v['speed_ratio_to_fp32'][s]:.2f}x)" for s in sizes)
            + f" | {v['cosine_min']:.3f} / {v['cosine_mean']:.4f} | {v['mAP_float']:.4f} ({v['delta_mAP_float']:+.4f}) | "
            f"{v['mAP_itq64']:.4f} ({v['delta_mAP_itq64']:+.4f}) | {'yes' if v['qualifies'] else 'no'} |")
    lines += ["", "Mixing spaces (float mAP of each variant's queries against the fp32 database): "
              + ", ".join(f"{name} {v['mAP_float_queries_vs_fp32_db']:.4f}" for name, v in r["variants"].items())
              + f" (fp32 alone {fp['mAP_float']:.4f}).",
              "", "Percentile (two-sided, 99.999%) and Entropy (2048 bins, thresholds clamped to the values seen) "
              f"calibration were tried on {' and '.join(CALIBRATION_CANDIDATES)}; the others use MinMax.",
              "", "## Conclusion", "", conclusion(r), "", machine_note(m["flags"])]
    if "calibration_set_check" in r:  # a second run's results, copied into this run's JSON by hand
        c = r["calibration_set_check"]
        lines += ["", "## Another calibration set", "",
                  f"`{c['command']}` ({c['calibration']['images']}; a separate run, load average at its start "
                  f"{'/'.join(f'{x:.2f}' for x in c['loadavg']['start'])}): the same variants calibrated on other images.", "",
                  "| model | " + " | ".join(f"x fp32, batch {s}" for s in c["model_alone_images_per_s"])
                  + " | cosine min / mean | mAP float (delta) | mAP ITQ-64 (delta) |",
                  "|---|" + "---:|" * len(c["model_alone_images_per_s"]) + "---:|---:|---:|"]
        for name, v in c["variants"].items():
            lines.append(f"| {name} | " + " | ".join(f"{x:.2f}x" for x in v["speed_ratio_to_fp32"].values())
                         + f" | {v['cosine_min']:.3f} / {v['cosine_mean']:.4f} | {v['mAP_float']:.4f} "
                         f"({v['delta_mAP_float']:+.4f}) | {v['mAP_itq64']:.4f} ({v['delta_mAP_itq64']:+.4f}) |")
    return "\n".join(lines) + "\n"


def conclusion(r: dict[str, Any]) -> str:
    sizes = list(r["model_alone_images_per_s"])
    qualifying = {n: v for n, v in r["variants"].items() if v["qualifies"]}
    if not qualifying:
        closest = min(r["variants"].items(), key=lambda kv: abs(kv[1]["delta_mAP_float"]))
        return (f"No int8 variant keeps both mAPs within {MAX_MAP_DELTA} of fp32 on this machine (closest: "
                f"{closest[0]}, float {closest[1]['delta_mAP_float']:+.4f}, ITQ-64 {closest[1]['delta_mAP_itq64']:+.4f}); "
                "by the issue's rule no int8 model is offered.")
    name, v = max(qualifying.items(), key=lambda kv: kv[1]["speed_ratio_to_fp32"][sizes[-1]])
    return (f"Within {MAX_MAP_DELTA} of fp32 in both float and ITQ-64 mAP: {', '.join(qualifying)}. The fastest of them, "
            f"{name} ({v['settings']['description']}), runs "
            + " and ".join(f"{v['speed_ratio_to_fp32'][s]:.2f}x fp32's images/s at batch {s}" for s in sizes)
            + f" (mAP float {v['delta_mAP_float']:+.4f}, ITQ-64 {v['delta_mAP_itq64']:+.4f}; feature cosine to fp32 "
            f"mean {v['cosine_mean']:.4f}, min {v['cosine_min']:.3f}, so its own feature space, not fp32's). Not within: "
            + ", ".join(f"{n} ({o['delta_mAP_float']:+.4f} / {o['delta_mAP_itq64']:+.4f})"
                        for n, o in r["variants"].items() if not o["qualifies"]) + ".")


def machine_note(flags: dict[str, bool]) -> str:
    """What the ranking depends on: how this CPU multiplies uint8 by int8."""
    if flags.get("avx512_vnni") or flags.get("avx_vnni"):
        return ("This CPU has VNNI: uint8 x int8 products accumulate straight into 32 bits, without the 16-bit "
                "saturation of AVX2's pairwise multiply-add, so reduce_range only costs precision here. On an AVX2 CPU "
                "without VNNI (the issue's earlier machine, where plain U8S8 gave feature cosine 0.815) the ranking may "
                "differ and reduce_range or S8S8 may be needed: measure there before offering int8 there.")
    return ("This CPU has no VNNI: uint8 x int8 products pass through AVX2's 16-bit saturating multiply-add, "
            "which reduce_range (7-bit weights) avoids; a VNNI CPU may rank the variants differently.")


if __name__ == "__main__":
    main()
