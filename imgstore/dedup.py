"""Near-duplicate groups through the band index, with memory that grows linearly.

For each stored code (in chunks) the band index is probed at radius 1, exactly as a query
would: that finds every code within Hamming distance ``2 * n_bands - 1`` and most a little
farther. Pairs within ``max_distance`` are then checked against the float features
(``min_cosine``), and accepted pairs are joined into connected components with a union-find.
No all-pairs matrix is ever built: work and memory are proportional to the number of codes plus
the candidates of one chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .hashing.bits import band_values, flip_neighbours
from .search import CodeCache

#: Pairs whose float features are less similar than this are not duplicates. Measured on the
#: copy-detection set (benchmarks/bench_dedup.py): resized, recompressed and slightly cropped
#: copies of a photo stay well above it with CNN features, different photos of one kind stay below.
DEFAULT_MIN_COSINE = 0.90
#: ... or, for pairs whose float features agree at least SIGNATURE_COSINE_FLOOR, pixel-layout
#: signatures (imgstore.signature, flip-aware) at least this similar: degraded copies (half size,
#: heavy JPEG) of small images drift in CNN space but keep their layout.
DEFAULT_MIN_SIGNATURE = 0.95
SIGNATURE_COSINE_FLOOR = 0.30
#: Hamming distance allowed, as a fraction of the code length, before the float check.
DEFAULT_MAX_DISTANCE_FRACTION = 0.25
CHUNK = 2048


@dataclass(frozen=True)
class Edge:
    a: int  # image ids, a < b
    b: int
    distance: int
    cosine: float | None


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, int(self.parent[x])
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def default_max_distance(n_bits: int) -> int:
    return int(round(DEFAULT_MAX_DISTANCE_FRACTION * n_bits))


def _flip_signs() -> npt.NDArray[np.float32]:
    """Signs that turn a signature into the signature of the mirrored image: a horizontal flip
    negates the DCT coefficients of odd horizontal frequency."""
    from .signature import DIM, KEEP

    signs = np.array([(-1.0) ** (i % KEEP) for i in range(KEEP * KEEP)], dtype=np.float32)[1:]
    assert len(signs) == DIM
    return signs


def signature_similarity(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Row-wise similarity of unit signatures (n, 63), the better of as-is and mirrored."""
    flip = _flip_signs()
    return np.maximum((a * b).sum(axis=1), (a * (b * flip)).sum(axis=1)).astype(np.float32)


