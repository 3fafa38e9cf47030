"""The web pages through the ASGI app, on SQLite and PostgreSQL: search by upload and by id,
an image's page and its original file (only the stored bytes, ever), duplicates found in the
background (a page that follows the search, joined by a second visitor, kept while the store is
unchanged; the API's 202 and job) and resolved and undone from the page, background index
creation with progress, and the page-side security (the token cookie, cross-site form posts,
read-only servers)."""

from __future__ import annotations

import hashlib
import html
import io
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from imgstore import ImageStore
from imgstore.dedup import CANDIDATES, CHECKING, GROUPING, PHASES, describe_progress
from imgstore.errors import DatabaseError
from imgstore.serve import Thumbnails, create_app

from .helpers import photo, write_variants
from .test_serve import running

HTML = {"Accept": "text/html"}


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> ImageStore:
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root / "cat", "cat", 4)
    write_variants(photo("rocket"), root / "rocket", "rocket", 3)
    photo("coffee").save(root / "coffee.png")
    s = ImageStore(db_url, cache_codes=True)
    s.ingest([root], extractor="color")
    s.create_index("lsh", 32, extractor="color")
    yield s
    s.close()


def pages(store: ImageStore, tmp_path: Path, **options) -> TestClient:  # type: ignore[no-untyped-def]
    return TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs"), **options))


def png(img) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, "a write form carries its token"
    return found.group(1)


def result_ids(page: str) -> list[int]:
    grid = page.split('id="results"', 1)[1]
    return [int(i) for i in re.findall(r'href="/images/(\d+)"', grid)]


def search_job(page: str) -> tuple[int, str]:
    """The job a duplicates page follows while the search runs, and the page it then shows."""
    job = re.search(r'id="dup-search" data-job="(\d+)" data-next="([^"]+)"', page)
    assert job, "the page follows a running search"
    return int(job.group(1)), html.unescape(job.group(2))


def finished(web: TestClient | httpx.Client, job_id: int, hang_s: float = 600) -> dict[str, Any]:
    """The job once it is done or failed, polled as the page's script polls it (``hang_s``
    only turns a hang into a failure: no speed is asserted)."""
    deadline = time.monotonic() + hang_s
    while True:
        job: dict[str, Any] = web.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {job['state']}"
        time.sleep(0.05)


def followed(web: TestClient | httpx.Client, url: str = "/duplicates", **options: Any) -> Any:
    """The duplicates page a browser ends up showing: while the search runs the page follows
    its job and then loads the page it names; so does this."""
    page = web.get(url, **options)
    while page.status_code == 202:
        job, after = search_job(page.text)
        finished(web, job)
        page = web.get(after, **options)
    return page


def gated(store: ImageStore, monkeypatch: pytest.MonkeyPatch, at: str | None = None) -> tuple[threading.Event, threading.Event]:
    """Hold the store's duplicate searches until the test opens the gate: at their start, or
    (``at``) when they first report that phase. Returns (reached, gate)."""
    reached, gate = threading.Event(), threading.Event()
    real: Callable[..., Any] = store.find_duplicates

    def held(**options: Any) -> Any:
        if at is None:
            reached.set()
            assert gate.wait(600)
            return real(**options)
        progress = options.pop("progress")

        def report(phase: str, done: int, total: int) -> None:
            progress(phase, done, total)
            if phase == at and not reached.is_set():
                reached.set()
                assert gate.wait(600)

        return real(progress=report, **options)

    monkeypatch.setattr(store, "find_duplicates", held)
    return reached, gate


def test_search_pages(store: ImageStore, tmp_path: Path) -> None:
    web = pages(store, tmp_path)
    empty = web.get("/")
    assert empty.status_code == 200 and "Drop an image here" in empty.text and 'src="/static/app.js"' in empty.text
    assert "https://" not in empty.text and "http://" not in empty.text  # nothing loaded from elsewhere
    assert web.get("/static/app.js").status_code == 200 and web.get("/static/style.css").status_code == 200

    uploaded = web.post("/", data={"k": "10"}, files={"image": ("query.png", png(photo("chelsea")), "image/png")})
    assert uploaded.status_code == 200 and "Images like query.png" in uploaded.text
    ids = result_ids(uploaded.text)
    cats = {store.image(str(p)).id for p in sorted((tmp_path / "photos" / "cat").iterdir())}
    assert set(ids[:4]) == cats  # her four copies come first
    assert "data:image/jpeg;base64," in uploaded.text and "bits" in uploaded.text and "cos " in uploaded.text

    first = ids[0]
    by_id = web.get("/", params={"id": first, "k": 10, "exact": 1})
    assert by_id.status_code == 200 and result_ids(by_id.text)[0] == first
    assert f'/api/images/{first}/thumbnail' in by_id.text

    # every mistake gets a page that says what went wrong, with the right status
    not_image = web.post("/", files={"image": ("notes.txt", b"hello, not a picture", "text/plain")})
    assert not_image.status_code == 415 and "notes.txt: not a recognised image format" in not_image.text
    assert 'class="error"' in not_image.text and "in-memory" not in not_image.text
    nothing = web.post("/", data={"k": "10"})
    assert nothing.status_code == 422 and "multipart form field" in nothing.text
    assert web.get("/", params={"id": 99999}).status_code == 404
    assert web.get("/", params={"id": "abc"}).status_code == 422
    missing = web.get("/images/99999", headers=HTML)
    assert missing.status_code == 404 and "<html" in missing.text and "no image with id" in missing.text
    wrong_url = web.get("/no/such/page", headers=HTML)
    assert wrong_url.status_code == 404 and "<html" in wrong_url.text and "/duplicates" in wrong_url.text


