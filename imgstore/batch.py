"""Batch search over shards: the exact k nearest codes of every code, and every pair of codes
within a Hamming radius, block by block, in this process or on a Dask cluster.

The work is a set of blocks, one per (query shard, data shard): for neighbours every ordered
pair of shards, for pairs every unordered one. A block loads the data shard into the same
:class:`~imgstore.codecache.CodeCache` a server searches with (a worker keeps the last ones it
built, so the blocks of one data shard share one), and runs

- **neighbours**: :func:`~imgstore.search.hamming_search` in exact mode for each query code
  (top ``k`` by (distance, id), the code itself left out); blocks of one query shard are merged
  by (distance, id), so the result equals a brute-force sort over every code;
- **pairs**: a join of band values, vectorised with numpy: a pair is a candidate when some band
  of the two codes is within ``probe_radius`` bits (found once, at its first such band) and
  kept when the whole codes are within ``max_distance``: the candidates of dedup's band probe
  (:class:`imgstore.dedup.IndexPairs`), exactly; or, asked for every pair within
  ``max_distance``, a join on sets of whole bands (:func:`imgstore.bandjoin.band_set_join`) when
  the distance is below the number of bands, else on bands at ``max_distance // n_bands``.

Each finished block is saved in the work folder under a name holding the shard set's token
(:meth:`ShardSet.token`), written under a temporary name and renamed: a rerun after a killed
client loads the finished blocks and computes only the rest; shards exported again (another
token) start afresh. A worker killed mid-block makes Dask run the block again elsewhere; blocks
are deterministic, so the output is the same. A finished block goes to its file and the worker
drops it; neighbours are merged one query shard at a time into the graph's files, memory-mapped
for the caller (100M codes' graph at k = 10 is ~10 GB, its blocks ~40 GB: neither needs to fit
in the client's memory); pairs are merged one query shard at a time as its last block is saved
(the client holds that shard's blocks and the pairs merged so far: the result, held whole).
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import socket
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .bandjoin import BandTable, band_join, band_set_join, equal_band_sets
from .cluster import connect
from .codecache import CodeCache, probe_values
from .errors import ClusterError, ConfigError, ImgStoreError
from .hashing.bits import as_words, band_values
from .search import MAX_PROBES_PER_BAND
from .shards import Shard, ShardSet, load_shard, read_manifest

#: Query rows joined at once in a pairs block (bounds the candidate arrays).
PAIR_ROWS = 65_536
#: Queries per compiled call in a neighbours block.
QUERY_BATCH = 4096
#: Entries a neighbours query may visit, as a fraction of the data shard's codes, before it scans
#: the shard instead. Higher than the interactive cache's 0.02: the batch search stops band by band,
#: and probing on measured cheaper than a scan up to here (bench_batch).
KNN_SCAN_FRACTION = 0.2
#: Data-shard caches a worker process keeps (each ~90 bytes a code).
KEPT_CACHES = 2
#: Distance that pads a neighbour list shorter than k (fewer than k other codes exist).
NO_DISTANCE = np.iinfo(np.int16).max

Progress = Callable[[int, int], None]
#: Pairs as arrays: a, b (image ids) and their codes' distances.
PairArrays = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int16]]


@dataclass(frozen=True)
class Block:
    kind: str  # "knn" or "pairs"
    query: str  # shard names
    data: str

    def file_name(self, token: str, params: str) -> str:
        return f"{self.kind}_{params}_{token}_{self.query}_{self.data}.npz"


@dataclass
class Neighbours:
    """Every code's ``k`` nearest other codes: ``image_ids (n,)`` ascending, ``neighbours (n, k)``
    int64 (-1 where fewer than k others exist), ``distances (n, k)`` int16 (NO_DISTANCE there)."""

    image_ids: npt.NDArray[np.int64]
    neighbours: npt.NDArray[np.int64]
    distances: npt.NDArray[np.int16]
    stats: RunStats


@dataclass
class Pairs:
    """Pairs of image ids ``a < b`` whose codes are within the radius, sorted by (a, b)."""

    a: npt.NDArray[np.int64]
    b: npt.NDArray[np.int64]
    distances: npt.NDArray[np.int16]
    stats: RunStats


@dataclass
class RunStats:
    blocks: int = 0
    blocks_reused: int = 0
    codes: int = 0
    seconds: float = 0.0
    workers: int = 1
    where: str = "this process"
    saved_by_workers: int = 0  # blocks a worker wrote into the work folder itself (the rest came back to the client)

    def as_dict(self) -> dict[str, Any]:
        return {"blocks": self.blocks, "blocks_reused": self.blocks_reused, "codes": self.codes,
                "seconds": round(self.seconds, 3), "workers": self.workers, "where": self.where,
                "saved_by_workers": self.saved_by_workers}


# --- one block ---------------------------------------------------------------------------------

_caches: OrderedDict[tuple[str, str, str], CodeCache] = OrderedDict()
_caches_lock = threading.Lock()


def shard_cache(shards: ShardSet, shard: Shard) -> CodeCache:
    """The code cache of one shard, built once per process and shard content (keyed by the
    folder, the shard set's token and the shard) and kept for the next blocks."""
    key = (str(shards.folder), shards.token(), shard.name)
    with _caches_lock:
        got = _caches.get(key)
        if got is not None:
            _caches.move_to_end(key)
            return got
    ids, codes = load_shard(shards, shard)
    cache = CodeCache(shards.index, shards.generation, np.asarray(ids), np.asarray(codes))
    with _caches_lock:
        _caches[key] = cache
        while len(_caches) > KEPT_CACHES:
            _caches.popitem(last=False)
    return cache


def _shard(shards: ShardSet, name: str) -> Shard:
    for s in shards.shards:
        if s.name == name:
            return s
    raise ConfigError(f"no shard {name} in {shards.folder}; export the shards again")


def knn_block(shards: ShardSet, query: str, data: str, k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """For each code of shard ``query``, its ``k`` nearest codes in shard ``data`` (itself left
    out), exact, by (distance, id): ``(n_query, k)`` ids (-1 padded) and distances
    (:func:`knn_codes` on the data shard's cache)."""
    q_ids, q_codes = load_shard(shards, _shard(shards, query))
    return knn_codes(shard_cache(shards, _shard(shards, data)), np.asarray(q_ids), np.asarray(q_codes), k,
                     exclude_self=query == data)


def knn_codes(cache: CodeCache, q_ids: npt.NDArray[np.int64], q_codes: npt.NDArray[np.uint8], k: int, *,
              exclude_self: bool) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """For each query code, its ``k`` nearest codes in ``cache`` by (distance, id), exact (the
    query's own id left out when ``exclude_self``): ``(n_query, k)`` ids (-1 padded) and
    distances. The cache's multi-index search, band by band, for a batch of queries at a time in
    one compiled call (:func:`imgstore.kernels.knn_batch`); queries run in the order of their
    codes, so neighbouring queries probe the same buckets while they are still in the CPU's caches."""
    want = min(k + 1 if exclude_self else k, len(cache))
    out_ids = np.full((len(q_ids), k), -1, dtype=np.int64)
    out_dist = np.full((len(q_ids), k), NO_DISTANCE, dtype=np.int16)
    if want == 0 or len(q_ids) == 0:
        return out_ids, out_dist
    from . import kernels  # numba: only batch work and the code cache load it, never a plain CLI command

    index = cache.index
    flips, starts = _round_flips(index.band_width, index.n_bands)
    budget = KNN_SCAN_FRACTION * len(cache)
    q_words = as_words(q_codes)
    order = np.lexsort(q_words.T[::-1])
    for start in range(0, len(q_ids), QUERY_BATCH):
        at = order[start : start + QUERY_BATCH]
        part = np.ascontiguousarray(q_codes[at])
        rows, dist = kernels.knn_batch(cache.seg_keys, cache.seg_dir, cache.dir_shift, cache.seg_rows, cache.seg_words,
                                       cache.words, part, np.ascontiguousarray(q_words[at]), cache.band_masks,
                                       index.band_width, flips, starts, want, budget)
        ids = np.where(rows >= 0, cache.image_ids[np.maximum(rows, 0)], -1)
        if exclude_self:  # the query itself is among its own results: drop it, keep the order
            keep = ids != q_ids[at, None]
            order_in = np.argsort(~keep, axis=1, kind="stable")
            ids = np.take_along_axis(ids, order_in, 1)
            dist = np.take_along_axis(dist, order_in, 1)
            ids[~np.take_along_axis(keep, order_in, 1)] = -1
        n = min(k, ids.shape[1])
        got = ids[:, :n] >= 0
        out_ids[at, :n] = np.where(got, ids[:, :n], -1)
        out_dist[at, :n] = np.where(got, dist[:, :n], NO_DISTANCE)
    return out_ids, out_dist


def _round_flips(band_width: int, n_bands: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """The XOR masks of band radius 0, 1, ... (as many radii as exact search would probe before
    it scans: at most :data:`~imgstore.search.MAX_PROBES_PER_BAND` values a band), and where
    each radius starts."""
    parts, total = [], 0
    for s in range(band_width + 1):
        size = math.comb(band_width, s)
        if s and total + size > MAX_PROBES_PER_BAND:
            break
        parts.append(probe_values(0, band_width, s, s))
        total += size
    starts = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)
    return np.concatenate(parts).astype(np.int64), starts


def merge_knn(parts: Iterable[tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]],
              k: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int16]]:
    """Top-k by (distance, id) across the blocks of one query shard (at least one; an iterator is
    read a block at a time): each block's rows are sorted, so each merges linearly into the
    running top-k (:func:`imgstore.kernels.merge_topk`; sorting the rows side by side took 4.9 s
    for 2.5M rows, on the client, while the workers waited)."""
    from . import kernels

    it = iter(parts)
    ids, dist = next(it)
    top = (np.zeros((len(ids), 0), np.int64), np.zeros((len(ids), 0), np.int16))
    while True:
        top = kernels.merge_topk(*top, np.ascontiguousarray(ids), np.ascontiguousarray(dist, dtype=np.int16), k)
        try:
            ids, dist = next(it)
        except StopIteration:
            return top


