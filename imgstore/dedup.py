"""Duplicate groups, end to end: exact copies, near copies from a pair source, a keeper each.

Near copies come from one of two pair sources, and the same acceptance rule decides them:

* :class:`IndexPairs`: each stored code (a chunk of them at a time, in one vectorised join,
  :mod:`imgstore.bandjoin`) probes the others' bands at radius 1, exactly as a query would;
  that finds every code within Hamming distance ``2 * n_bands - 1`` and most a little farther,
  kept when within ``max_distance``. Pixel-layout signatures are hashed and
  probed the same way, so copies whose CNN codes drifted apart are still candidates. Work and
  memory grow linearly: no all-pairs matrix is built.
* :class:`AllPairs`: every pair, in row chunks of a cosine matrix, for a store without an index.
  It accepts every pair the index path can accept (the rule alone decides, with no Hamming
  limit), and more. It is quadratic, so above :data:`ALL_PAIRS_MAX` images the flow builds a
  temporary in-memory index instead (ITQ, fitted on a sample, nothing stored).

A candidate pair is accepted when its float features have cosine >= ``min_cosine``, or when
they agree loosely (cosine >= :data:`SIGNATURE_COSINE_FLOOR`) and its pixel-layout signatures
(flip-aware, :mod:`imgstore.signature`) have similarity >= ``min_signature``. Then a geometric
check (:mod:`imgstore.geometry`, on the files re-read from their current paths) decides every
pair the rule accepted and, between images large enough for keypoints (photos, not
thumbnails), every pair whose features agree at least :data:`GEOMETRY_MIN_COSINE`: it finds
rotated, hard-cropped and captioned copies the rule misses and rejects what the rule accepts
wrongly (a second shot of one scene, look-alike layouts); where it cannot tell (a file gone, a
flat image) the rule's answer stands. Accepted pairs are joined into connected components
with a union-find.

A search reports how far it is through ``progress(phase, done, total)`` (:data:`PHASES`): a
first search of a photo collection spends most of its time in the geometric check, reading and
comparing files, so a server runs it in the background and shows these numbers meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, bindparam, case, func, select, update

from .bandjoin import BandTable, band_join
from .catalog import keeper_path, path_rows, stale_among
from .codecache import CodeCache, caches
from .decode import load_image
from .errors import ClusterError, ConfigError, ImgStoreError, NotFoundError
from .geometry import CHECK_VERSION, COPY, DIFFERENT, MIN_SIDE, UNKNOWN, WORK_SIDE, PairVerifier
from .hashing import make_hasher, min_samples
from .hashing.bits import band_values, default_n_bands, pack_bits
from .indexing import find_index, list_indexes
from .keeper import BORDER_VERSION, RULES, Borders, Candidate, choose
from .models import HashIndex, Image, ImagePath, PairVerdict
from .paths import printable
from .signature import DIM, KEEP, from_bytes
from .sqlhelpers import IN_CHUNK, chunks
from .types import IndexInfo, SpaceInfo, plain
from .vectors import get_space, iter_features, largest_space, list_spaces, load_features

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image as PILImage

    from .context import StoreContext

logger = logging.getLogger(__name__)

#: Pairs whose float features are less similar than this are not duplicates. Chosen on the
#: copy-detection set (benchmarks/results/dedup.md): resized, recompressed and slightly cropped
#: copies of a photo stay above it with CNN features, different photos of one kind below.
DEFAULT_MIN_COSINE = 0.90
#: ... or, for pairs whose float features agree at least SIGNATURE_COSINE_FLOOR, pixel-layout
#: signatures (imgstore.signature, flip-aware) at least this similar: degraded copies (half size,
#: heavy JPEG) of small images drift in CNN space but keep their layout.
DEFAULT_MIN_SIGNATURE = 0.95
SIGNATURE_COSINE_FLOOR = 0.30
#: A pair the features call alike must also show the same content: layouts at least this
#: alike (flip-aware), or, for two flat images (a solid colour each), features at least
#: FLAT_MIN_COSINE alike. Unrelated layouts are about 0 +- 0.13 alike (63 random directions), so
#: this is ~2.7 standard deviations above chance; on the copy-detection set the least alike true
#: copy with cosine >= 0.85 was a 5-degree rotation at 0.385 (benchmarks/results/dedup.md), so
#: no recall figure drops, while noise images of different seeds and a solid black beside a
#: solid white image (CNN cosine 0.95) no longer pair up.
LAYOUT_AGREEMENT = 0.35
FLAT_MIN_COSINE = 0.99
#: Pairs of photos whose features agree at least this much are checked geometrically even when
#: the rule rejects them. On the copy-detection set (benchmarks/results/dedup_extended.md) every
#: rotated (up to 15 degrees) or cropped (to half the area) copy of a photo was above 0.39 and
#: its other copies above 0.5: each copy reaches its original through some pair above it. A
#: lower floor costs more checks (2,536 false candidate pairs among its photos at 0.4, 761 at 0.5).
GEOMETRY_MIN_COSINE = 0.5
#: Pair verdicts a store context keeps between runs (about 150 bytes each).
KNOWN_VERDICTS_MAX = 1_000_000
#: A check reads the stored verdicts whole, in one query, when there are at most this many
#: (else those of the contents it meets, a chunk of contents per query).
VERDICTS_READ_WHOLE = 200_000
#: Hamming distance allowed, as a fraction of the code length, before the float check.
DEFAULT_MAX_DISTANCE_FRACTION = 0.25
#: Codes probed per chunk by IndexPairs; rows of the cosine matrix per chunk in AllPairs.
CHUNK = 2048
#: IndexPairs judges its pairs at least this often (pairs held), so memory stays bounded.
PAIR_BATCH = 1 << 20
ALL_PAIRS_ROWS = 512
#: Without an index, up to this many images are compared all pairs; above it a temporary
#: in-memory index finds the candidates (benchmarks/results/dedup.md times both).
ALL_PAIRS_MAX = 20_000
#: The temporary index is fitted on at most this many vectors.
TEMPORARY_INDEX_SAMPLE = 20_000
#: The geometric check reports its progress after each slice of this many pairs (a slice reads
#: its images in parallel, then compares its pairs in parallel; a larger slice wastes less at
#: its end, a smaller one reports more often).
CHECK_SLICE = 64
#: Pairs one cluster task checks (in id order: a task reads most of its images once).
REMOTE_SLICE = 256

#: ``progress(phase, done, total)``: how far a duplicate search is. ``total`` may grow while a
#: phase runs (candidate pairs are found, and checked, a chunk of the store at a time), and a
#: phase may come back (candidates, then their check, then the next chunk's candidates).
Progress = Callable[[str, int, int], None]
#: Images whose codes were probed for candidate pairs (done and total count images).
CANDIDATES = "candidates"
#: Images whose pixel-layout signatures were probed for candidate pairs (copies the CNN codes miss).
LAYOUT = "layout"
#: Candidate pairs compared on their files (the geometric check); verdicts stored by earlier
#: runs are not counted: they cost nothing.
CHECKING = "checking"
#: Connected groups checked as a whole (each member against the group's hub).
GROUPING = "grouping"
PHASES = (CANDIDATES, LAYOUT, CHECKING, GROUPING)


def no_progress(phase: str, done: int, total: int) -> None:
    """The progress callback of a search nobody follows."""


def describe_progress(phase: str, done: int, total: int) -> str:
    """One line a person reads: ``checking 120 of 480 candidate pairs``."""
    of = f"{done:,} of {total:,}" if total else f"{done:,}"
    if phase == CANDIDATES:
        return f"finding candidate pairs: {of} images probed"
    if phase == LAYOUT:
        return f"finding copies by layout: {of} images probed"
    if phase == CHECKING:
        return f"checking {of} candidate pairs"
    if phase == GROUPING:
        return f"forming groups: {of} checked"
    return "starting"


@dataclass(frozen=True)
class Edge:
    a: int  # image ids, a < b
    b: int
    distance: int | None  # Hamming distance in the index used (None: all pairs, no index)
    cosine: float | None


@dataclass(frozen=True)
class DuplicateMember:
    image_id: int
    paths: list[str]
    width: int
    height: int
    distance: int | None  # to the keeper (0 for the keeper); None when unknown
    cosine: float | None

    def as_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["cosine"] = plain(self.cosine)
        return out


@dataclass(frozen=True)
class DuplicateGroup:
    """``kind``: ``"exact"`` (one content at several paths) or ``"near"`` (several images)."""

    kind: str
    keeper: int
    members: list[DuplicateMember]
    #: the one file to keep: a current path of the keeper image (first seen, then shortest)
    keeper_path: str | None = None

    @property
    def n_files(self) -> int:
        return sum(len(m.paths) or 1 for m in self.members)

    @property
    def key(self) -> str:
        """Names the group by its images (``"3-17-42"``), stable while its members are."""
        return "-".join(str(i) for i in sorted(m.image_id for m in self.members))

    def with_keeper(self, path: str) -> DuplicateGroup:
        """The group with ``path`` (a current path of one of its members) as the one file kept."""
        for member in self.members:
            if path in member.paths:
                return replace(self, keeper=member.image_id, keeper_path=path)
        raise ConfigError(f"{printable(path)} is not a file of this duplicate group; choose one of its members' paths")

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "keeper": self.keeper, "keeper_path": self.keeper_path,
                "members": [m.as_dict() for m in self.members]}


@dataclass(frozen=True)
class PairLayout:
    """Pixel-layout evidence for candidate pairs (any array shape, all alike): signature
    similarity (flip-aware), whether both images have a signature, and whether each is flat
    (no light-and-dark layout at all: a solid colour)."""

    similarity: npt.NDArray[np.float32]
    known: npt.NDArray[np.bool_]
    flat_a: npt.NDArray[np.bool_]
    flat_b: npt.NDArray[np.bool_]

    def agrees(self, cos: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
        """The two images show the same content, not just what a CNN calls "featureless": their
        layouts correlate, or both are flat and their features all but equal (a solid black
        and a solid white image are 0.95 alike to the CNN). Unknown layouts do not veto."""
        both_flat = self.flat_a & self.flat_b
        textured = ~self.flat_a & ~self.flat_b
        return (~self.known) | (textured & (self.similarity >= LAYOUT_AGREEMENT)) | (both_flat & (cos >= FLAT_MIN_COSINE))


@dataclass(frozen=True)
class Rule:
    """When a candidate pair is a duplicate. ``min_cosine`` None: the codes alone decide;
    ``min_signature`` None: the signature route is off (the layout must still agree)."""

    min_cosine: float | None
    min_signature: float | None

    def accept(self, cos: npt.NDArray[np.float32], layout: PairLayout | None) -> npt.NDArray[np.bool_]:
        if self.min_cosine is None:
            return np.ones(cos.shape, dtype=bool)
        ok = cos >= self.min_cosine
        if layout is None:
            return ok
        ok &= layout.agrees(cos)
        if self.min_signature is not None:
            textured = layout.known & ~layout.flat_a & ~layout.flat_b
            ok |= textured & (cos >= SIGNATURE_COSINE_FLOOR) & (layout.similarity >= self.min_signature)
        return ok


def default_max_distance(n_bits: int) -> int:
    return round(DEFAULT_MAX_DISTANCE_FRACTION * n_bits)


def _flip_signs() -> npt.NDArray[np.float32]:
    """Signs that turn a signature into the signature of the mirrored image: a horizontal flip
    negates the DCT coefficients of odd horizontal frequency."""
    signs = np.array([(-1.0) ** (i % KEEP) for i in range(KEEP * KEEP)], dtype=np.float32)[1:]
    assert len(signs) == DIM
    return signs


def signature_similarity(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise similarity of unit signatures (n, 63), the better of as-is and mirrored."""
    flip = _flip_signs()
    return np.asarray(np.maximum((a * b).sum(axis=1), (a * (b * flip)).sum(axis=1)), dtype=np.float32)


