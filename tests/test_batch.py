"""Batch work over shards (imgstore.shards, imgstore.batch): shards exported from SQLite and
PostgreSQL equal the index's codes and are written again only where images changed; every
code's neighbours and every near pair equal brute force (hypothesis, any shard size), in this
process and on a real Dask LocalCluster; a worker killed mid-run and a client killed mid-run
change nothing; dedup and export through a cluster give what they give without one."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgstore import ImageStore, batch, shards
from imgstore.bandindex import scan_codes
from imgstore.cli import cli
from imgstore.codecache import CodeCache
from imgstore.dedup import IndexPairs, Rule
from imgstore.errors import ConfigError, NotFoundError
from imgstore.hashing.bits import as_words
from imgstore.indexing import create_index, list_indexes
from imgstore.types import IndexInfo

from .helpers import photo, populate, write_variants


def layout(n_bits: int = 64, n_bands: int = 4) -> IndexInfo:
    return IndexInfo(1, "test-uid", "lsh", n_bits, n_bands, n_bits // n_bands, "synthetic", 1, True, 0, 0, 0,
                     datetime.now(timezone.utc), {})


def clustered_codes(rng: np.random.Generator, n: int, n_bytes: int = 8, centres: int = 20, noise: float = 0.04) -> np.ndarray:
    """Codes around a few centres (near neighbours and exact duplicates exist), as real codes are."""
    c = rng.integers(0, 256, (centres, n_bytes), dtype=np.uint8)
    codes = c[rng.integers(0, centres, n)]
    return codes ^ np.packbits(rng.random((n, n_bytes * 8)) < noise, axis=1)


def brute_neighbours(ids: np.ndarray, codes: np.ndarray, k: int) -> dict[int, list[tuple[int, int]]]:
    words = as_words(codes)
    out = {}
    for i in range(len(ids)):
        dist = np.bitwise_count(words ^ words[i]).sum(axis=1)
        order = np.lexsort((ids, dist))
        order = order[ids[order] != ids[i]][:k]
        out[int(ids[i])] = [(int(ids[j]), int(dist[j])) for j in order]
    return out


def brute_pairs(ids: np.ndarray, codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    words = as_words(codes)
    found = set()
    for i in range(len(ids)):
        dist = np.bitwise_count(words ^ words[i]).sum(axis=1)
        for j in np.nonzero(dist <= radius)[0]:
            if ids[i] < ids[j]:
                found.add((int(ids[i]), int(ids[j])))
    return found


def graph_of(result: batch.Neighbours) -> dict[int, list[tuple[int, int]]]:
    return {image_id: list(zip(nbr, dist)) for image_id, nbr, dist in batch.iter_rows(result)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 120), shard=st.integers(1, 130), k=st.integers(1, 6), radius=st.integers(0, 9),
       bands=st.sampled_from([2, 4, 8]), seed=st.integers(0, 2**32 - 1))
def test_neighbours_and_pairs_equal_brute_force(n: int, shard: int, k: int, radius: int, bands: int, seed: int) -> None:
    """Any codes (with duplicates), any ids, any shard size: the k nearest other codes by
    (distance, id), and every pair within the radius, exactly."""
    rng = np.random.default_rng(seed)
    shard = max(shard, -(-n // 6))  # at most 6 shards: 36 blocks, each saved and fsynced
    codes = clustered_codes(rng, n, centres=max(1, n // 10))
    ids = rng.choice(np.arange(1, 10 * n + 2), size=n, replace=False).astype(np.int64)
    with tempfile.TemporaryDirectory() as tmp:
        got = shards.write_arrays(Path(tmp) / "s", layout(64, bands), ids, codes, shard_codes=shard)
        assert got.n_codes == n and len(got.shards) == max(1, -(-n // shard))
        graph = batch.neighbours(got, k, workdir=Path(tmp) / "w")
        assert graph_of(graph) == brute_neighbours(ids, codes, k)
        if math.comb(64 // bands, radius // bands) > 5_000:  # 32-bit bands, radius 8+: too many flips to probe
            with pytest.raises(ConfigError, match="flips too many values"):
                batch.near_pairs(got, radius, workdir=Path(tmp) / "w")
            radius = 7
        pairs = batch.near_pairs(got, radius, workdir=Path(tmp) / "w")
        assert set(zip(pairs.a.tolist(), pairs.b.tolist())) == brute_pairs(ids, codes, radius)
        assert len(pairs.a) == len(set(zip(pairs.a.tolist(), pairs.b.tolist())))  # each pair once
        listed = list(zip(pairs.a.tolist(), pairs.b.tolist()))
        assert listed == sorted(listed)  # in (a, b) order, merged from the blocks
        at = {int(i): j for j, i in enumerate(ids)}
        words = as_words(codes)
        assert all(int(np.bitwise_count(words[at[x]] ^ words[at[y]]).sum()) == dist
                   for x, y, dist in zip(pairs.a.tolist(), pairs.b.tolist(), pairs.distances.tolist()))
        again = batch.neighbours(got, k, workdir=Path(tmp) / "w")  # from the saved blocks
        assert again.stats.blocks_reused == again.stats.blocks and graph_of(again) == graph_of(graph)


def test_the_graph_lives_in_files_not_in_the_client(tmp_path: Path) -> None:
    """The merged graph is written to the work folder and memory-mapped, a rerun reads it without
    merging again, a graph file a killed client left half-written is cleaned up, and a damaged
    block is computed again: the same graph each time."""
    rng = np.random.default_rng(7)
    codes = clustered_codes(rng, 400, centres=8)
    ids = np.arange(5, 405, dtype=np.int64) * 3
    got = shards.write_arrays(tmp_path / "s", layout(), ids, codes, shard_codes=150)
    work = tmp_path / "w"
    first = batch.neighbours(got, 4, workdir=work)
    assert isinstance(first.neighbours, np.memmap) and graph_of(first) == brute_neighbours(ids, codes, 4)
    graph_files = sorted(p.name for p in work.glob("graph-k4-*.npy"))
    assert [n.rsplit("-", 1)[1] for n in graph_files] == ["distances.npy", "ids.npy", "neighbours.npy"]
    stale = work / f".{graph_files[0]}.{4_194_305}.tmp"  # above Linux's largest pid: its writer is gone
    stale.write_bytes(b"half a graph")
    for name in graph_files:
        (work / name).unlink()
    block = next(work.glob("knn_*.npz"))
    block.write_bytes(block.read_bytes()[:100])  # a damaged block
    again = batch.neighbours(got, 4, workdir=work)
    assert not stale.exists() and again.stats.blocks_reused == again.stats.blocks - 1
    assert graph_of(again) == graph_of(first)
    third = batch.neighbours(got, 4, workdir=work)  # from the graph's files
    assert third.stats.blocks_reused == third.stats.blocks and graph_of(third) == graph_of(first)


def test_pairs_rerun_from_saved_blocks(tmp_path: Path, dask_client: Any) -> None:
    """Pairs of a rerun come from the blocks the work folder holds (each query shard merged from
    them, here or beside a cluster's remaining blocks): all reused, or one damaged and computed
    again on the cluster; the same pairs, in the same order, each time."""
    rng = np.random.default_rng(11)
    codes = clustered_codes(rng, 500, centres=6)
    ids = np.arange(10, 510, dtype=np.int64) * 7
    got = shards.write_arrays(tmp_path / "s", layout(), ids, codes, shard_codes=130)
    work = tmp_path / "w"
    first = batch.near_pairs(got, 3, workdir=work)
    assert set(zip(first.a.tolist(), first.b.tolist())) == brute_pairs(ids, codes, 3) and len(first.a)
    again = batch.near_pairs(got, 3, workdir=work)
    assert again.stats.blocks_reused == again.stats.blocks == 10
    block = sorted(work.glob("pairs_*.npz"))[3]
    block.write_bytes(block.read_bytes()[:200])  # damaged: computed again
    third = batch.near_pairs(got, 3, workdir=work, cluster=dask_client)
    assert third.stats.blocks_reused == third.stats.blocks - 1
    for run in (again, third):
        for got_part, want in zip((run.a, run.b, run.distances), (first.a, first.b, first.distances), strict=True):
            np.testing.assert_array_equal(got_part, want)


def test_a_worker_saves_its_block_only_into_the_clients_own_folder(tmp_path: Path) -> None:
    """A cluster task writes its block straight into the work folder when the client's mark there
    holds the value it was given (the same folder), and hands the arrays back otherwise (a folder
    of the same name on another machine, or none): the same block either way."""
    rng = np.random.default_rng(3)
    codes = clustered_codes(rng, 300, centres=6)
    got = shards.write_arrays(tmp_path / "s", layout(), np.arange(1, 301, dtype=np.int64), codes, shard_codes=120)
    block = batch.Block("pairs", got.shards[0].name, got.shards[1].name)
    params = {"max_distance": 3, "probe_radius": -1}
    expected = batch._run_block(str(got.folder), got.token(), block, params)
    assert len(expected["a"]) > 0
    work = tmp_path / "w"
    work.mkdir()
    out = work / block.file_name(got.token(), "r3all")
    mark = work / ".client-1-ab"
    mark.write_text("right")
    for seen, value in ((False, "wrong"), (False, None), (True, "right")):
        if value is None:
            mark.unlink()
        result = batch._run_block_into(str(got.folder), got.token(), block, params, str(out), str(mark), value or "right")
        if seen:
            assert result == str(out) and out.exists()
            result = batch._load_block(out)
        else:
            assert isinstance(result, dict) and not out.exists()
        assert all(np.array_equal(result[name], expected[name]) for name in ("a", "b", "dist"))
        if value is None:
            mark.write_text("right")
    assert not list(work.glob("*.tmp"))


@settings(max_examples=15, deadline=None)
@given(n=st.integers(2, 150), shard=st.integers(1, 160), probe=st.integers(0, 2), max_distance=st.integers(0, 20),
       seed=st.integers(0, 2**32 - 1))
def test_pairs_are_dedups_candidates(n: int, shard: int, probe: int, max_distance: int, seed: int) -> None:
    """With dedup's probe radius and distance, the pairs over shards are exactly the candidates
    dedup finds by probing its code cache (so dedup --cluster groups as dedup does)."""
    rng = np.random.default_rng(seed)
    codes = clustered_codes(rng, n, centres=3, noise=0.08)
    ids = np.arange(1, n + 1, dtype=np.int64) * 2
    shard = max(shard, -(-n // 6))
    info = layout()
    cache = CodeCache(info, 0, ids, codes)
    probed = IndexPairs(cache, max_distance, probe).edges(Rule(min_cosine=None, min_signature=None), lambda i: {}, None)
    with tempfile.TemporaryDirectory() as tmp:
        got = shards.write_arrays(Path(tmp) / "s", info, ids, codes, shard_codes=shard)
        pairs = batch.near_pairs(got, max_distance, probe_radius=probe, workdir=Path(tmp) / "w")
    assert set(zip(pairs.a.tolist(), pairs.b.tolist())) == {(e.a, e.b) for e in probed}


def synthetic_store(url: str, n: int, seed: int = 0) -> tuple[ImageStore, int]:
    """A store of ``n`` images with clustered synthetic features and an LSH index (4 bands)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(2, n // 20), 32))
    vectors = (centres[rng.integers(0, len(centres), n)] + 0.3 * rng.standard_normal((n, 32))).astype(np.float32)
    store = ImageStore(url)
    index_id = store.transaction(lambda conn: create_index(conn, populate(conn, vectors), method="lsh", n_bits=64, n_bands=4))
    return store, index_id


def index_codes(store: ImageStore, index_id: int) -> tuple[np.ndarray, np.ndarray]:
    with store.engine.connect() as conn:
        info = next(i for i in list_indexes(conn) if i.id == index_id)
        return scan_codes(conn, info)


def test_export_equals_the_index_and_rewrites_only_what_changed(db_url: str, tmp_path: Path) -> None:
    store, index_id = synthetic_store(db_url, 1400)
    with store:
        folder = tmp_path / "shards"
        first = store.export_shards(folder, shard_codes=500)
        assert [s.n_codes for s in first.shards.shards] == [500, 500, 400]  # no last shard under half a shard
        assert first.written == ["shard-00000", "shard-00001", "shard-00002"] and not first.kept
        ids, codes = index_codes(store, index_id)
        loaded = [shards.load_shard(first.shards, s) for s in first.shards.shards]
        assert np.array_equal(np.concatenate([i for i, _ in loaded]), ids)
        assert np.array_equal(np.concatenate([c for _, c in loaded]), codes)

        again = store.export_shards(folder)  # nothing changed: only the open last range is read again
        assert again.kept == ["shard-00000", "shard-00001"] and again.written == ["shard-00002"]
        assert again.shards.token() == first.shards.token()

        middle = int(loaded[1][0][7])
        store.remove(middle)
        after = store.export_shards(folder)
        assert after.kept == ["shard-00000"] and after.written == ["shard-00001", "shard-00002"]
        assert after.shards.token() != first.shards.token()
        ids2, _ = index_codes(store, index_id)
        assert middle not in ids2
        assert np.array_equal(np.concatenate([shards.load_shard(after.shards, s)[0] for s in after.shards.shards]), ids2)
        assert shards.read_manifest(folder) == after.shards


def test_export_errors(sqlite_url: str, tmp_path: Path) -> None:
    store, _ = synthetic_store(sqlite_url, 50)
    with store:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / "notes.txt").write_text("mine")
        with pytest.raises(ConfigError, match="not empty"):
            store.export_shards(tmp_path / "busy")
        assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # nothing of the user's touched
        with pytest.raises(NotFoundError, match="imgstore shards export"):
            shards.read_manifest(tmp_path / "nowhere")
        done = store.export_shards(tmp_path / "s")
        (tmp_path / "s" / "manifest.json").write_text("{ broken")
        with pytest.raises(ConfigError, match="export the shards again"):
            shards.read_manifest(tmp_path / "s")
        assert done.shards.n_codes == 50
    runner = CliRunner()
    result = runner.invoke(cli, ["--db", sqlite_url, "export", "--cluster", "local:1"])
    assert result.exit_code == 2 and "add --neighbours" in result.output
    result = runner.invoke(cli, ["--db", sqlite_url, "shards", "export", str(tmp_path / "busy")])
    assert result.exit_code == 1 and "not empty" in result.output and "Traceback" not in result.output


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"IMGSTORE_NUM_THREADS": "1"}) as local, Client(local) as client:
        yield client