def pairs_block(shards: ShardSet, query: str, data: str, max_distance: int, probe_radius: int | None) -> PairArrays:
    """Pairs (a in ``query``, b in ``data``, a < b) whose whole codes are within ``max_distance``
    and that share a band within ``probe_radius`` bits, or, with ``probe_radius=None``, every such
    pair; sorted by (a, b). See the module."""
    index = shards.index
    m, w = index.n_bands, index.band_width
    q_ids, q_codes = load_shard(shards, _shard(shards, query))
    d_ids, d_codes = load_shard(shards, _shard(shards, data))
    q_ids, d_ids = np.asarray(q_ids), np.asarray(d_ids)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16))
    if len(q_ids) == 0 or len(d_ids) == 0:
        return empty
    out_a, out_b, out_d = [], [], []
    if probe_radius is None and equal_band_sets(m, max_distance):
        d_bands = _small_bands(d_codes, m, w)
        d_words = np.ascontiguousarray(as_words(d_codes))
        same = query == data
        q_bands = d_bands if same else _small_bands(q_codes, m, w)
        q_words = d_words if same else np.ascontiguousarray(as_words(q_codes))
        for qi, di, dist in band_set_join(q_bands, q_words, q_ids, d_bands, d_words, d_ids, w, max_distance):
            out_a.append(q_ids[qi])
            out_b.append(d_ids[di])
            out_d.append(dist.astype(np.int16))
    else:
        radius = max_distance // m if probe_radius is None else probe_radius
        table = BandTable.build(d_codes, m, w)
        for start in range(0, len(q_ids), PAIR_ROWS):
            rows = np.arange(start, min(start + PAIR_ROWS, len(q_ids)))
            for qi, di, dist in band_join(band_values(q_codes[rows], m, w), as_words(q_codes[rows]), q_ids[rows], table, d_ids,
                                          w, radius, max_distance):
                out_a.append(q_ids[rows[qi]])
                out_b.append(d_ids[di])
                out_d.append(dist.astype(np.int16))
    if not out_a:
        return empty
    return sort_pairs(np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_d))