def _pair_dots(m: npt.NDArray[np.float32], ra: npt.NDArray[np.intp], rb: npt.NDArray[np.intp]) -> npt.NDArray[np.float32]:
    """``(m[ra] * m[rb]).sum(axis=1)``: grouped by ``ra`` (a code's candidates come together),
    one matrix-vector product per row of ``m`` in ``ra``, so only the ``rb`` rows are gathered
    and no (pairs, dim) copy of a whole batch is made."""
    out = np.empty(len(ra), dtype=np.float32)
    if not len(ra):
        return out
    order = np.argsort(ra, kind="stable") if (np.diff(ra) < 0).any() else np.arange(len(ra))
    a, b = ra[order], rb[order]
    starts = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    got = np.empty(len(a), dtype=np.float32)
    for row, s, e in zip(a[starts].tolist(), starts.tolist(), ends.tolist()):
        got[s:e] = m[b[s:e]] @ m[row]
    out[order] = got
    return out


def _pair_similarity(sig: npt.NDArray[np.float32], ra: npt.NDArray[np.intp], rb: npt.NDArray[np.intp],
                     step: int = 65_536) -> npt.NDArray[np.float32]:
    """:func:`signature_similarity` of ``sig[ra]`` and ``sig[rb]``, a slice of pairs at a time
    (signatures are short: gathering both rows costs less than a product per row)."""
    flip = _flip_signs()
    out = np.empty(len(ra), dtype=np.float32)
    for s in range(0, len(ra), step):
        a, b = sig[ra[s:s + step]], sig[rb[s:s + step]]
        out[s:s + step] = np.maximum(np.einsum("ij,ij->i", a, b), np.einsum("ij,ij->i", a * flip, b))
    return out


#: Above the cosine of any two unit vectors, float rounding included.
COSINE_ABOVE_ANY = 1.001
#: Bytes of float features (and signatures) an IndexPairs keeps between its batches.
HELD_ROWS_BYTES = 256 << 20


