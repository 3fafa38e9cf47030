"""Search by words: a text's weights over the classifier's classes (:mod:`imgstore.text`) scored
against every image's features.

An image's score is the weighted sum of its log-probabilities of the text's classes,
``sum_c w_c log p_c``: with the log-sum-exp of its logits stored (``label_norms``) that is one dot
product with its features, ``f . (sum_c w_c W_c) + sum_c w_c b_c - logsumexp``, exact for every
image. Chosen by measurement (benchmarks/results/text.md, CIFAR-10 zero-shot): mean mAP@ALL
0.505 and accuracy 0.505, against 0.485 / 0.489 for the sum of probabilities and 0.309 / 0.297
for the probabilities of the few labels each image keeps. Reported as ``exp(score)`` (0..1).
A search reads every feature vector of the space once (a 40,000-photo library: 200 MB).

In a CLIP space (``clip:ARCH:DIGEST``) the words are embedded by CLIP's own text tower instead, and
an image scores the cosine of its features to them (:func:`search_embedding`); nothing is
"understood" there: no class names are involved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, select

from .catalog import existing_ids, path_rows, stale_among
from .filters import Allowed
from .labels import Head, ImageLabel, imagenet_classes, log_normalisers
from .models import Label, LabelNorm
from .types import SpaceInfo
from .vectors import iter_features

#: results looked at per round when some are dropped as stale (every file gone)
SLACK = 16


@dataclass(frozen=True)
class WordHit:
    """One image a word search found: its current paths, its score (what hits are ordered by;
    0..1: the weighted geometric mean of its probabilities of the text's classes; in a CLIP space
    the cosine, -1..1) and its labels among those classes, most probable first (the first is its
    best-matching label; none in a CLIP space). A label's probability is of that class alone:
    two hits' first labels need not be in the order of their scores."""

    image_id: int
    paths: list[str]
    score: float
    labels: list[ImageLabel]

    def as_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "score": round(self.score, 4), "paths": self.paths,
                "labels": [label.as_dict() for label in self.labels]}


@dataclass(frozen=True)
class WordSearch:
    """A word search's answer: the hits, best first, and what the text was understood as (the
    classes it weighed most, with their weights)."""

    text: str
    hits: list[WordHit]
    understood: list[ImageLabel]

    def as_dict(self) -> dict[str, Any]:
        return {"text": self.text, "understood": [{"label": u.label, "weight": round(u.prob, 3)} for u in self.understood],
                "results": [h.as_dict() for h in self.hits]}


