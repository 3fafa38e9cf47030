"""Shared benchmark plumbing: the CIFAR-10 protocol split, cached features, test photos, scoring.

Everything heavy is cached under ``~/.cache/imgstore-bench/`` (override: IMGSTORE_BENCH_CACHE),
outside the repository. The CIFAR-10 test archive is ``../shared/datasets/cifar10-test.tar.gz``
relative to the repository root (override: IMGSTORE_CIFAR, the .tar.gz or an unpacked folder).
"""

from __future__ import annotations

import logging
import os
import tarfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from imgstore.decode import DecodedImage, load_image
from imgstore.evaluation import RetrievalScores, cosine_distances, evaluate_distances
from imgstore.features import get_extractor
from imgstore.features.base import Extractor
from imgstore.features.pipeline import extract_stream

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
N_QUERIES_PER_CLASS = 100


def cache_dir() -> Path:
    path = Path(os.environ.get("IMGSTORE_BENCH_CACHE") or Path.home() / ".cache" / "imgstore-bench")
    path.mkdir(parents=True, exist_ok=True)
    return path


def cifar_root() -> Path:
    """The unpacked ``cifar10-test/`` folder (``<class>/<NNNN>.jpg``), unpacking the archive once."""
    source = Path(os.environ.get("IMGSTORE_CIFAR") or REPO_ROOT.parent / "shared" / "datasets" / "cifar10-test.tar.gz")
    if source.is_dir():
        return source / "cifar10-test" if (source / "cifar10-test").is_dir() else source
    if not source.is_file():
        raise FileNotFoundError(f"CIFAR-10 archive not found at {source}; set IMGSTORE_CIFAR")
    target = cache_dir() / "cifar10"
    root = target / "cifar10-test"
    marker = target / ".unpacked"
    if not marker.exists():
        target.mkdir(parents=True, exist_ok=True)
        logger.info("unpacking %s into %s", source, target)
        with tarfile.open(source) as tar:
            tar.extractall(target, filter="data")
        marker.write_text(str(source))
    return root


@dataclass(frozen=True)
class CifarSplit:
    """The project protocol: per class, the first 100 files by name are queries, the other 900 the database."""

    classes: list[str]
    q_paths: list[Path]
    q_labels: npt.NDArray[np.int64]
    db_paths: list[Path]
    db_labels: npt.NDArray[np.int64]


def cifar_split() -> CifarSplit:
    root = cifar_root()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    q_paths: list[Path] = []
    db_paths: list[Path] = []
    q_labels: list[int] = []
    db_labels: list[int] = []
    for label, name in enumerate(classes):
        files = sorted((root / name).iterdir(), key=lambda p: p.name)
        q_paths += files[:N_QUERIES_PER_CLASS]
        q_labels += [label] * len(files[:N_QUERIES_PER_CLASS])
        db_paths += files[N_QUERIES_PER_CLASS:]
        db_labels += [label] * len(files[N_QUERIES_PER_CLASS:])
    return CifarSplit(classes, q_paths, np.array(q_labels), db_paths, np.array(db_labels))


@dataclass(frozen=True)
class CifarFeatures:
    q_feats: npt.NDArray[np.float32]  # (1000, dim)
    q_labels: npt.NDArray[np.int64]
    db_feats: npt.NDArray[np.float32]  # (9000, dim)
    db_labels: npt.NDArray[np.int64]
    preprocess_version: str
    precision: str
    seconds: float  # wall time of the extraction that made these features (pipeline, 10,000 images)


def extract_paths(
    extractor: Extractor, paths: list[Path], *, batch_size: int = 64, workers: int | None = None, draft: bool = True,
    flip: bool = False,
) -> npt.NDArray[np.float32]:
    """Features (n, dim) of image files through the real decode + extract pipeline; any failure raises.

    flip: mirror each decoded image left-right before the extractor sees it (a training view)."""
    draft_size = extractor.draft_size if draft else None

    def load(p: Path) -> DecodedImage:
        decoded = load_image(p, draft_size=draft_size)
        return replace(decoded, image=decoded.image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) if flip else decoded

    rows: list[npt.NDArray[np.float32]] = []
    for batch in extract_stream(paths, load, extractor, batch_size=batch_size, workers=workers):
        for r in batch:
            if r.features is None:
                raise RuntimeError(f"{r.item}: {r.error}")
            rows.append(r.features)
    return np.stack(rows).astype(np.float32)


def _slug(options: dict[str, Any]) -> str:
    return "".join(f"-{k}={v}" for k, v in sorted(options.items()))


