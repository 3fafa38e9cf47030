"""The in-memory cache's compiled probes (imgstore.kernels through CodeCache) against numpy
brute force, without a database: which codes a probe finds, each once, their top-k by
(distance, image id), exact search, scans and probe counts, over several code layouts
(bands that cross bytes, leave bits uncovered, or span several 64-bit words), and the batch
search that stops band by band (hypothesis)."""

from __future__ import annotations

import datetime
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgstore import batch, kernels
from imgstore.hashing.bits import as_words, band_values, band_word_masks
from imgstore.indexing import IndexInfo
from imgstore.codecache import CodeCache
from imgstore.search import hamming_search

LAYOUTS = [  # (n_bits, n_bands, band_width)
    (32, 4, 8),
    (64, 4, 16),
    (64, 3, 21),  # bands cross byte boundaries; the last bit is in no band
    (96, 4, 24),  # a partial last word
    (128, 8, 16),  # two words
]


def make_cache(n_bits: int, n_bands: int, band_width: int, n: int = 3000, seed: int = 0) -> CodeCache:
    rng = np.random.default_rng(seed)
    n_bytes = n_bits // 8
    # clustered codes with exact duplicates, so buckets are uneven and ties are common
    centres = rng.integers(0, 256, size=(30, n_bytes), dtype=np.uint8)
    codes = centres[rng.integers(0, 30, n)]
    flips = rng.random((n, n_bits)) < 0.08
    codes = codes ^ np.packbits(flips, axis=1)
    codes[: n // 20] = codes[n // 20 : 2 * (n // 20)]  # duplicates
    image_ids = np.sort(rng.choice(10 * n, size=n, replace=False)).astype(np.int64) + 1
    info = IndexInfo(1, "test-uid", "lsh", n_bits, n_bands, band_width, "test", 1, True, n, n, 0,
                     datetime.datetime.now(datetime.timezone.utc), {})
    return CodeCache(info, 0, image_ids, np.ascontiguousarray(codes))


def distances(cache: CodeCache, q: np.ndarray) -> np.ndarray:
    return np.bitwise_count(cache.words ^ as_words(q.reshape(1, -1))[0]).sum(axis=1).astype(np.int64)


def band_distances(cache: CodeCache, q: np.ndarray) -> np.ndarray:
    """(n, n_bands) Hamming distance per band, from band values (independent of the kernels)."""
    m, w = cache.index.n_bands, cache.index.band_width
    a = band_values(cache.codes, m, w)
    b = band_values(q.reshape(1, -1), m, w)
    return np.bitwise_count(a ^ b).astype(np.int64)


def top(ids: np.ndarray, dist: np.ndarray, k: int) -> list[tuple[int, int]]:
    order = np.lexsort((ids, dist))[:k]
    return [(int(ids[i]), int(dist[i])) for i in order]


def queries(cache: CodeCache, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    near = cache.codes[rng.integers(0, len(cache), 6)] ^ np.packbits(rng.random((6, cache.codes.shape[1] * 8)) < 0.05, axis=1)
    far = rng.integers(0, 256, size=(3, cache.codes.shape[1]), dtype=np.uint8)
    return list(near) + list(far) + [cache.codes[0].copy()]


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{b}b-{m}x{w}" for b, m, w in LAYOUTS])
def test_probe_rounds_find_each_code_once_and_rank_like_brute_force(layout: tuple[int, int, int]) -> None:
    cache = make_cache(*layout)
    for q in queries(cache):
        d, bd = distances(cache, q), band_distances(cache, q)
        closest = bd.min(axis=1)
        for s_lo, s_hi in ((0, 0), (0, 1), (0, 2), (1, 1), (2, 2), (2, 3)):
            inside = (closest >= s_lo) & (bd.min(axis=1) <= s_hi) & (bd <= s_hi).any(axis=1)
            for k in (1, 10, len(cache) + 5):
                ids, dist, found = cache.rank_probes(q, k, s_lo, s_hi)
                assert found == int(inside.sum())
                assert list(zip(ids.tolist(), dist.tolist())) == top(cache.image_ids[inside], d[inside], k)
            if s_lo == s_hi:
                assert cache.count(q, s_lo) == int((bd == s_lo).sum())


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{b}b-{m}x{w}" for b, m, w in LAYOUTS])
def test_cached_exact_search_and_scan_equal_brute_force(layout: tuple[int, int, int]) -> None:
    cache = make_cache(*layout)
    for q in queries(cache):
        d = distances(cache, q)
        for k in (1, 10, 100, len(cache) + 5):
            want = top(cache.image_ids, d, k)
            got = hamming_search(q, cache.index, k, cache, exact=True, probe_radius=0)
            assert list(zip(got.image_ids.tolist(), got.distances.tolist())) == want
            ids, dist = cache.scan(q, k)
            assert list(zip(ids.tolist(), dist.tolist())) == want
        approx = hamming_search(q, cache.index, 10, cache, probe_radius=1)
        assert len(approx.image_ids) == 10 and (d[np.searchsorted(cache.image_ids, approx.image_ids)] == approx.distances).all()


def test_empty_and_tiny_caches() -> None:
    empty = make_cache(64, 4, 16, n=0)
    q = np.zeros(8, dtype=np.uint8)
    assert hamming_search(q, empty.index, 5, empty).image_ids.tolist() == []
    assert empty.rank_probes(q, 5, 0, 1)[2] == 0 and empty.count(q, 0) == 0
    tiny = make_cache(64, 4, 16, n=3)
    got = hamming_search(q, tiny.index, 10, tiny)
    assert sorted(got.image_ids.tolist()) == tiny.image_ids.tolist()  # all three, even though k > n


@pytest.mark.parametrize("layout", LAYOUTS, ids=[f"{b}b-{m}x{w}" for b, m, w in LAYOUTS])
def test_band_word_masks_measure_band_distances(layout: tuple[int, int, int]) -> None:
    n_bits, m, w = layout
    cache = make_cache(*layout, n=200)
    q = cache.codes[7] ^ np.uint8(0x5A)
    x = cache.words ^ as_words(q.reshape(1, -1))[0]
    masks = band_word_masks(n_bits, m, w)
    via_masks = np.stack([np.bitwise_count(x & masks[j]).sum(axis=1) for j in range(m)], axis=1)
    assert (via_masks == band_distances(cache, q)).all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS), n=st.integers(1, 3000), nq=st.integers(1, 30), k=st.integers(1, 12),
       noise=st.sampled_from([0.01, 0.05, 0.15, 0.5]), budget=st.sampled_from([0.0, 30.0, 1e3, math.inf]),
       seed=st.integers(0, 2**32 - 1))