def test_image_page_and_original_file(store: ImageStore, tmp_path: Path) -> None:
    web = pages(store, tmp_path)
    path = sorted((tmp_path / "photos" / "cat").iterdir())[1]
    record = store.image(str(path))
    page = web.get(f"/images/{record.id}")
    assert page.status_code == 200
    assert str(path) in page.text and "current" in page.text and f"{record.width} × {record.height}" in page.text
    assert page.text.count('class="card"') >= 3  # its neighbours
    original = web.get(f"/images/{record.id}/file")
    assert original.status_code == 200 and original.content == path.read_bytes()
    assert original.headers["x-content-type-options"] == "nosniff"
    # the path now holds other bytes (replaced, or a symlink pointed out of the collection): refused
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0")
    path.unlink()
    path.symlink_to(secret)
    refused = web.get(f"/images/{record.id}/file")
    assert refused.status_code == 404 and b"root:" not in refused.content
    assert hashlib.sha256(secret.read_bytes()).hexdigest() != record.sha256


def test_duplicates_resolved_from_the_page_and_undone(store: ImageStore, tmp_path: Path) -> None:
    moved_to = tmp_path / "set-aside"
    web = pages(store, tmp_path, allow_writes=True, move_to=moved_to)
    page = followed(web)
    assert page.status_code == 200 and "suggested keeper" in page.text
    groups = store.find_duplicates()
    cat_group = next(g for g in groups if any("cat" in p for m in g.members for p in m.paths))
    assert f'data-key="{cat_group.key}"' in page.text
    # choose another keeper than the suggested one
    other = next(p for m in cat_group.members for p in m.paths if p != cat_group.keeper_path)
    token = csrf(page.text)
    without_token = web.post("/duplicates/resolve", data={"group": cat_group.key, "keeper": other, "keep": "original"})
    assert without_token.status_code == 403
    cross_site = web.post("/duplicates/resolve", headers={"Origin": "http://evil.example"},
                          data={"csrf": token, "group": cat_group.key, "keeper": other, "keep": "original"})
    assert cross_site.status_code == 403 and Path(other).exists()
    done = web.post("/duplicates/resolve", data={"csrf": token, "group": cat_group.key, "keeper": other, "keep": "original"},
                    follow_redirects=False)
    assert done.status_code == 303
    # files moved: the groups are found again; the page that follows that search, and the groups, say what was done
    searching = web.get(done.headers["location"])
    assert "Moved 3 files" in searching.text and "Undo that" in searching.text
    done = followed(web, done.headers["location"])
    assert done.status_code == 200 and "Moved 3 files" in done.text and "Undo that" in done.text
    assert f'data-key="{cat_group.key}"' not in done.text
    assert Path(other).exists() and sum(1 for m in cat_group.members for p in m.paths if Path(p).exists()) == 1
    assert len(list(moved_to.rglob("*.png")) + list(moved_to.rglob("*.jpg"))) == 3
    assert all(g.key != cat_group.key for g in store.find_duplicates())
    journal = re.search(r'name="journal" value="([^"]+)"', done.text).group(1)  # type: ignore[union-attr]
    undone = web.post("/duplicates/undo", data={"csrf": csrf(done.text), "journal": journal}, follow_redirects=False)
    undone = followed(web, undone.headers["location"])
    assert undone.status_code == 200 and "Put back 3 files" in undone.text and f'data-key="{cat_group.key}"' in undone.text
    assert all(Path(p).exists() for m in cat_group.members for p in m.paths)
    assert web.post("/duplicates/undo", data={"csrf": token, "journal": "../../etc/passwd"}).status_code == 404
    # a keeper that is not a file of the group is refused; a group that changed is refused
    bad = web.post("/duplicates/resolve", data={"csrf": token, "group": cat_group.key, "keeper": "/etc/passwd"})
    assert bad.status_code == 422
    assert web.post("/duplicates/resolve", data={"csrf": token, "group": "1-2-3-999"}).status_code == 404


