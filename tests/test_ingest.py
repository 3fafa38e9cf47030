"""Ingest on SQLite and PostgreSQL with real files: counts, duplicates, bad files, incremental
runs, changed and moved files, and a kill -9 midway."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from imgstore import ImageStore
from imgstore.errors import DecodeError, NotFoundError
from imgstore.models import Code, Feature, HashIndex, Image as ImageRow

from .helpers import make_collection, photo, write_variants


def check_consistent(store: ImageStore) -> dict[str, int]:
    """Every image has features in every space it belongs to and a code in every index."""
    with store.engine.connect() as conn:
        n_images = conn.scalar(select(func.count()).select_from(ImageRow))
        n_features = conn.scalar(select(func.count()).select_from(Feature))
        assert n_features == n_images
        for hasher_id in conn.scalars(select(HashIndex.id)):
            n_codes = conn.scalar(select(func.count()).select_from(Code).where(Code.hasher_id == hasher_id))
            assert n_codes == n_images, f"index {hasher_id}: {n_codes} codes for {n_images} images"
        orphans = conn.scalar(select(func.count()).select_from(ImageRow).where(~ImageRow.paths.any()))
        assert orphans == 0
    return store.counts()


def test_ingest_twice_counts_and_errors(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    expected = make_collection(root)
    with ImageStore(db_url) as store:
        s1 = store.ingest([root], extractor="color", batch_size=8)
        assert (s1.added, s1.duplicates, s1.failed) == (expected["images"], 1, expected["failed"])
        counts = check_consistent(store)
        assert counts.images == expected["images"]
        assert counts.paths == expected["paths"]
        errors = {Path(e.path).name: e.reason for e in store.errors()}
        assert set(errors) == {"truncated.jpg", "notes.jpg"}
        assert "not a recognised image format" in errors["notes.jpg"]

        s2 = store.ingest([root], extractor="color", batch_size=8)
        assert (s2.added, s2.duplicates, s2.unchanged) == (0, 0, expected["paths"])
        assert store.counts().images == expected["images"]


def test_changed_and_moved_files(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    files = write_variants(photo("coffee"), root, "coffee", 4)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        old_id = store.image(str(files[0])).id
        # changed content at the same path: a new image, the old path row kept as history
        photo("rocket").save(files[0])
        os.utime(files[0], ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
        s = store.ingest([root], extractor="color")
        assert s.added == 1 and s.unchanged == 3
        new = store.image(str(files[0]))
        assert new.id != old_id
        old_paths = store.image(old_id).paths
        assert [p.is_current for p in old_paths] == [False]
        # moved: same bytes at a new path, no new image
        moved = root / "moved.jpg"
        files[1].rename(moved)
        s = store.ingest([root], extractor="color")
        assert s.added == 0 and s.duplicates == 1
        assert str(moved) in [p.path for p in store.image(str(moved)).paths]
        check_consistent(store)


def test_add_api_bytes_pil_and_bad_input(db_url: str, tmp_path: Path) -> None:
    img = photo("astronaut").resize((128, 128))
    path = tmp_path / "a.png"
    img.save(path)
    with ImageStore(db_url) as store:
        id_file = store.add(path, extractor="color")
        assert store.add(path.read_bytes(), extractor="color") == id_file  # same bytes, same image
        id_pil = store.add(img.rotate(90), extractor="color")
        assert id_pil != id_file
        with pytest.raises(DecodeError):
            store.add(b"not an image at all", extractor="color")
        with pytest.raises(DecodeError, match="not found"):
            store.add(tmp_path / "missing.png", extractor="color")
        assert store.counts().images == 2


def test_default_index_built_automatically(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgstore.indexing as indexing

    monkeypatch.setattr(indexing, "AUTO_INDEX_MIN_IMAGES", 20)
    root = tmp_path / "photos"
    make_collection(root, per_photo=3)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        infos = store.indexes()
        assert len(infos) == 1 and infos[0].is_active and infos[0].config["auto"]
        check_consistent(store)
        # later images get codes in every index of their space
        write_variants(photo("horse"), root / "more", "horse", 2)
        store.ingest([root], extractor="color")
        check_consistent(store)


KILL_SCRIPT = """
import sys
from imgstore import ImageStore
with ImageStore(sys.argv[1]) as store:
    store.ingest([sys.argv[2]], extractor="color", batch_size=4, workers=1)
