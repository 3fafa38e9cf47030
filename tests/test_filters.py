"""Filters on every search, on SQLite and PostgreSQL, through SQL and through the in-memory codes.

A synthetic store (clustered vectors, an LSH index) whose images carry metadata (a field that is
sometimes a list, a number), tags, files in folders (some stale) and capture times, each known to
the test: the allowed set of any filter is computed here in Python, independently of the SQL.
Property-based (hypothesis): exact filtered search equals brute force over the allowed images;
approximate search returns min(k, allowed) results, every one allowed and at its true distance.
Then each filter kind on both paths, the re-rank, a store without an index, a filter that allows
nothing, malformed filters, freshness after writes (this process and another one), the CLI in a
real process, and the HTTP API and the search page."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgstore import ImageStore, SearchFilter, SearchOptions
from imgstore.bandindex import scan_codes
from imgstore.errors import ConfigError
from imgstore.filters import filter_sets
from imgstore.indexing import create_index, list_indexes
from imgstore.labels import class_ids
from imgstore.models import Image, ImagePath, Label
from imgstore.search import cosine_similarities
from imgstore.serve import Thumbnails, create_app
from imgstore.vectors import get_or_create_space
from sqlalchemy import Connection, bindparam, insert, update

from .helpers import brute_force, photo, populate, write_variants

N_IMAGES = 1200
DIM = 24
GROUPS = ("a", "b", "c")
COLOURS = ("red", "green", "blue")
START = datetime(2020, 1, 1, tzinfo=timezone.utc)
#: Labels of the synthetic images (ImageNet names; "cardigan" names two classes, a dog and a sweater)
LABELS = ("tabby", "golden retriever", "sports car", "pizza", "cardigan")


@dataclass
class Synthetic:
    """A store of synthetic images and what the test knows about each (by image id)."""

    store: ImageStore
    ids: np.ndarray
    codes: np.ndarray
    vectors: np.ndarray
    meta: dict[int, dict[str, Any]]
    paths: dict[int, list[tuple[str, bool]]]
    captured: dict[int, datetime | None]
    labels: dict[int, set[str]]

    def code_of(self, vector: np.ndarray) -> np.ndarray:
        with self.store.engine.connect() as conn:
            index = next(i for i in list_indexes(conn) if i.is_active)
            return self.store.ctx.hasher(conn, index).encode(vector.reshape(1, -1))[0]

    def allowed(self, f: SearchFilter) -> set[int]:
        """The images ``f`` allows, by the filter's documented meaning, in Python."""
        out = set()
        for image_id in self.ids.tolist():
            meta = self.meta[image_id]
            ok = all(_field_has(meta.get(key), value) for key, value in f.where)
            ok = ok and all(_field_has(meta.get("tags"), tag) for tag in f.tags)
            if f.under is not None:
                prefix = f.under.rstrip("/") + "/"
                ok = ok and any(cur and (p == f.under or p.startswith(prefix)) for p, cur in self.paths[image_id])
            ok = ok and all(name in self.labels[image_id] for name in f.labels)
            when = self.captured[image_id]
            if f.taken_after is not None:
                ok = ok and when is not None and when >= f.taken_after
            if f.taken_before is not None:
                ok = ok and when is not None and when < f.taken_before
            if ok:
                out.add(image_id)
        return out

    def truth(self, code: np.ndarray, allowed: set[int], k: int) -> list[tuple[int, int]]:
        keep = np.isin(self.ids, sorted(allowed))
        return brute_force(self.ids[keep], self.codes[keep], code, k) if keep.any() else []


def _field_has(value: Any, wanted: str) -> bool:
    def text(v: Any) -> str | None:
        if isinstance(v, str):
            return v
        if isinstance(v, (bool, int, float)):
            return json.dumps(v)
        return None
    if isinstance(value, list):
        return any(text(v) == wanted for v in value)
    return text(value) == wanted


