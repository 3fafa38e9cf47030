"""One store, one context: caches never cross stores, an index re-created behind an open store is
picked up, dedup works without an index, and every public method answers a broken or unreachable
database with the project's own error (never a driver exception)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from imgstore import ImageStore
from imgstore.db import resolve_url
from imgstore.errors import DatabaseError, ImgStoreError
from imgstore.indexing import create_index

from .helpers import PHOTOS, photo, populate

DIM = 24


def vectors(seed: int, n: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((12, DIM))
    return (centres[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, DIM))).astype(np.float32)


def build(url: str, seed: int) -> None:
    """A store of synthetic vectors with one LSH index (id 1 in a fresh database), whose random
    hyperplanes depend on ``seed``."""
    with ImageStore(url) as store:
        store.transaction(lambda conn: create_index(conn, populate(conn, vectors(seed)), method="lsh", n_bits=32,
                                                    n_bands=2, random_state=seed))


def answers(store: ImageStore, queries: np.ndarray, cached: bool) -> list[list[tuple[int, int | None]]]:
    got = store.search_many(list(queries), k=8, rerank=False, cached=cached)
    return [[(r.image_id, r.distance) for r in res] for res in got]


@pytest.mark.parametrize("cached", [False, True], ids=["sql", "cache"])
def test_two_stores_with_the_same_index_id_answer_as_when_alone(db_url: str, tmp_path: Path, cached: bool) -> None:
    other = str(tmp_path / "other.db")
    build(db_url, seed=1)
    build(other, seed=2)
    queries = vectors(9, n=6)
    with ImageStore(db_url) as a:
        assert [i.id for i in a.indexes()] == [1]
        alone_a = answers(a, queries, cached)
    with ImageStore(other) as b:
        assert [i.id for i in b.indexes()] == [1]
        alone_b = answers(b, queries, cached)
    assert alone_a != alone_b  # different hyperplanes: the test can tell the hashers apart
    with ImageStore(db_url) as a, ImageStore(other) as b:
        for _ in range(2):  # interleaved, so each store's caches are warm when the other asks
            assert answers(a, queries, cached) == alone_a
            assert answers(b, queries, cached) == alone_b


def test_index_rebuilt_by_another_store_is_picked_up(db_url: str) -> None:
    build(db_url, seed=1)
    queries = vectors(9, n=6)
    with ImageStore(db_url, cache_codes=True) as long_lived:
        before = answers(long_lived, queries, cached=True)
        answers(long_lived, queries, cached=False)  # both paths have a hasher and codes in memory
        with ImageStore(db_url) as other:
            old = other.indexes()[0]
            other.drop_index(old.id)
            other.transaction(lambda conn: create_index(conn, old.space_id, method="lsh", n_bits=32, n_bands=2,
                                                        random_state=7))
            new = other.indexes()[0]
        if long_lived.url.get_backend_name() == "sqlite":
            assert new.id == old.id and new.generation == old.generation  # what used to fool the caches
        assert new.uid != old.uid
        with ImageStore(db_url) as fresh:
            want_sql, want_cache = answers(fresh, queries, cached=False), answers(fresh, queries, cached=True)
        assert want_cache != before
        assert answers(long_lived, queries, cached=True) == want_cache
        assert answers(long_lived, queries, cached=False) == want_sql


def copies_folder(root: Path) -> int:
    """Each test photo as PNG, plus a copy resized by half and re-saved as JPEG. Returns the
    number of originals."""
    root.mkdir(parents=True)
    for name in PHOTOS:
        img = photo(name)
        img.save(root / f"{name}.png")
        img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR).save(root / f"{name}_half.jpg", quality=85)
    return len(PHOTOS)


def near_pairs(groups: list[Any]) -> set[frozenset[str]]:
    out = set()
    for g in groups:
        names = sorted(Path(p).name for m in g.members for p in m.paths)
        out |= {frozenset((a, b)) for i, a in enumerate(names) for b in names[i + 1 :]}
    return out


def test_dedup_without_an_index_finds_the_copies(db_url: str, tmp_path: Path) -> None:
    n = copies_folder(tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"], auto_index=False)
        assert store.indexes() == []
        groups = store.find_duplicates()
        found = near_pairs(groups)
        for name in PHOTOS:
            assert frozenset((f"{name}.png", f"{name}_half.jpg")) in found, name
        assert len(groups) == n and all(len(g.members) == 2 for g in groups)
        # an index finds no pair the exact path missed
        store.create_index("lsh", 32)
        assert near_pairs(store.find_duplicates()) <= found


def test_dedup_without_an_index_above_the_all_pairs_limit(sqlite_url: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A store too large for all pairs gets a temporary in-memory index: nothing is stored, and
    the copies are still found."""
    import imgstore.dedup

    copies_folder(tmp_path / "photos")
    monkeypatch.setattr(imgstore.dedup, "ALL_PAIRS_MAX", 5)
    with ImageStore(sqlite_url) as store:
        store.ingest([tmp_path / "photos"], auto_index=False)
        found = near_pairs(store.find_duplicates())
        assert store.indexes() == [] and store.counts().codes == 0
    for name in PHOTOS:
        assert frozenset((f"{name}.png", f"{name}_half.jpg")) in found, name