def test_cluster_equals_this_process(db_url: str, tmp_path: Path, dask_client: Any) -> None:
    store, index_id = synthetic_store(db_url, 900)
    with store:
        store.export_shards(tmp_path / "s", shard_codes=250)
        here = store.neighbour_graph(5, shards=tmp_path / "s")
        assert here.stats.blocks == 16 and here.stats.where == "this process"
        ids, codes = index_codes(store, index_id)
        assert graph_of(here) == brute_neighbours(ids, codes, 5)
        store.export_shards(tmp_path / "c", shard_codes=250)
        there = store.neighbour_graph(5, cluster=dask_client, shards=tmp_path / "c")
        assert there.stats.workers == 2 and there.stats.blocks_reused == 0
        assert there.stats.saved_by_workers == there.stats.blocks  # the workers see the work folder: they save
        assert not list((tmp_path / "c").rglob(".client-*")) and not list((tmp_path / "c").rglob("*.tmp"))
        assert graph_of(there) == graph_of(here)
        pairs_here = batch.near_pairs(shards.read_manifest(tmp_path / "s"), 6, workdir=tmp_path / "s" / "work")
        pairs_there = batch.near_pairs(shards.read_manifest(tmp_path / "c"), 6, workdir=tmp_path / "c" / "work",
                                       cluster=dask_client)
        assert np.array_equal(pairs_here.a, pairs_there.a) and np.array_equal(pairs_here.b, pairs_there.b)
        assert set(zip(pairs_here.a.tolist(), pairs_here.b.tolist())) == brute_pairs(ids, codes, 6)


