"""Races between real processes on one store, on SQLite and PostgreSQL (issue 26): two ingests
into an existing store, an ingest beside ``imgstore serve``, ``dedup --apply`` beside an
ingest, ``rm`` beside searches. Nothing is lost, ``imgstore verify`` is clean.

No test waits for "long enough": each side starts when the other has visibly begun. An ingest
that must be caught in its middle runs the library's own ``ImageStore.ingest`` in a process of
its own (the call ``imgstore ingest`` makes) and, after a written batch (its ``progress``
callback, outside any transaction), leaves a marker file and waits for the marker the other
side leaves: a barrier, so the two overlap whatever the machine's load. Polls have long
deadlines and only ever wait for an event.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from imgstore import ImageStore
from imgstore.models import Image as ImageRow
from imgstore.models import ImagePath
from PIL import Image
from sqlalchemy import select

from .helpers import photo, write_variants

EXE = str(Path(sys.executable).with_name("imgstore"))
#: Generous: a deadline only bounds a wait for an event, it never decides an outcome.
DEADLINE_S = 300

#: One ingest through the Python API, held once at a point: ``first`` (after its first written
#: batch, with files still to go) or ``last`` (after its last batch, before the ingest's own
#: finish: marking vanished paths, the default index). There it writes ``GATE/NAME.POINT`` and
#: waits until every file of WAITS (comma-separated, in GATE) exists. Prints its summary as JSON.
GATED_INGEST = r"""
import json, sys, time
from pathlib import Path
from imgstore import ImageStore

db, gate, name, point, waits, batch_size, *roots = sys.argv[1:]
gate = Path(gate)
held = []

def progress(p):
    if held:
        return
    if point == "first" and p.done >= p.total:
        sys.exit(f"{name}: the first batch was the last one; give it more files")
    if point == "first" or p.done == p.total:
        held.append([p.done, p.total])
        (gate / f"{name}.{point}").touch()
        deadline = time.monotonic() + 300
        while not all((gate / w).exists() for w in waits.split(",") if w):
            if time.monotonic() > deadline:
                sys.exit(f"{name}: nobody released the gate")
            time.sleep(0.01)

with ImageStore(db) as store:
    summary = store.ingest(roots, extractor="color", batch_size=int(batch_size), progress=progress)
print(json.dumps({**summary.as_dict(), "held": held}))
"""


def gated_ingest(db_url: str, gate: Path, name: str, point: str, waits: list[str], roots: list[Path],
                 batch_size: int = 4) -> subprocess.Popen[str]:
    gate.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-c", GATED_INGEST, db_url, str(gate), name, point, ",".join(waits),
                             str(batch_size), *map(str, roots)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """The process's output once it exited 0 without a traceback."""
    out, err = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{err}"
    assert "Traceback" not in err, err
    return out, err


def imgstore(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``imgstore --db URL ARGS``, checked: exit 0, no traceback."""
    done = subprocess.run([EXE, "--db", db_url, *args], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, f"imgstore {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def wait_until(what: str, ready: Any, *procs: subprocess.Popen[str]) -> None:
    """Poll ``ready()`` until true; fail at once if one of ``procs`` exits meanwhile."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"waiting for {what}: {proc.args[:4]} exited {proc.returncode}\n{out}\n{err}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def assert_verify_clean(db_url: str) -> None:
    """``imgstore verify --json``: consistent, and every current path's file as it was stored."""
    report = json.loads(imgstore(db_url, "verify", "--json").stdout)
    assert report == {"images_without_features": [], "missing_codes": {}, "bucket_mismatch": {}, "dangling_rows": 0,
                      "vanished_files": [], "changed_files": [], "ok": True}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def image_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and ".imgstore" not in p.parts)


def current_paths(db_url: str) -> dict[str, str]:
    """Every current path in the store with the content hash of its image."""
    with ImageStore(db_url) as store, store.engine.connect() as conn:
        rows = conn.execute(select(ImagePath.path, ImageRow.sha256).join(ImageRow, ImageRow.id == ImagePath.image_id)
                            .where(ImagePath.is_current.is_(True))).all()
    return {str(path): str(digest) for path, digest in rows}


def assert_store_holds(db_url: str, files: list[Path]) -> None:
    """The store's current paths are exactly ``files``, each with its content; one image per
    content and no other."""
    assert current_paths(db_url) == {str(f): sha(f) for f in files}
    with ImageStore(db_url) as store:
        assert store.counts().images == len({sha(f) for f in files})