@dataclass
class HeldRows:
    """Rows (float features, signatures) read by image id for one search's batches of pairs,
    kept while they fit ``budget`` bytes: each batch's candidates reach across the
    store, so the batches ask for much the same images and most are read once. ``transform``
    is applied row-wise once, when a row is read (a row's result does not depend on the others).
    Rows are appended to a buffer that grows by doubling; ``ids`` (ascending) and ``slots``
    say where each image's row is."""

    load: VectorLoader
    transform: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]] | None = None
    dim: int | None = None
    budget: int = HELD_ROWS_BYTES
    ids: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    slots: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, np.intp))
    buffer: npt.NDArray[np.float32] | None = None  # (capacity, dim); rows [0, used) hold data
    known: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, bool))  # per buffer row
    used: int = 0

    def prefill(self, ids: npt.NDArray[np.int64], rows: npt.NDArray[np.float32]) -> None:
        """Hold ``rows`` ``(n, dim)`` of ``ids`` (ascending), as the loader would give them, when
        nothing is held yet and they fit the budget (a code cache's attached features)."""
        if self.buffer is not None or len(ids) * rows.shape[1] * 4 > self.budget:
            return
        self.dim = rows.shape[1]
        self.buffer = self.transform(rows) if self.transform is not None else rows.copy()
        self.known = np.ones(len(ids), dtype=bool)
        self.ids, self.slots, self.used = ids.copy(), np.arange(len(ids)), len(ids)

    def rows(self, wanted: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.intp],
                                                            npt.NDArray[np.bool_]]:
        """``(matrix, at, known)`` for ``wanted`` (ascending, unique ids): image ``wanted[i]``'s
        row is ``matrix[at[i]]`` (zeros where it has none, ``known[at[i]]`` False there)."""
        missing = np.setdiff1d(wanted, self.ids, assume_unique=True)
        if len(missing):
            by_id = self.load(missing.tolist())
            if self.dim is None and by_id:
                self.dim = len(next(iter(by_id.values())))
            if self.dim is None:  # nothing read yet: rows of zeros, nothing kept
                return np.zeros((len(wanted), 1), np.float32), np.arange(len(wanted)), np.zeros(len(wanted), bool)
            new = _stack(by_id, missing, self.dim)
            if self.transform is not None:
                new = self.transform(new)
            new_known = np.isin(missing, np.fromiter(by_id.keys(), dtype=np.int64, count=len(by_id)))
            if (self.used + len(missing)) * self.dim * 4 > self.budget and self.buffer is not None:
                keep = np.isin(self.ids, wanted, assume_unique=True)  # keep only this batch's rows
                self.ids, old = self.ids[keep], self.slots[keep]
                self.buffer, self.known = self.buffer[old], self.known[old]
                self.slots, self.used = np.arange(len(old)), len(old)
            need = self.used + len(missing)
            if self.buffer is None or need > len(self.buffer):
                grown = np.zeros((max(need, 2 * self.used), self.dim), np.float32)
                known = np.zeros(len(grown), bool)
                if self.buffer is not None:
                    grown[:self.used], known[:self.used] = self.buffer[:self.used], self.known[:self.used]
                self.buffer, self.known = grown, known
            self.buffer[self.used:need], self.known[self.used:need] = new, new_known
            ids = np.concatenate([self.ids, missing])
            slots = np.concatenate([self.slots, np.arange(self.used, need)])
            order = np.argsort(ids, kind="stable")
            self.ids, self.slots, self.used = ids[order], slots[order], need
        if self.buffer is None:  # nothing asked for yet
            return np.zeros((len(wanted), self.dim or 1), np.float32), np.arange(len(wanted)), np.zeros(len(wanted), bool)
        at = self.slots[np.searchsorted(self.ids, wanted)].astype(np.intp)
        return self.buffer, at, self.known


def _unit(v: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12), dtype=np.float32)


VectorLoader = Callable[[list[int]], dict[int, npt.NDArray[np.float32]]]


@dataclass
class IndexPairs:
    """Candidate pairs from an index's codes in memory: every code probes the others' bands, a
    chunk of rows at a time, as one vectorised join (:func:`imgstore.bandjoin.band_join`)."""

    cache: CodeCache
    max_distance: int
    probe_radius: int = 1
    check: GeometricCheck | None = None
    progress: Progress = no_progress
    phase: str = CANDIDATES  # what the probing reports itself as
    #: float features and signatures read for earlier batches, kept for the next (see HeldRows)
    _vectors: HeldRows | None = field(default=None, init=False, repr=False)
    _signatures: HeldRows | None = field(default=None, init=False, repr=False)

    def reading_as(self, other: IndexPairs) -> IndexPairs:
        """This pair source, sharing the rows ``other`` read (and reads): the passes of one
        search ask for much the same images."""
        self._vectors, self._signatures = other._vectors, other._signatures
        return self

    def edges(self, rule: Rule, load_vectors: VectorLoader, load_signatures: VectorLoader | None) -> list[Edge]:
        cache, index = self.cache, self.cache.index
        n = len(cache)
        if n < 2:
            return []
        self.progress(self.phase, 0, n)
        m = index.n_bands
        bands = band_values(cache.codes, m, index.band_width)
        # the cache's sorted band segments are the join's data side: nothing sorted again
        table = BandTable(bands, cache.words, cache.seg_rows.reshape(m, n), cache.seg_keys.reshape(m, n))
        rows = np.arange(n, dtype=np.int64)
        edges: list[Edge] = []
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            found = list(band_join(bands[start:stop], cache.words[start:stop], rows[start:stop], table, rows,
                                   index.band_width, self.probe_radius, self.max_distance))
            a = np.concatenate([qi for qi, _, _ in found] or [np.zeros(0, np.intp)]) + start
            b = np.concatenate([di for _, di, _ in found] or [np.zeros(0, np.intp)])
            order = np.lexsort((b, a))  # by row, then candidate: the order a probe row by row gives
            a, b = a[order].astype(np.intp), b[order].astype(np.intp)
            self.progress(self.phase, stop, n)
            # judged a chunk of rows at a time, at most PAIR_BATCH pairs at once (crowded
            # buckets): memory stays bounded whatever the store
            for s in range(0, len(a), PAIR_BATCH):
                edges += self._accepted(a[s:s + PAIR_BATCH], b[s:s + PAIR_BATCH], rule, load_vectors, load_signatures)
        return edges

    def _accepted(self, a: npt.NDArray[np.intp], b: npt.NDArray[np.intp], rule: Rule, load_vectors: VectorLoader,
                  load_signatures: VectorLoader | None) -> list[Edge]:
        cache = self.cache
        dist = np.bitwise_count(cache.words[a] ^ cache.words[b]).sum(axis=1)
        ids_a, ids_b = cache.image_ids[a], cache.image_ids[b]
        if rule.min_cosine is None:
            return [Edge(int(x), int(y), int(d), None) for x, y, d in zip(ids_a, ids_b, dist)]
        layout = None
        if load_signatures is not None:
            wanted = np.unique(np.concatenate([ids_a, ids_b]))
            if self._signatures is None or self._signatures.load is not load_signatures:
                self._signatures = HeldRows(load_signatures, dim=DIM)
            sig, at, known = self._signatures.rows(wanted)
            sa, sb = at[np.searchsorted(wanted, ids_a)], at[np.searchsorted(wanted, ids_b)]
            flat = known & (np.linalg.norm(sig, axis=1) < 0.5)
            layout = PairLayout(_pair_similarity(sig, sa, sb), known[sa] & known[sb], flat[sa], flat[sb])
        # the cosine only where it can matter: the rule and the check's choice of pairs rise
        # with it, so a pair the rule rejects even at the largest cosine, and the check leaves
        # alone, is rejected whatever it is (its cosine stays -1, nowhere reported)
        need = rule.accept(np.full(len(a), COSINE_ABOVE_ANY, dtype=np.float32), layout)
        if self.check is not None:
            need |= self.check.large(ids_a) & self.check.large(ids_b)
        cos = np.full(len(a), -1.0, dtype=np.float32)
        if need.any():
            na, nb = ids_a[need], ids_b[need]
            wanted = np.unique(np.concatenate([na, nb]))
            if self._vectors is None or self._vectors.load is not load_vectors:
                self._vectors = HeldRows(load_vectors, _unit)
                if self.cache.vectors is not None:  # the index's features, held beside its codes
                    self._vectors.prefill(self.cache.image_ids, self.cache.vectors)
            matrix, at, _ = self._vectors.rows(wanted)
            cos[need] = _pair_dots(matrix, at[np.searchsorted(wanted, na)], at[np.searchsorted(wanted, nb)])
        ok = rule.accept(cos, layout)
        if self.check is not None:
            ok = self.check.refine(ids_a, ids_b, cos, ok)
        return [Edge(int(x), int(y), int(d), float(c)) for x, y, d, c in zip(ids_a[ok], ids_b[ok], dist[ok], cos[ok])]


