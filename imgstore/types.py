"""Value types that cross module boundaries: what the library returns and what its layers pass
to each other. This module imports nothing of imgstore's, so any module may import it without
making a cycle (the import-graph test in ``tests/test_architecture.py`` keeps it so)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import date, datetime, timezone
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


#: What ``SearchFilter(where=...)`` takes: a mapping of fields to values, or ``"KEY=VALUE"``
#: strings or ``(key, value)`` pairs (one such string alone is one condition).
WhereArg = Mapping[str, Any] | str | Iterable[str | tuple[str, Any]]
#: A point in time as a filter takes it: a datetime, a date (its midnight) or ISO text.
WhenArg = datetime | date | str | None

_PARTIAL_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?$")


@dataclass(frozen=True, slots=True, init=False)
class SearchFilter:
    """Which stored images a search may return; every condition given must hold (AND). An empty
    filter allows every image. Equal filters are equal values (fields normalized and sorted),
    so a filter is a cache key.

    ``where``: metadata fields and values (``{"species": "cat"}``, or ``"species=cat"`` strings
    as the CLI takes them): the image's field, as text, equals the value (a number matches
    ``"3"``, true and false match ``"true"``/``"false"``), or, when the field holds a list, one
    of its items does. ``tags``: tags every image must have (``"cat"`` alone is one tag); the
    same as ``where`` on the ``tags`` field. ``under``: a folder; the image has a current file
    under it (``~`` expanded, made absolute here, as ingest stores paths).
    ``taken_after`` / ``taken_before``: EXIF capture time at or after / strictly before this
    point (a date means its midnight, ``"2024"`` and ``"2024-06"`` their first day); images
    without a capture time are left out. Times without an offset are compared with the
    camera's clock as it wrote it (what ingest stores); times with one are converted to UTC.
    ``labels``: what the classifier sees (ImageNet names, ``"golden retriever"``; ``"dog"`` alone
    is one label): every one must be among the image's kept labels, in any feature space that
    has labels. Compared case-insensitively (kept here in lower case, spaces collapsed); a name
    that is no ImageNet class is refused when the filter is used, with the closest names.

    Malformed values raise ``ValueError`` with a one-line message that says what to give.
    """

    where: tuple[tuple[str, str], ...]
    tags: tuple[str, ...]
    under: str | None
    taken_after: datetime | None
    taken_before: datetime | None
    labels: tuple[str, ...]

    def __init__(self, where: WhereArg = (), tags: str | Iterable[str] = (), under: str | os.PathLike[str] | None = None,
                 taken_after: WhenArg = None, taken_before: WhenArg = None, labels: str | Iterable[str] = ()) -> None:
        object.__setattr__(self, "where", _where_pairs(where))
        object.__setattr__(self, "tags", _tag_names(tags))
        object.__setattr__(self, "under", _folder(under))
        after, before = _when(taken_after, "taken_after"), _when(taken_before, "taken_before")
        object.__setattr__(self, "taken_after", after)
        object.__setattr__(self, "taken_before", before)
        object.__setattr__(self, "labels", _label_names(labels))

    def __bool__(self) -> bool:
        """True when the filter leaves some image out (any condition given)."""
        return bool(self.where or self.tags or self.under is not None or self.taken_after is not None
                    or self.taken_before is not None or self.labels)

    def as_dict(self) -> dict[str, Any]:
        """The conditions as given to the HTTP API (``where`` as ``KEY=VALUE`` strings)."""
        out: dict[str, Any] = {}
        if self.where:
            out["where"] = [f"{k}={v}" for k, v in self.where]
        if self.tags:
            out["tag"] = list(self.tags)
        if self.under is not None:
            out["under"] = self.under
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value.isoformat()
        if self.labels:
            out["label"] = list(self.labels)
        return out


def _no_nul(text: str, what: str) -> str:
    if "\x00" in text:
        raise ValueError(f"{what} cannot hold a NUL character")
    return text


def _where_pairs(where: WhereArg) -> tuple[tuple[str, str], ...]:
    """Sorted, distinct (key, value as text) pairs, deciding by type first: a mapping's items,
    one ``KEY=VALUE`` string, or an iterable of such strings or of pairs."""
    items: list[Any]
    if isinstance(where, Mapping):
        items = list(where.items())
    elif isinstance(where, str):
        items = [where]
    else:
        items = list(where)
    out = set()
    for item in items:
        if isinstance(item, str):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"where: {item!r} is not KEY=VALUE; give e.g. species=cat")
        elif isinstance(item, tuple) and len(item) == 2:
            key, value = item
        else:
            raise ValueError(f"where: {item!r} is not KEY=VALUE or a (key, value) pair")
        if not isinstance(key, str) or not key.strip():
            raise ValueError(f"where: {item!r} names no field; give KEY=VALUE, e.g. species=cat")
        out.add((_no_nul(key.strip(), "a where field"), _no_nul(_as_text(value, key), "a where value")))
    return tuple(sorted(out))


def _as_text(value: Any, key: str) -> str:
    """A metadata value as the filter compares it: a string as it is; a number or a boolean as
    JSON writes it (``3``, ``1.5``, ``true``)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or (isinstance(value, (int, float)) and math.isfinite(value)):
        return json.dumps(value)
    raise ValueError(f"where: the value of {key!r} must be a string, a number or true/false, got {value!r}")


