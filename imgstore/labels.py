"""What is in each picture, in words: the extractor's own classifier applied to stored features.

EfficientNet-Lite is an ImageNet classifier: its 1,000-class head (one matrix product on the
1280-d features the store keeps anyway) names what it sees at no decoding or model cost. Each
image keeps its :data:`TOP` most probable classes (the first always, the others when at least
:data:`MIN_PROB`), per feature space, in the ``labels`` table; ingest writes them with the
features, and :func:`update_labels` computes them for images stored before (from their stored
features: no file is read). Extractors without a classifier (``color``, ``resnet50``) have none.

Pure numpy and SQL: the head's weights come from the extractor (``classifier_head()``).
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import ColumnElement, Connection, case, func, select

from .errors import ConfigError
from .models import Feature, FeatureSpace, Label, LabelNorm
from .sqlhelpers import insert_ignore

#: classes kept per image, most probable first
TOP = 5
#: a class after the first is kept only at this probability or more (the first always is)
MIN_PROB = 0.05
#: extractors whose classifier names ImageNet-1k's classes
IMAGENET_EXTRACTORS = ("efficientnet-lite0", "efficientnet-lite2", "efficientnet-lite0-int8")
#: images whose labels are computed per transaction by :func:`update_labels`
UPDATE_CHUNK = 2048

Head = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]


@functools.cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names, in the classifier's order ("tench", "goldfish", ...)."""
    text = (Path(__file__).parent / "data" / "imagenet_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.strip() for line in text.splitlines() if line.strip())
    assert len(names) == 1000, len(names)
    return names


@functools.cache
def _ids_by_name() -> dict[str, tuple[int, ...]]:
    """Class ids by name as a filter compares it (lower case; "cardigan" names two classes)."""
    out: dict[str, tuple[int, ...]] = {}
    for class_id, name in enumerate(imagenet_classes()):
        key = name.casefold()
        out[key] = (*out.get(key, ()), class_id)
    return out


def class_ids(name: str) -> tuple[int, ...]:
    """The classes a label name names (case-insensitive, white space collapsed), or a
    ConfigError that suggests the closest names (a misspelling, or a word of a name)."""
    key = " ".join(name.split()).casefold()
    found = _ids_by_name().get(key)
    if found is None:
        suggestions = closest_names(key)
        hint = ("did you mean " + ", ".join(repr(s) for s in suggestions) + "?" if suggestions
                else "`imgstore labels` lists those of this collection")
        raise ConfigError(f"label: {name!r} is not an ImageNet label; {hint}")
    return found


def closest_names(name: str, n: int = 4) -> list[str]:
    """ImageNet names a person may have meant by ``name``: names that hold it as words
    ("retriever" -> "golden retriever", ...; shortest first), then near spellings."""
    key = " ".join(name.split()).casefold()
    names = imagenet_classes()
    lowered = [c.casefold() for c in names]
    holding = sorted((c for c in lowered if key and f" {key} " in f" {c.replace('-', ' ')} "), key=len)
    near = difflib.get_close_matches(key, lowered, n=n, cutoff=0.6)
    picked = list(dict.fromkeys(holding + near))[:n]
    return [names[lowered.index(c)] for c in picked]


def has_labels(extractor_name: str) -> bool:
    return extractor_name in IMAGENET_EXTRACTORS


def head_of(extractor: Any) -> Head | None:
    """The classifier head (weight (classes, dim), bias) of an extractor that has one, else None."""
    if not has_labels(getattr(extractor, "name", "")):
        return None
    get: Callable[[], Head] | None = getattr(extractor, "classifier_head", None)
    return get() if get is not None else None


def probabilities(features: npt.ArrayLike, head: Head) -> npt.NDArray[np.float32]:
    """(n, dim) features -> (n, classes) softmax probabilities of the head's classes."""
    weight, bias = head
    logits = np.asarray(features, dtype=np.float32) @ weight.T + bias
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=1, keepdims=True)
    return logits


def log_normalisers(features: npt.ArrayLike, head: Head) -> npt.NDArray[np.float64]:
    """(n,) log-sum-exp of each image's logits: log p_c = logit_c - this."""
    weight, bias = head
    logits = (np.asarray(features, dtype=np.float32) @ weight.T + bias).astype(np.float64)
    top = logits.max(axis=1)
    out: npt.NDArray[np.float64] = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return out