def _signature_matrix(by_id: dict[int, npt.NDArray[np.float32]],
                      ids: npt.NDArray[np.int64]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.bool_]]:
    """(n, 63) signatures in the order of ``ids`` (zeros where missing), and which are known."""
    known = np.array([int(i) in by_id for i in ids.tolist()], dtype=bool)
    return _stack(by_id, ids, len(_flip_signs())), known


def _stack(by_id: dict[int, npt.NDArray[np.float32]], ids: npt.NDArray[np.int64],
           dim: int | None = None) -> npt.NDArray[np.float32]:
    """Rows of ``by_id`` in the order of ``ids`` (zeros where missing)."""
    if dim is None:
        dim = len(next(iter(by_id.values()))) if by_id else 1
    out = np.zeros((len(ids), dim), dtype=np.float32)
    for i, image_id in enumerate(ids.tolist()):
        if image_id in by_id:
            out[i] = by_id[image_id]
    return out


@dataclass
class AllPairs:
    """Every pair of stored vectors, by row chunks of the cosine matrix (no index needed)."""

    image_ids: npt.NDArray[np.int64]  # (n,) ascending
    vectors: npt.NDArray[np.float32]  # (n, dim)
    signatures: npt.NDArray[np.float32] | None = None  # (n, 63), zeros where missing
    known: npt.NDArray[np.bool_] | None = None  # (n,) which signatures exist (default: all)
    check: GeometricCheck | None = None
    progress: Progress = no_progress

    def edges(self, rule: Rule) -> list[Edge]:
        if rule.min_cosine is None:
            raise ConfigError("--min-cosine 0 lets the codes alone decide, and this store has no index; "
                              "build one with `imgstore index create` or give a cosine threshold")
        n = len(self.image_ids)
        unit = _unit(self.vectors)
        sig = self.signatures
        sig_flip = sig * _flip_signs() if sig is not None else None
        known = self.known if self.known is not None else np.ones(n, dtype=bool)
        flat = known & (np.linalg.norm(sig, axis=1) < 0.5) if sig is not None else np.zeros(n, dtype=bool)
        edges: list[Edge] = []
        large = self.check.large(self.image_ids) if self.check is not None else None
        for start in range(0, n, ALL_PAIRS_ROWS):
            stop = min(n, start + ALL_PAIRS_ROWS)
            self.progress(CANDIDATES, stop, n)
            cos = unit[start:stop] @ unit[start:].T  # (rows, n - start): pairs (i, j >= start)
            layout = None
            if sig is not None and sig_flip is not None:
                layout = PairLayout(
                    np.maximum(sig[start:stop] @ sig[start:].T, sig[start:stop] @ sig_flip[start:].T),
                    known[start:stop, None] & known[None, start:], flat[start:stop, None], flat[None, start:],
                )
            ok = rule.accept(cos, layout)
            upper = np.arange(start, n)[None, :] > np.arange(start, stop)[:, None]  # each pair once, j > i
            if self.check is None or large is None:
                rows, cols = np.nonzero(ok & upper)
            else:
                wanted = (cos >= self.check.min_cosine) & large[start:stop, None] & large[None, start:]
                rows, cols = np.nonzero((ok | wanted) & upper)
                ids_a, ids_b = self.image_ids[start + rows], self.image_ids[start + cols]
                keep = self.check.refine(ids_a, ids_b, cos[rows, cols], ok[rows, cols])
                rows, cols = rows[keep], cols[keep]
            for r, c in zip(rows.tolist(), cols.tolist()):
                edges.append(Edge(int(self.image_ids[start + r]), int(self.image_ids[start + c]), None, float(cos[r, c])))
        return edges


