"""Indexes: fit a hasher on a feature space, store its parameters, encode and store codes;
labels for supervised methods; the policy that builds the default index automatically.

The fitted parameters live in ``hashers.params`` so every process encodes the same way; each
store keeps decoded hashers in its own context, keyed by the index's ``uid`` (parameters never
change in place: a refit is a new index with a new uid).
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, Row, delete, func, select, update

from .bandindex import append_deferred, mark_changed, write_codes, write_new_buckets
from .errors import ConfigError, NotEnoughDataError, NotFoundError
from .hashing import available_methods, make_hasher, min_samples
from .hashing.bits import band_layout, default_n_bands
from .models import Code, CodeBucket, Feature, FeatureSpace, HashIndex, Image, ImagePath
from .paths import is_storable_id
from .types import IndexInfo
from .vectors import iter_features, load_features

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext

log = logging.getLogger(__name__)

#: Encode this many stored vectors at a time when building an index (bounded memory).
ENCODE_BATCH = 20_000
#: Default number of vectors an index is fitted on (a random sample when the store is bigger):
#: PCA/ITQ statistics of 1280-d features are stable well before this.
DEFAULT_SAMPLE = 100_000
#: Methods that ignore labels, and those that learn from them.
UNSUPERVISED = ("lsh", "pca", "itq")
SUPERVISED = ("centres", "deep")
#: A store with no index gets one built automatically once a feature space has this many images.
AUTO_INDEX_MIN_IMAGES = 256
#: ... and rebuilt when the space has grown this many times past what the auto index was fitted on.
AUTO_INDEX_REFIT_GROWTH = 10


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
    progress: Callable[[str, int, int], None] | None = None,
) -> int:
    """Fit a hasher on the stored vectors of ``space_id``, store it and every image's code.

    Runs inside the caller's transaction, so a process killed midway leaves no half index.
    ``fallback``: with too few vectors for ``method``, build an LSH index instead of failing.
    ``labels``: image id -> label, for supervised methods. ``progress(phase, done, total)`` is
    called as the work goes (phases ``fit``, ``encode``, ``buckets``). Returns the new index's id.
    """
    report = progress or (lambda _phase, _done, _total: None)
    space = lock_space(conn, space_id, for_index=True)
    n_total = int(conn.scalar(select(func.count()).select_from(Feature).where(Feature.space_id == space_id)) or 0)
    method = _method_for(method, n_bits, n_total, space.extractor, fallback)
    if sample is not None and sample < max(n_bits, min_samples(method, n_bits)):
        raise ConfigError(f"a sample of {sample} images is too small to fit {n_bits}-bit codes; "
                          f"use --sample {max(n_bits, min_samples(method, n_bits))} or more")
    if n_bands is not None:
        band_layout(n_bits, n_bands)  # reject a layout that cannot work before spending time fitting
    report("fit", 0, n_total)
    hasher, n_fitted = _fit(conn, space_id, int(space.dim), method, n_bits, sample, random_state, labels)
    n_bands = default_n_bands(n_bits, max(n_total, 2)) if n_bands is None else n_bands
    band_width = band_layout(n_bits, n_bands)
    table = HashIndex.__table__
    hasher_id = int(conn.execute(
        table.insert().values(
            uid=uuid.uuid4().hex, space_id=space_id, method=method, n_bits=n_bits, n_bands=n_bands,
            band_width=band_width, params=hasher.to_bytes(), is_active=False, n_fitted=n_fitted, generation=0,
            config={"random_state": random_state, "sample": sample, "auto": auto, "supervised": labels is not None},
        ).returning(table.c.id)
    ).scalar_one())
    new_codes: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]] = []
    encoded = 0
    report("encode", 0, n_total)
    for batch_ids, vectors in iter_features(conn, space_id, int(space.dim), batch=ENCODE_BATCH):
        write_codes(conn, hasher_id, batch_ids, hasher.encode(vectors), n_bands, band_width, defer=new_codes, new_index=True)
        encoded += len(batch_ids)
        report("encode", encoded, n_total)
    report("buckets", n_total, n_total)
    write_new_buckets(conn, hasher_id, new_codes, n_bands, band_width)  # a new index: each bucket row once
    if activate:
        activate_index(conn, hasher_id)
    log.info("index %d: %s %d bits, %d bands of %d bits, %d images", hasher_id, method, n_bits, n_bands, band_width, n_total)
    return hasher_id


def lock_space(conn: Connection, space_id: int, *, for_index: bool) -> Row[Any]:
    """Lock the feature space's row until the transaction ends: exclusively to build an index of
    it (``for_index``), shared to write codes into its indexes. On PostgreSQL (READ COMMITTED)
    an index that read the space's vectors while a batch beside it listed the indexes before the
    index existed left that batch's images without a code; with the lock, each sees the other's
    work whole. SQLite's write transactions take the database's lock up front: nothing to add."""
    stmt = select(FeatureSpace).where(FeatureSpace.id == space_id)
    space = conn.execute(stmt.with_for_update(read=not for_index)).first()
    if space is None:
        raise NotFoundError(f"no feature space with id {space_id}")
    return space


def _method_for(method: str, n_bits: int, n_total: int, extractor: str, fallback: bool) -> str:
    """``method``, or ``lsh`` when there are too few vectors to fit it and ``fallback`` allows."""
    if method not in available_methods():
        raise ConfigError(f"unknown index method {method!r}; choose one of {', '.join(available_methods())}")
    needed = min_samples(method, n_bits)
    if n_total >= needed:
        return method
    if fallback and method != "lsh" and n_total >= min_samples("lsh", n_bits):
        log.warning("%d images are too few to fit %s with %d bits (needs %d); using lsh", n_total, method, n_bits, needed)
        return "lsh"
    raise NotEnoughDataError(
        f"fitting a {method} index with {n_bits} bits needs at least {needed} images with "
        f"{extractor} features; the store has {n_total}. Ingest more images, use fewer "
        "bits, or use --method lsh (which needs no training data)"
    )


def _fit(conn: Connection, space_id: int, dim: int, method: str, n_bits: int, sample: int | None, random_state: int,
         labels: dict[int, Any] | None) -> tuple[Any, int]:
    """A hasher fitted on (a random sample of) the space's vectors, and how many it saw."""
    hasher = make_hasher(method, n_bits=n_bits, random_state=random_state)
    if labels is not None and method in UNSUPERVISED:
        raise ConfigError(f"{method} does not learn from labels; use --method {' or '.join(SUPERVISED)} with --labels")
    if labels is None and getattr(hasher, "needs_labels", False):
        raise ConfigError(f"{method} learns from labels: add --labels folder or --labels tag:KEY")
    fit_ids = np.array(
        conn.scalars(select(Feature.image_id).where(Feature.space_id == space_id).order_by(Feature.image_id)).all(),
        dtype=np.int64,
    )
    if sample is not None and len(fit_ids) > sample:
        fit_ids = np.sort(np.random.default_rng(random_state).choice(fit_ids, size=sample, replace=False))
    ids, X = load_features(conn, space_id, dim, image_ids=fit_ids.tolist())
    if labels is None:
        return hasher.fit(X), len(ids)
    y = np.array([labels.get(int(i)) for i in ids], dtype=object)
    labelled = np.array([v is not None for v in y], dtype=bool)
    if labelled.sum() < 2:
        raise NotEnoughDataError(f"only {int(labelled.sum())} of {len(ids)} images have a label; check --labels")
    return hasher.fit(X[labelled], y[labelled].astype(str)), len(ids)


