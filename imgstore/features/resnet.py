"""torchvision ResNet-50 (ImageNet) as a 2048-d feature extractor. Never runs with random weights."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ExtractorError, WeightsNotFoundError
from . import _torch

logger = logging.getLogger(__name__)

WEIGHTS_ENV = "IMGSTORE_RESNET50_WEIGHTS"
_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _how_to_provide() -> str:
    return (
        "pass --weights PATH (CLI) or weights=PATH (API), a torchvision resnet50 state dict .pth; or set "
        f"{WEIGHTS_ENV}=PATH, or put torchvision's file "
        "resnet50-11ad3fa6.pth (ResNet50_Weights.IMAGENET1K_V2) in "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'} (TORCH_HOME) on a machine that can download it"
    )


def _load_state(weights: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    source = weights if weights is not None else os.environ.get(WEIGHTS_ENV) or None
    if source is not None:
        path = Path(source)
        if not path.is_file():
            raise WeightsNotFoundError(f"ResNet-50 weights file {path} does not exist; {_how_to_provide()}")
        try:
            state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ExtractorError(f"cannot read ResNet-50 weights {path}: {exc}") from exc
        return state
    from torchvision.models import ResNet50_Weights

    try:
        # torchvision's cache under TORCH_HOME, else a download
        cached: dict[str, torch.Tensor] = ResNet50_Weights.IMAGENET1K_V2.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, hash mismatch: all "no weights"
        raise WeightsNotFoundError(
            f"ResNet-50 ImageNet weights are not cached and could not be downloaded ({exc}); "
            f"{_how_to_provide()}"
        ) from exc
    return cached


class _Normalised(nn.Module):
    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_STD).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net((x - self.mean) / self.std)
        return out


class ResNet50Extractor(_torch.CnnExtractor):
    """2048-d globally pooled ResNet-50 features, ImageNet mean/std normalisation.

    Options: ``weights`` (path; else IMGSTORE_RESNET50_WEIGHTS; else torchvision's cache or a
    download of IMAGENET1K_V2), ``precision``, ``image_size`` (224), ``resize`` ("squash"),
    ``resample`` ("bilinear", as for EfficientNet-Lite0), ``num_threads``.
    """

    name = "resnet50"
    dim = 2048

    def __init__(
        self,
        *,
        weights: str | os.PathLike[str] | None = None,
        precision: str | None = None,
        image_size: int = 224,
        resize: str = "squash",
        resample: str = "bilinear",
        num_threads: int | None = None,
        device: str | None = None,
    ) -> None:
        from torchvision.models import resnet50

        self._configure(image_size, resize, resample, precision, scaling="imagenet-meanstd", device=device)
        state = _load_state(weights)
        _torch.configure_threads(num_threads)
        net = resnet50(weights=None)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ExtractorError(f"the weights are not a torchvision resnet50 state dict: {exc}") from exc
        net.fc = nn.Identity()
        self._model = _Normalised(net).eval().to(memory_format=torch.channels_last)
        self._place(self._model)