def near_duplicate_edges(
    cache: CodeCache,
    load_vectors: Callable[[list[int]], dict[int, npt.NDArray[np.float32]]] | None,
    *,
    max_distance: int,
    min_cosine: float | None,
    probe_radius: int = 1,
    load_signatures: Callable[[list[int]], dict[int, npt.NDArray[np.float32]]] | None = None,
    min_signature: float | None = DEFAULT_MIN_SIGNATURE,
) -> list[Edge]:
    """Accepted duplicate pairs among the cached codes (each pair once, a < b).

    A candidate pair (within ``max_distance`` bits) is accepted when its float features have
    cosine >= ``min_cosine``, or when they have cosine >= SIGNATURE_COSINE_FLOOR and its
    pixel-layout signatures have similarity >= ``min_signature``.
    """
    n = len(cache)
    index = cache.index
    if n < 2:
        return []
    bands = band_values(cache.codes, index.n_bands, index.band_width)
    edges: list[Edge] = []
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        pairs_a: list[npt.NDArray[np.intp]] = []
        pairs_b: list[npt.NDArray[np.intp]] = []
        for row in range(start, stop):
            probes = [flip_neighbours(int(bands[row, j]), index.band_width, probe_radius) for j in range(index.n_bands)]
            cand = cache.probe(probes)
            cand = cand[cand > row]  # each pair once
            if len(cand) == 0:
                continue
            dist = np.bitwise_count(cache.words[cand] ^ cache.words[row]).sum(axis=1)
            keep = cand[dist <= max_distance]
            if len(keep):
                pairs_a.append(np.full(len(keep), row, dtype=np.intp))
                pairs_b.append(keep)
        if not pairs_a:
            continue
        a = np.concatenate(pairs_a)
        b = np.concatenate(pairs_b)
        dist = np.bitwise_count(cache.words[a] ^ cache.words[b]).sum(axis=1)
        ids_a, ids_b = cache.image_ids[a], cache.image_ids[b]
        cos: npt.NDArray[np.float32] | None = None
        if min_cosine is not None and load_vectors is not None:
            wanted = np.unique(np.concatenate([ids_a, ids_b]))
            vectors = load_vectors(wanted.tolist())
            dim = len(next(iter(vectors.values()))) if vectors else 1
            matrix = np.zeros((len(wanted), dim), dtype=np.float32)
            for i, image_id in enumerate(wanted.tolist()):
                if image_id in vectors:
                    v = vectors[image_id]
                    matrix[i] = v / max(float(np.linalg.norm(v)), 1e-12)
            ra, rb = np.searchsorted(wanted, ids_a), np.searchsorted(wanted, ids_b)
            cos = (matrix[ra] * matrix[rb]).sum(axis=1).astype(np.float32)
            ok = cos >= min_cosine
            if load_signatures is not None and min_signature is not None:
                sigs = load_signatures(wanted.tolist())
                sig = np.zeros((len(wanted), len(_flip_signs())), dtype=np.float32)
                for i, image_id in enumerate(wanted.tolist()):
                    if image_id in sigs:
                        sig[i] = sigs[image_id]
                layout = signature_similarity(sig[ra], sig[rb])
                ok |= (cos >= SIGNATURE_COSINE_FLOOR) & (layout >= min_signature)
            ids_a, ids_b, dist, cos = ids_a[ok], ids_b[ok], dist[ok], cos[ok]
        for i in range(len(ids_a)):
            edges.append(Edge(int(ids_a[i]), int(ids_b[i]), int(dist[i]), None if cos is None else float(cos[i])))
    return edges


#: Signatures are also hashed (random hyperplanes, fixed seed) into short codes probed like an
#: index, so copies that drift in CNN space (a half-size thumbnail) are still candidates.
SIGNATURE_BITS = 32
SIGNATURE_BANDS = 2
SIGNATURE_MAX_DISTANCE = 8
_SIGNATURE_SEED = 20261129


def signature_codes(signatures: npt.NDArray[np.float32]) -> npt.NDArray[np.uint8]:
    """(n, 63) unit signatures -> (n, 4) packed 32-bit SimHash codes (same in every process)."""
    from .hashing.bits import pack_bits
    from .signature import DIM

    planes = np.random.default_rng(_SIGNATURE_SEED).standard_normal((DIM, SIGNATURE_BITS))
    return pack_bits(np.asarray(signatures, dtype=np.float64) @ planes > 0)


def signature_cache(image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> CodeCache:
    """A CodeCache over signature codes (ids ascending), probed like an index."""
    from datetime import datetime, timezone

    from .indexing import IndexInfo

    info = IndexInfo(
        id=-1, method="signature", n_bits=SIGNATURE_BITS, n_bands=SIGNATURE_BANDS,
        band_width=SIGNATURE_BITS // SIGNATURE_BANDS, extractor="signature", space_id=-1, is_active=False,
        n_codes=len(image_ids), n_fitted=0, generation=0, created_at=datetime.now(timezone.utc), config={},
    )
    return CodeCache(info, 0, image_ids, codes)


def components(ids: list[int], edges: list[Edge]) -> list[list[int]]:
    """Connected components (groups of 2 or more image ids), each sorted, groups by first id."""
    position = {image_id: i for i, image_id in enumerate(ids)}
    uf = UnionFind(len(ids))
    for e in edges:
        uf.union(position[e.a], position[e.b])
    groups: dict[int, list[int]] = {}
    for e in edges:
        for image_id in (e.a, e.b):
            groups.setdefault(uf.find(position[image_id]), [])
    for image_id, pos in position.items():
        root = uf.find(pos)
        if root in groups:
            groups[root].append(image_id)
    return sorted((sorted(set(g)) for g in groups.values() if len(set(g)) > 1), key=lambda g: g[0])