@dataclass
class GeometricCheck:
    """The geometric check of candidate pairs (:mod:`imgstore.geometry`) and where its files
    are. It decides every pair the rule accepted, and, between images both of whose sides are
    at least ``geometry.MIN_SIDE`` (``large_ids``), every pair with cosine >= ``min_cosine``."""

    conn: Connection
    large_ids: npt.NDArray[np.int64]  # ascending
    min_cosine: float = GEOMETRY_MIN_COSINE
    #: verdicts by pair of contents, kept between runs (the store's :class:`PairVerdicts`)
    known: dict[tuple[str, str], int] = field(default_factory=dict)
    max_pixels: int | None = None  # the store's decode limit (None: the process's)
    #: verdicts this run computed (to be stored), and how many came from the store's table
    fresh: dict[tuple[str, str], int] = field(default_factory=dict)
    stored_hits: int = 0
    progress: Progress = no_progress
    #: a ``distributed.Client``: pairs are compared on its workers, each reading the files at the
    #: paths the store has (a filesystem they share); None: here
    cluster: Any = None
    #: pairs compared on their files so far (of them on the cluster), and pairs to compare found so far
    checked: int = 0
    checked_remotely: int = 0
    to_check: int = 0
    _paths: dict[int, list[str]] = field(default_factory=dict)
    _sha: dict[int, str] = field(default_factory=dict)
    _asked: set[str] = field(default_factory=set)  # contents whose stored verdicts were read
    _all_read: bool = False  # every stored verdict was read
    verifier: PairVerifier = field(init=False)

    def __post_init__(self) -> None:
        self.verifier = PairVerifier(self._load)

    @classmethod
    def for_store(cls, conn: Connection, known: dict[tuple[str, str], int] | None = None,
                  max_pixels: int | None = None, progress: Progress = no_progress, cluster: Any = None) -> GeometricCheck:
        large = conn.execute(
            select(Image.id).where(Image.width >= MIN_SIDE, Image.height >= MIN_SIDE).order_by(Image.id)
        ).scalars().all()
        return cls(conn, np.array(large, dtype=np.int64), known=known if known is not None else {}, max_pixels=max_pixels,
                   progress=progress, cluster=cluster)

    def large(self, ids: npt.NDArray[np.int64]) -> npt.NDArray[np.bool_]:
        if not len(self.large_ids):
            return np.zeros(len(ids), dtype=bool)
        pos = np.minimum(np.searchsorted(self.large_ids, ids), len(self.large_ids) - 1)
        return np.asarray(self.large_ids[pos] == ids, dtype=np.bool_)

    def refine(self, ids_a: npt.NDArray[np.int64], ids_b: npt.NDArray[np.int64], cos: npt.NDArray[np.float32],
               ok: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """``ok`` with the check's verdict in place of the rule's where it could tell."""
        wanted = ok | ((cos >= self.min_cosine) & self.large(ids_a) & self.large(ids_b))
        if not wanted.any():
            return ok
        verdict = self.verdicts(ids_a[wanted], ids_b[wanted])
        decided = ok[wanted]
        decided[verdict == COPY] = True
        decided[verdict == DIFFERENT] = False
        out = ok.copy()
        out[wanted] = decided
        return out

    def verdicts(self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64]) -> npt.NDArray[np.int8]:
        """COPY, DIFFERENT or UNKNOWN per pair (a[i], b[i]): known verdicts by content, the
        others checked on the files."""
        if not len(a):
            return np.zeros(0, dtype=np.int8)
        need = sorted({int(i) for i in np.concatenate([a, b]).tolist()} - self._sha.keys())
        for part in chunks(need, IN_CHUNK):
            self._sha.update((int(i), h) for i, h in self.conn.execute(select(Image.id, Image.sha256).where(Image.id.in_(part))))
        keys = [_pair_key(self._sha.get(int(x), ""), self._sha.get(int(y), "")) for x, y in zip(a.tolist(), b.tolist())]
        self._load_stored([k for k in keys if k not in self.known and all(k)])
        verdict = np.array([self.known.get(k, UNKNOWN) for k in keys], dtype=np.int8)
        todo = np.nonzero(verdict == UNKNOWN)[0]
        if len(todo):
            need = sorted({int(i) for i in np.concatenate([a[todo], b[todo]]).tolist()} - self._paths.keys())
            self._paths.update(_current_paths(self.conn, need)[0])  # read here: the loader runs on threads
            self.to_check += len(todo)
            todo = todo[np.lexsort((b[todo], a[todo]))]  # the order the verifier reads images in
            if self.cluster is not None:
                self._on_cluster(a, b, todo, verdict)
            else:
                for start in range(0, len(todo), CHECK_SLICE):
                    pairs = todo[start:start + CHECK_SLICE]
                    verdict[pairs] = self.verifier.verdicts(a[pairs], b[pairs])
                    self.checked += len(pairs)
                    self.progress(CHECKING, self.checked, self.to_check)
            if len(self.known) > KNOWN_VERDICTS_MAX:
                self.known.clear()
                self._asked.clear()
                self._all_read = False
            found = {keys[k]: int(verdict[k]) for k in todo.tolist() if verdict[k] != UNKNOWN and all(keys[k])}
            self.known.update(found)
            self.fresh.update(found)
        return verdict

    def _load_stored(self, keys: list[tuple[str, str]]) -> None:
        """Verdicts of this check's version stored by earlier runs (``pair_verdicts``) into ``known``:
        all of them at the first look when they are few (:data:`VERDICTS_READ_WHOLE`), else those
        of each pair's first content. A content asked for once is not asked for again: that query
        read every verdict stored for it, and the table only grows by the verdicts this run keeps
        in ``known``."""
        if not keys or self._all_read:
            return
        if not self._asked:  # the first look: a table of modest size is read whole, in one query
            stored = int(self.conn.scalar(select(func.count()).select_from(PairVerdict)
                                          .where(PairVerdict.check_version == CHECK_VERSION)) or 0)
            if stored <= VERDICTS_READ_WHOLE:
                rows = self.conn.execute(select(PairVerdict.sha_a, PairVerdict.sha_b, PairVerdict.verdict)
                                         .where(PairVerdict.check_version == CHECK_VERSION))
                self.known.update(((x, y), int(v)) for x, y, v in rows)
                self.stored_hits += sum(k in self.known for k in set(keys))
                self._all_read = True
                return
        wanted = set(keys)
        by_first: dict[str, set[str]] = {}
        for x, y in wanted:
            if x not in self._asked:
                by_first.setdefault(x, set()).add(y)
        self._asked.update(by_first)
        for part in chunks(sorted(by_first), IN_CHUNK):
            rows = self.conn.execute(
                select(PairVerdict.sha_a, PairVerdict.sha_b, PairVerdict.verdict)
                .where(PairVerdict.sha_a.in_(part), PairVerdict.check_version == CHECK_VERSION))
            for x, y, v in rows:  # all of them: the contents are not asked for again
                self.known[(x, y)] = int(v)
                if y in by_first.get(x, ()):
                    self.stored_hits += 1

    def _load(self, image_id: int) -> PILImage.Image | None:
        return _first_readable(self._paths.get(image_id, []), self.max_pixels)

    def _on_cluster(self, a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], todo: npt.NDArray[np.intp],
                    verdict: npt.NDArray[np.int8]) -> None:
        """Verdicts of the pairs ``todo`` (in id order) from the cluster's workers, a task per
        :data:`REMOTE_SLICE` pairs with the paths of its images, filled in as tasks finish."""
        from distributed import as_completed

        futures = {}
        for start in range(0, len(todo), REMOTE_SLICE):
            part = todo[start:start + REMOTE_SLICE]
            pa, pb = a[part].tolist(), b[part].tolist()
            paths = {i: self._paths.get(i, []) for i in {*pa, *pb}}
            futures[self.cluster.submit(check_on_worker, pa, pb, paths, self.max_pixels, pure=False)] = part
        st = self.verifier.stats
        started = time.perf_counter()  # the wall time of the workers' reading and comparing, as the local check counts it
        try:
            for future in as_completed(list(futures)):  # type: ignore[no-untyped-call]  # distributed is not annotated
                part = futures[future]
                got, images_read, unreadable = future.result()
                verdict[part] = got
                st.count(got)
                st.images_read += images_read
                st.unreadable += unreadable
                self.checked += len(part)
                self.checked_remotely += len(part)
                st.seconds += time.perf_counter() - started
                self.progress(CHECKING, self.checked, self.to_check)
                started = time.perf_counter()
        except ImgStoreError:
            raise
        except Exception as exc:  # noqa: BLE001  # Dask raises the worker's error or its own; both end the run
            for future in futures:
                future.cancel()
            raise ClusterError(f"the geometric check on the cluster stopped ({type(exc).__name__}: {exc}); "
                               "run the same command again (verdicts already stored are kept)") from None


def _first_readable(paths: list[str], max_pixels: int | None) -> PILImage.Image | None:
    """The image at the first of ``paths`` that decodes, at the check's working size."""
    for path in paths:
        try:
            # a HEIC's embedded thumbnail where it covers the working image (verdicts measured equal:
            # benchmarks/results/geometry_heic.md); a JPEG's draft as always
            return load_image(path, max_pixels=max_pixels, draft_size=(WORK_SIDE, WORK_SIDE), thumbnail_box=WORK_SIDE).image
        except (ImgStoreError, OSError) as exc:
            logger.info("geometric check: %s: %s", printable(path), exc)
    return None


def check_on_worker(ids_a: list[int], ids_b: list[int], paths: dict[int, list[str]],
                    max_pixels: int | None) -> tuple[npt.NDArray[np.int8], int, int]:
    """The geometric check of pairs ``(ids_a[i], ids_b[i])`` as a cluster task: each image read
    from the first of its ``paths`` this machine can read (the store's paths, on a filesystem the
    workers share), a pair with an image no path gives UNKNOWN (the rule's answer stands).
    Returns the verdicts, the images read and those unreadable. One thread: the cluster runs
    tasks side by side."""
    verifier = PairVerifier(lambda image_id: _first_readable(paths.get(image_id, []), max_pixels), workers=1)
    got = verifier.verdicts(ids_a, ids_b)
    return got, verifier.stats.images_read, verifier.stats.unreadable


#: Signatures are also hashed (random hyperplanes, fixed seed) into short codes probed like an
#: index, so copies that drift in CNN space (a half-size thumbnail) are still candidates.
SIGNATURE_BITS = 32
SIGNATURE_BANDS = 2
SIGNATURE_MAX_DISTANCE = 8
_SIGNATURE_SEED = 20261129