def encode_images(ctx: StoreContext, conn: Connection, space_id: int, image_ids: npt.ArrayLike, vectors: npt.NDArray[np.float32],
                  *, deferred: dict[int, tuple[IndexInfo, list[Any]]] | None = None) -> list[int]:
    """Store codes of new vectors in every index of their feature space (hashers from the
    store's cache, checked against each index's uid); returns the indexes written.

    Without ``deferred`` the codes enter their band buckets and the indexes' generation is
    bumped here. With it (an ingest batch), the new codes are collected there per index, for
    :func:`finish_encoding` at the very end of the transaction: the shared bucket rows and the
    index rows are then locked only for the transaction's last moments, in one fixed order, so
    concurrent writers neither queue behind each other for a whole batch nor deadlock."""
    if len(vectors) == 0:
        return []
    lock_space(conn, space_id, for_index=False)  # no index of the space is being built meanwhile
    indexes = [i for i in list_indexes(conn, with_counts=False) if i.space_id == space_id]
    for index in indexes:
        hasher = ctx.hasher(conn, index)
        target = None if deferred is None else deferred.setdefault(index.id, (index, []))[1]
        write_codes(conn, index.id, image_ids, hasher.encode(vectors), index.n_bands, index.band_width, defer=target)
    if deferred is None:
        mark_changed(conn, [i.id for i in indexes])
    return [i.id for i in indexes]