def scores(conn: Connection, space: SpaceInfo, head: Head, weights: dict[int, float],
           allowed: Allowed | None = None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Every image of ``space`` (that ``allowed`` allows) with its score (the weighted log-probability), in id order."""
    weight, bias = head
    classes = np.array(sorted(weights), dtype=np.int64)
    w = np.array([weights[int(c)] for c in classes], dtype=np.float64)
    direction = (w @ weight[classes].astype(np.float64)).astype(np.float32)
    offset = float(w @ bias[classes].astype(np.float64))

    def score(ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        stored = dict(conn.execute(select(LabelNorm.image_id, LabelNorm.logsumexp).where(
            LabelNorm.space_id == space.id, LabelNorm.image_id >= int(ids[0]), LabelNorm.image_id <= int(ids[-1]))).all())
        lse = np.array([stored.get(int(i), np.nan) for i in ids], dtype=np.float64)
        missing = np.isnan(lse)
        if missing.any():  # stored before labels existed: computed here (`imgstore labels --update` stores them)
            lse[missing] = log_normalisers(vectors[missing], head)
        out: npt.NDArray[np.float64] = vectors @ direction + offset - lse
        return out

    return _score_features(conn, space, allowed, score)


def search(conn: Connection, space: SpaceInfo, head: Head, text: str, weights: dict[int, float], k: int, *,
           include_stale: bool = False, allowed: Allowed | None = None) -> WordSearch:
    """The ``k`` images of ``space`` that best match class ``weights``, best first (ties by id);
    only those ``allowed`` allows (a search filter), when given."""
    names = imagenet_classes()
    understood = [ImageLabel(names[c], w) for c, w in sorted(weights.items(), key=lambda kv: -kv[1])[:5]]
    ids, score = scores(conn, space, head, weights, allowed)
    kept = [(i, float(np.exp(s))) for i, s in _best(conn, ids, score, k, include_stale)]
    matched: dict[int, list[ImageLabel]] = {}
    for image_id, class_id, prob in conn.execute(
        select(Label.image_id, Label.class_id, Label.prob).where(
            Label.space_id == space.id, Label.image_id.in_([i for i, _ in kept]), Label.class_id.in_(sorted(weights)))
        .order_by(Label.image_id, Label.rank)
    ):
        matched.setdefault(int(image_id), []).append(ImageLabel(names[int(class_id)], float(prob)))
    return WordSearch(text, _hits(conn, kept, matched), understood)


def search_embedding(conn: Connection, space: SpaceInfo, query: npt.NDArray[np.float32], text: str, k: int, *,
                     include_stale: bool = False, allowed: Allowed | None = None) -> WordSearch:
    """The ``k`` images of ``space`` whose features have the highest cosine to ``query`` (the
    words' (dim,) embedding in that space, e.g. CLIP's text tower), best first (ties by id): an
    exact scan of every image ``allowed`` allows. Scores are the cosines (-1..1)."""
    direction = np.asarray(query, dtype=np.float64).reshape(-1)
    norm = float(np.linalg.norm(direction))
    if direction.shape != (space.dim,) or not norm:
        raise ValueError(f"a query embedding must be a non-zero ({space.dim},) vector, got shape {direction.shape}")
    direction /= norm

    def cosine(_ids: npt.NDArray[np.int64], vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        lengths = np.linalg.norm(vectors.astype(np.float64), axis=1)
        out: npt.NDArray[np.float64] = (vectors @ direction) / np.where(lengths > 0, lengths, 1.0)
        return out

    ids, score = _score_features(conn, space, allowed, cosine)
    if not len(ids):
        return WordSearch(text, [], [])
    return WordSearch(text, _hits(conn, _best(conn, ids, score, k, include_stale), {}), [])


def _score_features(conn: Connection, space: SpaceInfo, allowed: Allowed | None,
                    score: Callable[[npt.NDArray[np.int64], npt.NDArray[np.float32]], npt.NDArray[np.float64]]
                    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Every image of ``space`` that ``allowed`` allows (all when None) with ``score`` of its
    features, in id order: one pass over the stored vectors, a chunk at a time (``score`` gets
    a chunk's (n,) ids and (n, dim) vectors, never an empty one, and gives (n,) scores)."""
    all_ids: list[npt.NDArray[np.int64]] = []
    all_scores: list[npt.NDArray[np.float64]] = []
    for ids, vectors in iter_features(conn, space.id, space.dim):
        if allowed is not None:
            keep = allowed.contains(ids)
            ids, vectors = ids[keep], vectors[keep]
        if not len(ids):
            continue
        all_ids.append(ids)
        all_scores.append(score(ids, vectors))
    if not all_ids:
        return np.zeros(0, np.int64), np.zeros(0, np.float64)
    return np.concatenate(all_ids), np.concatenate(all_scores)


def _best(conn: Connection, ids: npt.NDArray[np.int64], score: npt.NDArray[np.float64], k: int,
          include_stale: bool) -> list[tuple[int, float]]:
    """The ``k`` best (id, score) by score, ties by id, leaving out stale images unless asked."""
    order = np.lexsort((ids, -score))
    kept: list[tuple[int, float]] = []
    start = 0
    while len(kept) < k and start < len(order):
        part = order[start:start + k + SLACK]
        start += len(part)
        part_ids = [int(i) for i in ids[part]]
        stale = set() if include_stale else stale_among(conn, part_ids)
        kept += [(i, float(s)) for i, s in zip(part_ids, score[part]) if i not in stale]
    return kept[:k]


def _hits(conn: Connection, kept: list[tuple[int, float]], matched: dict[int, list[ImageLabel]]) -> list[WordHit]:
    """The kept images with their current paths, leaving out any removed meanwhile."""
    paths = path_rows(conn, [i for i, _ in kept])
    pathless = [i for i, _ in kept if i not in paths]
    removed = set(pathless) - existing_ids(conn, pathless) if pathless else set()  # removed meanwhile
    return [WordHit(i, [p.path for p in paths.get(i, []) if p.is_current], s, matched.get(i, []))
            for i, s in kept if i not in removed]
