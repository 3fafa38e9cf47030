"""Shared torch plumbing for the CNN extractors: threads, precision, batched inference.

Imported only by the extractor factories, never at ``import imgstore.features``.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Literal, cast

import numpy as np
import numpy.typing as npt
import torch

from ..errors import ConfigError
from .base import SquareInput

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]
PRECISIONS = ("auto", "fp32", "bf16")

_threads_lock = threading.Lock()
_threads_configured = False
_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def configure_threads(num_threads: int | None = None) -> None:
    """Give torch every CPU this process may use, unless the user already chose.

    An explicit ``num_threads`` always wins; otherwise ``IMGSTORE_NUM_THREADS``; otherwise, when
    neither OMP_NUM_THREADS nor MKL_NUM_THREADS is set, the CPUs in this process's affinity mask
    (which respects taskset / cgroup cpusets, unlike ``os.cpu_count()``).
    """
    global _threads_configured
    with _threads_lock:
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
            torch.set_num_threads(num_threads)
            _threads_configured = True
            return
        if _threads_configured:
            return
        _threads_configured = True
        env = os.environ.get("IMGSTORE_NUM_THREADS")
        if env:
            try:
                torch.set_num_threads(max(1, int(env)))
            except ValueError:
                raise ConfigError(f"IMGSTORE_NUM_THREADS must be an integer, got {env!r}") from None
            return
        if any(os.environ.get(name) for name in _THREAD_ENV):
            return
        try:
            n = len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            n = os.cpu_count() or 1
        torch.set_num_threads(n)
        logger.debug("torch uses %d threads", n)


def native_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AMX or AVX512-BF16); emulated bf16 is slower than fp32."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    try:
        return any(bool(getattr(cpu, name)()) for name in checks if hasattr(cpu, name))
    except Exception:  # noqa: BLE001 - a probe must never fail extraction
        return False


def resolve_precision(precision: str | None) -> Precision:
    """"auto" | "fp32" | "bf16" (or None: IMGSTORE_PRECISION, default "auto") to the precision used.

    "auto" picks bf16 autocast when the CPU has native bf16 (faster than fp32, see benchmarks/results/features.md
    for EfficientNet-Lite0 on AMX, same retrieval mAP), else fp32.
    """
    chosen = (precision or os.environ.get("IMGSTORE_PRECISION") or "auto").strip().lower()
    if chosen not in PRECISIONS:
        raise ConfigError(f"unknown precision {chosen!r}; choose one of {', '.join(PRECISIONS)}")
    if chosen == "auto":
        return "bf16" if native_bf16() else "fp32"
    return cast(Precision, chosen)  # one of PRECISIONS other than "auto"


def nhwc_uint8_to_tensor(batch: npt.NDArray[np.generic]) -> torch.Tensor:
    """(n, h, w, 3) uint8 -> (n, 3, h, w) float32 tensor laid out channels_last (no copy before the cast)."""
    arr = np.ascontiguousarray(batch)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a (n, h, w, 3) batch, got shape {arr.shape}")
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    return x.to(dtype=torch.float32, memory_format=torch.channels_last)


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | None) -> str:
    """"auto" | "cpu" | "cuda" (or None: IMGSTORE_DEVICE, default "auto") to the device used:
    "auto" takes the first CUDA device when torch sees one, else the CPU."""
    chosen = (device or os.environ.get("IMGSTORE_DEVICE") or "auto").strip().lower()
    if chosen not in DEVICES:
        raise ConfigError(f"unknown device {chosen!r}; choose one of {', '.join(DEVICES)}")
    has_cuda = torch.cuda.is_available()
    if chosen == "cuda" and not has_cuda:
        raise ConfigError(
            "--device cuda: torch sees no CUDA device on this machine; use --device auto (falls back to the CPU) or cpu"
        )
    return "cuda" if chosen == "cuda" or (chosen == "auto" and has_cuda) else "cpu"


def run_model(module: torch.nn.Module, x: torch.Tensor, precision: Precision, device: str = "cpu") -> npt.NDArray[np.float32]:
    """Run ``module`` under inference_mode (bf16 autocast when asked) on ``device``; (n, d)
    float32 numpy."""
    if device != "cpu":
        x = x.to(device, non_blocking=True)
    with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
        out: torch.Tensor = module(x)
    return out.float().cpu().numpy().astype(np.float32, copy=False)


def fuse_conv_bn(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d) -> None:
    """Fold an eval-mode BatchNorm into the convolution before it, in place (the BN must then be skipped)."""
    mean, var = bn.running_mean, bn.running_var
    assert mean is not None and var is not None, "an eval-mode BatchNorm tracks running statistics"
    with torch.no_grad():
        scale = bn.weight / torch.sqrt(var + bn.eps)
        conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
        bias = bn.bias - mean * scale
        if conv.bias is None:
            conv.bias = torch.nn.Parameter(bias)
        else:
            conv.bias.mul_(scale).add_(bias)


class CnnExtractor(SquareInput):
    """What the torch CNN extractors share: square resize in worker threads, batched inference of
    ``self._model`` (uint8 NHWC in, features out) at the chosen precision.

    Subclasses set ``name``, ``dim``, call :meth:`_configure` and set ``self._model``.
    """

    runtime = "torch"
    _model: torch.nn.Module

    def _configure(self, image_size: int, resize: str, resample: str, precision: str | None, scaling: str,
                   device: str | None = None) -> None:
        self.device = resolve_device(device)
        if self.device != "cpu" and (precision or os.environ.get("IMGSTORE_PRECISION") or "auto") == "auto":
            precision = "fp32"  # the CPU's bf16 test says nothing about the accelerator
        self._configure_input(image_size, resize, resample, scaling)
        self.precision: Precision = resolve_precision(precision)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(runtime='torch', precision={self.precision!r}, device={self.device!r}, "
                f"preprocess={self.preprocess_version!r})")

    def _place(self, *modules: torch.nn.Module) -> None:
        """Move the model(s) to the chosen device."""
        if self.device != "cpu":
            for module in modules:
                module.to(self.device)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """(n, s, s, 3) uint8 -> (n, dim) float32."""
        return run_model(self._model, nhwc_uint8_to_tensor(batch), self.precision, self.device)
