"""Search on SQLite and PostgreSQL: exact mode equals brute force (random and structured codes,
through SQL and through the cache), approximate recall, query plans use the band indexes,
and every query form of the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Connection

from imgstore import ImageStore
from imgstore.bandindex import SqlProbe, scan_codes
from imgstore.indexing import create_index, list_indexes
from imgstore.codecache import CodeCache
from imgstore.search import SqlSource, hamming_search

from .helpers import assert_buckets_match_codes, brute_force, photo, populate, write_variants


@pytest.mark.parametrize("structured", [False, True], ids=["random", "clustered"])
def test_exact_mode_equals_brute_force(db_url: str, structured: bool) -> None:
    rng = np.random.default_rng(7)
    n, d = 3000, 32
    if structured:
        centres = rng.standard_normal((40, d))
        vectors = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, d))
    else:
        vectors = rng.standard_normal((n, d))
    queries = rng.standard_normal((15, d)) if not structured else vectors[:15] + 0.1 * rng.standard_normal((15, d))
    with ImageStore(db_url) as store:
        def build(conn: Connection) -> int:
            space_id = populate(conn, vectors.astype(np.float32))
            return create_index(conn, space_id, method="lsh", n_bits=64, n_bands=4)
        index_id = store.transaction(build)
        with store.engine.connect() as conn:
            index = next(i for i in list_indexes(conn) if i.id == index_id)
            ids, codes = scan_codes(conn, index)
            hasher = store.ctx.hasher(conn, index)
            cache = CodeCache.load(conn, index)
            sql = SqlSource(conn, index)
            for q in hasher.encode(queries):
                for k in (1, 10, 50):
                    want = brute_force(ids, codes, q, k)
                    via_sql = hamming_search(q, index, k, sql, exact=True)
                    via_cache = hamming_search(q, index, k, cache, exact=True)
                    assert list(zip(via_sql.image_ids.tolist(), via_sql.distances.tolist())) == want
                    assert list(zip(via_cache.image_ids.tolist(), via_cache.distances.tolist())) == want
                # approximate radius-1 results are a subset, each at its true distance
                approx = hamming_search(q, index, 10, sql, probe_radius=1)
                true = dict(brute_force(ids, codes, q, n))
                assert all(true[i] == dd for i, dd in zip(approx.image_ids.tolist(), approx.distances.tolist()))
                cached = hamming_search(q, index, 10, cache, probe_radius=1)
                assert all(true[i] == dd for i, dd in zip(cached.image_ids.tolist(), cached.distances.tolist()))
                # the cache may scan where SQL probes (scans are cheap in memory): never worse
                assert len(cached.distances) == len(approx.distances) == 10
                assert all(c <= a for c, a in zip(cached.distances.tolist(), approx.distances.tolist()))


def test_band_probe_uses_the_indexes(db_url: str) -> None:
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((4000, 16)).astype(np.float32)
    with ImageStore(db_url) as store:
        index_id = store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=32, n_bands=2))
        with store.engine.connect() as conn:
            index = next(i for i in list_indexes(conn) if i.id == index_id)
            sql = SqlProbe(index)
            probes = [np.array([1, 2, 3]), np.array([4, 5])]
            text_, params = sql.statement(conn.dialect.name, probes)
            cursor = conn.connection.dbapi_connection.cursor()
            if conn.dialect.name == "sqlite":
                cursor.execute(f"EXPLAIN QUERY PLAN {text_}", params)
                plan = " ".join(str(r[-1]) for r in cursor.fetchall())
                assert plan.count("SEARCH code_buckets USING PRIMARY KEY (hasher_id=? AND band=? AND value=?)") == 2, plan
            else:
                cursor.execute("ANALYZE code_buckets")
                cursor.execute(f"EXPLAIN {text_}", params)
                plan = " ".join(r[0] for r in cursor.fetchall())
                assert plan.count("pk_code_buckets") == 2, plan
                assert "Seq Scan" not in plan, plan
            # the buckets hold exactly the stored codes, each once per band
            assert_buckets_match_codes(conn, index_id)


def test_search_api_query_forms(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    cats = write_variants(photo("chelsea"), root / "cat", "cat", 3)
    write_variants(photo("rocket"), root / "rocket", "rocket", 3)
    write_variants(photo("coffee"), root / "coffee", "coffee", 3)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color", auto_index=False)
        # no index: exact cosine over the float features
        res = store.search(cats[0], k=3)
        assert res[0].paths == [str(cats[0])] and res[0].cosine == pytest.approx(1.0, abs=1e-5)
        assert res[0].distance is None
        store.create_index("lsh", 32, extractor="color")
        by_path = store.search(cats[0], k=5)
        assert by_path[0].image_id == res[0].image_id and by_path[0].distance == 0
        by_id = store.search(res[0].image_id, k=5)
        assert [r.image_id for r in by_id] == [r.image_id for r in by_path]
        by_bytes = store.search(Path(cats[0]).read_bytes(), k=5)
        assert [r.image_id for r in by_bytes] == [r.image_id for r in by_path]
        from PIL import Image
        by_pil = store.search(Image.open(cats[0]), k=1)
        assert by_pil[0].image_id == res[0].image_id
        vec = store.extractor("color").extract([Image.open(cats[0]).convert("RGB")])[0]
        assert store.search(vec, k=1)[0].image_id == res[0].image_id
        exact = store.search(cats[0], k=9, exact=True, rerank=False)
        dists = [r.distance for r in exact]
        assert dists == sorted(dists) and len(exact) == 9
        cached = store.search(cats[0], k=9, exact=True, rerank=False, cached=True)
        assert [(r.image_id, r.distance) for r in cached] == [(r.image_id, r.distance) for r in exact]
        many = store.search_many([cats[0], cats[1]], k=2)
        assert len(many) == 2 and all(len(r) == 2 for r in many)
        # the cache sees writes: a new image appears in cached results
        new = write_variants(photo("horse"), root / "horse", "horse", 1)[0]
        store.ingest([root], extractor="color")
        assert store.search(new, k=1, cached=True, rerank=False)[0].paths == [str(new)]