def sort_pairs(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], d: npt.NDArray[np.int16]) -> PairArrays:
    """Pairs in (a, b) order. A block's ids span two shards' ranges: where ``a``'s and ``b``'s
    offsets and the distance fit 64 bits together, they are packed into one word and sorted as
    plain integers (the 5.3M pairs of a 10M-code block, shuffled: 0.42 s against 2.6 s for a
    lexsort); else a lexsort."""
    if not len(a):
        return a, b, d
    a0, b0 = int(a.min()), int(b.min())
    a_bits, b_bits = (int(a.max()) - a0).bit_length(), (int(b.max()) - b0).bit_length()
    d_bits = max(int(d.max()), 0).bit_length() if int(d.min()) >= 0 else 64
    if a_bits + b_bits + d_bits > 64:
        order = np.lexsort((b, a))
        return a[order], b[order], d[order]
    packed = (a - a0).astype(np.uint64) << np.uint64(b_bits + d_bits)
    packed |= (b - b0).astype(np.uint64) << np.uint64(d_bits)
    packed |= d.astype(np.uint64)
    packed.sort()
    d_mask, b_mask = np.uint64((1 << d_bits) - 1), np.uint64((1 << b_bits) - 1)
    return ((packed >> np.uint64(b_bits + d_bits)).astype(np.int64) + a0,
            ((packed >> np.uint64(d_bits)) & b_mask).astype(np.int64) + b0,
            (packed & d_mask).astype(np.int16))