def _worker_pids(client: Any) -> dict[str, int]:
    return client.run(os.getpid)  # type: ignore[no-any-return]


def test_a_worker_killed_mid_run(sqlite_url: str, tmp_path: Path) -> None:
    """Kill a worker process once the first block is back: Dask runs its blocks elsewhere and
    the graph is the one computed without a cluster."""
    from distributed import Client, LocalCluster

    store, _ = synthetic_store(sqlite_url, 1500)
    with store:
        store.export_shards(tmp_path / "s", shard_codes=150)  # 10 shards, 100 blocks
        here = store.neighbour_graph(4, shards=tmp_path / "s")
        killed: list[int] = []
        with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                          env={"IMGSTORE_NUM_THREADS": "1"}) as local, Client(local) as client:
            pids = list(_worker_pids(client).values())

            def progress(done: int, total: int) -> None:
                if not killed and done > 0:
                    os.kill(pids[0], signal.SIGKILL)
                    killed.append(pids[0])

            store.export_shards(tmp_path / "c", shard_codes=150)
            there = store.neighbour_graph(4, cluster=client, shards=tmp_path / "c", progress=progress)
        assert killed, "a worker was killed during the run"
        assert graph_of(there) == graph_of(here)


def test_client_killed_then_rerun(sqlite_url: str, tmp_path: Path) -> None:
    """SIGKILL the command (and its LocalCluster) once some blocks are saved; the same command
    again reuses them and writes the same neighbours as a run in one process."""
    store, _ = synthetic_store(sqlite_url, 1500)
    with store:
        store.export_shards(tmp_path / "s", shard_codes=100)  # 15 shards, 225 blocks
    work = tmp_path / "s" / "work"
    out = tmp_path / "graph.jsonl"
    command = [sys.executable, "-m", "imgstore.cli", "--db", sqlite_url, "export", "--neighbours", "4", "--cluster", "local:2",
               "--shards", str(tmp_path / "s"), "-o", str(out)]
    first = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and first.poll() is None and not list(work.glob("knn_*.npz")):
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    saved = len(list(work.glob("knn_*.npz")))
    assert 0 < saved < 225, "killed mid-run"
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    reference = CliRunner().invoke(cli, ["--db", sqlite_url, "export", "--neighbours", "4", "--shards", str(tmp_path / "s")])
    assert reference.exit_code == 0, reference.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [json.loads(line) for line in reference.output.splitlines()]
    assert all(len(r["neighbours"]) == 4 and r["distances"] == sorted(r["distances"]) for r in rows)


