"""Geometric verification of a candidate copy pair: local features, one global transform, pixels.

The CNN features and the pixel-layout signature say two images look alike; neither can tell a
rotated, cropped or captioned copy of a photo from a second shot of the same scene, and both
drift under rotations and hard crops. What defines a copy is that one image is the other's
pixels under one global map. The check, on a greyscale working image (long side at most
:data:`WORK_SIDE`):

1. ORB keypoints and binary descriptors (OpenCV), matched with Lowe's ratio test.
2. One affine map (rotation, scale per axis, shear, translation: covers rotations, crops,
   resizing and aspect changes) fitted with RANSAC; a copy leaves hundreds of matches on it,
   two unrelated photos a handful.
3. Dense agreement: the two images aligned by that map, both smoothed, compared block by block
   (normalised cross-correlation of textured 16x16 blocks inside the shared area). A copy
   agrees over most of it (overlays, recolouring and recompression change a minority of
   blocks, or change them monotonically); a second shot of the scene from elsewhere does not,
   because parallax moves near and far things differently (the stereo pair
   motorcycle_left/right: median block correlation 0.74-0.78, its copies up to 0.89; copies
   of a photo 0.99 in the median, 0.958 at the first percentile).

Mirrored copies are checked against the mirrored image (ORB is not mirror-invariant).

Images too small for keypoints (a thumbnail), or too plain or repetitive for them to decide
(a chessboard: every corner has a twin, so no match survives the ratio test), are compared by
a search over the edits a copy plausibly went through instead: each image at 32x32, rotated
by up to 15 degrees, zoomed by up to 1.4 (a crop to half the area) and mirrored, against the
other as it is, on the central quarter of the frame only (where added borders, rotation
corners, captions and corner logos do not reach); a copy correlates >= :data:`EDIT_MIN` there.
An image that is flat in the centre gives :data:`UNKNOWN`, and the caller keeps its own answer.
Needs the pixels: callers re-read files. OpenCV is imported on first use.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Literal, cast, overload

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:
    from cv2.typing import MatLike

logger = logging.getLogger(__name__)

COPY, DIFFERENT, UNKNOWN = 1, 0, -1
#: The check's version, kept with each stored verdict (``pair_verdicts``): raised whenever a
#: change here can change a verdict, so that verdicts of an older check are not reused.
#: 2: the edit search compares detail (ramp removed, 0.90) and flat centres by colour.
CHECK_VERSION = 2

#: Long side of the working image (pixels); larger images are reduced, smaller kept.
WORK_SIDE = 512
#: Images whose shorter side is below this are not checked (thumbnails: too small for keypoints).
MIN_SIDE = 64
#: ORB keypoints per image: 500 gave the same verdicts as 1,000 on every photo pair of the
#: copy-detection set (5,432 pairs) in less than half the time (matching is quadratic).
N_KEYPOINTS = 500
#: A keypoint is distinctive when no other keypoint of its own image has a descriptor within
#: this many bits (of 256): only those can survive the ratio test against a copy.
DISTINCT_BITS = 32
#: Both images need this many distinctive keypoints for a conclusive verdict.
MIN_DISTINCT = 50
RATIO = 0.8
RANSAC_PIXELS = 4.0
#: Matches on the affine map needed to call a pair a copy.
MIN_INLIERS = 15
#: The map must be a plausible edit: scale per axis within 1/8..8, aspect change within 3x.
MAX_SCALE = 8.0
MAX_ANISOTROPY = 3.0
BLOCK = 16
#: Blocks flatter than this (grey-level standard deviation) say nothing about alignment.
MIN_BLOCK_STD = 4.0
MIN_BLOCKS = 8
#: Median block correlation of the aligned images from which the pair is a copy. Measured on
#: the copy-detection set's photos (4,669 pairs of copies with cosine >= 0.5): 1% of the copy
#: pairs fall below 0.958, 0.5% below 0.938 (copies of copies: a crop of a greyscale version
#: beside a rotation); the stereo pair and its copies reach 0.74-0.89 (a half-area crop of one
#: view sits at one depth, so one map fits it better).
MIN_AGREEMENT = 0.90
#: A copy keeps its original's keypoints as long as it keeps its resolution: an image with at
#: least RICH distinctive keypoints is no copy of one with fewer than MIN_DISTINCT / 2 whose
#: working image is at least RICH_MIN_SIDE on its shorter side (a textured photo beside a
#: smooth or flat one the features and layouts happen to call alike).
RICH = 4 * MIN_DISTINCT
RICH_MIN_SIDE = 128


@dataclass(frozen=True)
class LocalFeatures:
    """grey: (h, w) uint8 working image; xy: (n, 2) float32 keypoint positions in it;
    descriptors: (n, 32) uint8 ORB descriptors; n_distinct: distinctive keypoints."""

    grey: npt.NDArray[np.uint8]
    xy: npt.NDArray[np.float32]
    descriptors: npt.NDArray[np.uint8]
    n_distinct: int

    @property
    def conclusive(self) -> bool:
        return self.n_distinct >= MIN_DISTINCT

    @property
    def nbytes(self) -> int:
        return int(self.grey.nbytes + self.xy.nbytes + self.descriptors.nbytes)


#: The edit search for images too small or plain for keypoints: working sizes (images at least
#: the larger on their shorter side are compared at it, others at the smaller), the edits tried.
EDIT_SIDES = (32, 64)
EDIT_ANGLES = (0.0, -2.0, 2.0, -5.0, 5.0, -10.0, 10.0, -15.0, 15.0)
EDIT_ZOOMS = (1.0, 1.1, 1.2, 1.3, 1.4)
#: Best central correlation (of the detail: mean and linear ramp removed) from which a pair is a
#: copy. With the ramp left in (before issue 26) the threshold was 0.95, and two ships on a
#: horizon correlated 0.93 by their shared gradient alone; on the copy-detection set
#: (benchmarks/results/dedup_extended.md) the detail at 0.90 gave whole-set pair precision 1.000
#: with no group mixing two originals, at 0.93 and 0.90 alike, and 0.90 the better recall
#: (half-area crops of thumbnails 0.348 against 0.317).
EDIT_MIN = 0.90
#: A centre flatter than this (grey-level standard deviation) cannot be compared; one with
#: EDIT_TEXTURED times as much is no copy of a flat one (a copy keeps its centre's contrast).
EDIT_MIN_STD = 2.0
EDIT_TEXTURED = 4.0
#: Two centres without detail (:func:`colour_compare`): mean absolute difference (0-255, per
#: channel) under the best edit and brightness up to which they are the same colours, and above
#: which two clearly coloured centres (saturation at least COLOURED) are different pictures.
COLOUR_SAME = 4.0
COLOURS_APART = 6.0
COLOURED = 0.15
#: Colour spread (grey levels, per channel) a centre needs for its colours to make a copy.
COLOUR_MIN_STD = 1.0
#: The brightness change a copy may have gone through (gain on all channels), either way.
MAX_GAIN = 1.5


@dataclass(frozen=True)
class EditViews:
    """An image for the edit search at one working size: ``plain`` (P,) its centre's detail
    (the mean and a linear ramp removed), unit length (zeros when flat), ``std`` that detail's
    grey-level standard deviation; ``variants`` (V, P) the centre after each edit (rotation x
    zoom x mirror), the same way."""

    plain: npt.NDArray[np.float32]
    variants: npt.NDArray[np.float32]
    std: float

    @property
    def flat(self) -> bool:
        return self.std < EDIT_MIN_STD


def edit_views(grey: npt.NDArray[np.uint8], side: int) -> EditViews:
    import cv2

    img = Image.fromarray(grey)
    method = Image.Resampling.BOX if min(img.size) >= side else Image.Resampling.BILINEAR
    small = cv2.GaussianBlur(np.asarray(img.resize((side, side), method), dtype=np.float32), (0, 0), 1.0)
    map_x, map_y = _edit_maps(side)
    patches = cv2.remap(small, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    # the mean and a linear ramp removed: any two smooth gradients (two different skies)
    # correlate fully, and a ramp is no content to tell a copy by (a centre that is a ramp
    # alone is flat)
    basis = _ramp_basis(side)
    patches = patches - (patches @ basis) @ basis.T
    norms = np.linalg.norm(patches, axis=1, keepdims=True)
    unit = np.where(norms > 1e-6, patches / np.maximum(norms, 1e-6), 0).astype(np.float32)
    return EditViews(unit[0], unit, float(norms[0, 0]) / np.sqrt(unit.shape[1]))


@cache
def _ramp_basis(side: int) -> npt.NDArray[np.float32]:
    """(P, 3) orthonormal basis of the constant and the two linear ramps over the centre."""
    q = side // 4
    ys, xs = np.mgrid[q:side - q, q:side - q]
    basis, _ = np.linalg.qr(np.stack([np.ones(xs.size), xs.ravel(), ys.ravel()], axis=1).astype(np.float64))
    return basis.astype(np.float32)


@cache
def _edit_maps(side: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Where each pixel of the centre (the middle half of each axis) of each edited view comes
    from in the working image: (V, P) x and y, one row per edit, the unedited view first."""
    import cv2

    q = side // 4
    ys, xs = np.mgrid[q:side - q, q:side - q]
    dst = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)]).astype(np.float64)  # (3, P)
    centre = (side / 2 - 0.5, side / 2 - 0.5)
    rows_x, rows_y = [], []
    for mirrored in (False, True):
        for angle in EDIT_ANGLES:
            for zoom in EDIT_ZOOMS:
                src = cv2.invertAffineTransform(cv2.getRotationMatrix2D(centre, angle, zoom)) @ dst  # (2, P)
                rows_x.append(side - 1 - src[0] if mirrored else src[0])
                rows_y.append(src[1])
    return np.array(rows_x, dtype=np.float32), np.array(rows_y, dtype=np.float32)