def _attributes(image_id: int) -> tuple[dict[str, Any], list[tuple[str, bool]], datetime | None]:
    """Metadata, paths (path, current) and capture time of one synthetic image."""
    group: Any = GROUPS[image_id % 3]
    if image_id % 7 == 0:
        group = [group, "z"]  # a list field: a where condition matches any item
    meta: dict[str, Any] = {"group": group, "n": image_id % 5}
    tags = [c for bit, c in enumerate(COLOURS) if image_id >> bit & 1]
    if tags:
        meta["tags"] = tags
    if image_id % 13 == 0:
        meta["flag"] = True
    folder = f"/photos/f{image_id % 4}/s{image_id % 3}"
    paths = [(f"{folder}/img{image_id}.jpg", image_id % 17 != 0)]  # every 17th: stale (its file went)
    if image_id % 19 == 0:
        paths.append((f"/photos/f9/copy{image_id}.jpg", True))  # a second, current file elsewhere
    captured = None if image_id % 11 == 0 else START + timedelta(days=image_id, hours=image_id % 24)
    return meta, paths, captured


def _label_rows(image_id: int) -> list[tuple[int, int, int]]:
    """The labels of one synthetic image as (space: 0 the searched one, 1 another labelled
    one; rank; class id): a first label for all, a second for a third of them, and, for every
    eighth, the other "cardigan" class in another feature space (a label counts in any space)."""
    cardigans = class_ids("cardigan")
    first = class_ids(LABELS[image_id % 5])[0]
    rows = [(0, 0, first)]
    if image_id % 3 == 0:
        rows.append((0, 1, class_ids("golden retriever" if image_id % 5 != 1 else "tabby")[0]))
    if image_id % 8 == 0:
        rows.append((1, 0, cardigans[1]))
    return rows


def build(url: str, cache_codes: bool = False, index: bool = True) -> Synthetic:
    rng = np.random.default_rng(11)
    centres = rng.standard_normal((30, DIM))
    vectors = (centres[rng.integers(0, 30, N_IMAGES)] + 0.35 * rng.standard_normal((N_IMAGES, DIM))).astype(np.float32)
    store = ImageStore(url, cache_codes=cache_codes)
    meta, paths, captured, labels = {}, {}, {}, {}
    names = {c: name for name in LABELS for c in class_ids(name)}

    def fill(conn: Connection) -> int | None:
        space_id = populate(conn, vectors)
        spaces = (space_id, get_or_create_space(conn, "efficientnet-lite2", DIM, "v1"))
        ids = [int(i) for i in conn.scalars(Image.__table__.select().with_only_columns(Image.id).order_by(Image.id))]
        rows, path_rows, label_rows = [], [], []
        for image_id in ids:
            meta[image_id], paths[image_id], captured[image_id] = _attributes(image_id)
            rows.append({"i": image_id, "m": meta[image_id], "c": captured[image_id]})
            path_rows += [{"path": p, "image_id": image_id, "file_size": 1, "mtime_ns": 1, "is_current": cur}
                          for p, cur in paths[image_id]]
            found = _label_rows(image_id)
            labels[image_id] = {names[c] for _, _, c in found}
            label_rows += [{"image_id": image_id, "space_id": spaces[space], "rank": rank, "class_id": c, "prob": 0.5}
                           for space, rank, c in found]
        conn.execute(update(Image).where(Image.id == bindparam("i")).values(meta=bindparam("m"), captured_at=bindparam("c")),
                     rows)
        conn.execute(insert(ImagePath), path_rows)
        conn.execute(insert(Label), label_rows)
        return create_index(conn, space_id, method="lsh", n_bits=64, n_bands=4) if index else None

    index_id = store.transaction(fill)
    with store.engine.connect() as conn:
        if index_id is not None:
            found = next(i for i in list_indexes(conn) if i.id == index_id)
            ids, codes = scan_codes(conn, found)
        else:
            ids, codes = np.array(sorted(meta), dtype=np.int64), np.zeros((len(meta), 8), dtype=np.uint8)
    return Synthetic(store, ids, codes, vectors, meta, paths, captured, labels)