def noise_images(folder: Path, n: int, seed: int) -> list[Path]:
    """``n`` small distinct PNGs (quick to ingest: for tests that need many images)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        path = folder / f"noise_{seed}_{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


# --- a. two ingests into an existing store ------------------------------------------------------


def test_two_overlapping_ingests_into_an_existing_store(db_url: str, tmp_path: Path) -> None:
    """Two ingests held until both have written a batch, then run side by side: folders of their
    own, one folder both ingest, a file of one that is a byte copy of a file of the other, and
    an already stored folder rescanned. Every content is added exactly once (the summaries add
    up), every file is a current path of its content, every image has its code in the index."""
    base, one, two, shared = (tmp_path / n for n in ("base", "one", "two", "shared"))
    write_variants(photo("horse"), base, "base", 6)
    imgstore(db_url, "ingest", str(base), "--extractor", "color", "--no-progress")
    imgstore(db_url, "index", "create", "--method", "lsh", "--bits", "32", "--extractor", "color")
    write_variants(photo("chelsea"), one, "one", 16)
    write_variants(photo("rocket"), two, "two", 16)
    write_variants(photo("coffee"), shared, "shared", 16)
    shutil.copyfile(one / "one_005.jpg", two / "two_copy_of_one_005.jpg")  # one content at two paths
    gate = tmp_path / "gate"
    a = gated_ingest(db_url, gate, "a", "first", ["b.first"], [one, shared, base])
    b = gated_ingest(db_url, gate, "b", "first", ["a.first"], [two, shared])
    summaries = [json.loads(finished(p)[0]) for p in (a, b)]
    for s in summaries:
        assert s["held"] and s["held"][0][0] < s["held"][0][1]  # both were held in their middle
        assert s["failed"] == 0
    files = image_files(base, one, two, shared)
    new_contents = len({sha(f) for f in image_files(one, two, shared)})
    assert sum(s["added"] for s in summaries) == new_contents  # each content added once, by one of them
    assert summaries[0]["unchanged"] == 6  # the stored folder was not read again
    assert_store_holds(db_url, files)
    assert_verify_clean(db_url)


def test_two_ingests_crossing_the_default_index_threshold_build_one_index(db_url: str, tmp_path: Path) -> None:
    """Both ingests finish writing together with enough images between them for the default
    index: each then looks for it. Exactly one default index is built, with every image's code."""
    imgstore(db_url, "db", "upgrade")  # an existing, empty store
    noise_images(tmp_path / "a", 150, seed=1)
    noise_images(tmp_path / "b", 150, seed=2)
    gate = tmp_path / "gate"
    a = gated_ingest(db_url, gate, "a", "last", ["b.last"], [tmp_path / "a"], batch_size=16)
    b = gated_ingest(db_url, gate, "b", "last", ["a.last"], [tmp_path / "b"], batch_size=16)
    for proc in (a, b):
        finished(proc)
    indexes = json.loads(imgstore(db_url, "index", "list", "--json").stdout)
    assert [(i["is_active"], i["n_codes"], i["config"]["auto"]) for i in indexes] == [(True, 300, True)], indexes
    assert_verify_clean(db_url)


def test_an_ingest_beside_another_that_builds_the_default_index(db_url: str, tmp_path: Path) -> None:
    """One ingest crosses the default-index threshold and builds the index while another is
    still writing its batches: the images of those batches get their codes in the new index."""
    imgstore(db_url, "db", "upgrade")
    noise_images(tmp_path / "a", 260, seed=3)
    noise_images(tmp_path / "b", 120, seed=4)
    gate = tmp_path / "gate"
    # a writes everything, then waits until b has written a batch; b waits until a has written
    # everything: then a builds the index while b writes the rest of its batches
    a = gated_ingest(db_url, gate, "a", "last", ["b.first"], [tmp_path / "a"], batch_size=32)
    b = gated_ingest(db_url, gate, "b", "first", ["a.last"], [tmp_path / "b"], batch_size=2)
    for proc in (a, b):
        finished(proc)
    indexes = json.loads(imgstore(db_url, "index", "list", "--json").stdout)
    assert [(i["n_codes"], i["config"]["auto"]) for i in indexes] == [(380, True)], indexes
    assert_verify_clean(db_url)


# --- b. an ingest beside `imgstore serve` --------------------------------------------------------