def signature_codes(signatures: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """(n, 63) unit signatures -> (n, 4) packed 32-bit SimHash codes (same in every process)."""
    planes = np.random.default_rng(_SIGNATURE_SEED).standard_normal((DIM, SIGNATURE_BITS))
    return pack_bits(np.asarray(signatures, dtype=np.float64) @ planes > 0)


def signature_cache(image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> CodeCache:
    """A CodeCache over signature codes (ids ascending), probed like an index."""
    return CodeCache(_memory_index("signature", SIGNATURE_BITS, SIGNATURE_BANDS, len(image_ids)), 0, image_ids, codes)


def _memory_index(method: str, n_bits: int, n_bands: int, n: int, space_id: int = -1) -> IndexInfo:
    """The description of an index that lives only in this process's memory."""
    return IndexInfo(
        id=-1, uid=f"memory-{method}", method=method, n_bits=n_bits, n_bands=n_bands, band_width=n_bits // n_bands,
        extractor=method, space_id=space_id, is_active=False, n_codes=n, n_fitted=0, generation=0,
        created_at=datetime.now(timezone.utc), config={},
    )


def temporary_index(conn: Connection, space: SpaceInfo, n_bits: int = 64) -> CodeCache:
    """An ITQ index over every vector of ``space``, fitted on a sample and held in memory only."""
    ids_all = np.array(
        [i for part, _ in iter_features(conn, space.id, space.dim) for i in part.tolist()], dtype=np.int64
    )
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(ids_all, size=min(len(ids_all), TEMPORARY_INDEX_SAMPLE), replace=False))
    _, x = load_features(conn, space.id, space.dim, sample.tolist())
    method = "itq" if len(x) >= min_samples("itq", n_bits) else "lsh"  # lsh: a tiny store (tests)
    hasher = make_hasher(method, n_bits=n_bits, random_state=0).fit(x)
    ids_out, codes_out = [], []
    for ids, vectors in iter_features(conn, space.id, space.dim):
        ids_out.append(ids)
        codes_out.append(hasher.encode(vectors))
    info = _memory_index(method, n_bits, default_n_bands(n_bits, len(ids_all)), len(ids_all), space.id)
    return CodeCache(info, 0, np.concatenate(ids_out), np.concatenate(codes_out))


def _signatures(conn: Connection, ids: list[int]) -> dict[int, npt.NDArray[np.float32]]:
    out: dict[int, npt.NDArray[np.float32]] = {}
    for part in chunks(ids, IN_CHUNK):
        for image_id, blob in conn.execute(select(Image.id, Image.signature).where(Image.id.in_(part))):
            sig = from_bytes(blob)
            if sig is not None:
                out[int(image_id)] = sig
    return out


def _signature_codes(conn: Connection) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """Every stored image's signature hashed to a 32-bit code, read in chunks (bounded memory)."""
    ids_out: list[npt.NDArray[np.int64]] = []
    codes_out: list[npt.NDArray[np.uint8]] = []
    last = -1
    while True:
        rows = conn.execute(
            select(Image.id, Image.signature).where(Image.id > last, Image.signature.is_not(None))
            .order_by(Image.id).limit(50_000)
        ).all()
        if not rows:
            break
        last = int(rows[-1][0])
        sigs = [(int(i), from_bytes(b)) for i, b in rows]
        held = [(i, v) for i, v in sigs if v is not None and v.any()]
        if held:
            ids_out.append(np.array([i for i, _ in held], dtype=np.int64))
            codes_out.append(signature_codes(np.stack([v for _, v in held])))
    if not ids_out:
        return np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.uint8)
    return np.concatenate(ids_out), np.concatenate(codes_out)


#: Candidate pairs computed elsewhere for an index's codes (``imgstore.batch.near_pairs`` over
#: shards, on a cluster): ``(cache, max_distance, probe_radius) -> (ids_a, ids_b)``; they must
#: be what :class:`IndexPairs` finds by probing ``cache``.
CandidatePairs = Callable[[CodeCache, int, int], tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]


@dataclass
class GivenPairs(IndexPairs):
    """The candidates of :class:`IndexPairs` given instead of probed: judged the same way, in
    batches. Pairs of images the cache does not hold (shards older than the index) are left out."""

    given: tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] = field(
        default_factory=lambda: (np.zeros(0, np.int64), np.zeros(0, np.int64)))

    def edges(self, rule: Rule, load_vectors: VectorLoader, load_signatures: VectorLoader | None) -> list[Edge]:
        ids = self.cache.image_ids
        a, b = (np.asarray(x, dtype=np.int64) for x in self.given)
        ra, rb = np.searchsorted(ids, a), np.searchsorted(ids, b)
        ra_ok, rb_ok = np.minimum(ra, max(len(ids) - 1, 0)), np.minimum(rb, max(len(ids) - 1, 0))
        inside = (ra < len(ids)) & (rb < len(ids)) & (ids[ra_ok] == a) & (ids[rb_ok] == b) if len(ids) else \
            np.zeros(len(a), dtype=bool)
        ra, rb = ra_ok[inside].astype(np.intp), rb_ok[inside].astype(np.intp)
        self.progress(self.phase, 0, len(ra))
        edges: list[Edge] = []
        for start in range(0, len(ra), PAIR_BATCH):
            edges += self._accepted(ra[start : start + PAIR_BATCH], rb[start : start + PAIR_BATCH], rule, load_vectors,
                                    load_signatures)
            self.progress(self.phase, min(start + PAIR_BATCH, len(ra)), len(ra))
        return edges


def _with_index_distance(edges: list[Edge], cache: CodeCache) -> list[Edge]:
    """Edges found through signatures, restricted to images in the index and given the index's
    Hamming distance (what every other edge reports)."""
    if not edges:
        return []
    ids = cache.image_ids
    a = np.array([e.a for e in edges], dtype=np.int64)
    b = np.array([e.b for e in edges], dtype=np.int64)
    pa, pb = np.searchsorted(ids, a), np.searchsorted(ids, b)
    pa_ok, pb_ok = np.minimum(pa, len(ids) - 1), np.minimum(pb, len(ids) - 1)
    inside = (pa < len(ids)) & (pb < len(ids)) & (ids[pa_ok] == a) & (ids[pb_ok] == b)
    dist = np.bitwise_count(cache.words[pa_ok] ^ cache.words[pb_ok]).sum(axis=1)
    return [Edge(e.a, e.b, d, e.cosine) for e, d, ok in zip(edges, dist.tolist(), inside.tolist()) if ok]


def near_edges(conn: Connection, cache: CodeCache, space: SpaceInfo, rule: Rule, max_distance: int,
               probe_radius: int = 1, check: GeometricCheck | None = None,
               progress: Progress = no_progress, candidates: CandidatePairs | None = None) -> list[Edge]:
    """Accepted pairs among the codes of ``cache`` (an index, stored or temporary); their
    candidates probed here, or from ``candidates``."""
    def vectors(ids: list[int]) -> dict[int, npt.NDArray[np.float32]]:
        got_ids, vecs = load_features(conn, space.id, space.dim, ids)
        return dict(zip(got_ids.tolist(), vecs))

    signatures = (lambda ids: _signatures(conn, ids)) if rule.min_cosine is not None else None
    pairs = (GivenPairs(cache, max_distance, probe_radius, check, progress, given=candidates(cache, max_distance, probe_radius))
             if candidates is not None else IndexPairs(cache, max_distance, probe_radius, check, progress))
    edges = pairs.edges(rule, vectors, signatures)
    if rule.min_cosine is not None and rule.min_signature is not None:
        sig_ids, sig_codes = _signature_codes(conn)
        if len(sig_ids) > 1:
            only_layout = Rule(min_cosine=2.0, min_signature=rule.min_signature)  # only the signature rule
            sig_edges = IndexPairs(signature_cache(sig_ids, sig_codes), SIGNATURE_MAX_DISTANCE, check=check,
                                   progress=progress, phase=LAYOUT).reading_as(pairs).edges(only_layout, vectors, signatures)
            edges += _with_index_distance(sig_edges, cache)
    return edges


@dataclass(frozen=True)
class DuplicatesState:
    """What a duplicate search reads, summed up in a few numbers that change whenever it does:
    the images (how many, the highest id, the newest), their files (rows, the highest id, the
    newest, how many are current) and the indexes (id, uid, generation, which is active). Groups
    found under one state hold under an equal one, so a server keeps them while the state stays
    (image metadata is left out: no group depends on it). An image removed and another added
    meanwhile still shows (SQLite may give the new one the same id, never the same time)."""

    images: int
    last_image: int
    newest_image: datetime | None
    paths: int
    last_path: int
    newest_path: datetime | None
    current_paths: int
    indexes: tuple[tuple[int, str, int, bool], ...]


