"""The learned ``deep`` hasher: contract, reproducibility from bytes, and what supervision buys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

import imgstore.hashing.deep  # noqa: F401  (registers "deep")
from imgstore.errors import DimensionMismatchError, HasherError, NotEnoughDataError, NotFittedError
from imgstore.hashing import hasher_from_bytes, make_hasher, min_samples
from imgstore.hashing.deep import DeepHasher

N_FEATURES = 32
# Small and quick: the tests check behaviour, not quality.
FAST = {"hidden_units": 32, "max_epochs": 20, "patience": 3, "batch_size": 64, "learning_rate": 0.01}


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian clusters (off-centre, non-negative like CNN features) with labels 'a' / 'b'."""
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((2, N_FEATURES)) * 1.5
    labels = np.array(["a", "b"] * 100, dtype=object)
    x = centres[(labels == "b").astype(int)] + rng.standard_normal((200, N_FEATURES))
    return np.abs(x).astype(np.float32) + 0.5, labels


def _hamming(codes: np.ndarray) -> np.ndarray:
    bits = np.unpackbits(codes, axis=1).astype(np.int32)
    return (bits[:, None, :] != bits[None, :, :]).sum(axis=2)


@pytest.mark.parametrize("supervised", [False, True], ids=["unsupervised", "supervised"])
def test_contract(blobs: tuple[np.ndarray, np.ndarray], supervised: bool) -> None:
    x, labels = blobs
    y = labels if supervised else None
    hasher = make_hasher("deep", n_bits=32, random_state=3, **FAST)
    assert isinstance(hasher, DeepHasher) and not hasattr(hasher, "projection_")
    with pytest.raises(NotFittedError, match="fit"):
        hasher.encode(x)
    with pytest.raises(NotFittedError):
        hasher.to_bytes()

    assert hasher.fit(x, y) is hasher
    codes = hasher.encode(x)
    assert codes.shape == (len(x), 4) and codes.dtype == np.uint8
    assert hasher.encode(x[:0]).shape == (0, 4)
    assert hasher.supervised_ is supervised

    again = make_hasher("deep", n_bits=32, random_state=3, **FAST).fit(x, y)
    np.testing.assert_array_equal(again.encode(x), codes)
    assert again.to_bytes() == hasher.to_bytes()

    blob = hasher.to_bytes()
    restored = hasher_from_bytes(blob)
    assert type(restored) is DeepHasher and restored.get_params() == hasher.get_params()
    np.testing.assert_array_equal(restored.encode(x), codes)

    with pytest.raises(DimensionMismatchError, match=rf"\b{N_FEATURES - 1}\b.*\b{N_FEATURES}\b"):
        hasher.encode(x[:, :-1])
    with pytest.raises(HasherError, match="2-D"):
        hasher.encode(x[0])


def test_progress_callback_and_early_stopping(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    seen: list[tuple[int, float]] = []
    hasher = make_hasher("deep", n_bits=16, **{**FAST, "max_epochs": 40, "patience": 2})
    hasher.fit(x, progress=lambda epoch, loss: seen.append((epoch, loss)))
    assert [e for e, _ in seen] == list(range(1, len(seen) + 1))
    assert all(np.isfinite(loss) for _, loss in seen)
    assert hasher.loss_curve_.shape == (len(seen), 2)
    assert 1 <= hasher.best_epoch_ <= len(seen)
    assert "progress" not in hasher.get_params()  # a fit argument, never serialised


def test_labelled_training_separates_two_classes(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = blobs
    hasher = make_hasher("deep", n_bits=32, **FAST).fit(x, labels)
    dist = _hamming(hasher.encode(x))
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(x), dtype=bool)
    intra = dist[same & off_diagonal].mean()
    inter = dist[~same].mean()
    assert intra * 4 < inter and inter > 12, (intra, inter)


def test_unlabelled_entries_are_ignored(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = blobs
    partial = labels.copy()
    partial[::3] = None
    hasher = make_hasher("deep", n_bits=32, **FAST).fit(x, partial)
    assert hasher.supervised_
    dist = _hamming(hasher.encode(x))
    same = labels[:, None] == labels[None, :]
    assert dist[same].mean() * 3 < dist[~same].mean()  # unlabelled rows land with their class too
    # All unlabelled means unsupervised.
    assert not make_hasher("deep", n_bits=16, **FAST).fit(x, [None] * len(x)).supervised_


def test_one_label_is_rejected(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    with pytest.raises(HasherError, match="only one class"):
        make_hasher("deep", n_bits=16, **FAST).fit(x, ["cat"] * len(x))
    with pytest.raises(HasherError, match="only one class"):
        make_hasher("deep", n_bits=16, **FAST).fit(x, ["cat"] + [None] * (len(x) - 1))
    with pytest.raises(DimensionMismatchError, match="one label per row"):
        make_hasher("deep", n_bits=16, **FAST).fit(x, ["a", "b"])


def test_too_few_samples_and_bad_params(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = blobs
    need = min_samples("deep", 64)
    with pytest.raises(NotEnoughDataError, match=f"at least {need}"):
        make_hasher("deep", n_bits=64).fit(x[: need - 1])
    make_hasher("deep", n_bits=64, **FAST).fit(x[:need])
    with pytest.raises(HasherError, match="n_bits"):
        make_hasher("deep", n_bits=12)
    with pytest.raises(HasherError, match="hidden_units"):
        make_hasher("deep", hidden_units=0)
    with pytest.raises(HasherError, match="validation_fraction"):
        make_hasher("deep", validation_fraction=0.7)
    with pytest.raises(HasherError, match="NaN"):
        bad = x.copy()
        bad[3, 1] = np.nan
        make_hasher("deep", n_bits=16, **FAST).fit(bad)


def test_encode_needs_no_torch_and_is_bit_identical_in_a_fresh_process(
    blobs: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    x, labels = blobs
    hasher = make_hasher("deep", n_bits=64, **FAST).fit(x, labels)
    (tmp_path / "hasher.bin").write_bytes(hasher.to_bytes())
    np.save(tmp_path / "x.npy", x)
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails: encoding must not need it
import numpy as np
import imgstore.hashing.deep
from imgstore.hashing import hasher_from_bytes
from pathlib import Path
h = hasher_from_bytes(Path({str(tmp_path / 'hasher.bin')!r}).read_bytes())
np.save({str(tmp_path / 'codes.npy')!r}, h.encode(np.load({str(tmp_path / 'x.npy')!r})))
"""
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script], check=True, cwd=root, timeout=60)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), hasher.encode(x))


def test_supervised_training_runs_a_fixed_schedule(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    x, labels = blobs
    fast = {k: v for k, v in FAST.items() if k not in ("max_epochs", "patience")}
    seen: list[int] = []
    hasher = make_hasher("deep", n_bits=16, supervised_epochs=7, **fast)
    hasher.fit(x, labels, progress=lambda epoch, loss: seen.append(epoch))
    assert seen == list(range(1, 8))  # no early stopping with labels
    assert hasher.best_epoch_ == 7 and hasher.loss_curve_.shape == (7, 2)
    with pytest.raises(HasherError, match="supervised_epochs"):
        make_hasher("deep", supervised_epochs=0)
    with pytest.raises(HasherError, match="centre_quantization_weight"):
        make_hasher("deep", centre_quantization_weight=-1.0)
