"""Bit packing, Hamming distance, top-k by counting and bands, each against a naive reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgstore.errors import ImgStoreError
from imgstore.hashing.bits import (
    as_words,
    band_layout,
    band_values,
    codes_from_int64,
    codes_to_int64,
    default_n_bands,
    flip_neighbours,
    hamming_distances,
    hamming_distances_batch,
    pack_bits,
    rank_candidates,
    topk_smallest,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.mark.parametrize("n_bits", [8, 16, 24, 64, 72, 256])
def test_pack_round_trips_through_numpy_unpackbits(rng: np.random.Generator, n_bits: int) -> None:
    bits = rng.random((37, n_bits)) < 0.5
    codes = pack_bits(bits)
    assert codes.shape == (37, n_bits // 8) and codes.dtype == np.uint8
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1, bitorder="big").astype(bool), bits)


def test_documented_bit_order() -> None:
    # bit i lives in byte i // 8 at position 7 - i % 8 (MSB first).
    for i in range(16):
        bits = np.zeros((1, 16), dtype=bool)
        bits[0, i] = True
        codes = pack_bits(bits)
        expected = np.zeros(2, dtype=np.uint8)
        expected[i // 8] = 1 << (7 - i % 8)
        np.testing.assert_array_equal(codes[0], expected)
    # So byte strings compare in bit order.
    a = pack_bits(np.array([[0, 1] + [1] * 14], dtype=bool))[0].tobytes()
    b = pack_bits(np.array([[1, 0] + [0] * 14], dtype=bool))[0].tobytes()
    assert a < b


def test_pack_rejects_non_multiple_of_8() -> None:
    with pytest.raises(ImgStoreError, match="multiple of 8"):
        pack_bits(np.zeros((2, 12), dtype=bool))


@pytest.mark.parametrize("n_bytes", [1, 2, 5, 8])
def test_int64_round_trip_and_order(rng: np.random.Generator, n_bytes: int) -> None:
    codes = rng.integers(0, 256, size=(200, n_bytes), dtype=np.uint8)
    values = codes_to_int64(codes)
    assert values.dtype == np.int64
    np.testing.assert_array_equal(codes_from_int64(values, n_bytes * 8), codes)
    # Big-endian: as unsigned, the integers sort like the byte strings.
    unsigned = values.view(np.uint64)
    by_int = np.argsort(unsigned, kind="stable")
    by_bytes = sorted(range(200), key=lambda i: (codes[i].tobytes(), i))
    np.testing.assert_array_equal(by_int, by_bytes)
    first_bit_set = (codes[:, 0] & 0x80) != 0
    if n_bytes == 8:
        np.testing.assert_array_equal(values < 0, first_bit_set)


@pytest.mark.parametrize("n_bits", [16, 64, 72, 128, 256])
def test_hamming_matches_naive(rng: np.random.Generator, n_bits: int) -> None:
    bits = rng.random((300, n_bits)) < 0.5
    codes = pack_bits(bits)
    words = as_words(codes)
    assert words.dtype == np.uint64 and words.flags.c_contiguous
    assert words.shape == (300, math.ceil(n_bits / 64))
    naive = (bits[:, None, :] != bits[None, :, :]).sum(axis=2)
    for q in (0, 17, 299):
        np.testing.assert_array_equal(hamming_distances(words[q], words), naive[q])
    np.testing.assert_array_equal(hamming_distances_batch(words[:50], words, chunk_size=7), naive[:50])


def _naive_topk(dist: np.ndarray, k: int, max_distance: int | None) -> np.ndarray:
    order = sorted(range(len(dist)), key=lambda i: (dist[i], i))
    if max_distance is not None:
        order = [i for i in order if dist[i] <= max_distance]
    return np.array(order[:k], dtype=np.intp)


@pytest.mark.parametrize("k", [0, 1, 5, 37, 500, 2000])
@pytest.mark.parametrize("max_distance", [None, 0, 3, 6, 100])
def test_topk_matches_stable_sort(rng: np.random.Generator, k: int, max_distance: int | None) -> None:
    dist = rng.integers(0, 8, size=1000).astype(np.uint16)  # many ties
    got = topk_smallest(dist, k, max_distance)
    np.testing.assert_array_equal(got, _naive_topk(dist, k, max_distance))


def test_topk_edge_cases() -> None:
    assert topk_smallest(np.array([], dtype=np.int64), 3).size == 0
    np.testing.assert_array_equal(topk_smallest(np.array([5, 5, 5]), 2), [0, 1])
    np.testing.assert_array_equal(topk_smallest(np.array([9, 1, 4]), 10), [1, 2, 0])
    with pytest.raises(ImgStoreError):
        topk_smallest(np.array([1.5, 2.0]), 1)


def _naive_bands(bits: np.ndarray, n_bands: int, band_width: int) -> np.ndarray:
    out = np.zeros((bits.shape[0], n_bands), dtype=np.int64)
    for row in range(bits.shape[0]):
        for j in range(n_bands):
            value = 0
            for b in bits[row, j * band_width : (j + 1) * band_width]:
                value = value * 2 + int(b)
            out[row, j] = value
    return out


@pytest.mark.parametrize(
    ("n_bits", "n_bands", "band_width"),
    [(16, 2, 8), (32, 1, 32), (64, 4, 16), (64, 3, 21), (64, 6, 10), (128, 4, 32), (256, 8, 32), (24, 2, 11)],
)
def test_band_values_match_naive(rng: np.random.Generator, n_bits: int, n_bands: int, band_width: int) -> None:
    bits = rng.random((40, n_bits)) < 0.5
    bits[0] = True  # all-ones: the largest value must stay non-negative
    got = band_values(pack_bits(bits), n_bands, band_width)
    assert got.shape == (40, n_bands) and got.dtype == np.int64
    np.testing.assert_array_equal(got, _naive_bands(bits, n_bands, band_width))
    assert got.min() >= 0 and got[0].max() == (1 << band_width) - 1


@settings(max_examples=300, deadline=None)
@given(n_bytes=st.integers(min_value=1, max_value=40), data=st.data())
def test_band_values_any_layout(n_bytes: int, data: st.DataObject) -> None:
    """Any width 1..32 and any number of bands that fits, the last band ending anywhere (mid-byte,
    or bytes before the code's end): the same values as reading the bits one by one."""
    band_width = data.draw(st.integers(min_value=1, max_value=min(32, n_bytes * 8)))
    n_bands = data.draw(st.integers(min_value=1, max_value=n_bytes * 8 // band_width))
    n = data.draw(st.integers(min_value=0, max_value=5))
    raw = data.draw(st.binary(min_size=n * n_bytes, max_size=n * n_bytes))
    codes = np.frombuffer(raw, dtype=np.uint8).reshape(n, n_bytes)
    got = band_values(codes, n_bands, band_width)
    assert got.shape == (n, n_bands) and got.dtype == np.int64
    np.testing.assert_array_equal(got, _naive_bands(np.unpackbits(codes, axis=1).astype(bool), n_bands, band_width))


def test_band_values_rejects_bad_layout() -> None:
    codes = np.zeros((2, 8), dtype=np.uint8)
    for n_bands, band_width in [(3, 33), (9, 8), (3, 32), (0, 8)]:
        with pytest.raises(ImgStoreError):
            band_values(codes, n_bands, band_width)


@pytest.mark.parametrize("band_width", [8, 16, 32])
def test_flip_neighbours(band_width: int) -> None:
    value = 0b1011 << (band_width - 4)
    r0 = flip_neighbours(value, band_width, 0)
    np.testing.assert_array_equal(r0, [value])
    r1 = flip_neighbours(value, band_width, 1)
    assert r1.shape == (1 + band_width,) and r1[0] == value and len(set(r1.tolist())) == 1 + band_width
    assert all(bin(int(v) ^ value).count("1") == 1 for v in r1[1:])
    r2 = flip_neighbours(value, band_width, 2)
    assert len(set(r2.tolist())) == 1 + band_width + band_width * (band_width - 1) // 2
    assert all(0 <= v < 1 << band_width for v in r2.tolist())
    batch = flip_neighbours(np.array([value, 0, (1 << band_width) - 1]), band_width, 1)
    assert batch.shape == (3, 1 + band_width)
    np.testing.assert_array_equal(batch[0], r1)
    with pytest.raises(ImgStoreError):
        flip_neighbours(1 << band_width, band_width, 1)


def test_default_n_bands_rule() -> None:
    for n_bits in (16, 32, 64, 128, 256):
        for n_items in (1, 10, 1000, 60_000, 10**6, 10**9):
            m = default_n_bands(n_bits, n_items)
            assert 1 <= m <= n_bits // 8
            assert 8 <= band_layout(n_bits, m) <= 32
    assert default_n_bands(64, 2**16) == 4  # 64 / log2(65536) = 4 bands of 16 bits
    assert default_n_bands(64, 2**32) == 2
    # rounded up (no band wider than log2 N): the faster layout measured at 1M and at 10M
    assert default_n_bands(64, 10**6) == 4 and default_n_bands(64, 10**7) == 3
    assert default_n_bands(256, 10**6) == 13  # 256 / log2(1e6): no longer capped at 8 (migration 0004)
    assert band_layout(256, 4) == 32  # capped: bits 128..255 are in no band
    assert band_layout(64, 8) == 8
    with pytest.raises(ImgStoreError, match="at most 8 bands"):
        band_layout(64, 9)  # 7-bit bands match too many codes to filter
    with pytest.raises(ImgStoreError):
        band_layout(64, 0)


@settings(max_examples=200, deadline=None)
@given(
    n_bytes=st.sampled_from([2, 4, 8, 12, 16]),
    data=st.data(),
    k=st.integers(min_value=0, max_value=12),
)
def test_rank_candidates_is_a_sort_of_the_distinct_candidates(n_bytes: int, data: st.DataObject, k: int) -> None:
    """The SQL path's top-k: each id once however many bands found it, ordered by (distance, id)."""
    n_ids = data.draw(st.integers(min_value=0, max_value=30))
    ids = data.draw(st.lists(st.integers(min_value=0, max_value=(1 << 40) - 1), min_size=n_ids, max_size=n_ids,
                             unique=True))
    codes = {i: data.draw(st.binary(min_size=n_bytes, max_size=n_bytes)) for i in ids}
    repeats = data.draw(st.lists(st.sampled_from(ids), max_size=40)) if ids else []
    found = ids + repeats
    order = data.draw(st.permutations(range(len(found))))
    found = [found[i] for i in order]
    query = data.draw(st.binary(min_size=n_bytes, max_size=n_bytes))
    code_rows = np.array([list(codes[i]) for i in found], dtype=np.uint8).reshape(len(found), n_bytes)
    top, dist, distinct = rank_candidates(np.array(found, dtype=np.int64), code_rows,
                                          np.frombuffer(query, dtype=np.uint8), k)

    def hamming(a: bytes, b: bytes) -> int:
        return sum(bin(x ^ y).count("1") for x, y in zip(a, b))

    expected = sorted((hamming(codes[i], query), i) for i in ids)[:k]
    assert distinct == len(ids)
    assert list(zip(dist.tolist(), top.tolist())) == expected