#: Codes whose band values are computed at once (``band_values`` holds ~160 bytes a code while
#: it works: a 25M-code shard at once peaked at 11.5 GB).
BAND_ROWS = 1 << 20


def _small_bands(codes: npt.NDArray[np.uint8], n_bands: int, band_width: int) -> npt.NDArray[np.unsignedinteger]:
    """Band values in the smallest unsigned type that holds them (a 25M-code shard's 4 bands of
    16 bits: 200 MB instead of 800), computed :data:`BAND_ROWS` codes at a time."""
    dtype: type[np.unsignedinteger] = next((t for t in (np.uint8, np.uint16, np.uint32) if band_width <= np.iinfo(t).bits),
                                           np.uint64)
    out = np.empty((len(codes), n_bands), dtype=dtype)
    for start in range(0, len(codes), BAND_ROWS):
        out[start : start + BAND_ROWS] = band_values(codes[start : start + BAND_ROWS], n_bands, band_width)
    return out


# --- running blocks ----------------------------------------------------------------------------


def _run_block(folder: str, token: str, block: Block, params: dict[str, int]) -> dict[str, np.ndarray]:
    """A block as a task: reads the manifest (the worker's view of the shared folder), checks
    it is the set the client planned with, computes."""
    shards = read_manifest(folder)
    if shards.token() != token:
        raise ConfigError(f"the shards in {folder} changed while the batch ran; run it again")
    if block.kind == "knn":
        ids, dist = knn_block(shards, block.query, block.data, params["k"])
        return {"ids": ids, "dist": dist}
    a, b, d = pairs_block(shards, block.query, block.data, params["max_distance"],
                          None if params["probe_radius"] < 0 else params["probe_radius"])
    return {"a": a, "b": b, "dist": d}