def test_duplicates_are_found_in_the_background(store: ImageStore, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Over real HTTP: the first answer is a page that follows the search, not the groups; a
    second visitor and the API join the same job; the page ends on the groups, which are kept
    until the store changes."""
    reached, gate = gated(store, monkeypatch)  # the search waits for the test: no race with it
    app = create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs"))
    with running(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60, headers=HTML) as http:
        first = http.get("/duplicates")
        assert first.status_code == 202 and "Finding duplicate groups" in first.text
        assert 'class="group"' not in first.text and "suggested keeper" not in first.text
        job, after = search_job(first.text)
        assert f"job={job}" in after and f'<meta http-equiv="refresh" content="2;url={html.escape(after)}">' in first.text
        assert reached.wait(60)
        assert search_job(http.get("/duplicates").text)[0] == job  # a second visitor joins it
        api = http.get("/api/duplicates", headers={"Accept": "application/json"})
        assert api.status_code == 202 and api.headers["location"] == f"/api/jobs/{job}"
        assert api.json()["id"] == job and api.json()["state"] == "running" and api.json()["message"] == "starting"
        assert [j["id"] for j in http.get("/api/jobs").json() if j["kind"] == "duplicates"] == [job]

        gate.set()
        page = http.get(after)
        while page.status_code == 202:  # as the page's script does: follow the job, then load the page
            finished(http, job)
            page = http.get(after)
        assert page.status_code == 200 and 'id="dup-search"' not in page.text and "suggested keeper" in page.text
        keys = set(re.findall(r'data-key="([^"]+)"', page.text))
        done = http.get(f"/api/jobs/{job}").json()
        assert done["state"] == "done" and done["phase"] == GROUPING and done["done"] == done["total"]
        assert done["result"]["groups"] == len(keys) > 0 and done["result_url"] == "/api/duplicates?keep=original"
        groups = http.get(done["result_url"])
        assert groups.status_code == 200 and {g["key"] for g in groups.json()} == keys
        # kept while the store is unchanged: no new search
        assert http.get("/duplicates").status_code == 200
        assert [j["id"] for j in http.get("/api/jobs").json() if j["kind"] == "duplicates"] == [job]

        # a new image, a smaller copy of the coffee photo: the groups are found again, with it (the
        # search reads the codes as of its start, not as of the server's last background refresh)
        buf = io.BytesIO()
        photo("coffee").resize((200, 150)).save(buf, format="JPEG")
        added = store.add(buf.getvalue())
        assert followed(http).status_code == 200
        assert len([j for j in http.get("/api/jobs").json() if j["kind"] == "duplicates"]) == 2
        # a script waits for the groups instead of following the job
        waited = http.get("/api/duplicates", params={"keep": "largest", "wait": 300})
        assert waited.status_code == 200
        new_keys = {g["key"] for g in waited.json()}
        assert keys < new_keys and [k.split("-")[-1] for k in new_keys - keys] == [str(added)]
        assert http.get("/api/duplicates", params={"wait": 301}).status_code == 422


def test_a_failed_duplicate_search_says_why_once(store: ImageStore, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A search that fails: its page says why in one line with the error's status, and does not
    start it again by itself (the page it ends on names the failed job); asking again does."""
    def broken(**_: Any) -> Any:
        raise DatabaseError("the database is unreachable (connection refused); is the server running?")

    monkeypatch.setattr(store, "find_duplicates", broken)
    web = pages(store, tmp_path)
    first = web.get("/duplicates", headers=HTML)
    (job,) = [j["id"] for j in web.get("/api/jobs").json() if j["kind"] == "duplicates"]
    # the page that follows the search, or, when it failed before the page was made, the failure
    assert first.status_code in (202, 503)
    assert finished(web, job)["error"] == "the database is unreachable (connection refused); is the server running?"
    for _ in range(2):  # the page the followed search ends on (it names the job)
        shown = web.get(f"/duplicates?keep=original&job={job}", headers=HTML)
        assert shown.status_code == 503 and "The duplicate search failed: the database is unreachable" in shown.text
        assert "Search again" in shown.text and "Traceback" not in shown.text
    assert [j["id"] for j in web.get("/api/jobs").json() if j["kind"] == "duplicates"] == [job]
    api = web.get("/api/duplicates", params={"wait": 60})
    assert api.status_code == 503 and api.json() == {"error": "the database is unreachable (connection refused); "
                                                              "is the server running?"}

    def crashed(**_: Any) -> Any:
        raise RuntimeError("opencv: out of memory\nwith a second line")

    monkeypatch.setattr(store, "find_duplicates", crashed)
    api = web.get("/api/duplicates", params={"wait": 60})
    assert api.status_code == 500 and api.json() == {"error": "the duplicate search failed: opencv: out of memory"}


def test_a_duplicate_search_reports_its_progress(store: ImageStore, tmp_path: Path) -> None:
    """What the background job shows: the search's phases in order of work, done never past
    the total, in words; and the state that says when its groups are out of date."""
    seen: list[tuple[str, int, int]] = []
    groups = store.find_duplicates(progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert groups and seen and {phase for phase, _, _ in seen} <= set(PHASES)
    assert seen[0][0] == CANDIDATES and seen[-1] == (GROUPING, seen[-1][2], seen[-1][2])
    checks = [(done, total) for phase, done, total in seen if phase == CHECKING]
    assert checks and all(0 < done <= total for done, total in checks) and checks[-1][0] == checks[-1][1]
    assert describe_progress(CHECKING, 120, 480) == "checking 120 of 480 candidate pairs"
    assert describe_progress(CANDIDATES, 1200, 30000) == "finding candidate pairs: 1,200 of 30,000 images probed"

    state = store.duplicates_state()
    assert store.duplicates_state() == state
    assert store.find_duplicates() and store.duplicates_state() == state  # a search changes nothing it reads
    path = next(p for g in groups for m in g.members for p in m.paths)
    store.remove(path)
    assert store.duplicates_state() != state


def test_read_only_pages_offer_no_writes(store: ImageStore, tmp_path: Path) -> None:
    web = pages(store, tmp_path)
    dup = followed(web)
    assert "--allow-writes --move-to DIR" in dup.text and "Keep the selected copy" not in dup.text
    coll = web.get("/collection")
    assert "New index" not in coll.text and "Activate" not in coll.text
    token = csrf(web.get("/images/1").text) if 'name="csrf"' in web.get("/images/1").text else "x"
    assert web.post("/images/1/remove", data={"csrf": token}).status_code == 403
    assert web.post("/collection/indexes", data={"csrf": token, "method": "lsh"}).status_code == 403
    assert store.image(1).id == 1


def test_collection_page_creates_an_index_in_the_background(store: ImageStore, tmp_path: Path) -> None:
    app = create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs"), allow_writes=True)
    web = TestClient(app)
    page = web.get("/collection")
    assert page.status_code == 200 and "New index" in page.text and ">color<" in page.text
    before = {i.id for i in store.indexes()}
    started = web.post("/collection/indexes", data={"csrf": csrf(page.text), "method": "lsh", "n_bits": "64"})
    assert started.status_code == 200 and "Started job" in started.text
    jobs = app.state.service.jobs
    job = jobs.wait(jobs.all()[-1].id, timeout_s=60)
    assert job is not None and job.state == "done", job and job.error
    assert job.phase == "buckets" and job.done == job.total == store.counts().features
    new = {i.id for i in store.indexes()} - before
    assert new == {job.result} and next(i for i in store.indexes() if i.id == job.result).is_active
    polled = web.get(f"/api/jobs/{job.id}").json()
    assert polled["state"] == "done" and polled["fraction"] == 1.0
    # activate the old index again from the page
    old = min(before)
    shown = web.get("/collection")
    assert f"/collection/indexes/{old}/activate" in shown.text
    web.post(f"/collection/indexes/{old}/activate", data={"csrf": csrf(shown.text)})
    assert next(i for i in store.indexes() if i.id == old).is_active
    # a bad request fails as a job that says why, not as a crash
    failing = web.post("/api/indexes", json={"method": "itq", "n_bits": 256})
    assert failing.status_code == 202
    result = jobs.wait(failing.json()["id"], timeout_s=60)
    assert result is not None and result.state == "failed" and "needs at least" in (result.error or "")
    assert web.post("/api/indexes", json={"method": "nope"}).status_code == 422


def test_token_cookie_for_pages(store: ImageStore, tmp_path: Path) -> None:
    web = pages(store, tmp_path, token="s3cret-token-0123456789")
    refused = web.get("/", headers=HTML)
    assert refused.status_code == 401 and "token" in refused.text and "<html" in refused.text
    assert web.get("/static/style.css").status_code == 401
    assert web.get("/docs").status_code == 401
    opened = web.get("/?token=s3cret-token-0123456789", follow_redirects=False)
    assert opened.status_code == 303 and "token" not in opened.headers["location"]
    assert "httponly" in opened.headers["set-cookie"].lower() and "samesite=strict" in opened.headers["set-cookie"].lower()
    web.cookies.clear()  # only the cookie set below: the jar also keeps the server's own (another domain)
    web.cookies.set("imgstore_token", "s3cret-token-0123456789")
    assert web.get("/").status_code == 200 and web.get("/api/info").status_code == 200
    assert web.get("/api/images/1/thumbnail").status_code == 200
    web.cookies.clear()
    web.cookies.set("imgstore_token", "wrong")
    assert web.get("/api/info").status_code == 401
