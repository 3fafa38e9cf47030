"""A CLIP model of open_clip as an extractor: L2-normalised image embeddings, and text embeddings
in the same space for word searches.

The model is built from open_clip's architecture config with no weights, then the user's file is
loaded into it (strict): open_clip's own download paths (pretrained tags, ``hf-hub:`` names,
Hugging Face text towers and tokenizers) are never taken, so nothing is fetched at run time.
Architectures whose text side needs files from the Hugging Face hub are refused.

Runs on torch (CPU or CUDA, bf16 autocast where the CPU has it, as the CNN extractors); the ONNX
runtime does not serve it. Images are resized as open_clip's own transform does (shorter side to
the model's size and centre-cropped, bicubic, unless the architecture says otherwise) in worker
threads; the normalisation runs with the model.

Imported only when a CLIP extractor is built (``open_clip`` and torch with it).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ExtractorError
from . import _torch
from .base import no_root_handler
from .clip import EXAMPLE_ARCHS, ClipWeights

log = logging.getLogger(__name__)

#: message lines of torch's load_state_dict that say what did not fit
_MISFIT = ("Missing key(s)", "Unexpected key(s)", "size mismatch")


def model_config(arch: str) -> dict[str, Any]:
    """open_clip's config of ``arch``; ConfigError for an unknown one or one that would download."""
    known = list(open_clip.list_models())
    if arch not in known:
        examples = [a for a in EXAMPLE_ARCHS if a in known]
        raise ConfigError(
            f"unknown CLIP architecture {arch!r}; open_clip knows {', '.join(examples)} and {len(known) - len(examples)} "
            "more (python -c 'import open_clip; print(open_clip.list_models())')"
        )
    config: dict[str, Any] = open_clip.get_model_config(arch)
    text = config.get("text_cfg", {})
    if "hf_model_name" in text or "hf_tokenizer_name" in text or "siglip" in arch.lower():
        raise ConfigError(f"the CLIP architecture {arch} needs its text model or tokenizer from the Hugging Face hub, "
                          f"which imgstore never downloads; use one with open_clip's own tokenizer "
                          f"({', '.join(EXAMPLE_ARCHS)})")
    return config


def load_model(weights: ClipWeights) -> nn.Module:
    """The CLIP model of ``weights.arch`` with the file's weights, in eval mode on the CPU."""
    model_config(weights.arch)
    path = weights.path
    with no_root_handler():
        model: nn.Module = open_clip.create_model(
            weights.arch, pretrained=None, load_weights=False, pretrained_image=False, pretrained_text=False,
            precision="fp32", device="cpu",
        )
        try:
            open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
        except RuntimeError as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip().startswith(_MISFIT)]
            if not lines:
                raise ExtractorError(f"cannot read the CLIP weights file {path}: {_first_line(exc)}") from exc
            detail = lines[0] if len(lines[0]) <= 160 else lines[0][:157] + "..."
            raise ExtractorError(
                f"the weights in {path} do not fit open_clip's {weights.arch} ({detail}): give the architecture the file "
                f"was made for, e.g. clip:ViT-B-32:{path}"
            ) from exc
        except Exception as exc:  # pickle, zip, safetensors and format errors all mean "not a state dict"
            raise ExtractorError(f"cannot read the CLIP weights file {path} as an open_clip state dict: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from exc
    return model.eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _ImageTower(nn.Module):
    """0..255 NCHW pixels -> the model's normalisation -> unit-length image embeddings."""

    mean: torch.Tensor  # buffers, registered in __init__
    std: torch.Tensor

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model: Any = model  # open_clip's CLIP (untyped): encode_image
        self.register_buffer("mean", torch.tensor([255.0 * m for m in mean]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([255.0 * s for s in std]).reshape(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model.encode_image((x - self.mean) / self.std)
        return F.normalize(out.float(), dim=-1)


class ClipExtractor(_torch.CnnExtractor):
    """CLIP image embeddings (``dim`` = the model's embedding width, unit length) in the feature
    space ``clip:ARCH:DIGEST``, and :meth:`embed_text` into the same space.

    Options: ``precision`` ("auto" | "fp32" | "bf16"), ``num_threads``, ``device``.
    """

    def __init__(self, weights: ClipWeights, *, precision: str | None = None, num_threads: int | None = None,
                 device: str | None = None) -> None:
        config = model_config(weights.arch)
        _torch.configure_threads(num_threads)
        model = load_model(weights)
        pre = open_clip.get_model_preprocess_cfg(model)
        size = pre.get("size", 224)
        if not isinstance(size, int):
            if len(set(size)) != 1:
                raise ConfigError(f"the CLIP architecture {weights.arch} takes {size[0]}x{size[1]} images; imgstore "
                                  "embeds square ones only")
            size = int(size[0])
        resize = "squash" if pre.get("resize_mode") == "squash" else "crop"
        resample = str(pre.get("interpolation") or "bicubic")
        self._configure(int(size), resize, resample if resample in ("bicubic", "bilinear") else "bicubic", precision,
                        scaling="clip", device=device)
        self.name = weights.name
        self.dim = int(config["embed_dim"])
        self.arch = weights.arch
        self.weights: Path = weights.path
        self._clip: Any = model  # open_clip's CLIP (untyped): encode_text
        self._model = _ImageTower(model, pre.get("mean", open_clip.OPENAI_DATASET_MEAN),
                                  pre.get("std", open_clip.OPENAI_DATASET_STD)).eval()
        self._tokenizer = open_clip.get_tokenizer(weights.arch)
        self._place(self._model)

    def __repr__(self) -> str:
        return (f"ClipExtractor({self.name!r}, weights={os.fspath(self.weights)!r}, precision={self.precision!r}, "
                f"device={self.device!r}, preprocess={self.preprocess_version!r})")

    def embed_text(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Texts to (n, dim) float32 unit vectors by CLIP's text tower (fp32: one query's work)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self._tokenizer(list(texts))
        if self.device != "cpu":
            tokens = tokens.to(self.device)
        with torch.inference_mode():
            out = F.normalize(self._clip.encode_text(tokens).float(), dim=-1)
        return out.cpu().numpy().astype(np.float32, copy=False)
