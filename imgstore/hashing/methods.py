"""The hashing methods: random-projection LSH, PCA-sign and ITQ.

All three produce ``(mean_, projection_)`` for the shared float64 sign encoder in
:mod:`imgstore.hashing.base`; they differ in how the projection is chosen.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from imgstore.errors import DimensionMismatchError, HasherError, NotEnoughDataError
from imgstore.hashing.base import Hasher, register

F64 = npt.NDArray[np.float64]

#: Default cap on the rows PCA / ITQ fit on; covariance costs n * d**2, ITQ 50 * n * n_bits**2.
DEFAULT_MAX_SAMPLES = 50_000


@register
class LSHHasher(Hasher):
    """Sign of random Gaussian projections (Charikar's SimHash / cosine LSH).

    center: subtract the training mean first. CNN features are non-negative (post-ReLU) and
      far from the origin, so uncentred hyperplanes through 0 split the data unevenly and
      many bits carry little information. On CIFAR-10 EfficientNet-Lite0 features centring
      raised mAP at every code length (64 bits: 0.174 -> 0.200, 128: 0.205 -> 0.239; see
      benchmarks/results/hashing.md), hence the default.
    """

    method: ClassVar[str] = "lsh"

    def __init__(self, n_bits: int = 64, random_state: int | None = 0, center: bool = True) -> None:
        super().__init__(n_bits=n_bits, random_state=random_state)
        self.center = center

    def _validate_params(self) -> None:
        super()._validate_params()
        if not isinstance(self.center, (bool, np.bool_)):
            raise HasherError(f"center must be True or False, got {self.center!r}")

    def _fit(self, X: F64, y: npt.NDArray[Any] | None, rng: np.random.Generator) -> tuple[F64, F64]:
        d = X.shape[1]
        mean = X.mean(axis=0) if self.center else np.zeros(d)
        projection = rng.standard_normal((d, int(self.n_bits)))
        return mean, projection


def _subsample(X: F64, max_samples: int | None, rng: np.random.Generator) -> F64:
    if max_samples is None or X.shape[0] <= max_samples:
        return X
    rows = np.sort(rng.choice(X.shape[0], size=max_samples, replace=False))
    return X[rows]


def _pca(X: F64, n_components: int) -> tuple[F64, F64, F64]:
    """Mean, top principal directions ``(d, n_components)`` and their variances, descending.

    Each direction's sign is fixed (largest-magnitude entry positive) so the result does not
    depend on the eigensolver's arbitrary sign choice.
    """
    mean = X.mean(axis=0)
    centred = X - mean
    cov = centred.T @ centred / max(X.shape[0] - 1, 1)
    variances, vectors = np.linalg.eigh(cov)
    order = np.argsort(variances)[::-1][:n_components]
    components = vectors[:, order]
    flip = np.sign(components[np.abs(components).argmax(axis=0), np.arange(n_components)])
    components = components * np.where(flip == 0, 1.0, flip)
    return mean, components, variances[order]


class _PCABased(Hasher):
    """Shared parameters and checks for hashers that start from PCA to ``n_bits`` dimensions."""

    def __init__(
        self, n_bits: int = 64, random_state: int | None = 0, max_samples: int | None = DEFAULT_MAX_SAMPLES
    ) -> None:
        super().__init__(n_bits=n_bits, random_state=random_state)
        self.max_samples = max_samples

    @classmethod
    def min_samples(cls, n_bits: int) -> int:
        # Centred data of n rows has rank <= n - 1, and PCA must find n_bits directions.
        # That is the floor; several times n_bits gives much more stable directions.
        return n_bits + 1

    def _validate_params(self) -> None:
        super()._validate_params()
        ms = self.max_samples
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, np.integer)) or ms < 1):
            raise HasherError(f"max_samples must be a positive int or None, got {ms!r}")
        if ms is not None and ms < self.min_samples(int(self.n_bits)):
            raise HasherError(
                f"max_samples={ms} is below the {self.min_samples(int(self.n_bits))} rows "
                f"{self.method} needs for n_bits={self.n_bits}"
            )

    def _pca_fit(self, X: F64, rng: np.random.Generator) -> tuple[F64, F64]:
        n_bits = int(self.n_bits)
        if n_bits > X.shape[1]:
            raise HasherError(
                f"{self.method} cannot make {n_bits} bits from {X.shape[1]}-dimensional features "
                f"(PCA gives at most {X.shape[1]} directions); use n_bits <= {X.shape[1]} "
                f"or method 'lsh'"
            )
        sample = _subsample(X, self.max_samples, rng)
        if sample.shape[0] <= n_bits:  # only reachable when fit's own check was bypassed
            raise NotEnoughDataError(f"{self.method} needs more than {n_bits} training rows")
        mean, components, variances = _pca(sample, n_bits)
        if variances[-1] <= 1e-12 * max(variances[0], 1e-300):
            raise NotEnoughDataError(
                f"the training vectors span fewer than {n_bits} dimensions, so {self.method} "
                f"would make constant bits; use fewer bits, more varied images, or method 'lsh'"
            )
        self.components_ = components
        self.explained_variance_ = variances
        return mean, components


@register
class PCAHasher(_PCABased):
    """Sign of the top ``n_bits`` principal components: a baseline for ITQ."""

    method: ClassVar[str] = "pca"
    randomized: ClassVar[bool] = False  # random_state only picks the max_samples subset
    _fitted_arrays: ClassVar[tuple[str, ...]] = ("mean_", "projection_", "components_", "explained_variance_")

    def _fit(self, X: F64, y: npt.NDArray[Any] | None, rng: np.random.Generator) -> tuple[F64, F64]:
        return self._pca_fit(X, rng)


@register
class ITQHasher(_PCABased):
    """Iterative Quantization (Gong & Lazebnik, CVPR 2011).

    Centre, PCA to ``n_bits`` dimensions (``V``), then find the rotation ``R`` minimising the
    quantisation loss ``||sign(V R) - V R||``: alternate ``B = sign(V R)`` and the orthogonal
    Procrustes solution for ``R`` (an SVD), from a random orthogonal start, ``n_iter`` times.
    The rotation spreads variance evenly over bits, which plain PCA-sign does not.
    """

    method: ClassVar[str] = "itq"
    _fitted_arrays: ClassVar[tuple[str, ...]] = (
        "mean_",
        "projection_",
        "components_",
        "explained_variance_",
        "rotation_",
    )

    def __init__(
        self,
        n_bits: int = 64,
        random_state: int | None = 0,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
        n_iter: int = 50,
    ) -> None:
        super().__init__(n_bits=n_bits, random_state=random_state, max_samples=max_samples)
        self.n_iter = n_iter

    def _validate_params(self) -> None:
        super()._validate_params()
        it = self.n_iter
        if isinstance(it, bool) or not isinstance(it, (int, np.integer)) or it < 0:
            raise HasherError(f"n_iter must be a non-negative int, got {it!r}")

    def _fit(self, X: F64, y: npt.NDArray[Any] | None, rng: np.random.Generator) -> tuple[F64, F64]:
        sample = _subsample(X, self.max_samples, rng)
        mean, components = self._pca_fit(sample, rng)
        v = (sample - mean) @ components
        rotation = _random_orthogonal(int(self.n_bits), rng)
        for _ in range(int(self.n_iter)):
            b = np.where(v @ rotation >= 0, 1.0, -1.0)
            # Procrustes: maximise trace(R^T V^T B) over orthogonal R.
            u, _, vt = np.linalg.svd(v.T @ b)
            rotation = u @ vt
        self.rotation_ = rotation
        return mean, components @ rotation


def _random_orthogonal(n: int, rng: np.random.Generator) -> F64:
    """A Haar-random orthogonal matrix (QR of a Gaussian with the sign fix of Mezzadri 2007)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def _class_centres(n_classes: int, n_bits: int, rng: np.random.Generator) -> F64:
    """``(n_classes, n_bits)`` +-1 target codes, far apart in Hamming distance.

    Rows of a Sylvester Hadamard matrix (and their negations) are pairwise ``n_bits / 2`` apart
    when ``n_bits`` is a power of two and there are at most ``2 * n_bits`` classes; otherwise
    random +-1 codes, which are about ``n_bits / 2`` apart for long codes.
    """
    if n_bits & (n_bits - 1) == 0 and n_classes <= 2 * n_bits:
        h = np.ones((1, 1))
        while h.shape[0] < n_bits:
            h = np.block([[h, h], [h, -h]])
        rows = np.concatenate([h, -h])
        # The all-ones row (and its negation) come last: as a target it asks every bit to
        # put that class on the same side, which the other rows never do.
        order = np.concatenate([np.arange(1, n_bits), np.arange(n_bits + 1, 2 * n_bits), [0, n_bits]])
        chosen: F64 = rows[order[:n_classes]][:, rng.permutation(n_bits)]
        return chosen
    return np.where(rng.random((n_classes, n_bits)) < 0.5, -1.0, 1.0)


@register
class CentreRegressionHasher(Hasher):
    """Supervised: regress features onto a +-1 target code per class, hash by sign.

    Each class gets a target code (Hadamard rows, pairwise ``n_bits / 2`` apart), and a ridge
    regression from centred features to those targets gives the projection. A linear,
    closed-form cousin of hash-centre learning (Yuan et al., "Central Similarity Quantization",
    CVPR 2020). Needs labels ``y`` in ``fit``; learns what separates the training classes, so it
    helps retrieval of those classes and may hurt for unrelated images.

    alpha: ridge strength, relative to the mean feature variance (scale free). On CIFAR-10
      EfficientNet-Lite0 features (64 bits) mAP was 0.66 for alpha 0.001..0.1, 0.62 at 1,
      0.52 at 10; P@10 falls from 0.63 (0.001) to 0.62 (0.01) and 0.53 (1).

    Codes of one class collapse onto (nearly) one code, so Hamming ranking ties heavily and a
    band lookup returns whole classes: callers must cap band candidates.
    """

    method: ClassVar[str] = "centres"
    needs_labels: ClassVar[bool] = True

    def __init__(
        self,
        n_bits: int = 64,
        random_state: int | None = 0,
        alpha: float = 0.01,
        max_samples: int | None = DEFAULT_MAX_SAMPLES,
    ) -> None:
        super().__init__(n_bits=n_bits, random_state=random_state)
        self.alpha = alpha
        self.max_samples = max_samples

    @classmethod
    def min_samples(cls, n_bits: int) -> int:
        return 2

    def _validate_params(self) -> None:
        super()._validate_params()
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, (int, float, np.number)) or not np.isfinite(a) or a <= 0:
            raise HasherError(f"alpha must be a positive number, got {a!r}")
        ms = self.max_samples
        if ms is not None and (isinstance(ms, bool) or not isinstance(ms, (int, np.integer)) or ms < 2):
            raise HasherError(f"max_samples must be an int >= 2 or None, got {ms!r}")

    def _fit(self, X: F64, y: npt.NDArray[Any] | None, rng: np.random.Generator) -> tuple[F64, F64]:
        if y is None:
            raise NotEnoughDataError(
                f"the {self.method} hasher is supervised: pass labels, fit(X, y); "
                "or use an unsupervised method such as 'itq'"
            )
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != X.shape[0]:
            raise DimensionMismatchError(f"y has {y.shape[0]} labels for {X.shape[0]} rows of X")
        if (max_samples := self.max_samples) and X.shape[0] > max_samples:
            rows = np.sort(rng.choice(X.shape[0], size=max_samples, replace=False))
            X, y = X[rows], y[rows]
        classes, y_idx = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise NotEnoughDataError(f"the {self.method} hasher needs at least 2 classes in y")
        targets = _class_centres(len(classes), int(self.n_bits), rng)[y_idx]
        mean = X.mean(axis=0)
        centred = X - mean
        gram = centred.T @ centred
        ridge = float(self.alpha) * np.trace(gram) / gram.shape[0]
        gram[np.diag_indices_from(gram)] += ridge
        projection = np.linalg.solve(gram, centred.T @ targets)
        return mean, projection