@pytest.fixture
def synthetic(db_url: str) -> Iterator[Synthetic]:
    s = build(db_url)
    yield s
    s.store.close()


WHERE = st.lists(st.sampled_from(["group=a", "group=z", "group=b", "n=3", "n=0", "flag=true"]), max_size=2)
TAGS = st.lists(st.sampled_from([*COLOURS, "purple"]), max_size=2)
UNDER = st.sampled_from([None, "/photos", "/photos/f1", "/photos/f2/s0", "/photos/f9", "/photos/f1/s2/img10.jpg", "/else"])
AFTER = st.sampled_from([None, "2020-06-01", "2021-01-01T12:00", "2022"])
BEFORE = st.sampled_from([None, "2021-06", "2022-06-30T08:00+02:00", "2023"])
#: any case and spacing; "violin" is no image's label
NAMES = st.lists(st.sampled_from(["tabby", "Golden Retriever", "golden  retriever", "sports car", "Cardigan", "pizza",
                                  "violin"]), max_size=2)


@st.composite
def filters(draw: st.DrawFn) -> SearchFilter:
    return SearchFilter(where=draw(WHERE), tags=draw(TAGS), under=draw(UNDER), taken_after=draw(AFTER),
                        taken_before=draw(BEFORE), labels=draw(NAMES))


def test_exact_filtered_search_equals_brute_force_over_the_allowed_images(synthetic: Synthetic) -> None:
    """Random filters, k and queries (a vector near a cluster, or a stored image by id): exact
    mode through SQL and through the in-memory codes equals brute force over the allowed
    images, ties by id; approximate mode returns min(k, allowed) results, all allowed, each at
    its true distance."""
    s = synthetic
    by_id = dict(zip(s.ids.tolist(), s.codes))

    @given(f=filters(), k=st.sampled_from([1, 3, 10, 40]), seed=st.integers(0, 2**31), by_stored_id=st.booleans())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=bool(os.environ.get("CI")))
    def check(f: SearchFilter, k: int, seed: int, by_stored_id: bool) -> None:
        rng = np.random.default_rng(seed)
        if by_stored_id:
            query: Any = int(s.ids[seed % len(s.ids)])
            code = by_id[query]
        else:
            query = (s.vectors[seed % len(s.vectors)] + 0.2 * rng.standard_normal(DIM)).astype(np.float32)
            code = s.code_of(query)
        allowed = s.allowed(f)
        want = s.truth(code, allowed, k)
        true_distance = dict(s.truth(code, allowed, len(allowed))) if allowed else {}
        for cached in (False, True):
            exact = s.store.search(query, k, exact=True, rerank=False, cached=cached, include_stale=True, filter=f)
            assert [(r.image_id, r.distance) for r in exact] == want, (f, cached)
            approx = s.store.search(query, k, rerank=False, cached=cached, include_stale=True, filter=f)
            assert len(approx) == min(k, len(allowed)), (f, cached)
            assert all(true_distance[r.image_id] == r.distance for r in approx)

    check()