"""


def test_kill_9_midway_then_rerun_completes(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    expected = make_collection(root, per_photo=8)
    with ImageStore(db_url):
        pass  # create the schema first
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, db_url, str(root)])
    try:
        deadline = time.time() + 120
        with ImageStore(db_url) as store:
            while time.time() < deadline and proc.poll() is None:
                if store.counts().images >= 8:
                    break
                time.sleep(0.05)
        assert proc.poll() is None, "ingest finished before it could be killed; make the set bigger"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    with ImageStore(db_url) as store:
        partial = check_consistent(store)
        assert 0 < partial.images < expected["images"]
        s = store.ingest([root], extractor="color")
        counts = check_consistent(store)
        assert counts.images == expected["images"]
        assert counts.paths == expected["paths"]
        assert s.added == expected["images"] - partial.images


def test_unreadable_inputs_do_not_stop_ingest(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root, "cat", 2)
    (root / "dir.jpg").mkdir()  # a directory named like an image
    loop = root / "loop"
    loop.symlink_to(root)  # a symlink loop: skipped by default, detected when following
    with ImageStore(db_url) as store:
        with pytest.raises(NotFoundError, match="missing"):  # a mistyped folder stops before any work
            store.ingest([root, tmp_path / "missing"], extractor="color")
        assert store.counts().images == 0
        s = store.ingest([root], extractor="color")
        assert s.added == 2
        s = store.ingest([root], extractor="color", follow_symlinks=True)
        assert any("loop" in r for _, r in s.errors)
        assert store.counts().images == 2


def test_second_extractor_processes_unchanged_files(db_url: str, tmp_path: Path) -> None:
    """Unchanged files are skipped only for a feature space that already has them."""
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root, "cat", 2)
    with ImageStore(db_url) as store:
        assert store.ingest([root], extractor="color").added == 2
        again = store.ingest([root], extractor="efficientnet-lite0", auto_index=False)
        assert (again.added, again.unchanged) == (2, 0)
        assert store.counts().images == 2 and store.counts().features == 4
        assert store.ingest([root], extractor="efficientnet-lite0").unchanged == 2


def test_writes_join_batches_and_keep_blas_on_one_thread(tmp_path: Path) -> None:
    """``write_size`` joins consecutive batches into one transaction (as a cluster worker writes
    its partition) with the same result as batch by batch; while writing, numpy's BLAS runs on
    one thread (a second one only spun beside the small encoding products), and afterwards it
    is as it was."""
    from threadpoolctl import threadpool_info

    from imgstore.features import get_extractor
    from imgstore.ingest import Ingester, _joined
    from imgstore.vectors import get_or_create_space

    assert [len(b) for b in _joined([[1] * 3, [2] * 3, [3] * 3, [4] * 2], 5)] == [6, 5]  # type: ignore[list-item]
    assert [len(b) for b in _joined([[1] * 3], 64)] == [3]  # type: ignore[list-item]

    def blas() -> list[int]:
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas()
    make_collection(tmp_path / "photos", per_photo=2)
    results = {}
    for write_size in (2, 1000):
        seen: list[list[int]] = []
        with ImageStore(tmp_path / f"w{write_size}.db") as store:
            ex = get_extractor("color")
            space_id = store.transaction(lambda conn: get_or_create_space(conn, ex.name, ex.dim, ex.preprocess_version))
            job = Ingester(store.ctx, ex, space_id, batch_size=2, write_size=write_size,
                           progress=lambda _p, s=seen: s.append(blas()))
            summary = job.run([tmp_path / "photos"])
            assert summary.added > 0 and summary.failed == 2  # the collection's two broken files
            results[write_size] = (summary.added, summary.duplicates, summary.failed, store.counts())
            assert seen and all(n == [1] * len(n) for n in seen), seen  # one BLAS thread while writing
            assert len(seen) > 1 if write_size == 2 else len(seen) == 1  # one report per transaction
            check_consistent(store)
        assert blas() == before
    assert results[2] == results[1000]


def test_each_file_is_read_once_and_the_model_run_size_changes_no_feature(tmp_path: Path) -> None:
    """Issue 27: an ingest opens each image file once (the content hash and the decode both come
    from those bytes), and the short model runs of a CPU ingest (16 images, transactions still of
    64) store the very features, labels and signatures that one run of the whole batch stores."""
    import sys
    import threading
    from collections import Counter
    from typing import Any

    from imgstore.features import get_extractor
    from imgstore.ingest import CPU_MODEL_RUN, Ingester
    from imgstore.models import Label
    from imgstore.vectors import get_or_create_space

    from .helpers import PHOTOS

    folder = tmp_path / "photos"
    files = [p for name in PHOTOS[:4] for p in write_variants(photo(name), folder, name, 6)]
    assert len(files) > CPU_MODEL_RUN  # several runs in one transaction
    opened: list[str] = []
    recording = threading.Event()

    def count_opens(event: str, args: tuple[Any, ...]) -> None:  # a process's audit hook stays: it only counts while asked
        if event == "open" and recording.is_set() and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.abspath(os.fsdecode(args[0])))

    sys.addaudithook(count_opens)
    ex = get_extractor("efficientnet-lite0")
    stored = {}
    for run in (CPU_MODEL_RUN, 64):
        with ImageStore(tmp_path / f"run{run}.db") as store:
            space_id = store.transaction(lambda conn: get_or_create_space(conn, ex.name, ex.dim, ex.preprocess_version))
            job = Ingester(store.ctx, ex, space_id, batch_size=64)
            assert job.model_run == CPU_MODEL_RUN
            job.model_run = run
            opened.clear()
            recording.set()
            try:
                summary = job.run([folder])
            finally:
                recording.clear()
            assert summary.added == len(files) and summary.failed == 0
            reads = Counter(opened)
            assert all(reads[str(p)] == 1 for p in files), {p: reads[str(p)] for p in files}
            with store.engine.connect() as conn:
                stored[run] = (
                    conn.execute(select(ImageRow.sha256, Feature.vector).join(Feature, Feature.image_id == ImageRow.id)
                                 .order_by(ImageRow.sha256)).all(),
                    conn.execute(select(ImageRow.sha256, ImageRow.signature, ImageRow.width, ImageRow.height)
                                 .order_by(ImageRow.sha256)).all(),
                    conn.execute(select(ImageRow.sha256, Label.rank, Label.class_id, Label.prob)
                                 .join(Label, Label.image_id == ImageRow.id).order_by(ImageRow.sha256, Label.rank)).all(),
                )
    assert stored[CPU_MODEL_RUN] == stored[64]
