"""Decode + preprocess in worker threads, overlapped with batched model inference.

Pillow's decoders and resizers and numpy release the GIL, so a few threads keep the model fed
while it runs on the calling thread. Memory stays bounded: at most ``prefetch`` items are
decoded or queued ahead of the model.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from ..decode import DecodedImage
from ..errors import DatabaseError, ImgStoreError
from .base import Extractor

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StreamResult(Generic[T]):
    """What became of one input item.

    Exactly one of three outcomes: ``features`` set (and ``decoded``); ``error`` set (``load`` or
    ``preprocess`` raised an ImgStoreError); or all three None: ``load`` returned None and the
    item was skipped on purpose (e.g. a duplicate), without model work.
    features: (dim,) float32 row.
    """

    item: T
    decoded: DecodedImage | None
    error: ImgStoreError | None
    features: npt.NDArray[np.float32] | None

    @property
    def skipped(self) -> bool:
        return self.error is None and self.features is None


@dataclass(frozen=True)
class _Prepared(Generic[T]):
    item: T
    decoded: DecodedImage | None
    error: ImgStoreError | None
    array: npt.NDArray[np.generic] | None


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def extract_stream(
    items: Iterable[T],
    load: Callable[[T], DecodedImage | None],
    extractor: Extractor,
    batch_size: int = 64,
    workers: int | None = None,
    prefetch: int | None = None,
) -> Iterator[list[StreamResult[T]]]:
    """Yield one list of results per model batch, every item exactly once, in input order.

    load: runs in a worker thread; returns the decoded image, None to skip the item, or raises
        ImgStoreError (e.g. DecodeError), which is recorded on that item and the stream goes on.
        Any other exception is a bug and is re-raised here.
    Each yielded list holds ``batch_size`` model inputs (fewer at the end) plus the skipped and
    failed items that came between them. ``prefetch`` (default 2 x batch_size) bounds how many
    items are loaded ahead of the model.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_workers = workers if workers is not None else default_workers()
    max_ahead = prefetch if prefetch is not None else 2 * batch_size
    max_ahead = max(max_ahead, batch_size)

    def prepare(item: T) -> _Prepared[T]:
        try:
            decoded = load(item)
            if decoded is None:
                return _Prepared(item, None, None, None)
            return _Prepared(item, decoded, None, extractor.preprocess(decoded.image))
        except DatabaseError:
            raise  # the database, not this file: never recorded as the file's error
        except ImgStoreError as exc:
            return _Prepared(item, None, exc, None)

    source = iter(items)
    pending: deque[Future[_Prepared[T]]] = deque()
    executor = ThreadPoolExecutor(max_workers=max(1, n_workers), thread_name_prefix="imgstore-decode")
    exhausted = False

    def refill() -> None:
        nonlocal exhausted
        while not exhausted and len(pending) < max_ahead:
            try:
                item = next(source)
            except StopIteration:
                exhausted = True
                return
            pending.append(executor.submit(prepare, item))

    try:
        group: list[_Prepared[T]] = []
        n_model = 0
        refill()
        while pending:
            prepared = pending.popleft().result()
            refill()  # keep max_ahead items loading while the model runs below
            group.append(prepared)
            if prepared.array is not None:
                n_model += 1
            if n_model >= batch_size:
                yield _run(extractor, group)
                group, n_model = [], 0
        if group:
            yield _run(extractor, group)
    finally:
        for fut in pending:
            fut.cancel()
        executor.shutdown(wait=True, cancel_futures=True)


def _run(extractor: Extractor, group: list[_Prepared[T]]) -> list[StreamResult[T]]:
    arrays = [p.array for p in group if p.array is not None]
    feats: npt.NDArray[np.float32] | None = None
    if arrays:
        feats = extractor.extract_arrays(np.stack(arrays))
        if feats.shape != (len(arrays), extractor.dim):
            raise RuntimeError(
                f"extractor {extractor.name} returned shape {feats.shape}, expected {(len(arrays), extractor.dim)}"
            )
    out: list[StreamResult[T]] = []
    row = 0
    for p in group:
        if p.array is not None and feats is not None:
            out.append(StreamResult(p.item, p.decoded, None, feats[row]))
            row += 1
        else:
            out.append(StreamResult(p.item, p.decoded, p.error, None))
    return out
