"""Indexes: fit a hasher on a feature space, store its parameters, encode and store codes.

The fitted parameters live in ``hashers.params`` so every process encodes the same way; a
process keeps decoded hashers in a small cache keyed by id (parameters never change in place:
a refit is a new index).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, delete, func, select, update

from .dbops import bump_generation, iter_features, load_features, write_codes, write_new_buckets
from .errors import ConfigError, NotEnoughDataError, NotFoundError
from .hashing import Hasher as HasherModel
from .hashing import available_methods, hasher_from_bytes, make_hasher, min_samples
from .hashing.bits import band_layout, default_n_bands
from .models import Code, CodeBucket, Feature, FeatureSpace, Hasher

log = logging.getLogger(__name__)

#: Encode this many stored vectors at a time when building an index (bounded memory).
ENCODE_BATCH = 20_000
#: Default number of vectors an index is fitted on (a random sample when the store is bigger):
#: PCA/ITQ statistics of 1280-d features are stable well before this.
DEFAULT_SAMPLE = 100_000
#: Methods that ignore labels, and those that learn from them.
UNSUPERVISED = ("lsh", "pca", "itq")
SUPERVISED = ("centres", "deep")


@dataclass(frozen=True)
class IndexInfo:
    id: int
    method: str
    n_bits: int
    n_bands: int
    band_width: int
    extractor: str
    space_id: int
    is_active: bool
    n_codes: int
    n_fitted: int
    generation: int
    created_at: datetime
    config: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_HASHERS: dict[int, HasherModel] = {}


def load_hasher(conn: Connection, hasher_id: int) -> HasherModel:
    """The fitted hasher of an index, decoded once per process."""
    cached = _HASHERS.get(hasher_id)
    if cached is None:
        blob = conn.scalar(select(Hasher.params).where(Hasher.id == hasher_id))
        if blob is None:
            raise NotFoundError(f"no index with id {hasher_id}; `imgstore index list` shows them")
        cached = _HASHERS[hasher_id] = hasher_from_bytes(blob)
    return cached


def forget_hasher(hasher_id: int) -> None:
    _HASHERS.pop(hasher_id, None)


def create_index(
    conn: Connection,
    space_id: int,
    *,
    method: str = "itq",
    n_bits: int = 64,
    n_bands: int | None = None,
    sample: int | None = DEFAULT_SAMPLE,
    random_state: int = 0,
    activate: bool = True,
    fallback: bool = False,
    labels: dict[int, Any] | None = None,
    auto: bool = False,
) -> int:
    """Fit a hasher on the stored vectors of ``space_id``, store it and every image's code.

    Runs inside the caller's transaction, so a process killed midway leaves no half index.
    ``fallback``: with too few vectors for ``method``, build an LSH index instead of failing.
    ``labels``: image id -> label, for supervised methods. Returns the new index id.
    """
    if method not in available_methods():
        raise ConfigError(f"unknown index method {method!r}; choose one of {', '.join(available_methods())}")
    space = conn.execute(select(FeatureSpace).where(FeatureSpace.id == space_id)).first()
    if space is None:
        raise NotFoundError(f"no feature space with id {space_id}")
    dim = int(space.dim)
    n_total = int(conn.scalar(select(func.count()).select_from(Feature).where(Feature.space_id == space_id)) or 0)
    needed = min_samples(method, n_bits)
    if n_total < needed:
        if fallback and method != "lsh" and n_total >= min_samples("lsh", n_bits):
            log.warning("%d images are too few to fit %s with %d bits (needs %d); using lsh", n_total, method, n_bits, needed)
            method = "lsh"
        else:
            raise NotEnoughDataError(
                f"fitting a {method} index with {n_bits} bits needs at least {needed} images with "
                f"{space.extractor} features; the store has {n_total}. Ingest more images, use fewer "
                "bits, or use --method lsh (which needs no training data)"
            )
    rng = np.random.default_rng(random_state)
    all_ids = np.array(
        conn.scalars(select(Feature.image_id).where(Feature.space_id == space_id).order_by(Feature.image_id)).all(),
        dtype=np.int64,
    )
    fit_ids = all_ids
    if sample is not None and len(all_ids) > sample:
        fit_ids = np.sort(rng.choice(all_ids, size=sample, replace=False))
    ids, X = load_features(conn, space_id, dim, image_ids=fit_ids.tolist())
    params: dict[str, Any] = {"n_bits": n_bits, "random_state": random_state}
    hasher = make_hasher(method, **params)
    if labels is not None and method in UNSUPERVISED:
        raise ConfigError(f"{method} does not learn from labels; use --method {' or '.join(SUPERVISED)} with --labels")
    if labels is None and getattr(hasher, "needs_labels", False):
        raise ConfigError(f"{method} learns from labels: add --labels folder or --labels tag:KEY")
    if labels is not None:
        y = np.array([labels.get(int(i)) for i in ids], dtype=object)
        labelled = np.array([v is not None for v in y], dtype=bool)
        if labelled.sum() < 2:
            raise NotEnoughDataError(
                f"only {int(labelled.sum())} of {len(ids)} images have a label; check --labels"
            )
        hasher.fit(X[labelled], y[labelled].astype(str))
    else:
        hasher.fit(X)
    if n_bands is None:
        n_bands = default_n_bands(n_bits, max(n_total, 2))
    band_width = band_layout(n_bits, n_bands)
    table = Hasher.__table__
    hasher_id = int(
        conn.execute(
            table.insert()
            .values(
                space_id=space_id,
                method=method,
                n_bits=n_bits,
                n_bands=n_bands,
                band_width=band_width,
                params=hasher.to_bytes(),
                config={"random_state": random_state, "sample": sample, "auto": auto,
                        "supervised": labels is not None},
                is_active=False,
                n_fitted=len(ids),
                generation=0,
            )
            .returning(table.c.id)
        ).scalar_one()
    )
    _HASHERS[hasher_id] = hasher
    new_codes: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]] = []
    for batch_ids, vectors in iter_features(conn, space_id, dim, batch=ENCODE_BATCH):
        write_codes(conn, hasher_id, batch_ids, hasher.encode(vectors), n_bands, band_width, defer=new_codes)
    write_new_buckets(conn, hasher_id, new_codes, n_bands, band_width)  # a new index: each bucket row once
    if activate:
        activate_index(conn, hasher_id)
    log.info("index %d: %s %d bits, %d bands of %d bits, %d images", hasher_id, method, n_bits, n_bands, band_width, n_total)
    return hasher_id


def encode_images(conn: Connection, space_id: int, image_ids: npt.ArrayLike, vectors: npt.NDArray[np.float32]) -> None:
    """Store codes of new vectors in every index of their feature space."""
    if len(vectors) == 0:
        return
    rows = conn.execute(
        select(Hasher.id, Hasher.n_bands, Hasher.band_width).where(Hasher.space_id == space_id)
    ).all()
    for hasher_id, n_bands, band_width in rows:
        hasher = load_hasher(conn, hasher_id)
        write_codes(conn, hasher_id, image_ids, hasher.encode(vectors), n_bands, band_width)
    bump_generation(conn, [r[0] for r in rows])


def activate_index(conn: Connection, hasher_id: int) -> None:
    """Make one index the one queries use (one active index per store)."""
    if conn.scalar(select(Hasher.id).where(Hasher.id == hasher_id)) is None:
        raise NotFoundError(f"no index with id {hasher_id}; `imgstore index list` shows them")
    conn.execute(update(Hasher).where(Hasher.id != hasher_id, Hasher.is_active.is_(True)).values(is_active=False))
    conn.execute(update(Hasher).where(Hasher.id == hasher_id).values(is_active=True))


def drop_index(conn: Connection, hasher_id: int) -> None:
    if conn.scalar(select(Hasher.id).where(Hasher.id == hasher_id)) is None:
        raise NotFoundError(f"no index with id {hasher_id}; `imgstore index list` shows them")
    # codes and buckets first: SQLite only cascades when foreign keys are on, and we do not rely on that here
    conn.execute(delete(CodeBucket).where(CodeBucket.hasher_id == hasher_id))
    conn.execute(delete(Code).where(Code.hasher_id == hasher_id))
    conn.execute(delete(Hasher).where(Hasher.id == hasher_id))
    forget_hasher(hasher_id)


def list_indexes(conn: Connection) -> list[IndexInfo]:
    counts = dict(
        conn.execute(select(Code.hasher_id, func.count()).group_by(Code.hasher_id)).all()
    )
    rows = conn.execute(
        select(Hasher.__table__, FeatureSpace.extractor)
        .join(FeatureSpace, FeatureSpace.id == Hasher.space_id)
        .order_by(Hasher.id)
    ).mappings().all()
    return [
        IndexInfo(
            id=r["id"], method=r["method"], n_bits=r["n_bits"], n_bands=r["n_bands"],
            band_width=r["band_width"], extractor=r["extractor"], space_id=r["space_id"],
            is_active=bool(r["is_active"]), n_codes=int(counts.get(r["id"], 0)),
            n_fitted=r["n_fitted"], generation=int(r["generation"]), created_at=r["created_at"],
            config=dict(r["config"] or {}),
        )
        for r in rows
    ]


