"""The band buckets stay equal to the stored codes through every write: indexing, ingest-time
encoding, crowded buckets split into chunks, concurrent-looking duplicate writes, image
removal and index removal, on SQLite and PostgreSQL; verify notices a damaged bucket."""

from __future__ import annotations

import numpy as np
import pytest
from sqlalchemy import Connection, func, select, text

from imgstore import ImageStore, bandindex
from imgstore.bandindex import scan_codes, write_codes
from imgstore.indexing import create_index, drop_index, list_indexes
from imgstore.models import CodeBucket
from imgstore.search import SqlSource, hamming_search

from .helpers import assert_buckets_match_codes, brute_force, populate


def crowded_vectors(n: int, seed: int = 0) -> np.ndarray:
    """Few distinct directions, so many codes share band values (crowded buckets)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((6, 16))
    return (centres[rng.integers(0, 6, n)] + 0.01 * rng.standard_normal((n, 16))).astype(np.float32)


def test_crowded_buckets_are_chunked_and_survive_removal(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bandindex, "BUCKET_CHUNK", 7)
    vectors = crowded_vectors(300)
    with ImageStore(db_url) as store:
        index_id = store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=2))
        with store.engine.connect() as conn:
            assert_buckets_match_codes(conn, index_id)
            assert conn.execute(select(func.max(CodeBucket.n))).scalar_one() <= 7
            assert conn.execute(select(func.max(CodeBucket.chunk))).scalar_one() >= 5  # crowded buckets split
        # ingest-time encoding appends to the existing buckets, filling their last chunks
        more = crowded_vectors(60, seed=3)

        def add_more(conn: Connection) -> None:
            from imgstore.indexing import encode_images
            from imgstore.models import Image as ImageRow
            from imgstore.sqlhelpers import insert_ignore
            from imgstore.vectors import features_table, vector_to_bytes

            space_id = next(i for i in list_indexes(conn) if i.id == index_id).space_id
            insert_ignore(conn, ImageRow.__table__, [
                {"sha256": f"more{i:060x}", "width": 1, "height": 1, "format": None, "byte_size": 1, "meta": {}} for i in range(60)
            ])
            ids = [r[0] for r in conn.execute(text("SELECT id FROM images WHERE sha256 LIKE 'more%' ORDER BY id"))]
            insert_ignore(conn, features_table, [{"space_id": space_id, "image_id": i, "vector": vector_to_bytes(v)} for i, v in zip(ids, more)])
            encode_images(store.ctx, conn, space_id, np.array(ids), more)
        store.transaction(add_more)
        with store.engine.connect() as conn:
            assert_buckets_match_codes(conn, index_id)
            assert conn.execute(select(func.max(CodeBucket.n))).scalar_one() <= 7
        # writing the same codes again adds nothing (they are already stored)
        def again(conn: Connection) -> int:
            index = next(i for i in list_indexes(conn) if i.id == index_id)
            ids, codes = scan_codes(conn, index)
            return write_codes(conn, index_id, ids, codes, index.n_bands, index.band_width)
        assert store.transaction(again) == 0
        # remove a third of the images, spread over the chunks
        gone = list(range(1, 301, 3))
        store.remove(gone)
        with store.engine.connect() as conn:
            assert_buckets_match_codes(conn, index_id)
            index = next(i for i in list_indexes(conn) if i.id == index_id)
            ids, codes = scan_codes(conn, index)
            assert not set(gone) & set(ids.tolist()) and len(ids) == 360 - len(gone)
            sql = SqlSource(conn, index)
            for q in codes[:5]:
                got = hamming_search(q, index, 20, sql, exact=True)
                assert list(zip(got.image_ids.tolist(), got.distances.tolist())) == brute_force(ids, codes, q, 20)
        assert store.verify(check_files=False).ok
        store.transaction(lambda conn: drop_index(conn, index_id))
        with store.engine.connect() as conn:
            assert conn.execute(select(func.count()).select_from(CodeBucket)).scalar_one() == 0


def test_verify_notices_a_damaged_bucket(db_url: str) -> None:
    vectors = crowded_vectors(50, seed=1)
    with ImageStore(db_url) as store:
        store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=2))
        assert store.verify(check_files=False).ok
        with store.engine.begin() as conn:
            conn.execute(text("DELETE FROM code_buckets WHERE chunk = 0 AND band = 1 AND value = (SELECT min(value) FROM code_buckets WHERE band = 1)"))
        report = store.verify(check_files=False)
        assert not report.ok and report.bucket_mismatch


def test_bulk_path_of_a_new_index_writes_the_rows_of_the_append_path(db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``write_codes(new_index=True)`` + ``write_new_buckets`` (PostgreSQL: binary COPY built with
    numpy; SQLite: a plain executemany) stores the same codes and bucket rows, byte for byte, as
    the checked append path, with crowded buckets split into chunks and ids out of order."""
    monkeypatch.setattr(bandindex, "BUCKET_CHUNK", 5)
    rng = np.random.default_rng(7)
    vectors = crowded_vectors(400, seed=2)
    with ImageStore(db_url) as store:
        space_id = store.transaction(lambda conn: populate(conn, vectors))

        def load(conn: Connection) -> tuple[int, int]:
            from imgstore.hashing.methods import LSHHasher
            from imgstore.models import HashIndex

            ids = np.array([r[0] for r in conn.execute(text("SELECT id FROM images ORDER BY id"))], dtype=np.int64)
            codes = LSHHasher(n_bits=40, random_state=0).fit(vectors).encode(vectors)
            perm = rng.permutation(len(ids))  # batches arrive in any id order
            made = []
            for bulk in (True, False):
                hid = int(conn.execute(HashIndex.__table__.insert().values(
                    uid=f"bulk{bulk}", space_id=space_id, method="lsh", n_bits=40, n_bands=3, band_width=13, params=b"",
                    config={}, is_active=False, n_fitted=0, generation=0).returning(HashIndex.id)).scalar_one())
                deferred: list = []
                for part in np.array_split(perm, 3):
                    assert write_codes(conn, hid, ids[part], codes[part], 3, 13, defer=deferred, new_index=bulk) == len(part)
                bandindex.write_new_buckets(conn, hid, deferred, 3, 13)
                made.append(hid)
            with pytest.raises(ValueError, match="defer"):
                write_codes(conn, made[0], ids[:1], codes[:1], 3, 13, new_index=True)
            return made[0], made[1]

        bulk_id, checked_id = store.transaction(load)
        with store.engine.connect() as conn:
            def rows(table: str, cols: str, hid: int) -> list:
                return [tuple(bytes(x) if isinstance(x, memoryview) else x for x in r)
                        for r in conn.execute(text(f"SELECT {cols} FROM {table} WHERE hasher_id = :h ORDER BY {cols}"), {"h": hid})]
            bucket_cols = "band, value, chunk, n, image_ids, codes"
            assert rows("codes", "image_id, code", bulk_id) == rows("codes", "image_id, code", checked_id)
            got = rows("code_buckets", bucket_cols, bulk_id)
            assert got == rows("code_buckets", bucket_cols, checked_id)
            assert max(r[3] for r in got) == 5 and max(r[2] for r in got) >= 3  # crowded buckets were split
            assert_buckets_match_codes(conn, bulk_id)
