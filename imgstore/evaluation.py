"""Retrieval quality measures (pure numpy): mAP over the whole ranked database and precision@k.

Used by the benchmarks and ``imgstore eval``. Relevance is "same label".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class RetrievalScores:
    map_all: float
    precision_at_10: float
    n_queries: int

    def as_dict(self) -> dict[str, float | int]:
        return {"mAP@ALL": self.map_all, "P@10": self.precision_at_10, "n_queries": self.n_queries}


def rank_by_distance(distances: npt.NDArray[np.generic]) -> npt.NDArray[np.intp]:
    """Rank each row of ``distances`` (n_queries, n_db), smallest first.

    Ties keep database order (a stable sort), so Hamming rankings, which tie a lot, are
    scored the same way on every run and against every method.
    """
    return np.argsort(distances, axis=1, kind="stable")


def average_precision_from_ranking(
    ranking: npt.NDArray[np.intp],
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    k: int = 10,
) -> RetrievalScores:
    """mAP over the full ranking and precision@k.

    ranking: (n_queries, n_db) database indices, best first.
    """
    q = np.asarray(query_labels)
    d = np.asarray(db_labels)
    relevant = d[ranking] == q[:, None]  # (n_queries, n_db) bool
    n_rel = relevant.sum(axis=1)
    hits = np.cumsum(relevant, axis=1, dtype=np.float64)
    positions = np.arange(1, ranking.shape[1] + 1, dtype=np.float64)
    precision_at_hit = np.where(relevant, hits / positions, 0.0).sum(axis=1)
    ap = np.divide(precision_at_hit, n_rel, out=np.zeros_like(precision_at_hit), where=n_rel > 0)
    p_at_k = relevant[:, :k].mean(axis=1)
    return RetrievalScores(float(ap.mean()), float(p_at_k.mean()), len(q))


def evaluate_distances(
    distances: npt.NDArray[np.generic],
    query_labels: npt.ArrayLike,
    db_labels: npt.ArrayLike,
    k: int = 10,
    batch: int = 250,
) -> RetrievalScores:
    """mAP@ALL and P@k of a (n_queries, n_db) distance matrix (smaller is closer), in batches."""
    q = np.asarray(query_labels)
    total_ap = 0.0
    total_p = 0.0
    for start in range(0, len(q), batch):
        part = distances[start : start + batch]
        s = average_precision_from_ranking(rank_by_distance(part), q[start : start + batch], db_labels, k)
        total_ap += s.map_all * s.n_queries
        total_p += s.precision_at_10 * s.n_queries
    return RetrievalScores(total_ap / len(q), total_p / len(q), len(q))


def cosine_distances(queries: npt.NDArray[np.floating], database: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """1 - cosine similarity, (n_queries, n_db) float32."""
    qn: npt.NDArray[np.floating] = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    dn: npt.NDArray[np.floating] = database / np.maximum(np.linalg.norm(database, axis=1, keepdims=True), 1e-12)
    return (1.0 - qn.astype(np.float32) @ dn.astype(np.float32).T).astype(np.float32)