def top_labels(features: npt.ArrayLike, head: Head, top: int = TOP,
               min_prob: float = MIN_PROB) -> list[list[tuple[int, float]]]:
    """Per image, its most probable (class, probability) pairs: the first always, up to ``top``
    of those at ``min_prob`` or more."""
    probs = probabilities(features, head)
    if probs.shape[0] == 0:
        return []
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top]
    out: list[list[tuple[int, float]]] = []
    for row, classes in zip(probs, order):
        kept = [(int(c), float(row[c])) for rank, c in enumerate(classes) if rank == 0 or row[c] >= min_prob]
        out.append(kept)
    return out


def write_labels(conn: Connection, space_id: int, image_ids: Sequence[int], features: npt.ArrayLike, head: Head) -> int:
    """Insert the labels of ``image_ids`` (rows of ``features``) in ``space_id``; rows already
    there are left (an image's features, and so its labels, never change within a space)."""
    rows = [
        {"image_id": int(image_id), "space_id": space_id, "rank": rank, "class_id": cls, "prob": prob}
        for image_id, labels in zip(image_ids, top_labels(features, head))
        for rank, (cls, prob) in enumerate(labels)
    ]
    if rows:
        insert_ignore(conn, Label.__table__, rows)
        insert_ignore(conn, LabelNorm.__table__, [
            {"image_id": int(image_id), "space_id": space_id, "logsumexp": float(lse)}
            for image_id, lse in zip(image_ids, log_normalisers(features, head))])
    return len(rows)


@dataclass(frozen=True)
class LabelCount:
    """How many images carry a label (among their kept classes), and how many as their first."""

    class_id: int
    name: str
    images: int
    first: int

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.name, "class_id": self.class_id, "images": self.images, "first": self.first}


@dataclass(frozen=True)
class ImageLabel:
    """One label of one image: the class's name and the classifier's probability."""

    label: str
    prob: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "prob": round(self.prob, 4)}


def labelled_spaces(conn: Connection) -> list[tuple[int, str]]:
    """(space id, extractor name) of every feature space whose extractor has a classifier."""
    rows = conn.execute(select(FeatureSpace.id, FeatureSpace.extractor).order_by(FeatureSpace.id)).all()
    return [(int(i), str(name)) for i, name in rows if has_labels(str(name))]


def _unlabelled(space_id: int) -> ColumnElement[bool]:
    """Features of ``space_id`` whose image has no labels there."""
    has = select(Label.image_id).where(Label.space_id == space_id, Label.image_id == Feature.image_id).exists()
    return (Feature.space_id == space_id) & ~has


def missing(conn: Connection, space_id: int) -> int:
    """Images with features in ``space_id`` and no labels there."""
    return int(conn.scalar(select(func.count()).select_from(Feature).where(_unlabelled(space_id))) or 0)


def missing_ids(conn: Connection, space_id: int, limit: int) -> list[int]:
    return [int(i) for i in conn.scalars(select(Feature.image_id).where(_unlabelled(space_id))
                                          .order_by(Feature.image_id).limit(limit))]


def counts(conn: Connection, space_id: int) -> list[LabelCount]:
    """Every label of ``space_id`` with how many images carry it, most common first."""
    names = imagenet_classes()
    first = func.sum(case((Label.rank == 0, 1), else_=0))
    rows = conn.execute(
        select(Label.class_id, func.count(), first).where(Label.space_id == space_id)
        .group_by(Label.class_id).order_by(func.count().desc(), Label.class_id)
    ).all()
    return [LabelCount(int(c), names[int(c)], int(n), int(f or 0)) for c, n, f in rows]


def image_labels(conn: Connection, image_id: int) -> dict[int, list[ImageLabel]]:
    """An image's labels per feature space, most probable first."""
    names = imagenet_classes()
    out: dict[int, list[ImageLabel]] = {}
    for space_id, class_id, prob in conn.execute(
        select(Label.space_id, Label.class_id, Label.prob).where(Label.image_id == image_id)
        .order_by(Label.space_id, Label.rank)
    ):
        out.setdefault(int(space_id), []).append(ImageLabel(names[int(class_id)], float(prob)))
    return out
