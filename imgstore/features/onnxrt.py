"""EfficientNet-Lite on ONNX Runtime: the default way features are computed on a CPU.

Same features as the torch model (cosine >= 0.9999998 on real images, the same feature space and
preprocessing version), several times its images per second on a CPU without bf16
(benchmarks/results/runtime.md), and no torch import: a query starts in a fraction of a second.

The ONNX model is exported from the torch model once per extractor, input size and weights file,
made on first use (that run imports torch), checked against torch, and cached in the user's cache
folder (``$IMGSTORE_CACHE_DIR``, else ``$XDG_CACHE_HOME/imgstore``, else ``~/.cache/imgstore``).
A reinstalled weights package (another file, size or time) gets a new export.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from PIL import Image

from ..errors import ConfigError, ExtractorError, ModelCacheError, WeightsNotFoundError
from .base import SquareInput, stack_preprocessed
from .lite import VARIANTS, default_weights_path, head_path

log = logging.getLogger(__name__)

#: changes whenever an export would give a different model file (graph edits, opset)
EXPORT_VERSION = 3
CACHE_ENV = "IMGSTORE_CACHE_DIR"
INPUT_NAME = "pixels"

_export_lock = threading.RLock()  # the int8 model is made from the fp32 one under it
T = TypeVar("T")


def cache_dir() -> Path:
    """Where exported models are kept: $IMGSTORE_CACHE_DIR, else $XDG_CACHE_HOME/imgstore, else ~/.cache/imgstore."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "imgstore"


def model_path(name: str, weights: Path, image_size: int) -> Path:
    """The cached export of extractor ``name`` with ``weights`` at ``image_size``: its file name
    changes with the weights file (path, size, modification time) and the export's version."""
    try:
        st = weights.stat()
    except OSError as exc:
        raise ExtractorError(f"cannot read the weights {weights}: {exc.strerror or exc}") from None
    key = f"{EXPORT_VERSION}|{name}|{image_size}|{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{name}-{image_size}-{digest}.onnx"