class Server:
    """``imgstore serve --port 0`` as a process: its stderr read in a thread (the port is in its
    "open http://..." line), stopped with Ctrl-C."""

    def __init__(self, db_url: str) -> None:
        self.proc = subprocess.Popen([EXE, "--db", db_url, "serve", "--port", "0"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        found: list[int] = []

        def port() -> bool:
            found[:] = [int(m.group(1)) for line in list(self.lines) if (m := re.search(r"open http://[^:]+:(\d+)/", line))]
            return bool(found)

        wait_until("the server's address", port, self.proc)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{found[0]}", timeout=DEADLINE_S)

        def answers() -> bool:
            try:
                return self.http.get("/api/info").status_code == 200
            except httpx.TransportError:
                return False

        wait_until("the server to answer", answers, self.proc)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> str:
        self.http.close()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        finally:
            self.proc.kill()
        self.reader.join(timeout=60)
        output = "".join(self.lines)
        assert self.proc.returncode == 0, output
        assert "Traceback" not in output and "Exception" not in output, output
        return output


def test_an_ingest_beside_the_server(db_url: str, tmp_path: Path) -> None:
    """``imgstore serve`` answers searches, image reads, uploads and its summary while another
    process ingests: held after its first batch until the server has answered a round of
    requests that sees it, then let go while the requests go on. Every answer is a 200; once the
    ingest is done the server finds the new images (its refresher, no restart)."""
    base, more = tmp_path / "base", tmp_path / "more"
    write_variants(photo("chelsea"), base / "cat", "cat", 4)
    write_variants(photo("rocket"), base / "rocket", "rocket", 4)
    for name in ("horse", "coffee", "astronaut", "camera"):
        write_variants(photo(name), more / name, name, 6)
    with ImageStore(db_url) as store:
        store.ingest([base], extractor="color")
        store.create_index("lsh", 32, extractor="color")
        base_ids = [store.image(str(f)).id for f in image_files(base)]
    upload = io_png(photo("horse"))
    server = Server(db_url)
    statuses: Counter[tuple[str, int]] = Counter()

    def round_of_requests(ids: list[int]) -> None:
        for i in ids:
            for url, response in ((f"/api/search?id={i}", server.http.get("/api/search", params={"id": i, "k": 5})),
                                  ("/api/images/{id}", server.http.get(f"/api/images/{i}"))):
                statuses[(url.split("?")[0], response.status_code)] += 1
                assert response.status_code == 200, (url, response.status_code, response.text)
        info = server.http.get("/api/info")
        searched = server.http.post("/api/search", params={"k": 3}, files={"image": ("q.png", upload, "image/png")})
        for what, response in (("/api/info", info), ("POST /api/search", searched)):
            statuses[(what, response.status_code)] += 1
            assert response.status_code == 200, (what, response.status_code, response.text)

    try:
        gate = tmp_path / "gate"
        ingest = gated_ingest(db_url, gate, "ingest", "first", ["go"], [more])
        wait_until("the ingest's first batch, seen by the server",
                   lambda: server.http.get("/api/info").json()["images"] > len(base_ids), ingest)
        with ImageStore(db_url) as store:  # the images of its first batch
            new_ids = [store.image(p).id for p in current_paths(db_url) if p.startswith(str(more))]
        assert 0 < len(new_ids) < 24
        round_of_requests(base_ids + new_ids)  # while the ingest is held in its middle
        (gate / "go").touch()
        rounds = 0
        while ingest.poll() is None or rounds < 1:
            round_of_requests(base_ids[:2] + new_ids[:2])
            rounds += 1
        finished(ingest)
        with ImageStore(db_url) as store:
            last = store.image(str(image_files(more)[-1])).id
            total = store.counts().images
        assert total == len(base_ids) + 24
        assert server.http.get("/api/info").json()["images"] == total
        shown = server.http.get(f"/api/images/{last}").json()
        assert [p["path"] for p in shown["paths"]] == [str(image_files(more)[-1])]

        def finds_the_last_image() -> bool:
            hits = server.http.get("/api/search", params={"id": last, "k": 3})
            assert hits.status_code == 200, hits.text
            return bool(hits.json()) and hits.json()[0]["image_id"] == last

        wait_until("the server to find the newest image", finds_the_last_image)
    finally:
        output = server.stop()
    assert set(status for _, status in statuses) == {200}, statuses
    assert "ERROR" not in output, output
    assert_verify_clean(db_url)


def io_png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# --- c. dedup --apply beside an ingest -----------------------------------------------------------


def test_dedup_apply_beside_an_ingest_of_more_copies(db_url: str, tmp_path: Path) -> None:
    """``imgstore dedup --apply`` starts while an ingest of more copies (a new folder inside the
    collection, rescanned with it) is held after its first batch, and the ingest goes on once
    the apply has begun its journal. No file is lost or doubled: each is in place or where the
    journal moved it; the store records each move; ``dedup --undo`` puts every file back;
    ``verify`` is clean after each step."""
    photos, moved_to = tmp_path / "photos", tmp_path / "moved"
    for name in ("chelsea", "rocket", "coffee", "horse"):
        originals = write_variants(photo(name), photos / name, name, 3)
        shutil.copyfile(originals[0], photos / name / f"{name}_copy.png")  # an exact copy: a group for sure
    imgstore(db_url, "ingest", str(photos), "--extractor", "color", "--no-progress")
    more = photos / "more"
    more.mkdir()
    for name in ("chelsea", "rocket", "coffee", "horse"):
        for k in range(3):
            shutil.copyfile(photos / name / f"{name}_000.png", more / f"{name}_again_{k}.png")
        write_variants(photo(name).rotate(90, expand=True), more / name, f"{name}_turned", 5)
    before = Counter(sha(f) for f in image_files(photos))
    gate = tmp_path / "gate"
    ingest = gated_ingest(db_url, gate, "ingest", "first", ["go"], [photos])
    wait_until("the ingest's first batch", lambda: (gate / "ingest.first").exists(), ingest)
    apply = subprocess.Popen([EXE, "--db", db_url, "dedup", "--apply", "--move-to", str(moved_to), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journals = moved_to / ".imgstore"
    wait_until("the apply's journal", lambda: journals.is_dir() and any(journals.glob("journal-*.jsonl")), apply, ingest)
    (gate / "go").touch()
    finished(ingest)
    report = json.loads(finished(apply)[0])
    assert report["failed"] == [] and report["moved"], report
    # nothing lost, nothing doubled: every content is where it was or where it was moved
    assert Counter(sha(f) for f in image_files(photos, moved_to)) == before
    entries = [json.loads(line) for line in Path(report["journal"]).read_text().splitlines()]
    done = {e["id"] for e in entries if e["op"] == "done"}
    moves = {e["src"]: e["dst"] for e in entries if e["op"] == "move" and e["id"] in done}
    assert moves == {m["from"]: m["to"] for m in report["moved"]}
    for src, dst in moves.items():
        assert not os.path.exists(src) and os.path.isfile(dst)
    assert set(map(str, image_files(moved_to))) == set(moves.values())
    # the store: every file in place is a current path, every moved one is recorded as moved
    with ImageStore(db_url) as store, store.engine.connect() as conn:
        rows = {p: (bool(c), m) for p, c, m in conn.execute(select(ImagePath.path, ImagePath.is_current, ImagePath.moved_to))}
    in_place = {str(f) for f in image_files(photos)}
    assert rows == {**{p: (True, None) for p in in_place}, **{src: (False, dst) for src, dst in moves.items()}}
    assert_verify_clean(db_url)
    undone = json.loads(imgstore(db_url, "dedup", "--undo", report["journal"], "--json").stdout)
    assert undone["failed"] == [] and len(undone["restored"]) == len(moves)
    assert image_files(moved_to) == []
    assert_store_holds(db_url, image_files(photos))
    assert Counter(sha(f) for f in image_files(photos)) == before
    assert_verify_clean(db_url)


# --- d. rm beside searches ------------------------------------------------------------------------


def test_rm_beside_searches(db_url: str, tmp_path: Path) -> None:
    """Searches in threads (through SQL, through a code cache, through a code cache kept fresh
    by the refresher as the server runs it, and through one whose refresher lags) while
    ``imgstore rm`` processes remove images by id and by path. Every search returns k results
    and never raises; a search that starts after an ``rm`` returned never returns an image it
    removed; ``verify`` is clean afterwards."""
    root = tmp_path / "photos"
    for name in ("chelsea", "rocket", "coffee", "horse"):
        write_variants(photo(name), root / name, name, 10)
    files = image_files(root)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        store.create_index("lsh", 32, extractor="color")
        ids = {str(f): store.image(str(f)).id for f in files}
        kept = [ids[str(f)] for f in files if f.stem.endswith(("_000", "_001"))]
        queries: list[Any] = kept + [store.extractor("color").extract([photo(n)])[0] for n in ("chelsea", "horse")]
    by_id = [ids[str(f)] for f in files if f.stem.endswith(("_002", "_003"))]
    by_path = [f for f in files if f.stem.endswith(("_004", "_005"))]
    steps: list[tuple[list[str], set[int]]] = [
        ([str(i) for i in by_id[:4]], set(by_id[:4])),
        ([str(f) for f in by_path[:4]], {ids[str(f)] for f in by_path[:4]}),
        ([str(i) for i in by_id[4:]] + [str(f) for f in by_path[4:]], set(by_id[4:]) | {ids[str(f)] for f in by_path[4:]}),
    ]
    removed = [frozenset[int]()]  # what the rm processes that returned so far removed (replaced, never changed)
    all_done = threading.Event()
    kinds = ("sql", "cached", "refresher", "lagging")
    started = threading.Barrier(len(kinds) + 1)
    failures: list[str] = []
    n_searches: Counter[str] = Counter()

    def searcher(kind: str) -> None:
        store = ImageStore(db_url, cache_codes=kind != "sql")
        if kind == "refresher":
            store.start_refresher(interval_s=0.05)
        elif kind == "lagging":  # a refresher that has not come round since: a busy server's, at worst
            store.start_refresher(interval_s=DEADLINE_S)
        try:
            after = 0
            n = 0
            while after < 10:  # a few more after the last rm returned
                if all_done.is_set():
                    after += 1
                gone = removed[0]  # removed before this search started
                query = queries[n % len(queries)]
                n += 1
                try:
                    hits = store.search(query, k=5, rerank=n % 2 == 0, exact=n % 3 == 0)
                except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
                    failures.append(f"{kind}: {type(exc).__name__}: {exc}")
                    started.abort()  # nobody waits for this one any more
                    return
                n_searches[kind] += 1
                if len(hits) != 5 or gone & {h.image_id for h in hits}:
                    failures.append(f"{kind}: after removing {sorted(gone)}: {[(h.image_id, h.paths) for h in hits]}")
                if n == 1:
                    started.wait(timeout=DEADLINE_S)
        finally:
            store.close()

    threads = [threading.Thread(target=searcher, args=(kind,)) for kind in kinds]
    for thread in threads:
        thread.start()
    try:
        started.wait(timeout=DEADLINE_S)  # every searcher has answered once
        for refs, images in steps:
            assert not failures, failures
            out = json.loads(imgstore(db_url, "rm", *refs, "--json").stdout)
            assert out["images"] == sorted(images) and out["dry_run"] is False
            removed[0] = removed[0] | images
    except threading.BrokenBarrierError:
        pass  # a searcher failed: reported below
    finally:
        all_done.set()
        for thread in threads:
            thread.join(timeout=DEADLINE_S)
    assert failures == []
    assert all(n_searches[kind] > 10 for kind in kinds), n_searches
    left = [f for f in files if ids[str(f)] not in removed[0]]
    assert_store_holds(db_url, left)
    assert_verify_clean(db_url)
    with ImageStore(db_url) as store:
        for query in queries:
            assert not removed[0] & {h.image_id for h in store.search(query, k=40, include_stale=True)}


# --- two connections opening a new SQLite file -------------------------------------------------


def test_connections_opening_a_new_sqlite_file_at_once(tmp_path: Path) -> None:
    """Two connections that switch a brand-new SQLite file to WAL at the same moment: one of
    them failed with "database is locked" about once in a hundred tries (SQLite answers at once, without
    waiting, when waiting could deadlock; seen as `imgstore ingest` failing when two started on
    a new store). Every connection opens, whichever way each round goes."""
    from imgstore.db import make_engine
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    failures: list[str] = []

    def connect(engine: Any, together: threading.Barrier, round_: int) -> None:
        together.wait(timeout=DEADLINE_S)
        try:
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        except Exception as exc:  # noqa: BLE001 - recorded, the test fails on it
            failures.append(f"round {round_}: {exc}")

    for round_ in range(400):
        engines = [make_engine(make_url(f"sqlite:///{tmp_path}/new-{round_}.db")) for _ in range(2)]
        together = threading.Barrier(2)
        threads = [threading.Thread(target=connect, args=(engine, together, round_)) for engine in engines]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DEADLINE_S)
        for engine in engines:
            engine.dispose()
    assert failures == []