def duplicates_state(conn: Connection) -> DuplicatesState:
    """The :class:`DuplicatesState` now: one aggregate query over images, one over their paths
    (each a scan of its table, far cheaper than the search) and the indexes' few rows."""
    images = conn.execute(select(func.count(), func.max(Image.id), func.max(Image.ingested_at))).one()
    current = func.sum(case((ImagePath.is_current.is_(True), 1), else_=0))
    paths = conn.execute(select(func.count(), func.max(ImagePath.id), func.max(ImagePath.first_seen_at), current)).one()
    indexes = conn.execute(select(HashIndex.id, HashIndex.uid, HashIndex.generation, HashIndex.is_active)
                           .order_by(HashIndex.id)).all()
    return DuplicatesState(
        int(images[0] or 0), int(images[1] or 0), images[2], int(paths[0] or 0), int(paths[1] or 0), paths[2],
        int(paths[3] or 0), tuple((int(i), str(u), int(g), bool(a)) for i, u, g, a in indexes))


def find_duplicates(
    ctx: StoreContext,
    *,
    max_distance: int | None = None,
    min_cosine: float | None = None,
    min_signature: float | None = None,
    index_id: int | None = None,
    probe_radius: int = 1,
    keep: str = "original",
    geometry: bool = True,
    progress: Progress | None = None,
    candidates: CandidatePairs | None = None,
    check_cluster: Any = None,
) -> list[DuplicateGroup]:
    """Groups of duplicate images, largest first (see ``ImageStore.find_duplicates``);
    ``progress(phase, done, total)`` follows the work (:data:`PHASES`); ``candidates`` computes
    an index's candidate pairs instead of probing it here (it needs an index); ``check_cluster``
    (a ``distributed.Client``) runs the geometric check's comparisons on its workers."""
    if keep not in RULES:
        raise ConfigError(f"unknown keeper rule {keep!r}; choose one of {', '.join(RULES)}")
    min_c = DEFAULT_MIN_COSINE if min_cosine is None else min_cosine
    min_s = DEFAULT_MIN_SIGNATURE if min_signature is None else min_signature
    rule = Rule(min_cosine=min_c if min_c > 0 else None, min_signature=min_s if min_s > 0 else None)
    report = progress or no_progress
    report(CANDIDATES, 0, 0)
    with ctx.read("find duplicates") as conn:
        multi = conn.execute(
            select(ImagePath.image_id).where(ImagePath.is_current.is_(True))
            .group_by(ImagePath.image_id).having(func.count() > 1)
        ).scalars().all()
        index = find_index(list_indexes(conn, with_counts=False), index_id)
        edges: list[Edge] = []
        ids: list[int] = []
        check = (GeometricCheck.for_store(conn, ctx.part(PairVerdicts).known, ctx.max_pixels, report, check_cluster)
                 if geometry and rule.min_cosine is not None else None)
        if index is not None:
            # the codes as of this read, not as of a server's last background refresh: a search
            # started after a write must see what was written
            cache = caches(ctx).code_cache(conn, index, refresh=True)
            max_d = default_max_distance(index.n_bits) if max_distance is None else max_distance
            edges = near_edges(conn, cache, get_space(conn, index.space_id), rule, max_d, probe_radius, check, report,
                               candidates)
            ids = cache.image_ids.tolist()
        elif candidates is not None:
            raise NotFoundError("a duplicate search on a cluster needs an index: `imgstore index create` builds one")
        else:
            spaces = [s for s in list_spaces(conn) if (s.n_features or 0) > 1]
            if spaces:
                space = largest_space(spaces)
                if (space.n_features or 0) <= ALL_PAIRS_MAX:
                    got, vectors = load_features(conn, space.id, space.dim)
                    sigs, known = _signature_matrix(_signatures(conn, got.tolist()), got)
                    edges = AllPairs(got, vectors, sigs, known, check, report).edges(rule)
                    ids = got.tolist()
                else:
                    cache = temporary_index(conn, space)
                    max_d = default_max_distance(cache.index.n_bits) if max_distance is None else max_distance
                    edges = near_edges(conn, cache, space, rule, max_d, probe_radius, check, report)
                    ids = cache.image_ids.tolist()
        stale = stale_among(conn, sorted({i for e in edges for i in (e.a, e.b)}))
        if stale:  # every path of these went: nothing on disk to act on
            edges = [e for e in edges if e.a not in stale and e.b not in stale]
        near = components(ids, edges)
        borders = Borders(max_pixels=ctx.max_pixels)
        groups = _groups(conn, list(multi), near, edges, keep, check.verdicts if check is not None else None, ctx.max_pixels,
                         report, borders)
    if check is not None and (check.verifier.stats.pairs or check.stored_hits):
        st = check.verifier.stats
        logger.info("geometric check: %d pairs (%d copies, %d different, %d undecided), "
                    "%d images read (%d unreadable), %.1f s; %d verdicts kept from earlier runs%s",
                    st.pairs, st.copies, st.different, st.unknown, st.images_read, st.unreadable, st.seconds,
                    check.stored_hits,
                    f"; {check.checked_remotely} pairs compared on the cluster's workers" if check.checked_remotely else "")
    if check is not None and check.fresh:
        save_verdicts(ctx, check.fresh)
    if borders.fresh:
        save_borders(ctx, borders.fresh)
    return groups


def _pair_key(x: str, y: str) -> tuple[str, str]:
    """A pair of contents, in one order (a verdict is about the pair, not its direction)."""
    return (x, y) if x <= y else (y, x)


def save_verdicts(ctx: StoreContext, verdicts: dict[tuple[str, str], int]) -> None:
    """Keep the check's verdicts in the store (``pair_verdicts``), so that the next run, in any
    process, checks only new pairs. Best effort: a store that cannot be written now (read-only
    file, a long write of another process) only loses the saving, never the result."""
    rows = [{"sha_a": x, "sha_b": y, "verdict": v, "check_version": CHECK_VERSION, "checked_at": datetime.now(timezone.utc)}
            for (x, y), v in verdicts.items()]

    def work(conn: Connection) -> None:
        for part in chunks(rows, 500):
            stmt = _upsert(conn)(PairVerdict).values(part)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[PairVerdict.sha_a, PairVerdict.sha_b],
                set_={"verdict": stmt.excluded.verdict, "check_version": stmt.excluded.check_version,
                      "checked_at": stmt.excluded.checked_at}))

    try:
        ctx.write(work, doing="keep the geometric check's verdicts")
    except ImgStoreError as exc:
        logger.warning("%s (the next dedup checks these pairs again)", exc)


def save_borders(ctx: StoreContext, measured: dict[int, float]) -> None:
    """Keep the border fractions the keeper measured (``images.border_fraction``, with
    :data:`keeper.BORDER_VERSION`), so that the next run decodes no file for them. Best effort,
    as :func:`save_verdicts`; an image removed meanwhile just updates no row."""
    rows = [{"image_id": i, "fraction": f} for i, f in sorted(measured.items())]
    stmt = (update(Image).where(Image.id == bindparam("image_id"))
            .values(border_fraction=bindparam("fraction"), border_version=BORDER_VERSION))

    def work(conn: Connection) -> None:
        for part in chunks(rows, 500):
            conn.execute(stmt, part)

    try:
        ctx.write(work, doing="keep the keeper's border measures")
    except ImgStoreError as exc:
        logger.warning("%s (the next dedup measures these borders again)", exc)


