"""The extractor protocol and the numpy preprocessing every extractor shares (no torch here)."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from PIL import Image

from ..errors import ConfigError

ResizeMode = Literal["squash", "crop", "crop875"]
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
RESIZE_MODES: tuple[str, ...] = ("squash", "crop", "crop875")


@runtime_checkable
class Extractor(Protocol):
    """Turns RGB images into fixed-length float32 vectors.

    The work is split so that a pipeline can overlap decoding with the model:
    ``preprocess`` runs in worker threads (thread-safe, numpy/Pillow only), ``extract_arrays``
    runs the model on a stacked batch in the calling thread.

    name: registry name (``"efficientnet-lite0"``).
    dim: length of each feature vector.
    preprocess_version: changes whenever ``preprocess`` would give different arrays, so stored
        features can say which preprocessing made them.
    draft_size: (width, height) a JPEG may be draft-decoded down to without hurting the
        features, or None.
    thumbnail_size: (width, height) an encoder-made thumbnail embedded in the file (a HEIC's)
        must cover to stand in for the image: what ``preprocess`` resizes to, so nothing is
        enlarged; or None (always the image itself).
    """

    name: str
    dim: int
    preprocess_version: str
    draft_size: tuple[int, int] | None
    thumbnail_size: tuple[int, int] | None

    def preprocess(self, img: Image.Image) -> npt.NDArray[np.generic]:
        """One RGB image to one model input array (same shape and dtype for every image)."""
        ...

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """A stack of ``preprocess`` outputs (n, ...) to features (n, dim) float32."""
        ...

    def extract(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        """Convenience: ``extract_arrays(stack(preprocess(im) for im in images))``, (n, dim) float32."""
        ...


def resampling(name: str) -> Image.Resampling:
    try:
        return _RESAMPLE[name]
    except KeyError:
        raise ConfigError(f"unknown resample {name!r}; choose one of {', '.join(_RESAMPLE)}") from None


def check_resize_mode(mode: str) -> str:
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {mode!r}; choose one of {', '.join(RESIZE_MODES)}")
    return mode


def short_side(size: int, mode: str) -> int:
    """The shorter side :func:`resize_square` resizes an image's to before it keeps the centre
    ``size`` square (squash: ``size``, each side)."""
    return round(size / 0.875) if mode == "crop875" else size


def resize_square(
    img: Image.Image, size: int, mode: str = "squash", resample: Image.Resampling = Image.Resampling.BICUBIC
) -> npt.NDArray[np.uint8]:
    """An RGB image to a (size, size, 3) uint8 array.

    mode: ``"squash"`` resizes the whole image to size x size (aspect ratio not kept, nothing
    lost); ``"crop"`` resizes the shorter side to ``size`` and keeps the centre square;
    ``"crop875"`` is the ImageNet evaluation habit: shorter side to size / 0.875, centre crop.
    """
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if mode == "squash":
        out = img.resize((size, size), resample) if (w, h) != (size, size) else img
    else:
        short = short_side(size, mode)
        scale = short / min(w, h)
        nw, nh = max(short, round(w * scale)), max(short, round(h * scale))
        left, top = (nw - size) / 2, (nh - size) / 2
        # resize straight into the crop box (one resampling pass, no intermediate image)
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        out = img.resize((size, size), resample, box=box)
    return np.asarray(out, dtype=np.uint8)


def stack_preprocessed(extractor: Extractor, images: Sequence[Image.Image]) -> npt.NDArray[np.generic]:
    if len(images) == 0:
        raise ValueError("no images given")
    return np.stack([extractor.preprocess(im) for im in images])


class SquareInput:
    """What the CNN extractors share whatever runs their model (torch or ONNX Runtime): the
    image squared to ``image_size`` in worker threads, uint8 NHWC batches, the preprocessing's
    version and the JPEG draft size. Subclasses set ``name``, ``dim`` and ``extract_arrays``."""

    name: str
    dim: int

    def _configure_input(self, image_size: int, resize: str, resample: str, scaling: str) -> None:
        self.image_size = int(image_size)
        if self.image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {self.image_size}")
        self.resize = check_resize_mode(resize)
        self.resample = resample
        self._resample = resampling(resample)
        # JPEG drafts (1/2..1/8 DCT scaling) no smaller than twice the input: the resize still
        # has real pixels to filter from
        self.draft_size: tuple[int, int] | None = (2 * self.image_size, 2 * self.image_size)
        # an embedded thumbnail was filtered down by its encoder: covering what the resize keeps
        # is enough (the shorter side it resizes to)
        side = short_side(self.image_size, self.resize)
        self.thumbnail_size: tuple[int, int] | None = (side, side)
        self.preprocess_version = f"{self.resize}{self.image_size}-{self.resample}-{scaling}-v1"

    def preprocess(self, img: Image.Image) -> npt.NDArray[np.uint8]:
        """RGB image -> (image_size, image_size, 3) uint8."""
        return resize_square(img, self.image_size, self.resize, self._resample)

    def extract_arrays(self, batch: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        raise NotImplementedError

    def extract(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]:
        return self.extract_arrays(stack_preprocessed(self, images))


@contextmanager
def no_root_handler() -> Iterator[None]:
    """Libraries that log through the root logger's functions (``logging.info``: open_clip,
    ONNX Runtime's quantiser) install a stderr handler when the root has none, and a library must
    not (an application's own ``basicConfig`` would then do nothing). A NullHandler stands in
    meanwhile."""
    root = logging.getLogger()
    guard = None if root.handlers else logging.NullHandler()
    if guard is not None:
        root.addHandler(guard)
    try:
        yield
    finally:
        if guard is not None:
            root.removeHandler(guard)