@pytest.mark.parametrize("cached", [False, True], ids=["sql", "cache"])
@pytest.mark.parametrize("f", [
    SearchFilter(where="group=a"),
    SearchFilter(where={"group": "z"}),  # an item of a list field
    SearchFilter(where={"n": 3}),  # a number, given as one
    SearchFilter(where=["n=3", "group=b"]),  # several: all must hold
    SearchFilter(where="flag=true"),  # a boolean
    SearchFilter(tags="red"),
    SearchFilter(tags=["red", "blue"]),
    SearchFilter(under="/photos/f2"),
    SearchFilter(under="/photos/f9"),  # a second file elsewhere counts
    SearchFilter(taken_after="2021-03-01"),
    SearchFilter(taken_before="2020-07"),
    SearchFilter(taken_after="2020-05-01T06:00", taken_before="2020-08-01T00:00:00Z"),
    SearchFilter(where="group=c", tags="green", under="/photos/f3", taken_after="2020-03", taken_before="2023"),
    SearchFilter(labels="golden retriever"),  # a first or a second label
    SearchFilter(labels=["Tabby", "GOLDEN RETRIEVER"]),  # both: any case
    SearchFilter(labels="cardigan"),  # either class of the name, in either feature space
    SearchFilter(labels="pizza", tags="red", under="/photos/f1"),
], ids=lambda f: json.dumps(f.as_dict()))
def test_each_filter_kind_on_both_paths(synthetic: Synthetic, cached: bool, f: SearchFilter) -> None:
    """Approximate (the default: with the float re-rank) and exact searches keep only the
    allowed images, k of them whenever k exist; the re-rank orders them by cosine."""
    s = synthetic
    allowed = s.allowed(f)
    assert allowed, "every case allows some image"
    stale = {i for i, paths in s.paths.items() if not any(cur for _, cur in paths)}
    visible = allowed - stale
    for query in (s.vectors[5], int(s.ids[40])):
        for k in (5, 60):
            hits = s.store.search(query, k, cached=cached, filter=f)
            assert {h.image_id for h in hits} <= visible
            assert len(hits) == min(k, len(visible))
            cosines = [h.cosine for h in hits]
            assert cosines == sorted(cosines, reverse=True) and None not in cosines
            exact = s.store.search(query, k, exact=True, rerank=False, cached=cached, filter=f)
            assert {h.image_id for h in exact} <= visible and len(exact) == min(k, len(visible))
    # stale images come back with include_stale, as without a filter
    everything = s.store.search(s.vectors[5], len(allowed) + 5, exact=True, cached=cached, include_stale=True, filter=f)
    assert {h.image_id for h in everything} == allowed


def test_search_many_options_and_the_filter_keyword(synthetic: Synthetic) -> None:
    s = synthetic
    f = SearchFilter(tags="blue", under="/photos/f3")
    allowed = s.allowed(f)
    via_options = s.store.search_many([s.vectors[1], s.vectors[2]], options=SearchOptions(k=7, exact=True, filter=f))
    via_keyword = s.store.search_many([s.vectors[1], s.vectors[2]], 7, exact=True, filter=f)
    beside = s.store.search_many([s.vectors[1], s.vectors[2]], options=SearchOptions(k=7, exact=True), filter=f)
    assert via_options == via_keyword == beside
    assert all(len(r) == 7 and {h.image_id for h in r} <= allowed for r in via_options)


@pytest.mark.parametrize("cached", [False, True], ids=["sql", "cache"])
def test_a_filter_that_allows_nothing_finds_nothing(synthetic: Synthetic, cached: bool) -> None:
    s = synthetic
    for f in (SearchFilter(tags="purple"), SearchFilter(under="/nowhere"), SearchFilter(taken_after="2099"),
              SearchFilter(taken_after="2021", taken_before="2020"), SearchFilter(where="group=a", tags="none")):
        for exact in (False, True):
            assert s.store.search(s.vectors[0], 10, exact=exact, cached=cached, filter=f) == []
            assert s.store.search(int(s.ids[3]), 10, exact=exact, cached=cached, filter=f) == []
    # the query itself is still checked: an unknown id is an error, not "no results"
    with pytest.raises(Exception, match="no image with id"):
        s.store.search(10**9, 10, cached=cached, filter=SearchFilter(tags="purple"))


def test_without_an_index_the_float_scan_is_filtered(db_url: str) -> None:
    s = build(db_url, index=False)
    try:
        f = SearchFilter(where="group=b", taken_after="2021")
        allowed = sorted(s.allowed(f) - {i for i, p in s.paths.items() if not any(c for _, c in p)})
        query = s.vectors[7]
        rows = np.searchsorted(s.ids, allowed)
        sims = dict(zip(allowed, cosine_similarities(query, s.vectors[rows]).tolist()))  # the library's float32 arithmetic
        want = sorted(allowed, key=lambda i: (-sims[i], i))[:12]
        hits = s.store.search(query, 12, filter=f)
        assert [h.image_id for h in hits] == want and all(h.distance is None for h in hits)
        assert s.store.search(query, 12, filter=SearchFilter(tags="purple")) == []
    finally:
        s.store.close()