def _upsert(conn: Connection) -> Any:
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


#: The geometric check's verdicts on pairs (ids_a[i], ids_b[i]): COPY, DIFFERENT or UNKNOWN.
Judge = Callable[[npt.NDArray[np.int64], npt.NDArray[np.int64]], npt.NDArray[np.int8]]


def _groups(conn: Connection, multi: list[int], near: list[list[int]], edges: list[Edge],
            keep: str = "original", judge: Judge | None = None, max_pixels: int | None = None,
            progress: Progress = no_progress, borders: Borders | None = None) -> list[DuplicateGroup]:
    """Exact-copy and near-copy groups with members, keepers (:mod:`imgstore.keeper`) and their
    distances to the keeper.

    With ``judge`` (the geometric check), a near group is consistent as a whole: no member is
    a different picture from the group's hub (its member with the most accepted pairs). Accepted
    pairs are joined into connected components, so one wrong edge would join two groups, and a
    chain of them dozens (different low-texture pictures whose features agree): members the
    check calls different from the hub are split off and form groups of their own by the edges
    among them, each checked the same way. A member the check cannot tell from the hub stays:
    a copy of a copy (rotated further, cropped harder) may be linked to its original only
    through another copy.

    ``borders`` gets the border measures kept in the store (of this measure's version) and
    measures the rest (see :class:`keeper.Borders`)."""
    borders = borders if borders is not None else Borders(max_pixels=max_pixels)
    info_ids = sorted(set(multi) | {i for g in near for i in g})
    sizes: dict[int, Any] = {}
    for part in chunks(info_ids, IN_CHUNK):
        for r in conn.execute(select(Image.id, Image.width, Image.height, Image.byte_size, Image.format,
                                     Image.captured_at, Image.ingested_at, Image.border_fraction, Image.border_version)
                              .where(Image.id.in_(part))):
            sizes[int(r.id)] = r
            if r.border_fraction is not None and r.border_version == BORDER_VERSION:
                borders.known.setdefault(int(r.id), float(r.border_fraction))
    paths, first_paths = _current_paths(conn, info_ids)
    pair: dict[tuple[int, int], Edge] = {}
    for e in edges:  # CNN-code edges first: their distance is the index's Hamming distance
        pair.setdefault((e.a, e.b), e)
    in_near = {i for g in near for i in g}
    groups: list[DuplicateGroup] = []
    for image_id in sorted(int(i) for i in multi):
        if image_id in in_near:
            continue
        r = sizes[image_id]
        groups.append(DuplicateGroup("exact", image_id, [
            DuplicateMember(image_id, paths[image_id], r.width, r.height, 0, 1.0)], first_paths.get(image_id)))

    def keeper_of(g: list[int]) -> int:
        return choose([Candidate(i, sizes[i].width, sizes[i].height, sizes[i].format, sizes[i].byte_size,
                                 sizes[i].captured_at, sizes[i].ingested_at, first_paths.get(i)) for i in g], keep, max_pixels,
                      borders)

    neighbours: dict[int, set[int]] = {}
    if judge is not None:
        for e in edges:
            neighbours.setdefault(e.a, set()).add(e.b)
            neighbours.setdefault(e.b, set()).add(e.a)
    final: list[tuple[list[int], int]] = []  # members, keeper
    todo = list(near)
    grouped = 0
    while todo:
        progress(GROUPING, grouped, grouped + len(todo))
        grouped += 1
        g = todo.pop()
        keeper = keeper_of(g)
        if judge is not None and len(g) > 2:  # a pair's one edge was judged this way already
            # each member against the group's hub (the member with the most accepted pairs in
            # it: the original, which every copy was made from); the keeper may be a copy (an
            # upscaled or stretched one has the most pixels) that another copy is no copy of
            inside = set(g)
            hub = max(g, key=lambda i: (len(neighbours.get(i, set()) & inside), i == keeper, -i))
            others = np.array([i for i in g if i != hub], dtype=np.int64)
            ok = judge(np.full(len(others), hub, dtype=np.int64), others) != DIFFERENT
            if not ok.all():
                split = set(others[~ok].tolist())
                todo += components(sorted(split), [Edge(a, b, None, None) for a in sorted(split)
                                                   for b in sorted(neighbours.get(a, set()) & split) if a < b])
                g = sorted(inside - split)
                if len(g) < 2:
                    continue
                keeper = keeper_of(g)
        final.append((g, keeper))
    progress(GROUPING, grouped, grouped)
    for g, keeper in final:
        members = []
        for i in g:
            edge = pair.get((min(i, keeper), max(i, keeper)))
            members.append(DuplicateMember(
                i, paths[i], sizes[i].width, sizes[i].height,
                0 if i == keeper else (edge.distance if edge else None),
                1.0 if i == keeper else (edge.cosine if edge else None),
            ))
        groups.append(DuplicateGroup("near", keeper, members, first_paths.get(keeper)))
    groups.sort(key=lambda g: (-g.n_files, g.keeper))
    return groups


def _current_paths(conn: Connection, image_ids: list[int]) -> tuple[dict[int, list[str]], dict[int, str]]:
    """Per image, its current paths (sorted) and the one to keep among them
    (:func:`catalog.keeper_path`: first seen, then shortest, then by name)."""
    rows = path_rows(conn, image_ids)
    paths = {int(i): [r.path for r in rows.get(int(i), []) if r.is_current] for i in image_ids}
    keepers = {int(i): keeper_path(rows.get(int(i), [])) for i in image_ids}
    return paths, {i: p for i, p in keepers.items() if p is not None}


class PairVerdicts:
    """The geometric check's verdicts on pairs of contents (sha256, sha256), COPY or
    DIFFERENT, kept per store for the life of the process (a part of its context): a content
    never changes, so a second dedup (the duplicates page) re-reads nothing."""

    def __init__(self, ctx: StoreContext) -> None:
        self.known: dict[tuple[str, str], int] = {}

    def forget_index(self, index_id: int) -> None:
        """Verdicts are about pixels, not indexes: nothing to forget."""

    def close(self) -> None:
        self.known.clear()


def components(ids: list[int], edges: list[Edge]) -> list[list[int]]:
    """Connected components (groups of 2 or more image ids), each sorted, groups by first id.
    Labels spread along the edges as the smallest position in reach, with pointer jumping, in
    numpy: a round per doubling of the longest chain, not a Python step per edge."""
    if not edges:
        return []
    id_arr = np.asarray(ids, dtype=np.int64)
    order = np.argsort(id_arr, kind="stable")
    sorted_ids = id_arr[order]
    ends = np.array([(e.a, e.b) for e in edges], dtype=np.int64)
    pa, pb = order[np.searchsorted(sorted_ids, ends[:, 0])], order[np.searchsorted(sorted_ids, ends[:, 1])]
    labels = np.arange(len(ids))
    while True:
        low = np.minimum(labels[pa], labels[pb])
        np.minimum.at(labels, pa, low)
        np.minimum.at(labels, pb, low)
        jumped = labels[labels]
        while not np.array_equal(jumped, labels):  # each label to its label's root
            labels, jumped = jumped, jumped[jumped]
        if np.array_equal(labels[pa], labels[pb]):
            break
    in_edges = np.zeros(len(ids), dtype=bool)
    in_edges[pa] = in_edges[pb] = True
    groups: dict[int, list[int]] = {}
    for image_id, label in zip(id_arr[in_edges].tolist(), labels[in_edges].tolist()):
        groups.setdefault(label, []).append(image_id)
    return sorted((sorted(set(g)) for g in groups.values() if len(set(g)) > 1), key=lambda g: g[0])