def test_dedup_through_a_cluster_groups_as_without(tmp_path: Path, dask_client: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Real photos and their edits: the groups of dedup with candidates from shards on a cluster,
    and the geometric check's comparisons run on its workers, are those of a plain dedup (the
    same candidates, the same rule, the same verdicts); two copies of one store, so that neither
    run reads the other's stored verdicts."""
    import shutil

    folder = tmp_path / "photos"
    for name in ("chelsea", "rocket", "coffee", "astronaut"):
        write_variants(photo(name), folder / name, name, 4)
    url = f"sqlite:///{tmp_path / 'photos.db'}"
    with ImageStore(url) as store:
        store.ingest([folder], auto_index=False)
        store.create_index("lsh", 64, n_bands=4)
    shutil.copy(tmp_path / "photos.db", tmp_path / "copy.db")
    with ImageStore(f"sqlite:///{tmp_path / 'copy.db'}") as store, caplog.at_level("INFO", logger="imgstore.dedup"):
        through = store.find_duplicates(cluster=dask_client, shards=tmp_path / "s2")
    remote = [r.getMessage() for r in caplog.records if "compared on the cluster's workers" in r.getMessage()]
    assert remote, "the check's comparisons ran on the workers"
    seconds = float(re.search(r"unreadable\), ([0-9.]+) s;", remote[0]).group(1))  # type: ignore[union-attr]
    assert seconds > 0, f"the workers' check time is counted: {remote[0]}"
    with ImageStore(url) as store:
        plain = store.find_duplicates()
        here = store.find_duplicates(shards=tmp_path / "s")
    assert plain, "the photos' edits are found as duplicates"
    assert [g.as_dict() for g in through] == [g.as_dict() for g in plain]
    assert [g.as_dict() for g in here] == [g.as_dict() for g in plain]
    result = CliRunner().invoke(cli, ["--db", url, "dedup", "--json", "--shards", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == json.loads(json.dumps([g.as_dict() for g in plain], default=str))


def test_the_check_on_a_worker_reads_what_it_can(tmp_path: Path) -> None:
    """The task a worker runs: a copy and its edit are a copy; a pair with an image no path of
    which this machine can read stays undecided (UNKNOWN: the rule's answer stands), counted."""
    from imgstore.dedup import check_on_worker
    from imgstore.geometry import COPY, UNKNOWN

    a, b = write_variants(photo("chelsea"), tmp_path, "cat", 2)
    verdicts, read, unreadable = check_on_worker([1, 1], [2, 3], {1: [str(a)], 2: [str(tmp_path / "gone.jpg"), str(b)],
                                                                  3: [str(tmp_path / "gone.jpg")]}, None)
    assert verdicts.tolist() == [COPY, UNKNOWN]
    assert (read, unreadable) == (3, 1)  # three images asked for, one of them unreadable


@settings(max_examples=200, deadline=None)
@given(data=st.data(), span=st.sampled_from([2, 1000, 1 << 31, 1 << 62, 1 << 63]))
def test_sort_pairs_is_the_lexsort(data: st.DataObject, span: int) -> None:
    """Packed into one word where ids and distances fit 64 bits, a lexsort where not (ids spread
    over 2**62 and more, up to int64's ends): the same (a, b) order, the distance carried along."""
    n = data.draw(st.integers(min_value=0, max_value=min(200, span * span)))
    base = data.draw(st.integers(min_value=-(1 << 63), max_value=(1 << 63) - span))
    pairs = data.draw(st.lists(st.tuples(st.integers(base, base + span - 1), st.integers(base, base + span - 1)),
                               min_size=n, max_size=n, unique=True))
    a = np.array([p[0] for p in pairs], dtype=np.int64)
    b = np.array([p[1] for p in pairs], dtype=np.int64)
    d = np.array(data.draw(st.lists(st.integers(0, 512), min_size=n, max_size=n)), dtype=np.int16)
    got = batch.sort_pairs(a, b, d)
    order = np.lexsort((b, a))
    for g, want in zip(got, (a[order], b[order], d[order]), strict=True):
        assert g.dtype == want.dtype
        np.testing.assert_array_equal(g, want)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n_runs=st.integers(min_value=1, max_value=4), spread=st.sampled_from([5, 100, 1 << 40]))
def test_merge_runs_interleaves_runs_by_a(data: st.DataObject, n_runs: int, spread: int) -> None:
    """Runs sorted by (a, b), each run's b above the runs' before it (a query shard's blocks):
    merged in (a, b) order, placed by counting, or sorted where the a values spread over far
    more ids than there are pairs (2**40)."""
    base = data.draw(st.integers(min_value=-1000, max_value=1000))
    runs = []
    for r in range(n_runs):
        pairs = data.draw(st.lists(st.tuples(st.integers(base, base + spread), st.integers(0, 999)), max_size=60,
                                   unique=True))  # a pair is found once
        a = np.array([p[0] for p in pairs], dtype=np.int64)
        b = np.array([p[1] for p in pairs], dtype=np.int64) + 1000 * r
        d = np.array(data.draw(st.lists(st.integers(0, 64), min_size=len(pairs), max_size=len(pairs))), dtype=np.int16)
        order = np.lexsort((b, a))
        runs.append((a[order], b[order], d[order]))
    got = batch.merge_runs(runs)
    a, b, d = (np.concatenate([r[i] for r in runs]) for i in range(3))
    order = np.lexsort((b, a))
    for g, want in zip(got, (a[order], b[order], d[order]), strict=True):
        assert g.dtype == want.dtype
        np.testing.assert_array_equal(g, want)
