"""Value types that cross module boundaries: what the library returns and what its layers pass
to each other. This module imports nothing of imgstore's, so any module may import it without
making a cycle (the import-graph test in ``tests/test_architecture.py`` keeps it so)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt

#: Image ids, and a best-first ranking: (image ids, Hamming distances), with the number of
#: candidates examined where a probe round reports it.
IdArray = npt.NDArray[np.int64]
Ranking = tuple[IdArray, IdArray]
RoundRanking = tuple[IdArray, IdArray, int]


def plain(value: float | None, digits: int = 6) -> float | None:
    """A similarity as a person reads it: float32 noise rounded away (1.0, not 1.0000001192)."""
    return None if value is None else round(float(value), digits)


@dataclass(frozen=True)
class IndexInfo:
    """An index as listed: its layout, space, state and size (not its fitted parameters)."""

    id: int
    uid: str
    method: str
    n_bits: int
    n_bands: int
    band_width: int
    extractor: str
    space_id: int
    is_active: bool
    n_codes: int
    n_fitted: int
    generation: int
    created_at: datetime
    config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SpaceInfo:
    """A feature space: one extractor and preprocessing version, and how many vectors it holds."""

    id: int
    extractor: str
    dim: int
    preprocess_version: str
    created_at: datetime
    n_features: int | None  # None where it was not counted (get_space)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class SearchResult:
    """One search hit. ``distance``: Hamming distance of the codes (None for an exact float
    search without index); ``cosine``: similarity of the float features when they were used."""

    image_id: int
    paths: list[str]
    distance: int | None
    cosine: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "distance": self.distance, "cosine": plain(self.cosine), "paths": self.paths}


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How a search runs (see ``ImageStore.search``): one value instead of nine loose
    arguments travelling through every layer.

    ``k``: results per query; ``exact``: grow the probe radius until the result equals a
    brute-force Hamming scan; ``probe_radius``: bits flipped per band in the first round;
    ``rerank``: order the best Hamming candidates by cosine of the stored features (None: the
    default, on); ``rerank_depth``: how many candidates the re-rank looks at (None: 10 x k);
    ``cached``: answer from this process's in-memory codes (None: the store's ``cache_codes``);
    ``index_id``: the index to search (None: the active one); ``include_stale``: keep images
    whose every path went stale."""

    k: int = 10
    exact: bool = False
    probe_radius: int = 1
    rerank: bool | None = None
    rerank_depth: int | None = None
    cached: bool | None = None
    index_id: int | None = None
    include_stale: bool = False


@dataclass(frozen=True)
class ThumbnailSource:
    """What a thumbnail of a stored image is made from: its content hash (the thumbnail's
    cache key: renames and moves never make it stale) and its first current file, if any."""

    image_id: int
    sha256: str
    path: str | None


@dataclass(frozen=True)
class ImageFiles:
    """An image's format and its current files with their sizes in bytes (by path)."""

    image_id: int
    format: str | None
    sizes: dict[str, int]


@dataclass(frozen=True)
class CacheState:
    """What one process holds in memory for one index: codes, whether their float features
    are attached, and the bytes of both."""

    index_id: int
    codes: int
    generation: int
    vectors: bool
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
