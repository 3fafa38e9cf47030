"""Browsing the collection (``ImageStore.browse``, ``GET /api/images``, the collection page,
``imgstore export`` with filters), on SQLite and PostgreSQL.

The synthetic store of the filter tests (metadata, tags, folders, stale files, capture times,
labels in two feature spaces, each known to the test), with added times that tie now and then:
every page of any filter, sort and order equals the same slice of the order computed here in
Python (missing values last in either direction, ties by id)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgstore import ImageStore, SearchFilter
from imgstore.browse import MAX_PER_PAGE, SORTS
from imgstore.errors import ConfigError
from imgstore.models import Image, ImagePath
from imgstore.serve import Thumbnails, create_app
from sqlalchemy import Connection, bindparam, delete, insert, update

from .test_filters import START, Synthetic, build, filters

HTML = {"Accept": "text/html"}


@pytest.fixture
def synthetic(db_url: str) -> Iterator[tuple[Synthetic, dict[int, datetime]]]:
    s = build(db_url)
    added = {int(i): START + timedelta(minutes=(int(i) * 37) % 500) for i in s.ids}  # ties: ids 500 apart

    def stamp(conn: Connection) -> None:
        conn.execute(update(Image).where(Image.id == bindparam("i")).values(ingested_at=bindparam("t")),
                     [{"i": i, "t": t} for i, t in added.items()])

    s.store.transaction(stamp)
    yield s, added
    s.store.close()


def expected(s: Synthetic, added: dict[int, datetime], f: SearchFilter | None, sort: str, order: str,
             include_stale: bool = False) -> list[int]:
    """The browse order by its documented meaning, in Python."""
    ids = s.allowed(f) if f else set(s.ids.tolist())
    if not include_stale:
        ids = {i for i in ids if any(cur for _, cur in s.paths[i])}
    key: dict[int, Any]
    if sort == "taken":
        key = {i: s.captured[i] for i in ids}
    elif sort == "added":
        key = {i: added[i] for i in ids}
    else:
        key = {i: min((p for p, cur in s.paths[i] if cur), default=None) for i in ids}
    desc = order == "desc"
    present = sorted((i for i in ids if key[i] is not None), key=lambda i: (key[i], i), reverse=desc)
    return present + sorted((i for i in ids if key[i] is None), reverse=desc)


def test_every_page_is_its_slice_of_the_order(synthetic: tuple[Synthetic, dict[int, datetime]]) -> None:
    """Random filters, sorts, orders and page sizes: the total, the first, a middle, the last
    and a past-the-last page equal their slices of the order computed in Python; each item
    carries its current files."""
    s, added = synthetic

    @given(f=st.none() | filters(), sort=st.sampled_from(SORTS), order=st.sampled_from(["asc", "desc"]),
           per_page=st.sampled_from([1, 7, 60, MAX_PER_PAGE]), include_stale=st.booleans(), at=st.floats(0, 1))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
              derandomize=bool(os.environ.get("CI")))
    def check(f: SearchFilter | None, sort: str, order: str, per_page: int, include_stale: bool, at: float) -> None:
        want = expected(s, added, f, sort, order, include_stale)
        first = s.store.browse(f, sort=sort, order=order, per_page=per_page, include_stale=include_stale)
        assert first.total == len(want) and first.pages == max(1, -(-len(want) // per_page))
        for page in sorted({1, 1 + int(at * (first.pages - 1)), first.pages, first.pages + 1}):
            got = s.store.browse(f, sort=sort, order=order, page=page, per_page=per_page, include_stale=include_stale)
            assert [item.image_id for item in got.items] == want[(page - 1) * per_page: page * per_page], (f, page)
            assert (got.page, got.per_page, got.sort, got.order, got.total) == (page, per_page, sort, order, len(want))
            for item in got.items:
                assert item.paths == sorted(p for p, cur in s.paths[item.image_id] if cur)
                assert item.captured_at == s.captured[item.image_id] and item.ingested_at == added[item.image_id]

    check()


def test_bad_arguments_say_what_to_give(synthetic: tuple[Synthetic, dict[int, datetime]]) -> None:
    s, _ = synthetic
    for kwargs, message in ((dict(sort="name"), "sort must be one of taken, added, folder, got 'name'"),
                            (dict(order="up"), "order must be asc or desc"),
                            (dict(page=0), "page must be a whole number from 1"),
                            (dict(page=True), "page must be a whole number"),
                            (dict(per_page=MAX_PER_PAGE + 1), "per_page must be a whole number from 1 to 500")):
        with pytest.raises(ConfigError) as caught:
            s.store.browse(**kwargs)  # type: ignore[arg-type]
        assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="did you mean 'golden retriever'"):
        s.store.browse(SearchFilter(labels="golden retreiver"))


def test_http_api_browses(synthetic: tuple[Synthetic, dict[int, datetime]], tmp_path: Path) -> None:
    s, added = synthetic
    web = TestClient(create_app(s.store, thumbnails=Thumbnails(s.store, tmp_path / "thumbs")))
    f = SearchFilter(tags="red", labels="Golden Retriever")
    want = expected(s, added, f, "folder", "asc")
    got = web.get("/api/images", params={"sort": "folder", "order": "asc", "per_page": 25, "page": 2, "tag": "red",
                                         "label": "Golden Retriever"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert [item["image_id"] for item in body["items"]] == want[25:50]
    assert body["total"] == len(want) and body["pages"] == -(-len(want) // 25) and body["page"] == 2
    assert set(body["items"][0]) == {"image_id", "paths", "width", "height", "captured_at", "ingested_at"}
    everything = web.get("/api/images").json()  # the defaults: newest taken first, 60 a page
    assert [i["image_id"] for i in everything["items"]] == expected(s, added, None, "taken", "desc")[:60]
    for params, message in (({"sort": "name"}, "sort"), ({"per_page": 501}, "per_page"), ({"page": 0}, "page"),
                            ({"label": "golden retreiver"}, "did you mean 'golden retriever'"),
                            ({"taken_after": "2024-13-01"}, "is not a date or time")):
        bad = web.get("/api/images", params=params)
        assert bad.status_code == 422, (params, bad.text)
        assert message in bad.json()["error"] and "\n" not in bad.json()["error"]
    spec = web.get("/openapi.json").json()["paths"]["/api/images"]["get"]
    assert {"sort", "order", "page", "per_page", "where", "tag", "label", "under", "taken_after", "taken_before"} <= {
        p["name"] for p in spec["parameters"]}
    assert spec["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/BrowsePage")


def _tiles(html: str) -> list[int]:
    grid = html.split('id="browse"', 1)[1].split("</div>", 1)[0]
    return [int(i) for i in re.findall(r'<figure class="card tile">\s*<a href="/images/(\d+)"', grid)]


def test_collection_page_browses(synthetic: tuple[Synthetic, dict[int, datetime]], tmp_path: Path) -> None:
    """Thumbnails in the chosen order, each linking to its image page; a pager that keeps the
    filter and the sort; the common labels as one-click filters (on, then off again)."""
    s, added = synthetic
    web = TestClient(create_app(s.store, thumbnails=Thumbnails(s.store, tmp_path / "thumbs")))
    page = web.get("/collection", params={"sort": "folder", "order": "asc", "per_page": 30, "tag": "red"}, headers=HTML)
    assert page.status_code == 200
    want = expected(s, added, SearchFilter(tags="red"), "folder", "asc")
    assert _tiles(page.text) == want[:30]
    assert f"{len(want):,} images meet the filter" in page.text and 'name="tag" value="red"' in page.text
    pager = page.text.split('id="pager"', 1)[1].split("</nav>", 1)[0]
    following = re.search(r'href="(/collection\?[^"]+)" rel="next"', pager)
    assert following is not None
    link = following.group(1).replace("&amp;", "&")
    assert "tag=red" in link and "sort=folder" in link and "order=asc" in link and "page=2" in link
    assert _tiles(web.get(link, headers=HTML).text) == want[30:60]
    # a page past the last (the collection shrank since the link was made): the last page
    last = web.get("/collection", params={"sort": "folder", "order": "asc", "per_page": 30, "tag": "red", "page": 999},
                   headers=HTML)
    assert _tiles(last.text) == want[30 * ((len(want) - 1) // 30):]
    # the common labels (here: the labelled feature space's, "cardigan"), a click away
    chips = re.findall(r'<a class="chip( on)?" href="([^"]+)"[^>]*>([^<]+)<span class="count">([\d,]+)</span>', page.text)
    assert [(on, name.strip()) for on, _, name, _ in chips] == [("", "cardigan")]
    filtered = web.get(chips[0][1].replace("&amp;", "&"), headers=HTML)
    want = expected(s, added, SearchFilter(tags="red", labels="cardigan"), "folder", "asc")
    assert _tiles(filtered.text) == want[:30] and 'class="chip on"' in filtered.text
    off = re.search(r'<a class="chip on" href="([^"]+)"', filtered.text)
    assert off is not None and "label=" not in off.group(1) and "tag=red" in off.group(1)
    # a filter that is wrong: the page says what to give, one line
    bad = web.get("/collection", params={"label": "golden retreiver"}, headers=HTML)
    assert bad.status_code == 422 and "did you mean" in bad.text and 'id="browse"' not in bad.text
    none = web.get("/collection", params={"label": "violin"}, headers=HTML)
    assert none.status_code == 200 and "No image meets the filter" in none.text


def test_cli_export_filters(synthetic: tuple[Synthetic, dict[int, datetime]], db_url: str, tmp_path: Path) -> None:
    s, _ = synthetic
    f = SearchFilter(tags="red", labels="tabby", under="/photos/f1")
    done = subprocess.run([sys.executable, "-m", "imgstore.cli", "--db", db_url, "export", "--json",
                           "--tag", "red", "--label", "Tabby", "--under", "/photos/f1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert [row["id"] for row in json.loads(done.stdout)] == sorted(s.allowed(f))
    never = tmp_path / "never.db"
    refused = subprocess.run([sys.executable, "-m", "imgstore.cli", "--db", str(never), "export", "--label", "retriever"],
                             capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stderr
    assert ("Invalid value for '--label': 'retriever' is not an ImageNet label; did you mean 'golden retriever'"
            in refused.stderr), refused.stderr
    assert not never.exists()  # refused before any database was opened


#: Path characters whose order a linguistic collation changes (it ignores spaces, dashes and
#: dots, folds case and accents): bytewise, a folder's files stay together, "/a b/x" before
#: "/a-b/x" before "/a/x" ("/" sorts after space, "-" and ".").
PATH_CHARS = st.sampled_from(["a", "b", "B", "-", " ", ".", "_", "é", "É", "~", "0"])
SEGMENT = st.text(PATH_CHARS, min_size=1, max_size=3)
FILES = st.lists(st.tuples(st.lists(SEGMENT, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts)),
                           st.booleans()), max_size=3)  # an image's files: (path, current)


def test_folder_order_is_bytewise_whatever_the_names(db_url: str) -> None:
    """Sorted by folder, images follow their bytewise smallest current path (folders together:
    every file under a folder before the next folder), ties by id; images without a current
    file last; the same on SQLite and PostgreSQL, whatever characters the names hold, and every
    page is its slice of that order."""
    with ImageStore(db_url) as store:

        @given(images=st.lists(FILES, min_size=1, max_size=14), per_page=st.sampled_from([1, 3, 500]))
        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                  derandomize=bool(os.environ.get("CI")))
        def check(images: list[list[tuple[str, bool]]], per_page: int) -> None:
            files = {i: dict(found) for i, found in enumerate(images, 1)}  # one row per (path, image)

            def fill(conn: Connection) -> None:
                conn.execute(delete(ImagePath))
                conn.execute(delete(Image))
                conn.execute(insert(Image), [{"id": i, "sha256": f"{i:064x}", "width": 1, "height": 1, "format": None,
                                              "byte_size": 1, "meta": {}} for i in files])
                rows = [{"path": p, "image_id": i, "file_size": 1, "mtime_ns": 1, "is_current": cur}
                        for i, found in files.items() for p, cur in found.items()]
                if rows:
                    conn.execute(insert(ImagePath), rows)

            store.transaction(fill)
            for include_stale in (False, True):
                shown = {i for i, found in files.items() if include_stale or not found or any(found.values())}
                first = {i: min((p.encode() for p, cur in files[i].items() if cur), default=None) for i in shown}
                for order in ("asc", "desc"):
                    desc = order == "desc"
                    want = sorted((i for i in shown if first[i] is not None), key=lambda i: (first[i], i), reverse=desc)
                    want += sorted((i for i in shown if first[i] is None), reverse=desc)
                    pages = -(-len(want) // per_page)
                    got = [item.image_id for page in range(1, pages + 1)
                           for item in store.browse(sort="folder", order=order, page=page, per_page=per_page,
                                                    include_stale=include_stale).items]
                    assert got == want, (order, include_stale, {i: sorted(files[i].items()) for i in want})

        check()