# --- broken and unreachable databases ---------------------------------------------------------


def every_public_method(store: ImageStore, image_file: Path) -> dict[str, Any]:
    vec = np.zeros(1280, dtype=np.float32)
    return {
        "schema_status": lambda: store.schema_status(),
        "counts": lambda: store.counts(),
        "errors": lambda: store.errors(),
        "image": lambda: store.image(1),
        "remove": lambda: store.remove([1]),
        "export_rows": lambda: list(store.export_rows(neighbours=2)),
        "feature_spaces": lambda: store.feature_spaces(),
        "ingest": lambda: store.ingest([image_file.parent], extractor="color"),
        "add": lambda: store.add(image_file.read_bytes(), extractor="color"),
        "add_many": lambda: store.add_many([image_file], extractor="color"),
        "create_index": lambda: store.create_index("lsh", 32),
        "indexes": lambda: store.indexes(),
        "activate_index": lambda: store.activate_index(1),
        "drop_index": lambda: store.drop_index(1),
        "search": lambda: store.search(vec, k=3),
        "search_cached": lambda: store.search(1, k=3, cached=True),
        "search_many": lambda: store.search_many([1, vec], k=3),
        "find_duplicates": lambda: store.find_duplicates(),
        "verify": lambda: store.verify(),
        "info": lambda: store.info(),
        "transaction": lambda: store.transaction(lambda conn: conn.exec_driver_sql("SELECT 1")),
        "upgrade": lambda: store.upgrade(),
        "downgrade": lambda: store.downgrade("base"),
    }


def assert_own_errors(store: ImageStore, image_file: Path) -> None:
    for name, call in every_public_method(store, image_file).items():
        with pytest.raises(ImgStoreError) as info:
            call()
        assert not isinstance(info.value, SQLAlchemyError), name
        assert "\n" not in str(info.value) and str(info.value), name


@pytest.fixture
def one_image(tmp_path: Path) -> Path:
    folder = tmp_path / "one"
    folder.mkdir()
    photo("chelsea").save(folder / "chelsea.png")
    return folder / "chelsea.png"


@pytest.mark.postgres
def test_unreachable_database(pg_url: str, one_image: Path) -> None:
    url = resolve_url(pg_url).set(port=1).render_as_string(hide_password=False)
    with pytest.raises(DatabaseError, match="cannot open"):
        ImageStore(url)
    with ImageStore(url, check_schema=False) as store:
        assert_own_errors(store, one_image)


def test_broken_sqlite_file(tmp_path: Path, one_image: Path) -> None:
    path = tmp_path / "broken.db"
    with ImageStore(path) as store:
        store.ingest([one_image.parent], extractor="color")
        store.close()  # the file is replaced behind the store's back while it stays "open"
        for suffix in ("-wal", "-shm"):
            if os.path.exists(f"{path}{suffix}"):
                os.remove(f"{path}{suffix}")
        path.write_bytes(b"this is not an SQLite database" * 100)
        assert_own_errors(store, one_image)


@pytest.mark.parametrize("table", ["image_paths", "images", "code_buckets", "features"])
def test_table_missing_behind_the_store(db_url: str, tmp_path: Path, one_image: Path, table: str) -> None:
    """Reads that used to bypass the error translation (ingest's look-ups of known paths and
    hashes, the automatic index check) answer with DatabaseError too."""
    with ImageStore(db_url) as store:
        store.ingest([one_image.parent], extractor="color")
        store.create_index("lsh", 32, extractor="color")
        with store.engine.begin() as conn:
            conn.exec_driver_sql(f"DROP TABLE {table} CASCADE" if conn.dialect.name == "postgresql" else f"DROP TABLE {table}")
        other = tmp_path / "more"
        other.mkdir()
        photo("rocket").save(other / "rocket.png")
        for call in (lambda: store.ingest([other], extractor="color"), lambda: store.search(1, k=1),
                     lambda: store.find_duplicates(), lambda: store.verify(), lambda: store.info()):
            try:
                call()
            except ImgStoreError as exc:
                assert not isinstance(exc, SQLAlchemyError) and "\n" not in str(exc)
