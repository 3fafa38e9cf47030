"""Property-based tests of the Python API (hypothesis): public ``ImageStore`` methods called with
generated arguments (ids as ints, digit strings and text, huge and negative numbers, None, NaN,
floats, booleans, bytes, lists and generators) give the documented result or one
``ImgStoreError`` with its message, never a ``TypeError`` or a driver's error, and a removal
never touches an image that was not named."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgstore import ImageStore
from imgstore.errors import ImgStoreError
from imgstore.types import SearchResult

from .helpers import photo, write_variants

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)

#: References a caller might pass where an image is expected, right or wrong.
refs = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=12),
    st.from_regex(r"[0-9]{1,25}", fullmatch=True),
    st.text(max_size=12),
    st.none(), st.booleans(), st.floats(allow_nan=True), st.binary(max_size=6),
    st.lists(st.integers(min_value=-3, max_value=12), max_size=3),
)
counts = st.one_of(st.integers(min_value=-(2**65), max_value=2**65), st.integers(min_value=-2, max_value=30),
                   st.text(max_size=4), st.floats(allow_nan=True), st.none(), st.booleans())


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageStore]:
    root = tmp_path_factory.mktemp("props")
    write_variants(photo("chelsea"), root / "cat", "cat", 3)
    write_variants(photo("rocket"), root / "rocket", "rocket", 3)
    with ImageStore(str(root / "props.db")) as s:
        s.ingest([root], extractor="color")
        s.create_index("lsh", 32, extractor="color")
        yield s


def _says_why(exc: ImgStoreError) -> None:
    """A library error a person can read: a message, on one line."""
    assert str(exc) and "\n" not in str(exc)


def _ids(store: ImageStore) -> list[int]:
    return sorted(row["id"] for row in store.export_rows())


def _named_ids(ref: Any, known: list[int]) -> set[int]:
    """The stored images a reference names by id (paths name none here: nothing lives at them)."""
    items = ref if isinstance(ref, list) else [ref]
    out = set()
    for item in items:
        if isinstance(item, bool):
            continue
        names_id = isinstance(item, int) or (isinstance(item, str) and item.isdigit() and not Path(item).exists())
        if names_id and int(item) in known:
            out.add(int(item))
    return out


@given(ref=refs)
@SETTINGS
def test_image_is_a_record_or_a_clear_error(store: ImageStore, ref: Any) -> None:
    try:
        record = store.image(ref)
    except ImgStoreError as exc:
        _says_why(exc)
        return
    assert record.id in _ids(store)


@given(ref=refs)
@SETTINGS
def test_remove_names_only_what_it_was_given(store: ImageStore, ref: Any) -> None:
    known = _ids(store)
    try:
        removal = store.remove(ref, dry_run=True)
    except ImgStoreError as exc:
        _says_why(exc)
    else:
        assert set(removal.images) <= _named_ids(ref, known), (ref, removal)
    assert _ids(store) == known  # a dry run changes nothing


@given(k=counts, probe_radius=counts, query=st.one_of(refs, st.just("vector")))
@SETTINGS
def test_search_answers_or_says_why(store: ImageStore, k: Any, probe_radius: Any, query: Any) -> None:
    if query == "vector":
        query = np.random.default_rng(0).standard_normal(464).astype(np.float32)
    try:
        hits = store.search(query, k=k, probe_radius=probe_radius)
    except ImgStoreError as exc:
        _says_why(exc)
        return
    assert isinstance(k, int) and 1 <= len(hits) <= k
    assert all(isinstance(h, SearchResult) for h in hits)


@given(limit=counts)
@SETTINGS
def test_errors_takes_a_count(store: ImageStore, limit: Any) -> None:
    try:
        listed = store.errors(limit)
    except ImgStoreError as exc:
        _says_why(exc)
        return
    assert isinstance(listed, list)


def test_removing_by_a_generator_and_by_digits() -> None:
    """The one-or-many rule, checked without a store: a generator is many, a str one."""
    from imgstore.paths import names_an_id

    assert names_an_id(12) and not names_an_id(True) and names_an_id("12") and not names_an_id("1x")


def test_a_missing_query_file_is_not_found(store: ImageStore, tmp_path: Path) -> None:
    from imgstore.errors import NotFoundError

    with pytest.raises(NotFoundError, match="no such file"):
        store.search(str(tmp_path / "nothing-here.jpg"))
    with pytest.raises(NotFoundError, match="no image with id"):
        store.search(2**64)  # beyond any stored id: not a driver's overflow
    with pytest.raises(NotFoundError, match="no image with id"):
        store.image(2**70)
