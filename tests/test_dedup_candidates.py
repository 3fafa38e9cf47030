"""Dedup's candidate pairs (the band join of :mod:`imgstore.bandjoin`) against their definition:
some band of the two codes within the probe radius and the whole codes within the distance; and
the join on sets of equal bands against every pair within the distance."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgstore.bandjoin import BandTable, band_join, band_set_join, equal_band_sets, sort_keys
from imgstore.codecache import CodeCache
from imgstore.dedup import IndexPairs, Rule
from imgstore.errors import ConfigError
from imgstore.hashing.bits import as_words, band_values
from imgstore.types import IndexInfo


def index_info(n_bits: int, n_bands: int) -> IndexInfo:
    return IndexInfo(1, "test-uid", "lsh", n_bits, n_bands, n_bits // n_bands, "synthetic", 1, True, 0, 0, 0,
                     datetime.now(timezone.utc), {})


def clustered(rng: np.random.Generator, n: int, n_bytes: int, centres: int, noise: float) -> np.ndarray:
    """Codes around a few centres, exact duplicates among them (crowded buckets)."""
    c = rng.integers(0, 256, (centres, n_bytes), dtype=np.uint8)
    return c[rng.integers(0, centres, n)] ^ np.packbits(rng.random((n, n_bytes * 8)) < noise, axis=1)


def by_definition(codes: np.ndarray, n_bands: int, band_width: int, radius: int, max_distance: int) -> set[tuple[int, int]]:
    bands, words = band_values(codes, n_bands, band_width), as_words(codes)
    out = set()
    for i in range(len(codes)):
        for j in range(i + 1, len(codes)):
            near_band = (np.bitwise_count(bands[i] ^ bands[j]) <= radius).any()
            if near_band and np.bitwise_count(words[i] ^ words[j]).sum() <= max_distance:
                out.add((i, j))
    return out


@settings(max_examples=25, deadline=None)
@given(n=st.integers(0, 120), layout=st.sampled_from([(64, 4), (32, 2), (64, 8), (48, 3)]), radius=st.integers(0, 2),
       max_distance=st.integers(0, 24), centres=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_index_pairs_are_the_defined_candidates(n: int, layout: tuple[int, int], radius: int, max_distance: int,
                                                centres: int, seed: int) -> None:
    n_bits, n_bands = layout
    codes = clustered(np.random.default_rng(seed), n, n_bits // 8, centres, 0.06)
    ids = np.arange(n, dtype=np.int64) * 3 + 5
    cache = CodeCache(index_info(n_bits, n_bands), 0, ids, codes)
    seen: list[tuple[int, int]] = []
    edges = IndexPairs(cache, max_distance, radius, progress=lambda phase, done, total: seen.append((done, total))).edges(
        Rule(min_cosine=None, min_signature=None), lambda i: {}, None)
    want = by_definition(codes, n_bands, n_bits // n_bands, radius, max_distance)
    assert [(e.a, e.b) for e in edges] == sorted((int(ids[i]), int(ids[j])) for i, j in want)  # once each, in order
    words = as_words(codes)
    for e in edges:
        assert e.distance == np.bitwise_count(words[(e.a - 5) // 3] ^ words[(e.b - 5) // 3]).sum()
    if n >= 2:
        assert seen[0] == (0, n) and seen[-1] == (n, n)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 80), held=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_join_pieces_are_bounded_and_add_up(n: int, held: int, seed: int) -> None:
    """However small the bound on the entries a piece holds, the pieces together are the join
    (a query row whose bucket is larger than the bound comes alone)."""
    codes = clustered(np.random.default_rng(seed), n, 4, 2, 0.05)
    table = BandTable.build(codes, 2, 16)
    keys = np.arange(n, dtype=np.int64)
    pieces = list(band_join(table.bands, table.words, keys, table, keys, 16, 1, 32, held=held))
    got = sorted((int(a), int(b)) for qi, di, _ in pieces for a, b in zip(qi, di))
    assert got == sorted(by_definition(codes, 2, 16, 1, 32))
    everything = list(band_join(table.bands, table.words, keys, table, keys, 16, 1, 32))
    assert sorted((int(a), int(b)) for qi, di, _ in everything for a, b in zip(qi, di)) == got


@settings(max_examples=40, deadline=None)
@given(n_q=st.integers(0, 70), n_d=st.integers(0, 70), same=st.booleans(),
       layout=st.sampled_from([(64, 4), (64, 8), (48, 3), (128, 4), (128, 8), (96, 3), (32, 1), (64, 3), (128, 5)]),
       max_distance=st.integers(0, 7), held=st.sampled_from([1, 7, 1 << 22]), centres=st.integers(1, 5),
       ordered=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_band_set_join_is_every_pair_within_the_distance(n_q: int, n_d: int, same: bool, layout: tuple[int, int],
                                                         max_distance: int, held: int, centres: int, ordered: bool,
                                                         seed: int) -> None:
    """Any two sets (or one set with itself), keys packed side by side (<= 64 bits) or mixed
    (128-bit codes, 3 bands of 32), bands that leave bits of the code out (3 of 21 in 64), the
    query keys all below the data keys (shards in id order) or not, any bound on a piece: each
    pair within the distance once."""
    n_bits, m = layout
    w = n_bits // m
    rng = np.random.default_rng(seed)
    codes = clustered(rng, n_q + n_d, n_bits // 8, centres, 0.03)
    q_codes, d_codes = (codes[:n_d], codes[:n_d]) if same else (codes[:n_q], codes[n_q:])
    q_keys = rng.permutation(len(q_codes) * 2)[: len(q_codes)].astype(np.int64)
    d_keys = q_keys if same else rng.permutation(len(d_codes) * 2)[: len(d_codes)].astype(np.int64)
    if ordered and not same:
        d_keys = d_keys + len(q_codes) * 2
    q_bands, d_bands = band_values(q_codes, m, w), band_values(d_codes, m, w)
    if same:
        q_bands = d_bands
    q_words, d_words = as_words(q_codes), as_words(d_codes)
    if max_distance >= m:
        assert equal_band_sets(m, max_distance) == []
        with pytest.raises(ConfigError, match="below the"):
            list(band_set_join(q_bands, q_words, q_keys, d_bands, d_words, d_keys, w, max_distance))
        return
    got: list[tuple[int, int, int]] = []
    for qi, di, dist in band_set_join(q_bands, q_words, q_keys, d_bands, d_words, d_keys, w, max_distance, held=held):
        assert len(qi) <= max(held, len(d_codes))
        got += zip(qi.tolist(), di.tolist(), dist.tolist())
    dist_all = np.bitwise_count(q_words[:, None, :] ^ d_words[None, :, :]).sum(axis=2) if len(q_codes) and len(d_codes) \
        else np.zeros((len(q_codes), len(d_codes)), np.int64)
    want = sorted((i, j, int(dist_all[i, j])) for i, j in zip(*np.nonzero(dist_all <= max_distance)) if q_keys[i] < d_keys[j])
    assert sorted(got) == want  # each pair once, with its distance


@settings(max_examples=200, deadline=None)
@given(data=st.data(), key_bits=st.sampled_from([1, 8, 16, 31, 32, 48, 62, 63, 64]))
def test_sort_keys_is_a_stable_argsort(data: st.DataObject, key_bits: int) -> None:
    """Packed or not (a key and a row number past 64 bits fall back to argsort), the rows come in
    key order with equal keys in row order, and the keys with them."""
    top = (1 << key_bits) - 1
    keys = np.array(data.draw(st.lists(st.one_of(st.just(0), st.just(top), st.integers(0, top)), max_size=300)),
                    dtype=np.uint64)
    order, by_key = sort_keys(keys, key_bits)
    np.testing.assert_array_equal(order, np.argsort(keys, kind="stable"))
    np.testing.assert_array_equal(by_key, keys[order])
    assert by_key.dtype == np.uint64 and order.dtype == np.intp


def test_a_probe_radius_wider_than_a_band_is_refused() -> None:
    codes = np.zeros((3, 4), dtype=np.uint8)
    cache = CodeCache(index_info(32, 2), 0, np.arange(3, dtype=np.int64), codes)
    with pytest.raises(ConfigError, match="radius"):
        IndexPairs(cache, 4, 17).edges(Rule(min_cosine=None, min_signature=None), lambda i: {}, None)
