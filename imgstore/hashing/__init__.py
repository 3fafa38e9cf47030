"""Hashers (float features -> packed binary codes) and the bit helpers. Pure numpy.

Usage::

    from imgstore.hashing import make_hasher, hasher_from_bytes
    hasher = make_hasher("itq", n_bits=64).fit(db_features)
    codes = hasher.encode(features)          # (n, 8) uint8
    blob = hasher.to_bytes()                 # store it; hasher_from_bytes(blob) encodes the same
"""

from __future__ import annotations

from imgstore.hashing import deep as _deep  # noqa: F401 - registers "deep" (torch only inside fit)
from imgstore.hashing.base import (
    MAX_BITS,
    MIN_BITS,
    Hasher,
    available_methods,
    hasher_from_bytes,
    make_hasher,
    min_samples,
)
from imgstore.hashing.methods import ITQHasher, LSHHasher, PCAHasher

__all__ = [
    "MAX_BITS",
    "MIN_BITS",
    "Hasher",
    "ITQHasher",
    "LSHHasher",
    "PCAHasher",
    "available_methods",
    "hasher_from_bytes",
    "make_hasher",
    "min_samples",
]