def _run_block_into(folder: str, token: str, block: Block, params: dict[str, int], out: str, mark: str,
                    mark_value: str) -> dict[str, np.ndarray] | str:
    """A block as a cluster task: computed, then saved by the worker itself to ``out`` when it
    sees the client's work folder (the mark file there holds ``mark_value``: the same folder, not
    one of the same name on another machine), returning the path; else the arrays, which the
    client saves. On a cluster a block (~100 MB of pairs at 10M codes) then crosses the network
    once, to the shared folder, instead of to the client and from it; on one machine it made no
    measured difference (10M pairs on two local workers: 63.3 s before, 62.9 s after)."""
    result = _run_block(folder, token, block, params)
    try:
        shared = Path(mark).read_text(encoding="ascii") == mark_value
    except (OSError, UnicodeDecodeError):
        shared = False
    if not shared:
        return result
    try:
        _save_block(Path(out), result)
    except OSError:  # seen but not writable from here: the client saves it
        return result
    return out


def _save_block(path: Path, result: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, allow_pickle=False, **result)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


#: What reading a damaged or truncated block file raises.
_DAMAGED = (OSError, ValueError, EOFError, zipfile.BadZipFile)


def _load_block(path: Path) -> dict[str, np.ndarray]:
    """A saved block (one :func:`run_blocks` listed); a file damaged inside is removed, so the
    rerun the message asks for computes it again."""
    try:
        with np.load(path) as z:
            return {name: z[name] for name in z.files}
    except _DAMAGED as exc:
        path.unlink(missing_ok=True)
        raise ConfigError(f"the block file {path} can no longer be read ({exc}); run the same command again") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # someone else's process
        return True
    return True


def _readable(path: Path) -> bool:
    """Whether a saved block opens (its archive's directory is whole: what a truncated file
    lacks); one that does not is removed and computed again. Its arrays are read once, later."""
    try:
        with np.load(path) as z:
            z.files  # noqa: B018  # listing them reads the archive's directory
        return True
    except _DAMAGED:
        path.unlink(missing_ok=True)
        return False


