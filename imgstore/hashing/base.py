"""The hasher base class: a scikit-learn-like ``fit`` / ``encode`` and self-describing bytes.

Every hasher here encodes the same way: ``bits = (X - mean_) @ projection_ > 0`` computed in
float64, then packed (:func:`imgstore.hashing.bits.pack_bits`). Methods differ only in how
``fit`` chooses ``mean_`` and ``projection_``. Encoding in float64 from arrays stored
exactly (float64) in :meth:`Hasher.to_bytes` is what lets another process reproduce codes bit
for bit: a bit could only differ if a projection lay within float64 rounding (~1e-16
relative) of zero, where float32 would leave ~1e-7.

Serialisation format (``to_bytes``): a zip archive (stored, fixed timestamps, so the same
hasher always gives the same bytes) holding ``header.json`` -- ``{"format":
"imgstore-hasher", "version": 1, "method", "params", "n_features_in", "arrays"}`` -- and one
``<name>.npy`` per fitted array, float64, written with ``allow_pickle=False``. ``np.load``
reads the arrays as an npz too.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import zipfile
from typing import Any, ClassVar, TypeVar

import numpy as np
import numpy.typing as npt

from imgstore.errors import DimensionMismatchError, HasherError, NotEnoughDataError, NotFittedError
from imgstore.hashing.bits import pack_bits

logger = logging.getLogger(__name__)

FORMAT_NAME = "imgstore-hasher"
FORMAT_VERSION = 1
MIN_BITS = 16
MAX_BITS = 256
#: Rows encoded per matrix product; bounds the float64 temporaries to ~chunk * d * 8 bytes.
ENCODE_CHUNK_ROWS = 8192

_REGISTRY: dict[str, type[Hasher]] = {}
H = TypeVar("H", bound="type[Hasher]")


def register(cls: H) -> H:
    """Class decorator: make ``cls`` available to :func:`make_hasher` under ``cls.method``."""
    if cls.method in _REGISTRY:
        raise HasherError(f"hasher method {cls.method!r} registered twice")
    _REGISTRY[cls.method] = cls
    return cls


def validate_n_bits(n_bits: object) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)):
        raise HasherError(f"n_bits must be an integer, got {n_bits!r}")
    n = int(n_bits)
    if n % 8 or not MIN_BITS <= n <= MAX_BITS:
        raise HasherError(
            f"n_bits must be a multiple of 8 between {MIN_BITS} and {MAX_BITS}, got {n}"
        )
    return n


def check_array(X: npt.ArrayLike, what: str = "X") -> npt.NDArray[np.float64]:
    """Validate a feature matrix: 2-D, numeric, finite; returned as float64 (a copy if needed)."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        hint = "; for one vector use X.reshape(1, -1)" if arr.ndim == 1 else ""
        raise HasherError(f"{what} must be a 2-D array (n_samples, n_features), got shape {arr.shape}{hint}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise HasherError(f"{what} must hold numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr).all(axis=1)))
        raise HasherError(f"{what} has NaN or infinite values in {bad} row(s); drop or repair them")
    return arr