def test_malformed_filters_say_what_to_give() -> None:
    cases = [
        (dict(where="species"), "where: 'species' is not KEY=VALUE; give e.g. species=cat"),
        (dict(where=["=cat"]), "names no field"),
        (dict(where={"n": None}), "must be a string, a number or true/false"),
        (dict(where={"n": float("nan")}), "must be a string, a number or true/false"),
        (dict(tags=[""]), "tag: '' is not a tag"),
        (dict(tags=["a\x00b"]), "cannot hold a NUL character"),
        (dict(under="  "), "under: give a folder"),
        (dict(taken_after="2024-13-01"), "taken_after: '2024-13-01' is not a date or time; give e.g. 2024-06-01"),
        (dict(taken_before="yesterday"), "taken_before: 'yesterday' is not a date or time"),
        (dict(taken_before="0001-01-01T00:00+05:00"), "out of range"),
        (dict(taken_after=20240101), "is not a date or time"),
        (dict(labels=["  "]), "label: '  ' is not a label; give an ImageNet name"),
        (dict(labels=[3]), "label: 3 is not a label"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=None) as caught:
            SearchFilter(**kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value), (kwargs, caught.value)
    # one string is one condition, one tag: never its characters
    assert SearchFilter(where="a=b").where == (("a", "b"),)
    assert SearchFilter(tags="cat").tags == ("cat",)
    # equal filters are equal values (a cache key): order, repeats and spelling of the same instant
    assert SearchFilter(where=["b=1", "a=x"], tags=["t", "t"], taken_after="2024-06-01") == SearchFilter(
        where={"a": "x", "b": 1}, tags="t", taken_after="2024-06-01T02:00+02:00")
    assert not SearchFilter() and SearchFilter(tags="x") and SearchFilter(labels="tabby")
    assert SearchFilter(labels="Golden  Retriever").labels == ("golden retriever",)  # one name, not its letters
    assert SearchFilter(labels=["tabby", "Tabby"]) == SearchFilter(labels="tabby")


@pytest.mark.parametrize("cached", [False, True], ids=["sql", "cache"])
def test_a_label_that_is_no_imagenet_name_suggests_the_closest(synthetic: Synthetic, cached: bool) -> None:
    for name, suggested in (("golden retreiver", "'golden retriever'"), ("retriever", "'golden retriever'"),
                            ("tabby cat", "'tabby'")):
        with pytest.raises(ConfigError) as caught:
            synthetic.store.search(synthetic.vectors[0], 5, cached=cached, filter=SearchFilter(labels=name))
        message = str(caught.value)
        assert message.startswith(f"label: {name!r} is not an ImageNet label; did you mean") and suggested in message
        assert "\n" not in message
    with pytest.raises(ConfigError, match="imgstore labels"):  # nothing close: where to look instead
        synthetic.store.search(synthetic.vectors[0], 5, cached=cached, filter=SearchFilter(labels="qqqqxz"))


def test_a_filter_of_the_wrong_type_is_refused(synthetic: Synthetic) -> None:
    with pytest.raises(ConfigError, match=r"filter must be an imgstore\.types\.SearchFilter"):
        synthetic.store.search(synthetic.vectors[0], options=SearchOptions(filter={"tags": "red"}))  # type: ignore[arg-type]


def test_allowed_sets_are_kept_while_the_store_is_unchanged_and_follow_writes(db_url: str) -> None:
    """The in-memory path keeps a filter's allowed set (and row mask) between searches while
    nothing is committed; a write in this process or in another one (another store object, its
    own connections) shows in the next search, on both paths."""
    s = build(db_url, cache_codes=True)
    other = ImageStore(db_url)
    try:
        f = SearchFilter(tags="purple")
        target = int(s.ids[100])
        assert s.store.search(target, 5, filter=f) == []
        sets = filter_sets(s.store.ctx)
        reuses, looks = sets.reuses, sets.reuses + sets.reads
        s.store.search(target, 5, filter=f)
        s.store.search(target, 5, filter=f, exact=True)
        assert sets.reuses + sets.reads == looks + 2
        if s.store.url.get_backend_name() == "sqlite":  # PostgreSQL's check sees the whole server's commits
            assert sets.reuses == reuses + 2  # nothing changed: the set was served again
        s.store.set_meta(target, {"tags": ["purple"]})  # this process
        for cached in (True, False):
            hits = s.store.search(target, 5, filter=f, cached=cached)
            assert [h.image_id for h in hits] == [target]
        second = int(s.ids[200])
        other.set_meta(second, {"tags": ["purple"]})  # another store object: its own engine
        for cached in (True, False):
            hits = s.store.search(second, 5, filter=f, cached=cached, exact=True)
            assert [h.image_id for h in hits] == [second, target]
        other.set_meta(target, {"tags": None})
        assert [h.image_id for h in s.store.search(target, 5, filter=f)] == [second]
    finally:
        other.close()
        s.store.close()


def test_with_a_refresher_searches_use_the_kept_sets_and_it_follows_writes(db_url: str) -> None:
    """What a server runs: the refresher checks the database and reads the sets searched with
    again after a write; searches use the kept set without a check of their own."""
    s = build(db_url, cache_codes=True)
    try:
        s.store.start_refresher(interval_s=0.05)
        sets = filter_sets(s.store.ctx)
        assert sets.background
        f = SearchFilter(tags="purple")
        target = int(s.ids[100])
        assert s.store.search(target, 5, filter=f) == []
        s.store.set_meta(target, {"tags": ["purple"]})
        deadline = time.monotonic() + 120  # turns a hang into a failure; no speed is asserted
        while s.store.search(target, 5, filter=f) == []:
            assert time.monotonic() < deadline, "the refresher never read the set again"
            time.sleep(0.02)
        assert [h.image_id for h in s.store.search(target, 5, filter=f)] == [target]
        s.store.stop_refresher()
        assert not sets.background
        s.store.set_meta(target, {"tags": None})  # without the refresher: the search checks itself
        assert s.store.search(target, 5, filter=f) == []
    finally:
        s.store.close()


# --- CLI (a real process) and HTTP ---------------------------------------------------------------


@pytest.fixture
def photos(db_url: str, tmp_path: Path) -> Iterator[tuple[ImageStore, Path]]:
    """Real photos in folders, ingested with the colour extractor, with tags and metadata."""
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root / "cat", "cat", 4)
    write_variants(photo("rocket"), root / "rocket", "rocket", 4)
    write_variants(photo("coffee"), root / "coffee", "coffee", 3)
    store = ImageStore(db_url, cache_codes=True)
    store.ingest([root], extractor="color")
    store.create_index("lsh", 32, extractor="color")
    for path in sorted((root / "cat").iterdir())[:2] + sorted((root / "rocket").iterdir())[:1]:
        store.set_meta(str(path), {"tags": ["fav"], "who": "me"})
    first = sorted((root / "coffee").iterdir())[0]
    store.set_meta(str(first), {"rating": 5})
    yield store, root
    store.close()