def edit_compare(a: Views, b: Views) -> Match:
    """Whether one image is the other after a rotation, zoom or mirroring (see the module doc),
    at the largest working size both have."""
    side = max(s for s in EDIT_SIDES if s in a.edits and s in b.edits)
    ea, eb = a.edits[side], b.edits[side]
    if ea.flat or eb.flat:
        textured = max(ea.std, eb.std) >= EDIT_TEXTURED * EDIT_MIN_STD
        if textured and not (ea.flat and eb.flat):
            return Match(DIFFERENT)
        return colour_compare(a.colour, b.colour) if ea.flat and eb.flat else Match(UNKNOWN)
    best = float(max((ea.variants @ eb.plain).max(), (eb.variants @ ea.plain).max()))
    return Match(COPY if best >= EDIT_MIN else DIFFERENT, agreement=best)


@dataclass(frozen=True)
class Views:
    """What the check keeps of one image: keypoints (None when too small) and the edit views
    by working size (the smallest always, larger ones when the image is that large)."""

    local: LocalFeatures | None
    edits: dict[int, EditViews]
    colour: npt.NDArray[np.float32]  # (side, side, 3) RGB at the first edit size


def views(img: Image.Image) -> Views:
    grey = working_image(img)
    local = local_features(grey) if min(img.size) >= MIN_SIDE else None
    sides = [s for s in EDIT_SIDES if s == EDIT_SIDES[0] or min(img.size) >= s]
    side = EDIT_SIDES[0]
    colour = np.asarray(img.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    return Views(local, {s: edit_views(grey, s) for s in sides}, colour)


def colour_compare(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> Match:
    """Two images with no detail in their centres (a sky, a wall, fog) are told apart by colour.
    Under the best of the edits and a change of brightness (one gain for all channels), the
    centres' mean absolute difference (0-255) is at most COLOUR_SAME for a copy (COPY); above
    COLOURS_APART, with both centres clearly coloured, the two are different pictures
    (DIFFERENT: a copy keeps its colours unless recoloured on purpose; a greyscale copy has
    none, so it is never told apart this way). Else UNKNOWN. ``a``, ``b``: (side, side, 3)
    RGB at the first edit size."""
    import cv2

    side = a.shape[0]
    map_x, map_y = _edit_maps(side)
    best = np.inf
    for x, y in ((a, b), (b, a)):
        plain = cv2.remap(y, map_x[:1], map_y[:1], interpolation=cv2.INTER_LINEAR)[0].ravel()  # the centre (P * 3)
        edited = cv2.remap(x, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        edited = edited.reshape(len(edited), -1)  # (V, P * 3)
        gain = np.clip((edited @ plain) / np.maximum((edited * edited).sum(axis=1), 1e-6), 1 / MAX_GAIN, MAX_GAIN)
        best = min(best, float(np.abs(edited * gain[:, None] - plain[None]).mean(axis=1).min()))
    agreement = 1.0 - best / 255
    q = side // 4
    centres = [v[q:side - q, q:side - q].reshape(-1, 3) for v in (a, b)]
    # the same colours make a copy only where there is something to agree on (a ramp, a
    # shade): two plain greys are told apart by the rule's features, not called copies here
    if best <= COLOUR_SAME and min(float(c.std(axis=0).mean()) for c in centres) >= COLOUR_MIN_STD:
        return Match(COPY, agreement=agreement)
    coloured = min(_saturation(c) for c in centres) >= COLOURED
    return Match(DIFFERENT if coloured and best > COLOURS_APART else UNKNOWN, agreement=agreement)


def _saturation(rgb: npt.NDArray[np.float32]) -> float:
    """Mean saturation (HSV's) of (n, 3) RGB pixels."""
    top = rgb.max(axis=1)
    return float(((top - rgb.min(axis=1)) / np.maximum(top, 1.0)).mean())


def compare_views(a: Views, b: Views, b_mirrored: Callable[[], LocalFeatures]) -> Match:
    """Keypoints where both images have them and they decide; else the edit search."""
    if a.local is not None and b.local is not None:
        match = compare_pair(a.local, b.local, b_mirrored)
        if match.verdict != UNKNOWN:
            return match
    return edit_compare(a, b)


@dataclass(frozen=True)
class Match:
    verdict: int  # COPY, DIFFERENT or UNKNOWN
    inliers: int = 0
    agreement: float | None = None  # median block correlation once aligned
    mirrored: bool = False


def working_image(img: Image.Image) -> npt.NDArray[np.uint8]:
    """(h, w) uint8 greyscale, long side at most WORK_SIDE."""
    grey = img.convert("L")
    scale = WORK_SIDE / max(grey.size)
    if scale < 1:
        grey = grey.resize((max(1, round(grey.width * scale)), max(1, round(grey.height * scale))), Image.Resampling.BOX)
    return np.asarray(grey, dtype=np.uint8)


def local_features(grey: npt.NDArray[np.uint8]) -> LocalFeatures:
    import cv2

    keypoints, descriptors = cv2.ORB.create(nfeatures=N_KEYPOINTS).detectAndCompute(grey, None)
    if descriptors is None or len(keypoints) < 2:
        return LocalFeatures(grey, np.zeros((0, 2), np.float32), np.zeros((0, 32), np.uint8), 0)
    xy = np.array([k.pt for k in keypoints], dtype=np.float32)
    descriptors = cast("npt.NDArray[np.uint8]", descriptors)  # ORB's: (n, 32) uint8
    # nearest other keypoint of the same image: k=2 gives the keypoint itself, then its twin
    own = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(descriptors, descriptors, k=2)
    n_distinct = sum(1 for m in own if len(m) == 2 and m[1].distance >= DISTINCT_BITS)
    return LocalFeatures(grey, xy, descriptors, n_distinct)


def compare(a: LocalFeatures, b: LocalFeatures) -> Match:
    """Whether ``b`` shows ``a``'s pixels under one affine map (no mirroring; see :func:`compare_pair`)."""
    import cv2

    if not (a.conclusive and b.conclusive):
        rich, poor = (a, b) if a.n_distinct >= b.n_distinct else (b, a)
        unlike = rich.n_distinct >= RICH and poor.n_distinct < MIN_DISTINCT // 2 and min(poor.grey.shape) >= RICH_MIN_SIDE
        return Match(DIFFERENT if unlike else UNKNOWN)
    pairs = cv2.BFMatcher(cv2.NORM_HAMMING).knnMatch(a.descriptors, b.descriptors, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < RATIO * p[1].distance]
    if len(good) < MIN_INLIERS:
        return Match(DIFFERENT, len(good))
    src = a.xy[[g.queryIdx for g in good]]
    dst = b.xy[[g.trainIdx for g in good]]
    fit, inliers = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS,
                                        maxIters=2000, confidence=0.995)
    affine = cast("npt.NDArray[np.float64] | None", fit)  # a 2x3 float64 matrix, None when no fit
    n_in = int(inliers.sum()) if inliers is not None else 0
    if affine is None or n_in < MIN_INLIERS or not _plausible(affine):
        return Match(DIFFERENT, n_in)
    agreement = aligned_agreement(a.grey, b.grey, affine)
    if agreement is None:
        return Match(UNKNOWN, n_in)
    return Match(COPY if agreement >= MIN_AGREEMENT else DIFFERENT, n_in, agreement)


def compare_pair(a: LocalFeatures, b: LocalFeatures, b_mirrored: Callable[[], LocalFeatures]) -> Match:
    """:func:`compare`, then against the mirrored ``b`` when that did not find a copy."""
    direct = compare(a, b)
    if direct.verdict == COPY or not (a.conclusive and b.conclusive):
        return direct
    mirrored = compare(a, b_mirrored())
    if mirrored.verdict == COPY:
        return Match(COPY, mirrored.inliers, mirrored.agreement, mirrored=True)
    if direct.verdict == UNKNOWN or mirrored.verdict == UNKNOWN:
        return Match(UNKNOWN, max(direct.inliers, mirrored.inliers))
    return direct


def _plausible(affine: npt.NDArray[np.float64]) -> bool:
    s = np.linalg.svd(affine[:, :2], compute_uv=False)
    return bool(np.linalg.det(affine[:, :2]) > 0 and s[1] > 1 / MAX_SCALE and s[0] < MAX_SCALE
                and s[0] / s[1] <= MAX_ANISOTROPY)


def aligned_agreement(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8], affine: npt.NDArray[np.float64]) -> float | None:
    """Median correlation of textured blocks of ``a`` and ``b`` aligned by ``affine`` (a's
    coordinates to b's), compared in the frame of the smaller of the two (the larger one is
    smoothed to its scale first); None when the shared area has too few textured blocks."""
    import cv2

    scale = float(np.sqrt(abs(np.linalg.det(affine[:, :2]))))  # b pixels per a pixel
    # the two images in one frame, and where the warped one covers it (255)
    xa: MatLike
    yb: MatLike
    if scale < 1:  # a is the larger: bring it into b's frame
        xa = cv2.warpAffine(cv2.GaussianBlur(a, (0, 0), 0.5 / scale), affine, (b.shape[1], b.shape[0]), flags=cv2.INTER_AREA)
        covered = cv2.warpAffine(np.full(a.shape, 255, np.uint8), affine, (b.shape[1], b.shape[0]), flags=cv2.INTER_NEAREST)
        yb = b
    else:
        flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
        yb = cv2.warpAffine(cv2.GaussianBlur(b, (0, 0), 0.5 * scale), affine, (a.shape[1], a.shape[0]), flags=flags)
        covered = cv2.warpAffine(np.full(b.shape, 255, np.uint8), affine, (a.shape[1], a.shape[0]),
                                 flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP)
        xa = a
    inside = cv2.erode(covered, np.ones((5, 5), np.uint8)) > 0
    x = cv2.GaussianBlur(xa, (0, 0), 1.0).astype(np.float32)
    y = cv2.GaussianBlur(yb, (0, 0), 1.0).astype(np.float32)
    corr = _block_correlations(x, y, inside)
    return float(np.median(corr)) if len(corr) >= MIN_BLOCKS else None


def _block_correlations(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.float32], inside: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float32]:
    h, w = (x.shape[0] // BLOCK) * BLOCK, (x.shape[1] // BLOCK) * BLOCK

    def blocks(v: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        return v[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).transpose(0, 2, 1, 3).reshape(-1, BLOCK * BLOCK)

    bx, by, bin_ = blocks(x), blocks(y), blocks(inside).all(axis=1)
    bx, by = bx - bx.mean(axis=1, keepdims=True), by - by.mean(axis=1, keepdims=True)
    sx, sy = bx.std(axis=1), by.std(axis=1)
    keep = bin_ & (sx >= MIN_BLOCK_STD) & (sy >= MIN_BLOCK_STD)
    corr: npt.NDArray[np.float32] = ((bx[keep] * by[keep]).mean(axis=1) / (sx[keep] * sy[keep])).astype(np.float32)
    return corr


def _nbytes(found: Views | LocalFeatures | None) -> int:
    if isinstance(found, Views):
        return (found.local.nbytes if found.local is not None else 0) + sum(e.variants.nbytes for e in found.edits.values()) + 200
    return found.nbytes if isinstance(found, LocalFeatures) else 100


ImageLoader = Callable[[int], "Image.Image | None"]


@dataclass
class VerifyStats:
    pairs: int = 0
    copies: int = 0
    different: int = 0
    unknown: int = 0
    images_read: int = 0
    unreadable: int = 0
    seconds: float = 0.0  # wall time spent reading images and comparing pairs

    def count(self, verdicts: npt.NDArray[np.int8]) -> None:
        """Add pairs decided as ``verdicts`` (COPY, DIFFERENT or UNKNOWN each)."""
        self.pairs += len(verdicts)
        self.copies += int((verdicts == COPY).sum())
        self.different += int((verdicts == DIFFERENT).sum())
        self.unknown += int((verdicts == UNKNOWN).sum())


@dataclass
class PairVerifier:
    """Verdicts for pairs of image ids, reading each image once (``load``: id -> PIL image, or
    None when it cannot be read) and keeping what it computed of them within ``max_bytes``.
    Images are read and pairs compared on ``workers`` threads (OpenCV and Pillow release the GIL)."""

    load: ImageLoader
    max_bytes: int = 1 << 30
    #: images read ahead per part of the pairs (all of a part's images stay cached while it runs)
    part_images: int = 512
    workers: int = field(default_factory=lambda: min(8, os.cpu_count() or 2))
    stats: VerifyStats = field(default_factory=VerifyStats)
    #: (image_id, False): its Views; (image_id, True): the mirrored image's LocalFeatures; None
    #: when unreadable (or, mirrored, without keypoints)
    _cache: OrderedDict[tuple[int, bool], Views | LocalFeatures | None] = field(default_factory=OrderedDict)
    _bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def verdicts(self, ids_a: Iterable[int], ids_b: Iterable[int]) -> npt.NDArray[np.int8]:
        started = time.perf_counter()
        pairs = list(zip((int(i) for i in ids_a), (int(i) for i in ids_b)))
        out = np.full(len(pairs), UNKNOWN, dtype=np.int8)
        step = self.part_images
        order = sorted(range(len(pairs)), key=lambda k: pairs[k])
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            start = 0
            while start < len(order):
                part: list[int] = []
                seen: set[int] = set()
                while start < len(order) and (len(seen) < step or {*pairs[order[start]]} <= seen):
                    seen.update(pairs[order[start]])
                    part.append(order[start])
                    start += 1
                missing = [i for i in seen if (i, False) not in self._cache]
                for image_id, feats in zip(missing, pool.map(self._features, missing)):
                    self._put((image_id, False), feats)
                for k, match in zip(part, pool.map(lambda k: self._compare(*pairs[k]), part)):
                    out[k] = match.verdict
        self.stats.count(out)
        self.stats.seconds += time.perf_counter() - started
        return out

    def _compare(self, a: int, b: int) -> Match:
        va, vb = self._get(a, False), self._get(b, False)
        if va is None or vb is None:
            return Match(UNKNOWN)

        def b_mirrored() -> LocalFeatures:
            found = self._get(b, True) or vb.local
            assert found is not None, "compare_views asks for the mirror only when b has keypoints"
            return found

        return compare_views(va, vb, b_mirrored)

    @overload
    def _get(self, image_id: int, mirrored: Literal[False]) -> Views | None: ...
    @overload
    def _get(self, image_id: int, mirrored: Literal[True]) -> LocalFeatures | None: ...
    def _get(self, image_id: int, mirrored: bool) -> Views | LocalFeatures | None:
        """(image_id, False): its Views (None: unreadable); (image_id, True): the mirrored image's
        LocalFeatures (computed when first asked for)."""
        key = (image_id, mirrored)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        found: Views | LocalFeatures | None
        if mirrored:
            plain = self._get(image_id, False)
            found = (
                None if plain is None or plain.local is None
                else local_features(np.ascontiguousarray(plain.local.grey[:, ::-1]))
            )
        else:
            found = self._features(image_id)
        self._put(key, found)
        return found

    def _put(self, key: tuple[int, bool], feats: Views | LocalFeatures | None) -> None:
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = feats
            self._bytes += _nbytes(feats)
            while self._bytes > self.max_bytes and len(self._cache) > 2 * self.part_images:
                self._bytes -= _nbytes(self._cache.popitem(last=False)[1])

    def _features(self, image_id: int) -> Views | None:
        try:
            img = self.load(image_id)
        except Exception as exc:  # noqa: BLE001 - an unreadable file only costs this pair its verdict
            logger.info("geometric check: image %d could not be read: %s", image_id, exc)
            img = None
        with self._lock:
            self.stats.images_read += 1
            self.stats.unreadable += img is None
        return None if img is None else views(img)