class Hasher:
    """Base class. Subclasses set ``method``, implement ``_fit`` and declare their params.

    Parameters common to every hasher:
      n_bits: code length, a multiple of 8 in 16..256.
      random_state: seed (int) for every random choice ``fit`` makes. Defaults to 0, not None,
        so that an index rebuilt from the same data gets the same codes.
    """

    method: ClassVar[str] = ""
    #: Whether ``random_state`` changes the fitted hasher (False for deterministic methods).
    randomized: ClassVar[bool] = True
    #: Whether ``fit`` needs labels ``y`` (supervised methods).
    needs_labels: ClassVar[bool] = False
    #: Fitted arrays saved by ``to_bytes`` (``mean_`` and ``projection_`` are always needed).
    _fitted_arrays: ClassVar[tuple[str, ...]] = ("mean_", "projection_")

    mean_: npt.NDArray[np.float64]
    projection_: npt.NDArray[np.float64]
    n_features_in_: int

    def __init__(self, n_bits: int = 64, random_state: int | None = 0) -> None:
        self.n_bits = n_bits
        self.random_state = random_state

    # --- parameters ---------------------------------------------------------------------

    @classmethod
    def _param_names(cls) -> tuple[str, ...]:
        sig = inspect.signature(cls.__init__)
        return tuple(p for p in sig.parameters if p != "self")

    def get_params(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._param_names()}

    def _validate_params(self) -> None:
        """Check parameters; called by ``fit`` and :func:`make_hasher`. Subclasses extend."""
        validate_n_bits(self.n_bits)
        rs = self.random_state
        if rs is not None and (isinstance(rs, bool) or not isinstance(rs, (int, np.integer))):
            raise HasherError(f"random_state must be an int or None, got {rs!r}")

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({params})"

    @property
    def n_bytes(self) -> int:
        return int(self.n_bits) // 8

    @classmethod
    def min_samples(cls, n_bits: int) -> int:
        """Fewest training rows ``fit`` accepts for ``n_bits`` (more is better)."""
        return 1

    # --- fitting and encoding -----------------------------------------------------------

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike | None = None) -> Hasher:
        """Learn the hash function from ``X: (n_samples, n_features)`` float. Returns self."""
        self._validate_params()
        arr = check_array(X)
        need = self.min_samples(int(self.n_bits))
        if arr.shape[0] < need:
            raise NotEnoughDataError(
                f"{self.method} with n_bits={self.n_bits} needs at least {need} training vectors, "
                f"got {arr.shape[0]}; add images or use fewer bits"
            )
        rng = np.random.default_rng(self.random_state)
        mean, projection = self._fit(arr, None if y is None else np.asarray(y), rng)
        self.mean_ = np.ascontiguousarray(mean, dtype=np.float64)
        self.projection_ = np.ascontiguousarray(projection, dtype=np.float64)
        self.n_features_in_ = int(arr.shape[1])
        assert self.projection_.shape == (self.n_features_in_, self.n_bits)
        return self

    def _fit(
        self, X: npt.NDArray[np.float64], y: npt.NDArray[Any] | None, rng: np.random.Generator
    ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "projection_"):
            raise NotFittedError(
                f"this {type(self).__name__} is not fitted yet; call fit(X) before encode"
            )

    def _check_dim(self, n_features: int) -> None:
        if n_features != self.n_features_in_:
            raise DimensionMismatchError(
                f"X has {n_features} features per row but this {self.method} hasher was fitted "
                f"on {self.n_features_in_}-dimensional vectors; use the same feature extractor"
            )

    def project(self, X: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Real-valued projections ``(X - mean_) @ projection_``: (n, n_bits) float64."""
        self._check_fitted()
        arr = check_array(X)
        self._check_dim(arr.shape[1])
        return (arr - self.mean_) @ self.projection_

    def encode(self, X: npt.ArrayLike) -> npt.NDArray[np.uint8]:
        """Hash ``X: (n, n_features)`` float to packed codes ``(n, n_bits // 8)`` uint8.

        Bit ``i`` is 1 iff projection ``i`` is > 0 (bit order: :mod:`imgstore.hashing.bits`).
        Works in chunks of ``ENCODE_CHUNK_ROWS`` rows; a row's code does not depend on the
        chunk it is in.
        """
        self._check_fitted()
        arr = np.asarray(X)
        if arr.ndim != 2:
            check_array(arr)  # raises, with a hint for 1-D input
        self._check_dim(arr.shape[1])
        out = np.empty((arr.shape[0], self.n_bytes), dtype=np.uint8)
        for start in range(0, arr.shape[0], ENCODE_CHUNK_ROWS):
            chunk = arr[start : start + ENCODE_CHUNK_ROWS]
            out[start : start + ENCODE_CHUNK_ROWS] = pack_bits(self.project(chunk) > 0)
        return out

    # --- serialisation ------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Self-describing bytes (see the module docstring); :func:`hasher_from_bytes` reads them."""
        self._check_fitted()
        header = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "method": self.method,
            "params": _jsonable(self.get_params()),
            "n_features_in": self.n_features_in_,
            "arrays": list(self._fitted_arrays),
        }
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            zf.writestr(_zipinfo("header.json"), json.dumps(header, sort_keys=True).encode())
            for name in self._fitted_arrays:
                arr = np.ascontiguousarray(getattr(self, name), dtype=np.float64)
                with zf.open(_zipinfo(f"{name}.npy"), "w") as f:
                    np.lib.format.write_array(f, arr, allow_pickle=False)
        return buf.getvalue()


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    return info


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        if v is not None and not isinstance(v, (bool, int, float, str)):
            raise HasherError(f"parameter {k}={v!r} cannot be serialised; use plain ints/floats")
        out[k] = v
    return out


def hasher_from_bytes(blob: bytes) -> Hasher:
    """Rebuild a fitted hasher from :meth:`Hasher.to_bytes` output."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as zf:
            header = json.loads(zf.read("header.json"))
            arrays = {}
            for name in header["arrays"]:
                with zf.open(f"{name}.npy") as f:
                    arrays[name] = np.lib.format.read_array(f, allow_pickle=False)
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError) as exc:
        raise HasherError(f"not a serialised imgstore hasher ({exc})") from exc
    if header.get("format") != FORMAT_NAME:
        raise HasherError("not a serialised imgstore hasher (wrong format name)")
    if header.get("version") != FORMAT_VERSION:
        raise HasherError(
            f"serialised hasher format version {header.get('version')} is not supported "
            f"(this imgstore reads version {FORMAT_VERSION}); upgrade imgstore"
        )
    cls = _REGISTRY.get(header["method"])
    if cls is None:
        raise HasherError(
            f"serialised hasher uses unknown method {header['method']!r}; "
            f"available: {', '.join(available_methods())}"
        )
    hasher = cls(**header["params"])
    hasher._validate_params()
    d = int(header["n_features_in"])
    for name, arr in arrays.items():
        setattr(hasher, name, arr)
    hasher.n_features_in_ = d
    if hasher.mean_.shape != (d,) or hasher.projection_.shape != (d, hasher.n_bits):
        raise HasherError("serialised hasher is corrupt: array shapes do not match its header")
    return hasher


def available_methods() -> tuple[str, ...]:
    """Names accepted by :func:`make_hasher`, sorted."""
    return tuple(sorted(_REGISTRY))


def _hasher_class(method: str) -> type[Hasher]:
    try:
        return _REGISTRY[method]
    except KeyError:
        raise HasherError(
            f"unknown hashing method {method!r}; available: {', '.join(available_methods())}"
        ) from None


def make_hasher(method: str, **params: Any) -> Hasher:
    """Construct an unfitted hasher by name, validating its parameters now."""
    cls = _hasher_class(method)
    unknown = set(params) - set(cls._param_names())
    if unknown:
        raise HasherError(
            f"{method} hasher has no parameter(s) {', '.join(sorted(unknown))}; "
            f"it takes {', '.join(cls._param_names())}"
        )
    hasher = cls(**params)
    hasher._validate_params()
    return hasher


def min_samples(method: str, n_bits: int) -> int:
    """How many training vectors fitting ``method`` with ``n_bits`` needs at the least."""
    return _hasher_class(method).min_samples(validate_n_bits(n_bits))
