"""Feature extractors behind one small protocol, and their registry.

Importing this package does not import torch: the CNN extractors are imported inside their
factories, so ``imgstore --help`` and pure-numpy users stay fast. EfficientNet-Lite runs on ONNX
Runtime by default (:mod:`.onnxrt`: same features, several times faster on a CPU, no torch
import); ``runtime="torch"`` keeps PyTorch (bf16, CUDA, and the only way for ResNet-50).

>>> ex = get_extractor("efficientnet-lite0", precision="fp32")   # doctest: +SKIP
>>> ex.extract([img]).shape                                      # doctest: +SKIP
(1, 1280)
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError, ExtractorError
from . import clip
from .base import Extractor
from .clip import TextEmbedder

__all__ = ["DEFAULT_EXTRACTOR", "RUNTIMES", "RUNTIME_ENV", "Extractor", "TextEmbedder", "available_extractors",
           "embeds_text", "get_extractor", "resolve_runtime", "space_name"]

log = logging.getLogger(__name__)

DEFAULT_EXTRACTOR = "efficientnet-lite0"
RUNTIMES = ("auto", "torch", "onnx")
RUNTIME_ENV = "IMGSTORE_RUNTIME"


def resolve_runtime(runtime: str | None, *, precision: str | None = None, device: str | None = None) -> str:
    """"auto" | "torch" | "onnx" (None: $IMGSTORE_RUNTIME, else "auto") to the runtime that runs a CNN.

    "auto" is ONNX Runtime (fp32 on the CPU: the torch model's features, 3-4x its speed on a CPU
    without bf16, benchmarks/results/runtime.md) unless bf16 or a CUDA device is asked for, an
    NVIDIA device is present with ``device`` auto, or onnxruntime is not installed: then torch.
    """
    chosen = (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if chosen not in RUNTIMES:
        raise ConfigError(f"unknown runtime {chosen!r}; choose one of {', '.join(RUNTIMES)}")
    prec = (precision or os.environ.get("IMGSTORE_PRECISION") or "auto").strip().lower()
    dev = (device or os.environ.get("IMGSTORE_DEVICE") or "auto").strip().lower()
    have_ort = importlib.util.find_spec("onnxruntime") is not None
    if chosen == "onnx":
        if not have_ort:
            raise ConfigError("the onnx runtime needs onnxruntime and onnx: `pip install onnxruntime onnx`, or use "
                              "--runtime torch")
        return chosen
    if chosen == "torch":
        return chosen
    gpu = dev == "cuda" or (dev == "auto" and any(os.path.exists(p) for p in _NVIDIA_DEVICES))
    return "torch" if prec == "bf16" or gpu or not have_ort else "onnx"


_NVIDIA_DEVICES = ("/dev/nvidiactl", "/proc/driver/nvidia/version")


def _lite(variant: str) -> Callable[..., Extractor]:
    def factory(runtime: str | None = None, **options: Any) -> Extractor:
        if resolve_runtime(runtime, precision=options.get("precision"), device=options.get("device")) == "onnx":
            from .onnxrt import lite_extractor

            try:
                return lite_extractor(variant, **options)
            except ExtractorError as exc:
                if (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower() == "onnx":
                    raise
                # chosen for speed, not asked for: the same features come from torch, slower
                log.warning("%s; using torch", exc)
        from .efficientnet import EfficientNetLite0Extractor, EfficientNetLite2Extractor

        return (EfficientNetLite0Extractor if variant == "lite0" else EfficientNetLite2Extractor)(**options)

    return factory


def _lite0_int8(runtime: str | None = None, **options: Any) -> Extractor:
    if (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower() == "torch":
        raise ConfigError("efficientnet-lite0-int8 runs on ONNX Runtime only: use --runtime auto or onnx (torch runs "
                          "efficientnet-lite0 in fp32 or bf16)")
    if importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError("efficientnet-lite0-int8 needs onnxruntime and onnx: `pip install onnxruntime onnx`")
    from .int8 import int8_extractor

    return int8_extractor(**options)


def _resnet50(runtime: str | None = None, **options: Any) -> Extractor:
    if runtime == "onnx":
        raise ConfigError("resnet50 runs on --runtime torch only (the onnx runtime serves efficientnet-lite0 and -lite2)")
    from .resnet import ResNet50Extractor

    return ResNet50Extractor(**options)


def _color(runtime: str | None = None, **options: Any) -> Extractor:
    from .color import ColorExtractor

    del runtime  # numpy: no model to run
    if options:
        raise ConfigError(f"the color extractor takes no options, got {', '.join(sorted(options))}")
    return ColorExtractor()


def _clip(spec: str, runtime: str | None = None, **options: Any) -> Extractor:
    if (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower() == "onnx":
        raise ConfigError("CLIP extractors run on torch only: use --runtime torch or auto (the onnx runtime serves "
                          "efficientnet-lite0 and -lite2)")
    weights = clip.resolve(spec, options.pop("weights", None))  # a missing file is said before torch loads
    clip.require_open_clip()
    from .clip_model import ClipExtractor

    return ClipExtractor(weights, **options)


_FACTORIES: dict[str, Callable[..., Extractor]] = {
    "efficientnet-lite0": _lite("lite0"),
    "efficientnet-lite2": _lite("lite2"),
    "efficientnet-lite0-int8": _lite0_int8,
    "resnet50": _resnet50,
    "color": _color,
}


def available_extractors() -> list[str]:
    """Names accepted by :func:`get_extractor`, the default first."""
    return [DEFAULT_EXTRACTOR, *sorted(n for n in _FACTORIES if n != DEFAULT_EXTRACTOR)]


def get_extractor(name: str = DEFAULT_EXTRACTOR, runtime: str | None = None, **options: Any) -> Extractor:
    """Build an extractor by name. Loads its weights now (can take a second); options are per extractor;
    ``runtime`` ("auto", "torch", "onnx") chooses what runs a CNN (:func:`resolve_runtime`).

    ``name`` is a registered name, or ``clip:ARCH:PATH`` (a CLIP model with a weights file) or a
    CLIP feature space's ``clip:ARCH:DIGEST`` (its file found again, or given as ``weights=PATH``).

    Raises ConfigError for an unknown name or option, WeightsNotFoundError when weights are needed
    and missing.
    """
    factory = _clip if clip.is_clip(name) else _FACTORIES[_check(name)]
    try:
        return factory(name, runtime=runtime, **options) if factory is _clip else factory(runtime=runtime, **options)
    except TypeError as exc:
        if "unexpected keyword argument" in str(exc):
            raise ConfigError(f"bad option for extractor {name!r}: {exc}") from None
        raise


def _check(name: str) -> str:
    if name not in _FACTORIES:
        raise ConfigError(f"unknown extractor {name!r}; available: {', '.join(available_extractors())}, or "
                          "clip:ARCH:PATH (CLIP weights on disk)")
    return name


def space_name(name: str) -> str:
    """The feature space the extractor ``name`` writes, without building it (a
    ``clip:ARCH:PATH`` spec reads the file's digest: ``clip:ARCH:DIGEST``)."""
    return clip.space_name(name)


def embeds_text(name: str) -> bool:
    """The extractor (or feature space) ``name`` embeds words into its own space (CLIP)."""
    return clip.is_clip(name)