def _tag_names(tags: str | Iterable[str]) -> tuple[str, ...]:
    listed = [tags] if isinstance(tags, str) else list(tags)
    for tag in listed:
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag: {tag!r} is not a tag; give a non-empty name")
        _no_nul(tag, "a tag")
    return tuple(sorted(set(listed)))


def _label_names(labels: str | Iterable[str]) -> tuple[str, ...]:
    """Sorted, distinct label names as compared: lower case, white space collapsed."""
    listed = [labels] if isinstance(labels, str) else list(labels)
    out = set()
    for name in listed:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"label: {name!r} is not a label; give an ImageNet name, e.g. golden retriever")
        out.add(" ".join(_no_nul(name, "a label").split()).casefold())
    return tuple(sorted(out))


def _folder(under: str | os.PathLike[str] | None) -> str | None:
    if under is None:
        return None
    if not isinstance(under, (str, os.PathLike)):
        raise ValueError(f"under: {under!r} is not a folder; give a path")
    text = os.fspath(under)
    if not isinstance(text, str) or not text.strip():
        raise ValueError("under: give a folder, e.g. ~/Pictures/2024")
    return os.path.abspath(os.path.expanduser(_no_nul(text, "a folder")))


def _when(value: WhenArg, name: str) -> datetime | None:
    """A filter's time bound as an aware UTC datetime (see :class:`SearchFilter`)."""
    if value is None:
        return None
    if isinstance(value, datetime):
        when = value
    elif isinstance(value, date):
        when = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        when = _parse_when(value.strip(), name)
    else:
        raise ValueError(f"{name}: {value!r} is not a date or time; give e.g. 2024-06-01 or 2024-06-01T14:30")
    try:
        return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    except OverflowError:  # an offset that moves year 1 or 9999 out of range
        raise ValueError(f"{name}: {value!r} is out of range; give a time between the years 1 and 9999") from None


def _parse_when(text: str, name: str) -> datetime:
    partial = _PARTIAL_DATE.match(text)
    try:
        if partial:
            return datetime(int(partial.group(1)), int(partial.group(2) or 1), 1)
        return datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except (ValueError, IndexError):
        raise ValueError(f"{name}: {text!r} is not a date or time; give e.g. 2024-06-01 or 2024-06-01T14:30") from None


@dataclass(frozen=True, slots=True)
class SearchOptions:
    """How a search runs (see ``ImageStore.search``): one value instead of ten loose
    arguments travelling through every layer.

    ``k``: results per query; ``exact``: grow the probe radius until the result equals a
    brute-force Hamming scan; ``probe_radius``: bits flipped per band in the first round;
    ``rerank``: order the best Hamming candidates by cosine of the stored features (None: the
    default, on); ``rerank_depth``: how many candidates the re-rank looks at (None: 10 x k);
    ``cached``: answer from this process's in-memory codes (None: the store's ``cache_codes``);
    ``index_id``: the index to search (None: the active one); ``include_stale``: keep images
    whose every path went stale; ``filter``: which images may be returned (None or an empty
    :class:`SearchFilter`: all)."""

    k: int = 10
    exact: bool = False
    probe_radius: int = 1
    rerank: bool | None = None
    rerank_depth: int | None = None
    cached: bool | None = None
    index_id: int | None = None
    include_stale: bool = False
    filter: SearchFilter | None = None


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
