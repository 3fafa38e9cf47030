"""A code cache that saw its index grow appends the new codes instead of reloading them all, and
gives the same answers as a cache built from scratch; anything but appends reloads."""

from __future__ import annotations

import time

import numpy as np
import pytest

from imgstore import ImageStore
from imgstore.indexing import create_index
from imgstore.search import CodeCache, hamming_search

from .helpers import populate
from .test_kernels import make_cache


@pytest.mark.parametrize("n_bits,n_bands,width", [(64, 4, 16), (32, 2, 16), (128, 6, 21)])
def test_appended_equals_built_from_scratch(n_bits: int, n_bands: int, width: int) -> None:
    whole = make_cache(n_bits, n_bands, width, n=3000, seed=4)  # clustered, with exact duplicates
    split = 2200
    first = CodeCache(whole.index, 0, whole.image_ids[:split], whole.codes[:split])
    grown = first.appended(whole.image_ids[split:], whole.codes[split:], generation=7)
    assert grown.generation == 7 and len(first) == split  # the old cache is untouched
    for name in ("image_ids", "codes", "words", "seg_keys", "seg_rows", "seg_words"):
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
        assert store.ctx.cache_refreshes == {"loads": 1, "appends": 0}

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
        assert store.ctx.cache_refreshes == {"loads": 1, "appends": 1}
        with ImageStore(db_url) as fresh:
            assert [[r.image_id for r in res] for res in fresh.search_many(queries, k=5, rerank=False, cached=True)] == \
                [[r.image_id for r in res] for res in grown]
        store.remove([int(grown[0][1].image_id)])
        after = store.search_many(queries, k=5, rerank=False)
        assert store.ctx.cache_refreshes["loads"] == 2
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
        server.ctx.start_refresher(interval_s=3600)  # a refresher that will not run during this part
        (new,) = add_images(writer, vectors[300:301], "one")
        hits = server.search(vectors[300], k=1, rerank=False)
        assert hits[0].image_id != new  # answered from the cache as it was, without waiting
        assert server.ctx.cache_refreshes == {"loads": 1, "appends": 0}
        server.ctx.stop_refresher()
        server.ctx.start_refresher(interval_s=0.05)
        more = add_images(writer, vectors[301:340], "two")
        deadline = time.time() + 20
        while time.time() < deadline and server.search(vectors[339], k=1, rerank=False)[0].image_id != more[-1]:
            time.sleep(0.05)
        assert server.search(vectors[339], k=1, rerank=False)[0].image_id == more[-1]
        assert server.ctx.cache_refreshes["loads"] == 1 and server.ctx.cache_refreshes["appends"] >= 1
    writer.close()