def run_blocks(shards: ShardSet, blocks: list[Block], params: dict[str, int], param_tag: str, workdir: Path,
               cluster: Any, progress: Progress | None, stats: RunStats,
               saved: Callable[[Block, Path], None] | None = None) -> dict[Block, Path]:
    """Where every block's result is saved: a readable file the work folder holds already, else
    computed (here, or on the cluster) and saved there as it finishes; ``saved`` is told of each
    block once its file is there (those found first), while the rest still run. Blocks come back
    as files, never held here together (a 100M-code graph is ~40 GB of blocks)."""
    workdir.mkdir(parents=True, exist_ok=True)
    token = shards.token()
    for old in workdir.glob("*_*_*_*_*.npz"):  # blocks of shards since exported again
        if old.name.split("_")[2] != token:
            old.unlink(missing_ok=True)
    results: dict[Block, Path] = {}
    todo: list[Block] = []
    names = {block: block.file_name(token, param_tag) for block in blocks}
    for block in blocks:
        path = workdir / names[block]
        if path.exists() and _readable(path):
            results[block] = path
        else:
            todo.append(block)
    stats.blocks, stats.blocks_reused = len(blocks), len(results)
    report = progress or (lambda done, total: None)
    report(len(results), len(blocks))
    tell = saved or (lambda block, path: None)
    for block in blocks:
        if block in results:
            tell(block, results[block])
    folder = str(shards.folder)
    if cluster is None:
        for block in todo:
            path = workdir / names[block]
            _save_block(path, _run_block(folder, token, block, params))
            results[block] = path
            report(len(results), len(blocks))
            tell(block, path)
        return results
    told: Exception | None = None  # what ``saved`` raised
    client, close, _threads = connect(cluster)
    try:
        stats.workers = len(client.scheduler_info().get("workers", {})) or 1
        stats.where = str(cluster) if isinstance(cluster, str) else "a Dask cluster"
        host = _host_tag()
        for old in workdir.glob(f".client-{host}-*"):  # marks of this machine's clients killed mid-run
            pid = old.name.split("-")[2]
            if pid.isdigit() and not _alive(int(pid)):
                old.unlink(missing_ok=True)
        mark = workdir / f".client-{host}-{os.getpid()}-{secrets.token_hex(4)}"
        mark_value = secrets.token_hex(16)
        mark.write_text(mark_value, encoding="ascii")
        futures = {client.submit(_run_block_into, folder, token, block, params, str((workdir / names[block]).resolve()),
                                 str(mark.resolve()), mark_value, key=f"imgstore-{names[block]}", pure=False): block
                   for block in todo}
        from distributed import as_completed

        try:
            done = as_completed(list(futures))  # type: ignore[no-untyped-call]
            for future in done:
                block = futures[future]
                path = workdir / names[block]
                got = future.result()
                if isinstance(got, str):  # the worker saved it here
                    if not _readable(path):  # not (yet) seen here, e.g. a network filesystem's cached lookup
                        again = client.submit(_run_block, folder, token, block, params, pure=False,
                                              key=f"imgstore-again-{names[block]}")
                        futures[again] = block
                        done.add(again)  # type: ignore[no-untyped-call]
                        future.release()
                        continue
                    stats.saved_by_workers += 1
                else:
                    _save_block(path, got)
                future.release()  # the worker may drop it: the file is the result now
                results[block] = path
                report(len(results), len(blocks))
                try:
                    tell(block, path)
                except Exception as exc:  # noqa: BLE001  # the caller's own work failed, not the cluster: raised as it is, below
                    told = exc
                    break
        except ImgStoreError:
            raise
        except Exception as exc:  # noqa: BLE001  # Dask raises the worker's error or its own; both end the run
            raise ClusterError(f"the batch on {stats.where} stopped ({type(exc).__name__}: {exc}); the finished "
                               f"blocks are kept in {workdir}: run the same command again to do the rest") from None
        finally:
            mark.unlink(missing_ok=True)
    finally:
        close()
    if told is not None:
        raise told
    for block in blocks:  # every block is saved: what a worker killed mid-save left is garbage once old
        for tmp in workdir.glob(f".{names[block]}.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > ABANDONED_S:
                    tmp.unlink(missing_ok=True)
            except OSError:
                continue
    return results


#: a half-saved block this old was left by a killed process (another client's may be in progress)
ABANDONED_S = 3600


def _host_tag() -> str:
    """This machine, in a work folder's mark names (a pid means something only on its host)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def neighbours(shards: ShardSet, k: int, *, workdir: str | os.PathLike[str], cluster: Any = None,
               progress: Progress | None = None) -> Neighbours:
    """Every code's exact ``k`` nearest other codes (see the module). The blocks of one query
    shard are merged at a time, two by two, into the graph's files in the work folder
    (``graph-k{k}-{token}-*.npy``, rows in id order, written under temporary names, then
    renamed); the result's arrays are those files memory-mapped, so no process holds the whole
    graph (a rerun with the graph already written reads it directly)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    started = time.perf_counter()
    stats = RunStats(codes=shards.n_codes)
    names = [s.name for s in shards.shards]
    blocks = [Block("knn", q, d) for d in names for q in names]  # by data shard: a worker's next block reuses its cache
    folder = Path(workdir)
    token = shards.token()
    final = {part: folder / f"graph-k{k}-{token}-{part}.npy" for part in ("ids", "neighbours", "distances")}
    if not all(p.exists() for p in final.values()):
        paths = run_blocks(shards, blocks, {"k": k}, f"k{k}", folder, cluster, progress, stats)
        _write_graph(shards, names, paths, k, final)
    else:
        stats.blocks = stats.blocks_reused = len(blocks)
        if progress is not None:
            progress(len(blocks), len(blocks))
    for old in folder.glob("graph-k*-*-*.npy"):  # graphs of shards since exported again
        if old.name.split("-")[2] != token:
            old.unlink(missing_ok=True)
    stats.seconds = time.perf_counter() - started
    return Neighbours(np.load(final["ids"], mmap_mode="r"), np.load(final["neighbours"], mmap_mode="r"),
                      np.load(final["distances"], mmap_mode="r"), stats)


def _write_graph(shards: ShardSet, names: list[str], paths: dict[Block, Path], k: int, final: dict[str, Path]) -> None:
    n = shards.n_codes
    for stale in next(iter(final.values())).parent.glob(".graph-k*.tmp"):  # left by a client killed while writing
        if not _alive(int(stale.name.rsplit(".", 2)[-2])):
            stale.unlink(missing_ok=True)
    tmp = {name: p.with_name(f".{p.name}.{os.getpid()}.tmp") for name, p in final.items()}
    out_ids = np.lib.format.open_memmap(tmp["ids"], mode="w+", dtype=np.int64, shape=(n,))
    out_nbr = np.lib.format.open_memmap(tmp["neighbours"], mode="w+", dtype=np.int64, shape=(n, k))
    out_dist = np.lib.format.open_memmap(tmp["distances"], mode="w+", dtype=np.int16, shape=(n, k))
    row = 0
    for s in shards.shards:
        ids, _ = load_shard(shards, s)
        blocks = (_load_block(paths[Block("knn", s.name, d)]) for d in names)
        nbr, dist = merge_knn(((b["ids"], b["dist"]) for b in blocks), k)
        out_ids[row : row + len(ids)] = ids
        out_nbr[row : row + len(ids)] = nbr
        out_dist[row : row + len(ids)] = dist
        row += len(ids)
    for arr in (out_ids, out_nbr, out_dist):
        arr.flush()
    del out_ids, out_nbr, out_dist
    for name, p in tmp.items():
        with open(p, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(p, final[name])


def near_pairs(shards: ShardSet, max_distance: int, *, probe_radius: int | None = None, workdir: str | os.PathLike[str],
               cluster: Any = None, progress: Progress | None = None) -> Pairs:
    """Every pair of codes within ``max_distance`` bits that shares a band within
    ``probe_radius`` bits, or by default every pair within the distance (joined on sets of equal
    bands when the distance is below the number of bands, else probed at
    ``max_distance // n_bands``: pigeonhole either way)."""
    index = shards.index
    if max_distance < 0 or max_distance > index.n_bits:
        raise ConfigError(f"the distance must be between 0 and {index.n_bits} bits, got {max_distance}")
    radius = max_distance // index.n_bands if probe_radius is None else probe_radius
    if radius < 0 or radius > index.band_width:
        raise ConfigError(f"the probe radius must be between 0 and {index.band_width}, got {radius}")
    if math.comb(index.band_width, radius) > 5_000:
        raise ConfigError(f"a probe radius of {radius} in {index.band_width}-bit bands flips too many values; "
                          "give a smaller distance or an index with more bands")
    started = time.perf_counter()
    stats = RunStats(codes=shards.n_codes)
    names = [s.name for s in sorted(shards.shards, key=lambda s: s.first_id)]
    # By query shard, so each is merged while later ones run; within one, the diagonal block
    # (one shard to sort) last, so the run ends on the smaller blocks.
    blocks = [Block("pairs", q, d) for i, q in enumerate(names) for d in [*names[i + 1 :], q]]
    every = probe_radius is None
    merger = _PairsMerger(names, blocks)
    run_blocks(shards, blocks, {"max_distance": max_distance, "probe_radius": -1 if every else radius},
               f"r{max_distance}all" if every else f"r{max_distance}p{radius}", Path(workdir), cluster, progress, stats,
               saved=merger.saved)
    a, b_, d = merger.result()
    stats.seconds = time.perf_counter() - started
    return Pairs(a, b_, d, stats)


class _PairsMerger:
    """Every block's pairs in (a, b) order, merged a query shard at a time as soon as its last
    block is saved (on a cluster, while the workers run the later shards' blocks). Shards are id
    ranges, so the query shards follow one another in id order, and the blocks of one, taken in
    their data shards' order, are runs to interleave by a alone (:func:`merge_runs`, no sort: a
    lexsort of every pair on two keys left the workers idle for ~10 s at 10M codes, a stable
    sort by a for ~4 s, counting ~1 s)."""

    def __init__(self, names: list[str], blocks: list[Block]) -> None:
        self.names = names  # in id order
        rank = {name: i for i, name in enumerate(names)}
        self.mine = {q: sorted((blk for blk in blocks if blk.query == q), key=lambda blk: rank[blk.data]) for q in names}
        self.paths: dict[Block, Path] = {}
        self.merged: dict[str, PairArrays] = {}

    def saved(self, block: Block, path: Path) -> None:
        self.paths[block] = path
        mine = self.mine[block.query]
        if all(blk in self.paths for blk in mine):
            self.merged[block.query] = merge_runs([_pair_arrays(_load_block(self.paths[blk])) for blk in mine])

    def result(self) -> PairArrays:
        """The query shards' pairs one after the other; each shard's part is let go once copied
        (the output's pages are taken as they are written: about one copy of the pairs at a time)."""
        missing = [q for q in self.names if q not in self.merged]
        if missing:  # every block was saved, so every query shard was merged: a bug, not bad input
            raise RuntimeError(f"query shards {missing} were not merged")
        n = sum(len(self.merged[q][0]) for q in self.names)
        out_a, out_b, out_d = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int16)
        at = 0
        for q in self.names:
            a, b, d = self.merged.pop(q)
            out_a[at : at + len(a)], out_b[at : at + len(a)], out_d[at : at + len(a)] = a, b, d
            at += len(a)
            del a, b, d
        return out_a, out_b, out_d


def _pair_arrays(block: dict[str, np.ndarray]) -> PairArrays:
    return block["a"], block["b"], block["dist"]


def merge_runs(runs: list[PairArrays]) -> PairArrays:
    """Pairs of several runs in (a, b) order, where each run is sorted by (a, b) and every b of a
    run is below every b of the runs after it (a query shard's blocks in their data shards'
    order): for each a, its pairs of the first run, then of the second, ... Placed by counting,
    not sorted: each pair goes after the pairs of smaller a and those of its a in earlier runs.
    A run costs its own length (its a values are sorted: each a's pairs lie side by side), the
    shard one pass over its id span; where the a values spread over far more ids than there are
    pairs, the pairs are sorted instead."""
    n = sum(len(r[0]) for r in runs)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int16)
    full = [r for r in runs if len(r[0])]
    if len(full) == 1:
        return full[0]
    lo = min(int(r[0][0]) for r in full)
    span = max(int(r[0][-1]) for r in full) - lo + 1
    if span > max(4 * n, 1 << 20):
        return sort_pairs(*(np.concatenate([r[i] for r in full]) for i in range(3)))
    groups = []
    place = np.zeros(span + 1, dtype=np.int64)  # pairs of each a (at a + 1), then where the next goes
    for a, _, _ in full:
        rel = a - lo
        starts = np.flatnonzero(np.concatenate(([True], rel[1:] != rel[:-1])))  # each a's first pair in the run
        counts = np.diff(starts, append=len(rel))
        place[rel[starts] + 1] += counts
        groups.append((rel, starts, counts))
    np.cumsum(place, out=place)
    out_a, out_b = np.empty(n, np.int64), np.empty(n, np.int64)
    out_d = np.empty(n, np.int16)
    for (a, b, d), (rel, starts, counts) in zip(full, groups, strict=True):
        at = place[rel] + (np.arange(len(rel)) - np.repeat(starts, counts))
        out_a[at], out_b[at], out_d[at] = a, b, d
        place[rel[starts]] += counts
    return out_a, out_b, out_d


def iter_rows(result: Neighbours) -> Iterator[tuple[int, list[int], list[int]]]:
    for i, image_id in enumerate(result.image_ids.tolist()):
        row = result.neighbours[i]
        keep = row >= 0
        yield image_id, row[keep].tolist(), result.distances[i][keep].tolist()