def test_batch_knn_stops_band_by_band_exactly(layout: tuple[int, int, int], n: int, nq: int, k: int, noise: float,
                                               budget: float, seed: int) -> None:
    """The batch search (:func:`imgstore.kernels.knn_batch`) stops after any band of any round,
    skips codes past its k-th distance so far, probes to its last radius or scans mid-round when
    the budget runs out: always the exact k nearest rows by (distance, row)."""
    n_bits, n_bands, band_width = layout
    rng = np.random.default_rng(seed)
    n_bytes = n_bits // 8
    centres = rng.integers(0, 256, size=(max(1, n // 50), n_bytes), dtype=np.uint8)
    codes = centres[rng.integers(0, len(centres), n)] ^ np.packbits(rng.random((n, n_bits)) < noise, axis=1)
    queries = np.concatenate([codes[rng.integers(0, n, nq // 2)],
                              rng.integers(0, 256, size=(nq - nq // 2, n_bytes), dtype=np.uint8)])
    info = IndexInfo(1, "test-uid", "lsh", n_bits, n_bands, band_width, "test", 1, True, n, n, 0,
                     datetime.datetime.now(datetime.timezone.utc), {})
    cache = CodeCache(info, 0, np.arange(1, n + 1, dtype=np.int64), np.ascontiguousarray(codes))
    flips, starts = batch._round_flips(band_width, n_bands)
    rows, dist = kernels.knn_batch(cache.seg_keys, cache.seg_dir, cache.dir_shift, cache.seg_rows, cache.seg_words,
                                   cache.words, queries, np.ascontiguousarray(as_words(queries)), cache.band_masks,
                                   band_width, flips, starts, k, budget)
    want = min(k, n)
    for i, q in enumerate(queries):
        d = distances(cache, q)
        order = np.lexsort((np.arange(n), d))[:want]
        assert rows[i, :want].tolist() == order.tolist() and dist[i, :want].tolist() == d[order].tolist()
        assert (rows[i, want:] == -1).all()


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), ka=st.integers(0, 6), kb=st.integers(0, 6), k=st.integers(1, 14), seed=st.integers(0, 2**32 - 1))
def test_merge_topk_equals_a_sort(n: int, ka: int, kb: int, k: int, seed: int) -> None:
    """Merging two rows sorted by (distance, id), -1 padding last, equals sorting them together."""
    rng = np.random.default_rng(seed)
    pad = np.iinfo(np.int16).max

    def side(width: int) -> tuple[np.ndarray, np.ndarray]:
        dist = rng.integers(0, 5, (n, width)).astype(np.int16)
        ids = rng.integers(0, 8, (n, width)).astype(np.int64)
        short = rng.random((n, width)) < 0.2
        ids[short], dist[short] = -1, pad
        order = np.lexsort((np.where(ids < 0, 1 << 40, ids), dist), axis=1)
        return np.take_along_axis(ids, order, 1), np.take_along_axis(dist, order, 1)

    (ai, ad), (bi, bd) = side(ka), side(kb)
    ids, dist = kernels.merge_topk(ai, ad, bi, bd, k)
    all_ids, all_dist = np.concatenate([ai, bi], axis=1), np.concatenate([ad, bd], axis=1)
    for r in range(n):
        want = sorted(zip(all_dist[r].tolist(), np.where(all_ids[r] < 0, 1 << 40, all_ids[r]).tolist()))[:k]
        want += [(pad, 1 << 40)] * (k - len(want))
        got = list(zip(dist[r].tolist(), np.where(ids[r] < 0, 1 << 40, ids[r]).tolist()))
        assert got == want