def thread_count(num_threads: int | None) -> int:
    """Threads for one model run: ``num_threads``, else IMGSTORE_NUM_THREADS, else OMP_NUM_THREADS,
    else the CPUs this process may use (its affinity mask, which respects taskset and cgroups)."""
    if num_threads is not None:
        if num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
        return num_threads
    for var in ("IMGSTORE_NUM_THREADS", "OMP_NUM_THREADS"):
        env = os.environ.get(var)
        if env:
            try:
                return max(1, int(env))
            except ValueError:
                raise ConfigError(f"{var} must be an integer, got {env!r}") from None
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def open_session(path: Path, num_threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session of the model at ``path``. Its threads sleep between runs
    instead of spinning: the decode threads of an ingest need those cores."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = thread_count(num_threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: its warnings are about the graph, not the user's images
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelCacheError(f"ONNX Runtime cannot load {path}: {first}") from exc


class OnnxExtractor(SquareInput):
    """A CNN extractor whose model runs on ONNX Runtime (fp32, CPU): uint8 NHWC in, features out."""

    runtime = "onnx"
    precision = "fp32"
    device = "cpu"

    def __init__(self, name: str, dim: int, path: Path, *, image_size: int, resize: str, resample: str,
                 scaling: str, num_threads: int | None = None) -> None:
        self.name = name
        self.dim = dim
        self.path = path
        self._configure_input(image_size, resize, resample, scaling)
        self._session = open_session(path, num_threads)
        self._head: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, runtime='onnx', model={str(self.path)!r}, "
                f"preprocess={self.preprocess_version!r})")

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """(n, s, s, 3) uint8 -> (n, dim) float32. Thread-safe (ONNX Runtime allows concurrent runs)."""
        return self._run("features", batch)

    def classifier_head(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The model's ImageNet head: weight (1000, dim) and bias (1000,), float32 (logits =
        features @ weight.T + bias), kept beside the export."""
        if self._head is None:
            try:
                with np.load(head_path(self.path)) as z:
                    self._head = (z["weight"].astype(np.float32), z["bias"].astype(np.float32))
            except (OSError, KeyError, ValueError) as exc:
                raise ExtractorError(f"cannot read the classifier head beside {self.path}: {exc}; delete {self.path} "
                                     "to export it again") from None
        return self._head

    def classify(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """ImageNet logits (n, 1000) float32 of the model's own head."""
        return self._run("logits", stack_preprocessed(self, images))

    def _run(self, output: str, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        arr = np.ascontiguousarray(batch, dtype=np.uint8)
        if arr.ndim != 4 or arr.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected a (n, {self.image_size}, {self.image_size}, 3) batch, got shape {arr.shape}")
        return np.asarray(self._session.run([output], {INPUT_NAME: arr})[0], dtype=np.float32)


def lite_extractor(variant: str, *, weights: str | os.PathLike[str] | None = None, precision: str | None = None,
                   image_size: int | None = None, resize: str = "squash", resample: str = "bilinear",
                   num_threads: int | None = None, fuse_batchnorm: bool = True,
                   device: str | None = None) -> OnnxExtractor:
    """EfficientNet-Lite ``variant`` ("lite0", "lite2") on ONNX Runtime, with the torch extractor's
    options (``precision`` must be fp32 or auto, ``device`` cpu or auto; ``fuse_batchnorm`` is
    always done by the export). Exports the model on first use."""
    del fuse_batchnorm  # the export always folds the BatchNorms
    prec = (precision or os.environ.get("IMGSTORE_PRECISION") or "auto").strip().lower()
    if prec not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"unknown precision {prec!r}; choose one of auto, fp32, bf16")
    if prec == "bf16":
        raise ConfigError("the onnx runtime computes in fp32; bf16 runs on --runtime torch")
    dev = (device or os.environ.get("IMGSTORE_DEVICE") or "auto").strip().lower()
    if dev not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"unknown device {dev!r}; choose one of auto, cpu, cuda")
    if dev == "cuda":
        raise ConfigError("the onnx runtime runs on the CPU; --device cuda runs on --runtime torch")
    v = VARIANTS[variant]
    size = int(image_size or v.image_size)
    name = f"efficientnet-{variant}"

    def load(path: Path) -> OnnxExtractor:
        return OnnxExtractor(name, 1280, path, image_size=size, resize=resize, resample=resample,
                             scaling="x127d128", num_threads=num_threads)

    return cached_model(fp32_model_path(variant, weights, size), lambda path: fp32_export(variant, weights, size, path),
                        load)


def fp32_model_path(variant: str, weights: str | os.PathLike[str] | None, size: int) -> Path:
    """Where the fp32 export of EfficientNet-Lite ``variant`` with ``weights`` (None: the weights
    package's) at ``size`` pixels is cached; WeightsNotFoundError when the weights are missing."""
    v = VARIANTS[variant]
    weights_path = Path(weights) if weights is not None else default_weights_path(variant)
    if not weights_path.is_file():
        raise WeightsNotFoundError(f"{v.title} weights not found at {weights_path}: reinstall `{v.pip_name}`, or "
                                   "pass weights=PATH to the .pth file")
    return model_path(f"efficientnet-{variant}", weights_path, size)


def fp32_export(variant: str, weights: str | os.PathLike[str] | None, size: int, dest: Path) -> None:
    """Export EfficientNet-Lite ``variant`` to ``dest`` (imports torch and onnx)."""
    from .onnx_export import export_lite

    export_lite(variant, Path(weights) if weights is not None else default_weights_path(variant), size, dest)


def cached_model(path: Path, make: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(path)`` of a cached model and its classifier head, after ``make(path)`` when either
    is missing, or when loading raised ModelCacheError (a file damaged since it was written: made
    again once; any other error is the caller's). One thread of this process makes it at a time;
    another process making the same file at once writes its own temporary file and renames it
    over this one (the same bytes)."""
    with _export_lock:
        if path.is_file() and head_path(path).is_file():
            try:
                return load(path)
            except ModelCacheError as exc:  # damaged since it was written: made again below
                log.warning("%s", exc)
                path.unlink(missing_ok=True)
        make(path)
        return load(path)
