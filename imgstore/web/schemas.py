"""The HTTP contract: the shapes of request bodies and responses, declared to OpenAPI.

Responses are the typed results' ``as_dict()`` (the CLI's ``--json`` shapes). Where a result's
``as_dict()`` is its fields as they are (``IndexInfo``, ``ImageRecord``, ``IngestErrorRecord``,
``CacheState``), the dataclass itself is the response model: one declaration of the shape. Routes off the hot
path validate what they return against these models (``response_model``), so the spec cannot
drift from the answers unnoticed; the two search routes serialize their hits directly (speed)
and declare :class:`SearchHit` in the spec, and the tests check their answers against it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..labels import ImageLabel
from ..types import CacheState


class Model(BaseModel):
    """Fields added later reach clients too (an older model must not drop them)."""

    model_config = ConfigDict(extra="allow")


class ErrorOut(Model):
    error: str = Field(description="what went wrong, and what to do about it")


class SearchHit(Model):
    image_id: int
    distance: int | None = Field(description="Hamming distance of the codes; null for an exact float search (no index)")
    cosine: float | None = Field(description="cosine similarity of the float features, when they were used")
    paths: list[str] = Field(description="the image's current files")


class WordHitOut(Model):
    image_id: int
    score: float = Field(description="its match score, which orders the results (highest first): how well the image "
                                     "matches the words as a whole, 0..1 through labels (the weighted geometric mean of its "
                                     "probabilities of the classes the words were understood as); in a CLIP feature space "
                                     "the cosine of the image's and the words' embeddings, -1..1")
    paths: list[str] = Field(description="the image's current files")
    labels: list[ImageLabel] = Field(description="the image's labels among the classes the words were understood as, most "
                                                 "probable first (the first is its best-matching label); each probability "
                                                 "is of that class alone: the results are ordered by score, not by these")


class UnderstoodOut(Model):
    label: str = Field(description="an ImageNet class name")
    weight: float = Field(description="its share of the words' meaning, 0..1")


class WordSearchOut(Model):
    """A word search's answer (``GET /api/search?text=``): the hits, best first, and what the
    words were understood as (the classes weighed most)."""

    text: str = Field(description="the words, white space collapsed")
    understood: list[UnderstoodOut] = Field(description="the classes the words were understood as, weightiest first "
                                                        "(empty in a CLIP feature space: no class names are involved)")
    results: list[WordHitOut]


class FilterFields(BaseModel):
    """Which images a search may return (all conditions must hold; none: every image). The
    same conditions may be given as query parameters; both at once must agree."""

    tag: list[str] = Field(default_factory=list, description="only images with every one of these tags")
    label: list[str] = Field(default_factory=list, description="only images the classifier labelled with every one of "
                                                               "these ImageNet names (any case), e.g. golden retriever")
    under: str | None = Field(None, description="only images with a current file under this folder (as the server sees it)")
    taken_after: str | None = Field(None, description="only images taken (EXIF) at or after this date or ISO time, "
                                                      "e.g. 2024-06-01, 2024-06, 2024-06-01T14:30")
    taken_before: str | None = Field(None, description="only images taken (EXIF) before this date or ISO time")


class VectorQuery(FilterFields):
    """A feature vector to search from (as many values as the index's feature space has)."""

    vector: list[float] = Field(min_length=1)
    where: list[str] | dict[str, str | int | float | bool] = Field(
        default_factory=list, description='metadata conditions: "KEY=VALUE" strings, or an object of fields and values')


class UploadQuery(FilterFields):
    """An image file to search from (any format the server decodes: JPEG, PNG, WebP, ...)."""

    image: bytes = Field(json_schema_extra={"format": "binary"})
    where: list[str] = Field(default_factory=list, description="metadata conditions, KEY=VALUE (a field per condition)")


class IndexRequest(BaseModel):
    """Fit an index in the background."""

    model_config = ConfigDict(extra="forbid")
    method: str = "itq"
    n_bits: int = Field(64, ge=8, le=1024, multiple_of=8)
    extractor: str | None = None
    n_bands: int | None = Field(None, ge=1)
    activate: bool = True


class JobOut(Model):
    """A background job (``GET /api/jobs/{id}``): an index being fitted, or duplicate groups
    being found."""

    id: int
    kind: Literal["index", "duplicates"]
    title: str
    state: Literal["queued", "running", "done", "failed"]
    phase: str = Field(description="what the job is doing: for an index, e.g. fit or buckets; for duplicates, "
                                   "candidates, layout, checking or grouping")
    done: int
    total: int = Field(description="how much the phase has to do (0: not known yet); it may grow while the phase runs")
    fraction: float | None = Field(description="done / total, when the total is known")
    message: str = Field(description="the state in words, e.g. 'checking 120 of 480 candidate pairs'")
    result: Any = Field(None, description="an index job: the new index's id; a duplicates job: counts "
                                          "({groups, spare_files}), the groups themselves at result_url")
    result_url: str | None = Field(None, description="where to GET what the job made, once done")
    error: str | None = Field(None, description="why it failed (one line)")
    created_at: float
    finished_at: float | None = None


class InfoOut(Model):
    database: str
    revision: str | None
    images: int
    paths: int
    feature_spaces: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    cache: list[CacheState] = Field(description="what this server holds in memory per index")


class MemberOut(Model):
    image_id: int
    paths: list[str]
    width: int
    height: int
    distance: int | None
    cosine: float | None


class GroupOut(Model):
    kind: Literal["exact", "near"]
    keeper: int
    keeper_path: str | None
    members: list[MemberOut]
    key: str = Field(description="names the group in /api/duplicates/apply")


class ApplyRequest(BaseModel):
    """Which groups to resolve: ``{"KEY": "path to keep" or null}`` for some, or ``"all"``."""

    model_config = ConfigDict(extra="forbid")
    keep: Literal["original", "largest", "oldest", "newest", "smallest"] = "original"
    groups: dict[str, str | None] | Literal["all"] | None = None


class Move(Model):
    from_: str = Field(alias="from")
    to: str


class Failure(Model):
    path: str
    reason: str


class ApplyOut(Model):
    journal: str
    moved: list[Move]
    failed: list[Failure]
    resumed: int


class UndoRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    journal: str = Field(description="the journal's file name, as /api/duplicates/apply returned it")


class UndoOut(Model):
    journal: str
    restored: list[Move]
    failed: list[Failure]


class AddedOut(Model):
    image_id: int


class RemovalOut(Model):
    paths: list[str]
    images: list[int]
    dry_run: bool


#: The error answers every route may give (all ``{"error": ...}``).
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorOut, "description": text} for status, text in (
        (401, "a token is needed"), (403, "not allowed (read-only server, or from another site)"),
        (404, "no such image, index or job"), (422, "a bad argument"), (503, "the database is unavailable, or busy"),
    )
}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **ERRORS, 413: {"model": ErrorOut, "description": "upload too large"},
    415: {"model": ErrorOut, "description": "not an image this server can read"},
}