def finish_encoding(conn: Connection, deferred: dict[int, tuple[IndexInfo, list[Any]]]) -> None:
    """The bucket appends and generation bumps that :func:`encode_images` deferred, indexes in id
    order and bucket rows in (band, value) order."""
    for hasher_id in sorted(deferred):
        index, codes = deferred[hasher_id]
        append_deferred(conn, hasher_id, codes, index.n_bands, index.band_width)
    mark_changed(conn, sorted(deferred))


def activate_index(conn: Connection, hasher_id: int) -> None:
    """Make one index the one queries use (one active index per store)."""
    if not is_storable_id(hasher_id) or conn.scalar(select(HashIndex.id).where(HashIndex.id == hasher_id)) is None:
        raise NotFoundError(f"no index with id {hasher_id}; `imgstore index list` shows them")
    conn.execute(update(HashIndex).where(HashIndex.id != hasher_id, HashIndex.is_active.is_(True)).values(is_active=False))
    conn.execute(update(HashIndex).where(HashIndex.id == hasher_id).values(is_active=True))


def drop_index(conn: Connection, hasher_id: int) -> int | None:
    """Delete an index with its codes and buckets. When it was the active one, the newest
    remaining index of the same feature space becomes active; returns that id (None: queries
    now scan the float features, or the dropped index was not active)."""
    row = None
    if is_storable_id(hasher_id):
        row = conn.execute(select(HashIndex.space_id, HashIndex.is_active).where(HashIndex.id == hasher_id)).first()
    if row is None:
        raise NotFoundError(f"no index with id {hasher_id}; `imgstore index list` shows them")
    # codes and buckets first: SQLite only cascades when foreign keys are on, and we do not rely on that here
    conn.execute(delete(CodeBucket).where(CodeBucket.hasher_id == hasher_id))
    conn.execute(delete(Code).where(Code.hasher_id == hasher_id))
    conn.execute(delete(HashIndex).where(HashIndex.id == hasher_id))
    if not row.is_active:
        return None
    successor = conn.scalar(select(func.max(HashIndex.id)).where(HashIndex.space_id == row.space_id))
    if successor is not None:
        activate_index(conn, int(successor))
    return None if successor is None else int(successor)


def list_indexes(conn: Connection, *, with_counts: bool = True) -> list[IndexInfo]:
    """Every index, by id (without its parameters). ``with_counts=False`` skips counting codes
    (``n_codes`` is then -1), for callers that only need the layout."""
    counts = dict(conn.execute(select(Code.hasher_id, func.count()).group_by(Code.hasher_id)).all()) if with_counts else {}
    h = HashIndex
    rows = conn.execute(
        select(h.id, h.uid, h.method, h.n_bits, h.n_bands, h.band_width, h.space_id, h.is_active, h.n_fitted,
               h.generation, h.created_at, h.config, FeatureSpace.extractor)
        .join(FeatureSpace, FeatureSpace.id == h.space_id)
        .order_by(h.id)
    ).all()
    return [
        IndexInfo(
            id=r.id, uid=r.uid, method=r.method, n_bits=r.n_bits, n_bands=r.n_bands,
            band_width=r.band_width, extractor=r.extractor, space_id=r.space_id,
            is_active=bool(r.is_active), n_codes=int(counts.get(r.id, 0)) if with_counts else -1,
            n_fitted=r.n_fitted, generation=int(r.generation), created_at=r.created_at,
            config=dict(r.config or {}),
        )
        for r in rows
    ]


