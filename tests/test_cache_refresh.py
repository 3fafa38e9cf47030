"""A code cache that saw its index grow appends the new codes instead of reloading them all, and
gives the same answers as a cache built from scratch; anything but appends reloads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imgstore import ImageStore
from imgstore.indexing import create_index
from imgstore.codecache import CodeCache, caches
from imgstore.search import hamming_search

from .helpers import populate
from .test_kernels import make_cache


@pytest.mark.parametrize("n_bits,n_bands,width", [(64, 4, 16), (32, 2, 16), (128, 6, 21)])
def test_appended_equals_built_from_scratch(n_bits: int, n_bands: int, width: int) -> None:
    whole = make_cache(n_bits, n_bands, width, n=3000, seed=4)  # clustered, with exact duplicates
    split = 2200
    first = CodeCache(whole.index, 0, whole.image_ids[:split], whole.codes[:split])
    grown = first.appended(whole.image_ids[split:], whole.codes[split:], generation=7)
    assert grown.generation == 7 and len(first) == split  # the old cache is untouched
    for name in ("image_ids", "codes", "words", "seg_keys", "seg_rows", "seg_words", "seg_dir", "dir_shift"):
        np.testing.assert_array_equal(getattr(grown, name), getattr(whole, name), err_msg=name)
    rng = np.random.default_rng(0)
    for q in whole.codes[rng.integers(0, len(whole), 10)]:
        for kw in ({"exact": True}, {"probe_radius": 1}):
            a = hamming_search(q, whole.index, 10, grown, **kw)
            b = hamming_search(q, whole.index, 10, whole, **kw)
            assert a.image_ids.tolist() == b.image_ids.tolist() and a.distances.tolist() == b.distances.tolist()
    with pytest.raises(ValueError):
        grown.appended(whole.image_ids[:1], whole.codes[:1], generation=8)


def test_a_growing_index_is_appended_and_a_removal_reloads(db_url: str) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((900, 16)).astype(np.float32)
    with ImageStore(db_url, cache_codes=True) as store:
        store.transaction(lambda conn: create_index(conn, populate(conn, vectors[:600]), method="lsh", n_bits=32, n_bands=2))
        queries = list(vectors[:5])
        store.search_many(queries, k=5, rerank=False)
        assert store.cache_refreshes == {"loads": 1, "appends": 0}

        def more(conn):  # type: ignore[no-untyped-def]
            from sqlalchemy import text

            from imgstore.indexing import encode_images
            from imgstore.models import Image as ImageRow
            from imgstore.sqlhelpers import insert_ignore
            from imgstore.vectors import features_table, vector_to_bytes

            insert_ignore(conn, ImageRow.__table__, [
                {"sha256": f"more{i:060x}", "width": 1, "height": 1, "format": None, "byte_size": 1, "meta": {}} for i in range(300)
            ])
            ids = [r[0] for r in conn.execute(text("SELECT id FROM images WHERE sha256 LIKE 'more%' ORDER BY id"))]
            insert_ignore(conn, features_table, [{"space_id": 1, "image_id": i, "vector": vector_to_bytes(v)} for i, v in zip(ids, vectors[600:])])
            encode_images(store.ctx, conn, 1, np.array(ids), vectors[600:])

        store.transaction(more)
        grown = store.search_many(queries, k=5, rerank=False)
        assert store.cache_refreshes == {"loads": 1, "appends": 1}
        with ImageStore(db_url) as fresh:
            assert [[r.image_id for r in res] for res in fresh.search_many(queries, k=5, rerank=False, cached=True)] == \
                [[r.image_id for r in res] for res in grown]
        store.remove([int(grown[0][1].image_id)])
        after = store.search_many(queries, k=5, rerank=False)
        assert store.cache_refreshes["loads"] == 2
        assert grown[0][1].image_id not in [r.image_id for r in after[0]]


def add_images(store: ImageStore, vectors: np.ndarray, tag: str) -> list[int]:
    """Images with these feature vectors, encoded into every index (what an ingest batch writes)."""
    from sqlalchemy import text

    from imgstore.indexing import encode_images
    from imgstore.models import Image as ImageRow
    from imgstore.sqlhelpers import insert_ignore
    from imgstore.vectors import features_table, vector_to_bytes

    def work(conn):  # type: ignore[no-untyped-def]
        insert_ignore(conn, ImageRow.__table__, [
            {"sha256": f"{tag}{i:060x}", "width": 1, "height": 1, "format": None, "byte_size": 1, "meta": {}} for i in range(len(vectors))
        ])
        ids = [r[0] for r in conn.execute(text(f"SELECT id FROM images WHERE sha256 LIKE '{tag}%' ORDER BY id"))]
        insert_ignore(conn, features_table, [{"space_id": 1, "image_id": i, "vector": vector_to_bytes(v)} for i, v in zip(ids, vectors)])
        encode_images(store.ctx, conn, 1, np.array(ids), vectors)
        return ids

    return store.transaction(work)


def test_a_background_refresher_keeps_searches_from_waiting(sqlite_url: str) -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    writer = ImageStore(sqlite_url)
    writer.transaction(lambda conn: create_index(conn, populate(conn, vectors[:300]), method="lsh", n_bits=32, n_bands=2))
    with ImageStore(sqlite_url, cache_codes=True) as server:
        server.search(vectors[0], k=3, rerank=False)  # the first load happens in the request
        server.start_refresher(interval_s=3600)  # a refresher that will not run during this part
        (new,) = add_images(writer, vectors[300:301], "one")
        hits = server.search(vectors[300], k=1, rerank=False)
        assert hits[0].image_id != new  # answered from the cache as it was, without waiting
        assert server.cache_refreshes == {"loads": 1, "appends": 0}
        server.stop_refresher()
        server.start_refresher(interval_s=0.05)
        more = add_images(writer, vectors[301:340], "two")
        deadline = time.time() + 20
        while time.time() < deadline and server.search(vectors[339], k=1, rerank=False)[0].image_id != more[-1]:
            time.sleep(0.05)
        assert server.search(vectors[339], k=1, rerank=False)[0].image_id == more[-1]
        assert server.cache_refreshes["loads"] == 1 and server.cache_refreshes["appends"] >= 1
    writer.close()


def _answers(hits_per_query):  # type: ignore[no-untyped-def]
    return [[(h.image_id, h.distance, h.cosine) for h in hits] for hits in hits_per_query]


def test_vectors_held_beside_the_codes_give_the_answers_read_from_the_database(db_url: str) -> None:
    """The re-rank and a search by stored id read the vectors attached to the code cache, and
    answer exactly as reading them from the database does; appends carry them forward, a
    removal reloads, and a budget too small for them leaves them in the database."""
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((700, 24)).astype(np.float32)
    with ImageStore(db_url, cache_codes=True) as held, ImageStore(db_url, cache_codes=True, vector_cache_mb=0) as read:
        held.transaction(lambda conn: create_index(conn, populate(conn, vectors[:500]), method="lsh", n_bits=32, n_bands=2))
        queries: list[object] = [*vectors[:4], 1, 7, 250]  # vectors and stored ids, all re-ranked by cosine
        first = held.search_many(queries, k=8)
        (cache,) = [c for _, c in caches(held.ctx).held()]
        assert cache.vectors is not None and cache.vectors.shape == (500, 24)
        assert [c.vectors for c in held.cache_state()] == [True]
        assert _answers(first) == _answers(read.search_many(queries, k=8))
        assert all(c.vectors is None for c in [c for _, c in caches(read.ctx).held()])
        assert first[4][0].image_id == 1 and first[4][0].distance == 0 and first[4][0].cosine == pytest.approx(1.0)

        new = add_images(held, vectors[500:], "late")  # an ingest appends: the vectors come along
        queries += [new[3], vectors[650]]
        grown = held.search_many(queries, k=8)
        (cache,) = [c for _, c in caches(held.ctx).held()]
        assert held.cache_refreshes["appends"] == 1 and cache.vectors is not None and len(cache.vectors) == 700
        np.testing.assert_array_equal(cache.vectors[-200:], vectors[500:])
        assert _answers(grown) == _answers(read.search_many(queries, k=8))
        assert grown[-2][0].image_id == new[3]

        held.remove([new[3], 7])  # a removal reloads the codes; the vectors are read again with them
        queries = [q for q in queries if not isinstance(q, int) or q not in (new[3], 7)]
        after = held.search_many(queries, k=8)
        assert held.cache_refreshes["loads"] == 2
        (cache,) = [c for _, c in caches(held.ctx).held()]
        assert cache.vectors is not None and len(cache.vectors) == 698
        assert _answers(after) == _answers(read.search_many(queries, k=8))
        assert all(h.image_id not in (new[3], 7) for hits in after for h in hits)

    with ImageStore(db_url, cache_codes=True, vector_cache_mb=0) as small:
        small.search(1, k=3)
        assert [c.vectors for c in small.cache_state()] == [False]
    with pytest.raises(Exception, match="vector_cache_mb"):
        ImageStore(db_url, vector_cache_mb=-1)


def test_rows_of_finds_dense_and_sparse_ids() -> None:
    """The id -> row look-up the re-rank uses: a table for dense ids, a binary search for
    sparse ones; an id not held gives None (the caller reads from the database)."""
    whole = make_cache(64, 4, 16, n=200, seed=2)
    for ids in (np.arange(1, 201), np.arange(1, 201) * 1000 + 5):
        cache = CodeCache(whole.index, 0, ids.astype(np.int64), whole.codes)
        picked = ids[[5, 0, 199, 5]]
        np.testing.assert_array_equal(cache.rows_of(picked), [5, 0, 199, 5])
        assert cache.rows_of(np.array([ids[-1] + 1])) is None and cache.rows_of(np.array([-3])) is None
        assert cache.vectors_of(picked) is None  # nothing attached
        vectors = np.arange(200 * 3, dtype=np.float32).reshape(200, 3)
        np.testing.assert_array_equal(cache.with_vectors(vectors).vectors_of(picked), vectors[[5, 0, 199, 5]])


@pytest.mark.postgres
def test_a_cached_search_survives_its_connections_being_killed(pg_url: str) -> None:
    """A search answered from memory reads paths on a pooled autocommit connection without a
    ping; when the server ends those connections (a restart, an administrator), the next search
    still answers, on a fresh one."""
    from sqlalchemy import create_engine, text

    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    with ImageStore(pg_url, cache_codes=True) as store:
        store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=2))
        store.start_refresher(interval_s=0.05)
        deadline = time.time() + 30
        while time.time() < deadline and not store.answers_from_memory():
            store.search(1, k=3)
            time.sleep(0.05)
        assert store.answers_from_memory()
        before = _answers(store.search_many([1, 2, 3], k=5))
        admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            ended = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                      "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar()
        admin.dispose()
        assert ended >= 1
        assert _answers(store.search_many([1, 2, 3], k=5)) == before
        store.stop_refresher()
