"""Watched folders (``imgstore watch``, ``imgstore serve --watch``), for real: the command runs
as a process on both databases while this test writes, changes, renames and deletes real image
files, and the store is read to see that each change arrived; Ctrl-C ends it with status 130
and a store that verifies clean. Every wait is for a condition with a generous deadline, never
a sleep that decides an outcome. The coalescing of events (:class:`imgstore.watch.Pending`) is
tested on its own, against a model file system, with hypothesis."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgstore import ImageStore
from imgstore.errors import ConfigError, NotFoundError
from imgstore.models import Image as ImageRow
from imgstore.models import ImagePath
from imgstore.watch import Change, Pending, Watcher, is_under, watched_folders
from PIL import Image, ImageEnhance
from sqlalchemy import select

from .helpers import PHOTOS, ctrl_c_default, photo

EXE = str(Path(sys.executable).with_name("imgstore"))
#: Generous: a deadline only bounds a wait for a condition, it never decides an outcome.
DEADLINE_S = 300


# --- helpers ---------------------------------------------------------------------------------------


def make_images(folder: Path, n: int, stem: str = "img", offset: int = 0) -> list[Path]:
    """``n`` distinct small photos (crops of scikit-image's, each of other pixels), JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(offset, offset + n):
        src = photo(PHOTOS[i % len(PHOTOS)])
        x, y = (i * 37) % (src.width - 96), (i * 53) % (src.height - 96)
        img = ImageEnhance.Brightness(src.crop((x, y, x + 96, y + 96))).enhance(0.7 + (i % 13) * 0.05)
        path = folder / f"{stem}_{i:04d}.{'png' if i % 3 == 0 else 'jpg'}"
        img.save(path, quality=90) if path.suffix == ".jpg" else img.save(path)
        out.append(path)
    return out


def sha(path: Path | bytes) -> str:
    return hashlib.sha256(path if isinstance(path, bytes) else path.read_bytes()).hexdigest()


def current_paths(db_url: str) -> dict[str, str]:
    """Every current path in the store with the content hash of its image."""
    with ImageStore(db_url) as store, store.engine.connect() as conn:
        rows = conn.execute(select(ImagePath.path, ImageRow.sha256).join(ImageRow, ImageRow.id == ImagePath.image_id)
                            .where(ImagePath.is_current.is_(True))).all()
    return {str(path): str(digest) for path, digest in rows}


def holds(db_url: str, files: dict[Path, str], *, exactly: bool = False) -> Callable[[], bool]:
    """A condition: the store's current paths include (or are exactly) ``files`` with those contents."""
    want = {str(p): digest for p, digest in files.items()}

    def check() -> bool:
        found = current_paths(db_url)
        return found == want if exactly else all(found.get(p) == d for p, d in want.items())

    return check


def wait_until(what: str, ready: Callable[[], bool], *procs: subprocess.Popen[str]) -> None:
    """Poll ``ready()`` until true; fail at once if one of ``procs`` exits meanwhile."""
    deadline = time.monotonic() + DEADLINE_S
    while not ready():
        for proc in procs:
            if proc.poll() is not None:
                pytest.fail(f"waiting for {what}: {proc.args[:5]} exited {proc.returncode}")
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def imgstore(db_url: str, *args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([EXE, "--db", db_url, *args], capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == status, f"imgstore {' '.join(args)}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def assert_verify_clean(db_url: str) -> None:
    """``imgstore verify --json``: consistent, and every current path's file as it was stored."""
    report = json.loads(imgstore(db_url, "verify", "--json").stdout)
    assert report == {"images_without_features": [], "missing_codes": {}, "bucket_mismatch": {}, "dangling_rows": 0,
                      "vanished_files": [], "changed_files": [], "ok": True}


class Process:
    """An ``imgstore`` command as a process, its stdout and stderr read by threads as they come."""

    def __init__(self, args: list[str]) -> None:
        # PYTHONFAULTHANDLER: a child that outlives its deadline is sent SIGABRT, and prints every
        # thread's stack before it dies (see interrupt)
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default,
                                     env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for reader in self.readers:
            reader.start()

    @staticmethod
    def _read(stream: Any, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def interrupt(self) -> int:
        """Ctrl-C; returns the exit status. A process still running after :data:`DEADLINE_S`
        fails the test with every one of its threads' stacks (faulthandler's, on SIGABRT)."""
        self.proc.send_signal(signal.SIGINT)
        try:
            status = self.proc.wait(timeout=DEADLINE_S)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGABRT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=60)
            self.proc.kill()
            for reader in self.readers:
                reader.join(timeout=60)
            raise AssertionError(f"{self.proc.args!r:.200} did not exit within {DEADLINE_S} s of Ctrl-C; its output "
                                 f"and its threads' stacks then:\n{self.output[-30000:]}") from None
        finally:
            self.proc.kill()
        for reader in self.readers:
            reader.join(timeout=60)
        return status

    @property
    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)


class Watch(Process):
    """``imgstore watch FOLDER --json`` (colour features: hundreds of images a second)."""

    def __init__(self, db_url: str, *folders: Path, extra: tuple[str, ...] = ()) -> None:
        super().__init__([EXE, "--db", db_url, "watch", *map(str, folders), "--extractor", "color", "--json", *extra])

    @property
    def batches(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in list(self.out) if line.startswith("{")]

    def wait_for(self, what: str, ready: Callable[[], bool]) -> None:
        wait_until(what, ready, self.proc)

    def stop(self) -> str:
        """Ctrl-C: exit 130, one line saying so, no traceback."""
        status = self.interrupt()
        assert status == 130, self.output
        assert "Traceback" not in self.output, self.output
        assert "interrupted" in "".join(self.err)
        return self.output


def rescanned(watch: Watch) -> Callable[[], bool]:
    return lambda: any(b["rescanned"] for b in watch.batches)


# --- the command -----------------------------------------------------------------------------------


def test_watch_follows_new_changed_moved_and_deleted_files(db_url: str, tmp_path: Path) -> None:
    """New files (a new sub-folder too) are ingested once complete; a file rewritten in place gets
    its new image; a renamed file keeps its image at its new path; a deleted file's path is no
    longer current and its image leaves search results; sidecars and videos are ignored."""
    folder = tmp_path / "photos"
    first = make_images(folder, 3, "first")
    watch = Watch(db_url, folder)
    try:
        watch.wait_for("the start's rescan", rescanned(watch))
        watch.wait_for("the files there before", holds(db_url, {p: sha(p) for p in first}))
        new = make_images(folder / "2024" / "trip", 4, "new", offset=10)
        (folder / "2024" / "trip" / "new_0010.xmp").write_text("<x:xmpmeta/>")  # a sidecar
        (folder / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
        watch.wait_for("the new files", holds(db_url, {p: sha(p) for p in new}))

        changed = first[0]
        with ImageStore(db_url) as store:
            old_id = store.image(str(changed)).id
        make_images(tmp_path / "elsewhere", 1, "other", offset=40)[0].replace(changed)  # rewritten: renamed over it
        watch.wait_for("the changed file's new image", holds(db_url, {changed: sha(changed)}))

        moved_from, moved_to = new[0], folder / "renamed.png"
        with ImageStore(db_url) as store:
            moved_id = store.image(str(moved_from)).id
        os.rename(moved_from, moved_to)
        deleted = new[1]
        deleted_bytes = deleted.read_bytes()
        deleted.unlink()
        expected = {p: sha(p) for p in [*first, *new[2:], moved_to]}
        watch.wait_for("the rename and the deletion", holds(db_url, expected, exactly=True))

        in_place = new[2]
        with open(in_place, "wb") as f:  # rewritten in place: no new file, one close after writing
            f.write(make_images(tmp_path / "elsewhere", 1, "third", offset=70)[0].read_bytes())
        expected[in_place] = sha(in_place)
        watch.wait_for("the file rewritten in place", holds(db_url, expected, exactly=True))
    finally:
        output = watch.stop()

    with ImageStore(db_url) as store:
        assert store.image(str(moved_to)).id == moved_id  # the same image, at its new path
        assert store.image(str(changed)).id != old_id  # the new content is a new image; the old one is history
        hits = store.search(deleted_bytes, k=100)
        assert sha(deleted_bytes) not in {store.image(h.image_id).sha256 for h in hits}, "a deleted photo is still found"
        assert store.errors() == []  # the sidecar and the video were never tried
    batches = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert [str(moved_from), str(moved_to)] in [m for b in batches for m in b["paths"]["moved"]]
    assert str(deleted) in [p for b in batches for p in b["paths"]["removed"]]
    assert str(changed) in [p for b in batches for p in b["paths"]["updated"]]
    assert_verify_clean(db_url)


def test_the_start_rescans_what_changed_while_nothing_watched(db_url: str, tmp_path: Path) -> None:
    """Stopped, then files are added, deleted and rewritten: the next start's rescan finds each
    change, as `imgstore ingest FOLDER` would, before any new event."""
    folder = tmp_path / "photos"
    files = make_images(folder, 6)
    watch = Watch(db_url, folder)
    try:
        watch.wait_for("the first files", holds(db_url, {p: sha(p) for p in files}, exactly=True))
    finally:
        watch.stop()

    added = make_images(folder / "later", 3, "later", offset=20)
    files[0].unlink()
    files[1].write_bytes(make_images(tmp_path / "elsewhere", 1, "other", offset=50)[0].read_bytes())
    expected = {p: sha(p) for p in [*files[1:], *added]}
    watch = Watch(db_url, folder)
    try:
        watch.wait_for("what changed meanwhile", holds(db_url, expected, exactly=True))
        watch.wait_for("the rescan's line", rescanned(watch))
    finally:
        watch.stop()
    assert_verify_clean(db_url)


def test_a_burst_of_copies_is_absorbed_without_losing_one(db_url: str, tmp_path: Path) -> None:
    """300 files copied as fast as the disk takes them (a third into a folder made during the
    burst), crossing the automatic index's threshold: every one arrives, each exactly once, in
    several batches; the index holds every image."""
    source = tmp_path / "camera"
    images = make_images(source, 300, "burst")
    folder = tmp_path / "photos"
    folder.mkdir()
    watch = Watch(db_url, folder)
    try:
        watch.wait_for("the start's rescan", rescanned(watch))
        copies = []
        for i, src in enumerate(images):
            target = folder / ("new-album" if i % 3 == 0 else "") / src.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(src, target)
            copies.append(target)
        watch.wait_for("every copy", holds(db_url, {p: sha(p) for p in copies}, exactly=True))
        watch.wait_for("a line for every copy", lambda: sum(b["added"] for b in watch.batches) >= len(copies))
        watch.wait_for("the default index", lambda: json.loads(imgstore(db_url, "index", "list", "--json").stdout) != [])
    finally:
        watch.stop()
    batches = [b for b in watch.batches if not b["rescanned"]]
    assert sorted(p for b in batches for p in b["paths"]["added"]) == sorted(map(str, copies)), "a file twice or never"
    assert len(batches) > 1
    indexes = json.loads(imgstore(db_url, "index", "list", "--json").stdout)
    assert [i["n_codes"] for i in indexes] == [300]
    assert_verify_clean(db_url)


def test_ctrl_c_in_a_burst_exits_130_and_leaves_nothing_half_written(db_url: str, tmp_path: Path) -> None:
    """Ctrl-C as soon as the first batch of a burst is written (whatever the race: before or after
    later ones): exit 130, a store that verifies clean, and the next start finds the rest."""
    folder = tmp_path / "photos"
    folder.mkdir()
    watch = Watch(db_url, folder, extra=("--batch-size", "8"))
    watch.wait_for("the start's rescan", rescanned(watch))
    images = make_images(tmp_path / "camera", 120, "burst")
    copies = []
    for src in images:
        shutil.copyfile(src, folder / src.name)
        copies.append(folder / src.name)
    watch.wait_for("a first batch", lambda: any(b["added"] for b in watch.batches))
    watch.stop()
    assert_verify_clean(db_url)

    watch = Watch(db_url, folder)
    try:
        watch.wait_for("the start's rescan", rescanned(watch))  # (the first run may have finished them all)
        watch.wait_for("the rest", holds(db_url, {p: sha(p) for p in copies}, exactly=True))
    finally:
        watch.stop()
    assert_verify_clean(db_url)


def test_watch_refuses_a_missing_folder_in_one_line_and_creates_no_store(tmp_path: Path) -> None:
    db = tmp_path / "new.db"
    done = imgstore(str(db), "watch", str(tmp_path / "nowhere"), status=1)
    assert done.stderr.strip().splitlines() == [f"Error: no such folder: {tmp_path / 'nowhere'}"]
    assert not db.exists()
    done = imgstore(str(db), "serve", "--watch", str(tmp_path / "nowhere"), status=1)
    assert "no such folder" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = imgstore(str(db), "serve", "--watch", str(tmp_path), "--workers", "2", status=2)
    assert "--watch runs in one server process" in done.stderr


def test_lost_events_fall_back_to_a_rescan(db_url: str, tmp_path: Path) -> None:
    """When the kernel drops events (its queue overflowed: watchdog's EventsLostEvent), the
    folder is rescanned: a file no event announced is found. In process, the loss injected."""
    folder = tmp_path / "photos"
    unseen = make_images(folder / "sub", 2, "unseen")  # there before the watch, and no start rescan
    lines: list[Any] = []
    with ImageStore(db_url) as store:
        watcher = Watcher(store, [folder], extractor="color", rescan=False, on_batch=lines.append)
        watcher.start()
        try:
            assert watcher.watching.wait(DEADLINE_S)
            watcher.add(Change("lost", str(folder)))  # what the observer's EventsLostEvent becomes
            wait_until("the rescan", lambda: any(b.rescanned for b in lines))
            wait_until("the unseen files", holds(db_url, {p: sha(p) for p in unseen}, exactly=True))
        finally:
            watcher.stop()
    assert sorted(p for b in lines for p in b.added) == sorted(map(str, unseen))


def test_a_watch_that_stops_is_started_again_with_a_rescan(db_url: str, tmp_path: Path) -> None:
    """watchdog's threads end (an error inside it): the watcher notices, watches again, and
    rescans, so a file written meanwhile is found. In process, the observer's watches stopped."""
    folder = tmp_path / "photos"
    folder.mkdir()
    lines: list[Any] = []
    messages: list[str] = []
    with ImageStore(db_url) as store:
        watcher = Watcher(store, [folder], extractor="color", on_batch=lines.append, on_message=messages.append)
        watcher.start()
        try:
            assert watcher.watching.wait(DEADLINE_S)
            wait_until("the start's rescan", lambda: any(b.rescanned for b in lines))
            assert watcher._observer is not None
            for emitter in list(watcher._observer.emitters):
                emitter.stop()  # as if it had failed
            missed = make_images(folder, 1, "missed")
            wait_until("a second rescan", lambda: sum(bool(b.rescanned) for b in lines) >= 2)
            wait_until("the file written meanwhile", holds(db_url, {p: sha(p) for p in missed}, exactly=True))
        finally:
            watcher.stop()
    assert messages == ["the file-system watch stopped; watching again, and rescanning the folders"]


def test_watched_folders_are_checked_and_nested_ones_covered(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "file.jpg").write_bytes(b"")
    assert watched_folders([tmp_path / "a" / "b", tmp_path / "a", str(tmp_path / "a") + "/"]) == [str(tmp_path / "a")]
    with pytest.raises(NotFoundError, match="no such folder"):
        watched_folders([tmp_path / "nowhere"])
    with pytest.raises(ConfigError, match="not a folder"):
        watched_folders([tmp_path / "file.jpg"])


# --- serve --watch ---------------------------------------------------------------------------------


class Server(Process):
    """``imgstore serve --port 0 --watch FOLDER`` and an HTTP client for it."""

    def __init__(self, db_url: str, folder: Path) -> None:
        super().__init__([EXE, "--db", db_url, "serve", "--port", "0", "--watch", str(folder)])
        found: list[int] = []

        def port() -> bool:
            found[:] = [int(m.group(1)) for line in list(self.err) if (m := re.search(r"open http://[^:]+:(\d+)/", line))]
            return bool(found)

        wait_until("the server's address", port, self.proc)
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{found[0]}", timeout=DEADLINE_S)

        def answers() -> bool:  # the address is said before the server listens
            try:
                return self.http.get("/api/info").status_code == 200
            except httpx.TransportError:
                return False

        wait_until("the server to answer", answers, self.proc)

    def found(self, data: bytes) -> set[str]:
        """Every path of the images the server's search by upload returns for ``data``."""
        response = self.http.post("/api/search", params={"k": 50}, files={"image": ("q.png", data, "image/png")})
        assert response.status_code == 200, response.text
        return {p for hit in response.json() for p in hit["paths"]}

    def stop(self) -> str:
        self.http.close()
        status = self.interrupt()
        assert status == 0, self.output  # a server's Ctrl-C is a normal end
        assert "Traceback" not in self.output, self.output
        return self.output


def png(path: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(path) as img:
        img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def test_serve_watch_makes_new_files_searchable_through_the_server(db_url: str, tmp_path: Path) -> None:
    """A server with an index (its codes in memory) and a watched folder: a file written there is
    found by the server's own search within the deadline (the watcher ingests it in the server's
    process, the code cache's refresher merges it); a deleted one stops being found."""
    folder = tmp_path / "photos"
    base = make_images(folder, 12, "base")
    with ImageStore(db_url) as store:
        store.ingest([folder], extractor="color")
        store.create_index("lsh", 32, extractor="color")
    server = Server(db_url, folder)
    try:
        new = make_images(folder / "new", 3, "new", offset=30)
        for path in new:
            wait_until(f"the server to find {path.name}", lambda path=path: str(path) in server.found(png(path)),
                       server.proc)
        query = png(base[0])
        assert str(base[0]) in server.found(query)
        base[0].unlink()
        wait_until("the server to stop finding a deleted file", lambda: str(base[0]) not in server.found(query),
                   server.proc)
        info = server.http.get("/api/info").json()
        assert info["images"] == 15
    finally:
        output = server.stop()
    assert "watch: added" in output and "watch: added 0, updated 0, moved 0, removed 1" in output
    assert_verify_clean(db_url)


# --- the coalescing of events, against a model file system ----------------------------------------

DIRS = ["/w/a", "/w/b", "/w/c"]
NAMES = ["1.jpg", "2.png", "3.xmp", "4.heic"]
PATHS = [f"{d}/{n}" for d in DIRS for n in NAMES]
IMAGE = {p for p in PATHS if not p.endswith(".xmp")}

ops = st.lists(st.one_of(
    st.tuples(st.just("create"), st.sampled_from(PATHS)),  # written and closed
    st.tuples(st.just("begin"), st.sampled_from(PATHS)),  # created, still being written
    st.tuples(st.just("finish"), st.sampled_from(PATHS)),  # the writer closes it
    st.tuples(st.just("rewrite"), st.sampled_from(PATHS)),  # an existing file written in place
    st.tuples(st.just("delete"), st.sampled_from(PATHS)),
    st.tuples(st.just("rename"), st.sampled_from(PATHS), st.sampled_from(PATHS)),
    st.tuples(st.just("rename_dir"), st.sampled_from(DIRS), st.sampled_from(DIRS)),
), max_size=40)


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(ops=ops, before=st.sets(st.sampled_from(PATHS)))
def test_pending_coalesces_events_into_what_the_folder_holds(ops: list[tuple[str, ...]], before: set[str]) -> None:
    """Events as inotify reports them for a random sequence of file operations (``before``: files
    there at the start, stored), coalesced, then taken: every image file that exists at the end
    is to be ingested (or lies in a folder to walk), every one that went is to be marked (itself,
    or its folder), never both; a file still being written is not handed over before it settled
    unless something said it is complete; a rename is reported from where its content was first
    seen."""
    pending = Pending(settle_s=5.0)
    note = f"ops={ops!r} before={sorted(before)!r}"
    files: dict[str, tuple[int, bool]] = {p: (n, True) for n, p in enumerate(sorted(before))}  # path -> (content, complete)
    history: dict[int, list[str]] = {content: [p] for p, (content, _) in files.items()}  # where each content has been
    touched: set[str] = set()
    next_content = len(files)
    now = 0.0

    def event(kind: str, path: str, dest: str = "") -> None:
        pending.add(Change(kind, path, dest), now)  # type: ignore[arg-type]

    for op in ops:
        now += 1.0
        kind, path = op[0], op[1]
        if kind in ("create", "begin") and path not in files:
            # a file under a name the watcher ignores counts as complete: renamed to an image's
            # name, it is taken as a finished download (``x.jpg.part`` -> ``x.jpg``)
            files[path] = (next_content, kind == "create" or path not in IMAGE)
            history[next_content] = [path]
            next_content += 1
            event("created", path)
            if kind == "create":
                event("closed", path)
        elif kind == "finish" and path in files and not files[path][1]:
            files[path] = (files[path][0], True)
            event("closed", path)
        elif kind == "rewrite" and path in files and files[path][1]:
            files[path] = (next_content, True)
            history[next_content] = [path]
            next_content += 1
            event("closed", path)
        elif kind == "delete" and path in files:
            del files[path]
            event("deleted", path)
        elif kind == "rename" and path in files and op[2] != path:
            content, complete = files.pop(path)
            files[op[2]] = (content, complete or op[2] not in IMAGE)  # under an ignored name: complete, as above
            history[content].append(op[2])
            event("moved", path, op[2])
            touched.add(op[2])
        elif kind == "rename_dir" and op[2] != path and not any(is_under(p, op[2]) for p in files):
            inside = sorted(p for p in files if is_under(p, path))
            for p in inside:
                files[op[2] + p[len(path):]] = files.pop(p)
                history[files[op[2] + p[len(path):]][0]].append(op[2] + p[len(path):])
            event("dir_moved", path, op[2])
            for p in inside:  # watchdog reports each file of a renamed folder as moved too
                event("moved", p, op[2] + p[len(path):])
            touched.update(op[2] + p[len(path):] for p in inside)
        else:
            continue
        touched.add(path)

    waiting = copy.deepcopy(pending)
    waiting.settle_s = 1e6
    early = waiting.take(now, limit=10**6)  # nothing has settled yet
    assert not set(early.files) & {p for p, (_, complete) in files.items() if not complete}, f"handed over half-written: {note}"

    batch = pending.take(now + 10.0, limit=10**6)
    assert len(pending) == 0
    assert len(batch.files) == len(set(batch.files))
    assert not set(batch.files) & set(batch.gone)
    for path in touched & IMAGE:
        if path in files:
            assert path in batch.files or any(is_under(path, d) for d in batch.scans), f"{path} exists but is not taken: {note}"
            assert (path in batch.closed) == files[path][1] or path not in batch.files, note
        else:
            assert any(is_under(path, g) for g in batch.gone), f"{path} went but is not marked: {note}"
    for dest, src in batch.moves.items():  # from the first place the watcher saw it at (since its last ignored name)
        seen = history[files[dest][0]]
        ignored = [i for i, p in enumerate(seen) if p not in IMAGE]
        assert dest in files and seen[ignored[-1] + 1 if ignored else 0] == src, f"{dest} reported as moved from {src}: {note}"