def _ids_of(store: ImageStore, paths: list[Path]) -> set[int]:
    return {store.image(str(p)).id for p in paths}


def _cli(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgstore.cli", "--db", db_url, *args], capture_output=True, text=True,
                          timeout=600)


def test_cli_query_filters(photos: tuple[ImageStore, Path], db_url: str) -> None:
    store, root = photos
    cats = sorted((root / "cat").iterdir())
    favourites = _ids_of(store, cats[:2] + sorted((root / "rocket").iterdir())[:1])
    done = _cli(db_url, "query", str(cats[0]), "-k", "10", "--tag", "fav", "--where", "who=me", "--json")
    assert done.returncode == 0, done.stderr
    (answer,) = json.loads(done.stdout)
    assert {r["image_id"] for r in answer["results"]} == favourites
    done = _cli(db_url, "query", str(store.image(str(cats[1])).id), "--under", str(root / "rocket"), "--exact", "--json")
    assert done.returncode == 0, done.stderr
    assert {r["image_id"] for r in json.loads(done.stdout)[0]["results"]} == _ids_of(store, sorted((root / "rocket").iterdir()))
    done = _cli(db_url, "query", str(cats[0]), "--where", "rating=5", "--under", str(root / "coffee"))
    assert done.returncode == 0 and "coffee" in done.stdout and "cat_" not in done.stdout.split("\n", 2)[2], done.stdout
    # nothing captured (no EXIF in these files): a date filter allows nothing, and says nothing went wrong
    done = _cli(db_url, "query", str(cats[0]), "--taken-after", "2020-01-01", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["results"] == [], done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (("--where", "whome"), "Invalid value for '--where': 'whome' is not KEY=VALUE; give e.g. species=cat"),
    (("--taken-after", "2024-13-01"), "Invalid value for '--taken-after': '2024-13-01' is not a date or time; give e.g."),
    (("--taken-before", "soon"), "Invalid value for '--taken-before': 'soon' is not a date or time"),
    (("--tag", ""), "Invalid value for '--tag': '' is not a tag"),
    (("--label", "golden retreiver"),
     "Invalid value for '--label': 'golden retreiver' is not an ImageNet label; did you mean 'golden retriever'"),
    (("--label", " "), "Invalid value for '--label': ' ' is not a label; give an ImageNet name"),
])
def test_cli_filter_errors_are_usage_errors(sqlite_url: str, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    done = _cli(sqlite_url, "query", "1", *args)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not Path(sqlite_url).exists()  # refused before any database was opened


def test_http_search_filters(photos: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, root = photos
    cats = sorted((root / "cat").iterdir())
    favourites = _ids_of(store, cats[:2] + sorted((root / "rocket").iterdir())[:1])
    rockets = _ids_of(store, sorted((root / "rocket").iterdir()))
    cat_id = store.image(str(cats[0])).id
    web = TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs")))
    # by id: query parameters, repeated where/tag
    got = web.get("/api/search", params=[("id", cat_id), ("k", 10), ("tag", "fav"), ("where", "who=me")])
    assert got.status_code == 200 and {h["image_id"] for h in got.json()} == favourites
    got = web.get("/api/search", params={"id": cat_id, "k": 10, "under": str(root / "rocket"), "exact": "true"})
    assert {h["image_id"] for h in got.json()} == rockets
    assert web.get("/api/search", params={"id": cat_id, "tag": "nothing-has-this"}).json() == []
    # an upload: the filter as form fields beside the image, or in the query string
    data = cats[0].read_bytes()
    got = web.post("/api/search", params={"k": 10}, files={"image": ("q.jpg", data, "image/jpeg")},
                   data={"tag": "fav", "under": str(root / "rocket")})
    assert got.status_code == 200, got.text
    assert {h["image_id"] for h in got.json()} == favourites & rockets
    got = web.post("/api/search", params={"k": 10, "tag": "fav"}, files={"image": ("q.jpg", data, "image/jpeg")})
    assert {h["image_id"] for h in got.json()} == favourites
    # a vector: the filter as keys of the JSON body (where as strings or as an object)
    vector = store.extractor("color").extract([photo("chelsea")])[0].tolist()
    for where in (["who=me"], {"who": "me"}):
        got = web.post("/api/search", params={"k": 10}, json={"vector": vector, "where": where, "tag": ["fav"]})
        assert got.status_code == 200, got.text
        assert {h["image_id"] for h in got.json()} == favourites
    # malformed: 422, one line naming the fix
    for bad in (web.get("/api/search", params={"id": cat_id, "where": "whome"}),
                web.get("/api/search", params={"id": cat_id, "taken_after": "2024-13-01"}),
                web.get("/api/search", params=[("id", cat_id), ("under", "/a"), ("under", "/b")]),
                web.post("/api/search", json={"vector": vector, "where": "who=me"}),
                web.post("/api/search", json={"vector": vector, "taken_before": "nope"}),
                web.post("/api/search", params={"under": "/a"}, json={"vector": vector, "under": "/b"})):
        assert bad.status_code == 422, bad.text
        error = bad.json()["error"]
        assert "\n" not in error and ("give" in error or "send" in error), error
    # labels: colour histograms have none, so a label allows nothing; a name that is none: 422 naming the closest
    assert web.get("/api/search", params={"id": cat_id, "label": "Tabby"}).json() == []
    got = web.post("/api/search", params={"k": 10}, json={"vector": vector, "label": ["tabby"]})
    assert got.status_code == 200 and got.json() == []
    for bad in (web.get("/api/search", params={"id": cat_id, "label": "golden retreiver"}),
                web.post("/api/search", json={"vector": vector, "label": ["golden retreiver"]}),
                web.post("/api/search", json={"vector": vector, "label": "tabby"})):
        assert bad.status_code == 422, bad.text
        assert bad.json()["error"].count("\n") == 0 and ("did you mean 'golden retriever'" in bad.json()["error"]
                                                          or "send a list of label names" in bad.json()["error"])
    # declared in the spec, for both methods
    spec = web.get("/openapi.json").json()
    for method in ("get", "post"):
        names = {p["name"] for p in spec["paths"]["/api/search"][method]["parameters"]}
        assert {"where", "tag", "label", "under", "taken_after", "taken_before"} <= names
    body = spec["paths"]["/api/search"]["post"]["requestBody"]["content"]
    assert {"where", "tag", "label", "under"} <= set(body["multipart/form-data"]["schema"]["properties"])
    assert {"where", "tag", "label", "taken_after"} <= set(body["application/json"]["schema"]["properties"])


def test_search_page_filters(photos: tuple[ImageStore, Path], tmp_path: Path) -> None:
    store, root = photos
    cats = sorted((root / "cat").iterdir())
    favourites = _ids_of(store, cats[:2] + sorted((root / "rocket").iterdir())[:1])
    cat_id = store.image(str(cats[0])).id
    web = TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs")))
    html = {"Accept": "text/html"}
    page = web.get("/", params={"id": cat_id, "k": 10, "tag": "fav"}, headers=html)
    assert page.status_code == 200
    grid = page.text.split('id="results"', 1)[1]
    shown = {int(i) for i in re.findall(r'href="/images/(\d+)"', grid)}
    assert shown == favourites
    assert "&amp;tag=fav" in grid  # a result's link searches with the same filter
    assert 'name="tag" value="fav"' in page.text and "filtered" in page.text
    assert 'name="label" value=""' in page.text  # the label input, empty
    # the form sent again without a new file: the same image's search, with the new settings
    again = web.post("/", data={"id": str(cat_id), "k": "10", "tag": "fav", "where": "", "under": str(root / "cat"),
                                "taken_after": "", "taken_before": ""}, headers=html, follow_redirects=False)
    assert again.status_code == 303 and "tag=fav" in again.headers["location"] and "under=" in again.headers["location"]
    page = web.get(again.headers["location"], headers=html)
    grid = page.text.split('id="results"', 1)[1]
    assert {int(i) for i in re.findall(r'href="/images/(\d+)"', grid)} == favourites - _ids_of(
        store, sorted((root / "rocket").iterdir()))
    # an upload with filter fields
    page = web.post("/", files={"image": ("q.jpg", cats[0].read_bytes(), "image/jpeg")},
                    data={"k": "10", "tag": "fav, nothing-has-this"}, headers=html)
    assert page.status_code == 200 and "No image meets the filter" in page.text
    bad = web.get("/", params={"id": cat_id, "taken_after": "2024-13-01"}, headers=html)
    assert bad.status_code == 422 and "is not a date or time" in bad.text
