"""Contract tests over every registered hasher, plus method-specific checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from imgstore.errors import DimensionMismatchError, HasherError, NotEnoughDataError, NotFittedError
from imgstore.hashing import Hasher, available_methods, hasher_from_bytes, make_hasher, min_samples
from imgstore.hashing.bits import as_words, hamming_distances_batch

METHODS = available_methods()
N_FEATURES = 48


def test_registry_lists_the_methods() -> None:
    assert {"lsh", "itq", "pca"} <= set(METHODS)
    with pytest.raises(HasherError, match="available: "):
        make_hasher("nope")
    with pytest.raises(HasherError, match="no parameter"):
        make_hasher("lsh", n_bitz=64)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    rng = np.random.default_rng(7)
    # Non-negative and off-centre, like post-ReLU CNN features.
    return np.abs(rng.standard_normal((400, N_FEATURES))).astype(np.float32) + 0.5


LABELS = np.arange(400) % 5  # for supervised methods; unsupervised ones ignore y


def _fit(hasher: Hasher, x: np.ndarray) -> Hasher:
    return hasher.fit(x, LABELS[: len(x)] if hasher.needs_labels else None)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_bits", [16, 32])
def test_hasher_contract(method: str, n_bits: int, data: np.ndarray) -> None:
    hasher = make_hasher(method, n_bits=n_bits, random_state=3)
    assert isinstance(hasher, Hasher)
    assert not hasattr(hasher, "projection_")  # __init__ stores parameters only
    with pytest.raises(NotFittedError, match="fit"):
        hasher.encode(data)
    with pytest.raises(NotFittedError):
        hasher.to_bytes()

    assert _fit(hasher, data) is hasher
    assert hasher.n_features_in_ == N_FEATURES
    codes = hasher.encode(data)
    assert codes.shape == (len(data), n_bits // 8) and codes.dtype == np.uint8
    assert hasher.encode(data[:0]).shape == (0, n_bits // 8)
    # Bits are not constant (each splits the data).
    bits = np.unpackbits(codes, axis=1)
    assert (bits.mean(axis=0) > 0.02).all() and (bits.mean(axis=0) < 0.98).all()

    # Determinism under random_state; a different seed changes randomized methods.
    np.testing.assert_array_equal(_fit(make_hasher(method, n_bits=n_bits, random_state=3), data).encode(data), codes)
    other = _fit(make_hasher(method, n_bits=n_bits, random_state=4), data).encode(data)
    if type(hasher).randomized:
        assert not np.array_equal(other, codes)

    # Serialisation round trip, byte-stable.
    blob = hasher.to_bytes()
    assert blob == hasher.to_bytes()
    restored = hasher_from_bytes(blob)
    assert type(restored) is type(hasher) and restored.get_params() == hasher.get_params()
    np.testing.assert_array_equal(restored.encode(data), codes)

    # Wrong input dimension names both dimensions.
    with pytest.raises(DimensionMismatchError, match=rf"\b{N_FEATURES - 1}\b.*\b{N_FEATURES}\b"):
        hasher.encode(data[:, :-1])
    with pytest.raises(HasherError, match="2-D"):
        hasher.encode(data[0])
    bad = data[:3].copy()
    bad[1, 2] = np.nan
    with pytest.raises(HasherError, match="NaN"):
        hasher.encode(bad)
    with pytest.raises(HasherError, match="NaN"):
        _fit(make_hasher(method, n_bits=n_bits), bad)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n_bits", [0, 8, 12, 60, 264, 512, 64.0, "64", True])
def test_bad_n_bits_rejected(method: str, n_bits: object) -> None:
    with pytest.raises(HasherError, match="n_bits"):
        make_hasher(method, n_bits=n_bits)
    with pytest.raises(HasherError, match="n_bits"):
        make_hasher(method).__class__(n_bits=n_bits).fit(np.ones((300, 8)))  # type: ignore[arg-type]


@pytest.mark.parametrize("method", METHODS)
def test_min_samples_is_enforced(method: str) -> None:
    need = min_samples(method, 32)
    assert need >= 1
    rng = np.random.default_rng(0)
    _fit(make_hasher(method, n_bits=32), rng.standard_normal((need, 40)))
    if need > 1:
        with pytest.raises(NotEnoughDataError, match=str(need)):
            _fit(make_hasher(method, n_bits=32), rng.standard_normal((need - 1, 40)))


def test_itq_needs_n_bits_samples() -> None:
    assert min_samples("itq", 64) > 64
    assert min_samples("lsh", 64) == 1


@pytest.mark.parametrize("method", ["itq", "pca"])
def test_pca_methods_refuse_more_bits_than_dimensions(method: str) -> None:
    x = np.random.default_rng(0).standard_normal((500, 24))
    with pytest.raises(HasherError, match="24-dimensional.*lsh"):
        make_hasher(method, n_bits=32).fit(x)
    # LSH has no such limit.
    make_hasher("lsh", n_bits=32).fit(x)


def test_pca_methods_refuse_degenerate_data() -> None:
    x = np.random.default_rng(0).standard_normal((500, 8)) @ np.random.default_rng(1).standard_normal((8, 64))
    with pytest.raises(NotEnoughDataError, match="span fewer"):
        make_hasher("itq", n_bits=16).fit(x)


def test_itq_max_samples_fits_on_a_subset(data: np.ndarray) -> None:
    a = make_hasher("itq", n_bits=16, max_samples=100, random_state=0).fit(data)
    b = make_hasher("itq", n_bits=16, max_samples=100, random_state=1).fit(data)
    assert not np.allclose(a.mean_, b.mean_)
    with pytest.raises(HasherError, match="max_samples"):
        make_hasher("itq", n_bits=32, max_samples=10)


def test_lsh_center_option(data: np.ndarray) -> None:
    assert make_hasher("lsh").center is True
    uncentred = make_hasher("lsh", n_bits=32, center=False).fit(data)
    np.testing.assert_array_equal(uncentred.mean_, 0.0)
    centred = make_hasher("lsh", n_bits=32).fit(data)
    np.testing.assert_allclose(centred.mean_, data.mean(axis=0, dtype=np.float64))


def test_supervised_needs_labels(data: np.ndarray) -> None:
    with pytest.raises(NotEnoughDataError, match="fit\\(X, y\\)"):
        make_hasher("centres").fit(data)
    with pytest.raises(DimensionMismatchError, match="labels"):
        make_hasher("centres").fit(data, LABELS[:10])
    with pytest.raises(NotEnoughDataError, match="2 classes"):
        make_hasher("centres").fit(data, np.zeros(len(data)))


def test_hasher_from_bytes_rejects_garbage() -> None:
    with pytest.raises(HasherError, match="not a serialised"):
        hasher_from_bytes(b"hello")


def _clusters(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, 64)) * 3.0 + 5.0
    labels = np.repeat(np.arange(8), 60)
    return centres[labels] + rng.standard_normal((len(labels), 64)), labels


@pytest.mark.parametrize("method", ["itq", "lsh", "centres"])  # PCA-sign spends most bits on noise here
def test_codes_preserve_neighbourhoods(method: str) -> None:
    x, labels = _clusters(0)
    hasher = make_hasher(method, n_bits=64)
    words = as_words(hasher.fit(x, labels if hasher.needs_labels else None).encode(x))
    dist = hamming_distances_batch(words, words).astype(np.float64)
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    different = labels[:, None] != labels[None, :]
    assert dist[same].mean() < 0.6 * dist[different].mean()
    # Nearest non-self neighbour is in the same cluster for nearly every point.
    np.fill_diagonal(dist, np.inf)
    assert (labels[dist.argmin(axis=1)] == labels).mean() > 0.95


@pytest.mark.parametrize("method", METHODS)
def test_codes_reproduced_bit_for_bit_in_another_process(method: str, tmp_path: Path, data: np.ndarray) -> None:
    hasher = _fit(make_hasher(method, n_bits=32), data)
    (tmp_path / "hasher.bin").write_bytes(hasher.to_bytes())
    np.save(tmp_path / "x.npy", data)
    script = (
        "import sys, numpy as np; from imgstore.hashing import hasher_from_bytes; "
        "d = sys.argv[1]; h = hasher_from_bytes(open(d + '/hasher.bin', 'rb').read()); "
        "np.save(d + '/codes.npy', h.encode(np.load(d + '/x.npy')))"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), hasher.encode(data))