def cifar_features(extractor_name: str = "efficientnet-lite0", precision: str = "auto", **options: Any) -> CifarFeatures:
    """Features of the CIFAR-10 protocol split, computed once and cached as
    ``features-<name>-<precision>[-<options>].npz`` (q_feats, q_labels, db_feats, db_labels, paths)."""
    torch_free = extractor_name == "color"
    extractor = get_extractor(extractor_name, **options) if torch_free else get_extractor(
        extractor_name, precision=precision, **options
    )
    resolved = getattr(extractor, "precision", "fp32")
    path = cache_dir() / f"features-{extractor_name}-{resolved}{_slug(options)}.npz"
    if path.exists():
        with np.load(path) as z:
            if str(z["preprocess_version"]) == extractor.preprocess_version:
                return CifarFeatures(
                    z["q_feats"], z["q_labels"], z["db_feats"], z["db_labels"],
                    str(z["preprocess_version"]), resolved, float(z["seconds"]) if "seconds" in z else 0.0,
                )
        logger.info("%s was made with another preprocessing; recomputing", path)
    split = cifar_split()
    start = time.perf_counter()
    feats = extract_paths(extractor, split.q_paths + split.db_paths)
    seconds = time.perf_counter() - start
    n_q = len(split.q_paths)
    result = CifarFeatures(
        feats[:n_q], split.q_labels, feats[n_q:], split.db_labels, extractor.preprocess_version, resolved, seconds
    )
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        q_feats=result.q_feats, q_labels=result.q_labels, db_feats=result.db_feats, db_labels=result.db_labels,
        q_paths=np.array([str(p) for p in split.q_paths]), db_paths=np.array([str(p) for p in split.db_paths]),
        preprocess_version=np.array(extractor.preprocess_version), seconds=np.array(seconds),
    )
    tmp.replace(path)
    return result


def cifar_flipped_db_features(extractor_name: str = "efficientnet-lite0", precision: str = "auto") -> npt.NDArray[np.float32]:
    """Features (9000, dim) of the protocol's database images mirrored left-right, in
    ``cifar_split().db_paths`` order: extra training views for a hasher (never queries). Computed
    once and cached as ``features-<name>-<precision>-flipped-db.npz``."""
    extractor = get_extractor(extractor_name, precision=precision)
    resolved = getattr(extractor, "precision", "fp32")
    path = cache_dir() / f"features-{extractor_name}-{resolved}-flipped-db.npz"
    if path.exists():
        with np.load(path) as z:
            if str(z["preprocess_version"]) == extractor.preprocess_version:
                return z["db_feats"]
        logger.info("%s was made with another preprocessing; recomputing", path)
    split = cifar_split()
    start = time.perf_counter()
    feats = extract_paths(extractor, split.db_paths, flip=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp, db_feats=feats, db_labels=split.db_labels, db_paths=np.array([str(p) for p in split.db_paths]),
        preprocess_version=np.array(extractor.preprocess_version), seconds=np.array(time.perf_counter() - start),
    )
    tmp.replace(path)
    return feats


def retrieval_scores(f: CifarFeatures, *, centre: bool = False) -> RetrievalScores:
    """mAP@ALL and P@10 of exact cosine kNN; ``centre`` subtracts the database mean from both sides first."""
    q, db = f.q_feats.astype(np.float32), f.db_feats.astype(np.float32)
    if centre:
        mean = db.mean(axis=0, keepdims=True)
        q, db = q - mean, db - mean
    return evaluate_distances(cosine_distances(q, db), f.q_labels, f.db_labels)


def photo_folder(n: int = 100, seed: int = 0) -> list[Path]:
    """``n`` full-size JPEGs (2000-4000 px on the long side, quality 90) made once from
    scikit-image's bundled photos: upscaled, randomly cropped and flipped, so decode cost is real."""
    from PIL import Image
    import skimage

    folder = cache_dir() / f"photos-{n}-{seed}"
    files = sorted(folder.glob("*.jpg"))
    if len(files) == n:
        return files
    folder.mkdir(parents=True, exist_ok=True)
    data = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
             "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "immunohistochemistry.png",
             "color.png", "logo.png", "horse.png", "camera.png", "coins.png", "moon.png", "page.png",
             "grass.png", "gravel.png", "brick.png", "clock_motion.png"]
    sources = []
    for name in names:
        p = data / name
        if p.exists():
            sources.append(load_image(p).image)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        long_side = int(rng.integers(2000, 4001))
        aspect = float(rng.choice([4 / 3, 3 / 2, 16 / 9, 1.0]))
        w, h = (long_side, int(long_side / aspect)) if rng.random() < 0.7 else (int(long_side / aspect), long_side)
        # crop a random 70-100% window of the source to the target aspect, then upscale
        sw, sh = src.size
        frac = float(rng.uniform(0.7, 1.0))
        cw = min(sw, int(sw * frac))
        ch = min(sh, max(1, int(cw * h / w)))
        cw = min(cw, int(ch * w / h))
        x0 = int(rng.integers(0, sw - cw + 1))
        y0 = int(rng.integers(0, sh - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.Resampling.BICUBIC)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"photo{i:03d}.jpg"
        img.save(path, quality=90)
        out.append(path)
    return out