def find_index(indexes: list[IndexInfo], index_id: int | None) -> IndexInfo | None:
    """The index ``index_id`` (NotFoundError if there is none), or by default the active one."""
    if index_id is None:
        return next((i for i in indexes if i.is_active), None)
    for info in indexes:
        if info.id == index_id:
            return info
    raise NotFoundError(f"no index with id {index_id}; `imgstore index list` shows them")


def labels_from(conn: Connection, spec: str) -> dict[int, Any]:
    """Image id -> label from ``folder`` (the parent folder of a current path) or ``tag:KEY``."""
    out: dict[int, Any] = {}
    if spec == "folder":
        rows = conn.execute(
            select(ImagePath.image_id, ImagePath.path).where(ImagePath.is_current.is_(True)).order_by(ImagePath.id)
        )
        for image_id, path in rows:
            out.setdefault(int(image_id), os.path.basename(os.path.dirname(path)))
    elif spec.startswith("tag:") and len(spec) > 4:
        key = spec[4:]
        for image_id, meta in conn.execute(select(Image.id, Image.meta)):
            if isinstance(meta, dict) and key in meta:
                out[int(image_id)] = str(meta[key])
    else:
        raise ConfigError(f"unknown labels {spec!r}; use 'folder' or 'tag:KEY'")
    return out


def maybe_auto_index(ctx: StoreContext, space_id: int) -> int | None:
    """Build the default index once a space has enough images; rebuild an automatic one that
    was fitted on far fewer images than the space now holds. Returns the new index's id.

    Decided again in the write transaction, with the space locked: two ingests that finish
    together both find no index in their first look, and each built one."""
    with ctx.read("check the default index") as conn:
        if _auto_index_options(conn, space_id) is None:
            return None  # the usual case, decided without the write lock

    def work(conn: Connection) -> tuple[int, int | None] | None:
        lock_space(conn, space_id, for_index=True)
        options = _auto_index_options(conn, space_id)
        if options is None:
            return None  # another process built it meanwhile
        replaces = options.pop("replaces", None)
        made = create_index(conn, space_id, fallback=True, auto=True, **options)
        if replaces is not None:
            drop_index(conn, replaces)
        return made, replaces

    done = ctx.write(work, doing="build the default index")
    if done is None:
        return None
    made, replaces = done
    if replaces is not None:
        ctx.forget_index(replaces)
    ctx.forget_index(made)
    return made


def _auto_index_options(conn: Connection, space_id: int) -> dict[str, Any] | None:
    """The default index the policy wants now, as :func:`create_index` options plus the id of an
    automatic index it ``replaces`` (refitted); None when it wants nothing."""
    n = int(conn.scalar(select(func.count()).select_from(Feature).where(Feature.space_id == space_id)) or 0)
    if n < AUTO_INDEX_MIN_IMAGES:
        return None
    existing = [i for i in list_indexes(conn, with_counts=False) if i.space_id == space_id]
    if not existing:
        return {"method": "itq", "n_bits": 64}
    for old in existing:
        if old.config.get("auto") and n >= AUTO_INDEX_REFIT_GROWTH * max(old.n_fitted, 1):
            return {"method": old.method, "n_bits": old.n_bits, "activate": old.is_active, "replaces": old.id}
    return None


def build_index(ctx: StoreContext, space_id: int, doing: str, *, labels: str | None = None,
                replaces: int | None = None, **options: Any) -> int:
    """:func:`create_index` in one write transaction of ``ctx``, dropping ``replaces`` in the
    same one."""
    def work(conn: Connection) -> int:
        label_map = labels_from(conn, labels) if labels else None
        made = create_index(conn, space_id, labels=label_map, **options)
        if replaces is not None:
            drop_index(conn, replaces)
        return made

    index_id = ctx.write(work, doing=doing)
    if replaces is not None:
        ctx.forget_index(replaces)
    ctx.forget_index(index_id)
    return index_id
