"""Compiled loops for the in-memory code cache (numba): band probes, popcount, top-k.

Why numba and not numpy here: one cached query is a few dozen band look-ups, a gather of a
few hundred to a few thousand codes, XOR + popcount and a top-k. In numpy that is twenty-odd
calls with microseconds of fixed overhead each, which cost more than the work itself; compiled
as one loop the same query runs several times faster (benchmarks/results/search.md has the
cached path beside faiss).
The SQL path and the bit helpers in :mod:`imgstore.hashing.bits` stay pure numpy; this module
is imported only when a cache is built, so the CLI and SQL-only queries never pay numba's import.

Layout the kernels read (built by :class:`imgstore.search.CodeCache`), for ``n`` codes and ``m``
bands of ``w`` bits:

* ``seg_keys`` ``(m * n,)`` uint32: band ``j``'s values sorted, in segment ``[j * n, (j + 1) * n)``;
* ``seg_rows`` ``(m * n,)`` int32: the cache row of each entry;
* ``seg_words`` ``(m * n, n_words)`` uint64: that row's code, copied next to its key so a probe
  reads codes sequentially instead of one cache miss per candidate;
* ``seg_dir`` ``(m, 2**p + 1)`` int32 and ``shift``: where each value of a band's top
  ``w - shift`` bits starts in its segment (:func:`imgstore.search.directory`);
* ``band_masks`` ``(m, n_words)`` uint64: the bits of band ``j`` in the word layout of
  :func:`imgstore.hashing.bits.as_words`, so a band's distance is ``popcount((x ^ q) & mask)``.

A code is reported once even when several bands find it: a candidate met in band ``j`` counts
only if no earlier band ``j' < j`` is within the probed radius of the query, and (for rounds of
exact search that probe radius ``s`` only) no band is closer than ``s``, i.e. it was not found in
an earlier round. That needs no "seen" set, so calls share no state (``nogil`` safe).

Top-k is by counting (a histogram of distances gives the threshold), then the few survivors
are sorted by ``distance * n + row``; rows are in image-id order, so ties break by image id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, cast

import numba as nb
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.base import BaseContext
from numba.core.typing.templates import Signature
from numba.extending import intrinsic

I64 = npt.NDArray[np.int64]
U64 = npt.NDArray[np.uint64]


@intrinsic
def _ctpop(typingctx: object, x: types.Type) -> tuple[Signature, Callable[..., Any]]:
    """The CPU's popcount (LLVM ``ctpop``) on a uint64."""

    def codegen(context: BaseContext, builder: Any, signature: Signature, args: Sequence[Any]) -> Any:  # llvmlite's IR
        fnty = ir.FunctionType(ir.IntType(64), [ir.IntType(64)])
        # numba's cgutils is unannotated
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.ctpop.i64")  # type: ignore[no-untyped-call]
        return builder.call(fn, args)

    return types.uint64(types.uint64), codegen


#: :func:`_ctpop` as compiled code calls it: a uint64 in, its count of set bits out (numba's stub
#: types an intrinsic's call with the typing function's parameters, typing context included, and
#: no result)
_popcount = cast("Callable[[np.uint64], int]", _ctpop)


@nb.njit(cache=True, nogil=True)
def _query_band(qbytes: npt.NDArray[np.uint8], j: int, w: int) -> np.int64:
    """Band ``j`` of a packed code (bits ``[j * w, (j + 1) * w)``, the first one most significant)."""
    v = np.int64(0)
    for b in range(j * w, (j + 1) * w):
        v = (v << 1) | ((np.int64(qbytes[b >> 3]) >> (7 - (b & 7))) & 1)
    return v


@nb.njit(cache=True, nogil=True)
def _ranges(
    seg_keys: npt.NDArray[np.uint32], seg_dir: npt.NDArray[np.int32], shift: int, n: int, qbytes: npt.NDArray[np.uint8],
    m: int, w: int, flips: I64,
) -> tuple[I64, I64]:
    """Start and end (exclusive) in ``seg_keys`` of every probe, band by band (:func:`_band_ranges`)."""
    nf = flips.shape[0]
    los = np.empty(m * nf, np.int64)
    his = np.empty(m * nf, np.int64)
    for j in range(m):
        _band_ranges(seg_keys, seg_dir, shift, n, qbytes, j, w, flips, los[j * nf : (j + 1) * nf], his[j * nf : (j + 1) * nf])
    return los, his


@nb.njit(cache=True, nogil=True)
def _band_ranges(
    seg_keys: npt.NDArray[np.uint32], seg_dir: npt.NDArray[np.int32], shift: int, n: int, qbytes: npt.NDArray[np.uint8],
    j: int, w: int, flips: I64, los: I64, his: I64,
) -> None:
    """Into ``los``/``his``: start and end (exclusive) in ``seg_keys`` of band ``j``'s probes
    (the query's band XOR each of ``flips``). The directory gives the run of keys sharing the
    probe's top bits (exactly its bucket when ``shift`` is 0), a binary search inside that run
    the rest."""
    qb = _query_band(qbytes, j, w)
    seg = seg_keys[j * n : (j + 1) * n]
    for f in range(flips.shape[0]):
        v = qb ^ flips[f]
        top = v >> shift
        lo = np.int64(seg_dir[j, top])
        hi = np.int64(seg_dir[j, top + 1])
        if shift > 0:
            lo = lo + np.searchsorted(seg[lo:hi], v)
            end = hi
            hi = lo
            while hi < end and seg[hi] == v:
                hi += 1
        los[f] = j * n + lo
        his[f] = j * n + hi


@nb.njit(cache=True, nogil=True)
def probe_count(
    seg_keys: npt.NDArray[np.uint32], seg_dir: npt.NDArray[np.int32], shift: int, n: int, qbytes: npt.NDArray[np.uint8],
    m: int, w: int, flips: I64,
) -> int:
    """Index entries the probes would visit (codes found by several bands count each time)."""
    los, his = _ranges(seg_keys, seg_dir, shift, n, qbytes, m, w, flips)
    return int((his - los).sum())


@nb.njit(cache=True, nogil=True)
def _threshold(hist: I64, k: int) -> tuple[int, int]:
    """The smallest distance ``t`` with at least ``k`` entries at ``<= t`` (or the largest), and
    how many entries are at ``<= t``."""
    acc = 0
    for d in range(hist.shape[0]):
        acc += hist[d]
        if acc >= k:
            return d, acc
    return hist.shape[0] - 1, acc


@nb.njit(cache=True, nogil=True)
def _select(keys: I64, hist: I64, c: int, n: int, k: int) -> tuple[I64, I64]:
    """The ``k`` smallest of ``keys[:c]`` (``distance * n + row``), ascending, via the histogram."""
    threshold, acc = _threshold(hist, k)
    sel = np.empty(min(acc, c), np.int64)
    t = 0
    limit = (threshold + 1) * n
    for i in range(c):
        if keys[i] < limit:
            sel[t] = keys[i]
            t += 1
    sel = np.sort(sel[:t])[:k]
    return sel % n, sel // n


@nb.njit(cache=True, nogil=True)
def probe_rank(
    seg_keys: npt.NDArray[np.uint32], seg_dir: npt.NDArray[np.int32], shift: int, seg_rows: npt.NDArray[np.int32],
    seg_words: U64, n: int, qbytes: npt.NDArray[np.uint8], qwords: U64, band_masks: U64, w: int, flips: I64,
    s_lo: int, s_hi: int, k: int, allow: npt.NDArray[np.uint8],
) -> tuple[I64, I64, int]:
    """Top-k rows among codes with some band within ``s_lo..s_hi`` bits of the query's.

    ``flips``: the XOR masks of that radius range (``probe_values(0, w, s_lo, s_hi)``); codes
    with a band closer than ``s_lo`` are left out (an earlier round found them). ``allow``:
    ``(n,)`` 1 for the rows a filter allows, or empty for every row; a row it leaves out is
    skipped before its code is read. Returns (rows, distances, number of distinct allowed
    candidates), rows ordered by (distance, row).
    """
    los, his = _ranges(seg_keys, seg_dir, shift, n, qbytes, band_masks.shape[0], w, flips)
    keys = np.empty(int((his - los).sum()), np.int64)
    return _probe_into(seg_rows, seg_words, n, qwords, band_masks, flips.shape[0], s_lo, s_hi, k, allow, los, his, keys, 0,
                       qwords.shape[0] * 64)


@nb.njit(cache=True, nogil=True)
def _probe_into(
    seg_rows: npt.NDArray[np.int32], seg_words: U64, n: int, qwords: U64, band_masks: U64, nf: int, s_lo: int, s_hi: int,
    k: int, allow: npt.NDArray[np.uint8], los: I64, his: I64, keys: I64, j0: int, bound: int,
) -> tuple[I64, I64, int]:
    """:func:`probe_rank` over the probes' ranges ``los``/``his`` (from :func:`_ranges`), with
    ``keys`` (at least as long as the ranges together) as its scratch space: a caller that runs
    many queries passes one buffer, not a fresh allocation per query (a large one is an mmap and
    its page faults each time: see :func:`_scan_into`). The ranges are band ``j0``'s probes, then
    band ``j0 + 1``'s, ... (``nf`` a band). Codes farther than ``bound`` bits are left out before
    anything else is read of them (the caller's k-th distance so far: they cannot be among the
    k nearest), and counted in none of the results."""
    m = band_masks.shape[0]
    nw = qwords.shape[0]
    filtered = allow.shape[0] > 0
    hist = np.zeros(nw * 64 + 1, np.int64)
    x = np.empty(nw, np.uint64)
    c = 0
    for i in range(los.shape[0]):
        j = j0 + i // nf
        bands = m if s_lo > 0 else j  # at radius 0 only the bands before j can have found it already
        for p in range(los[i], his[i]):
            if filtered and allow[seg_rows[p]] == 0:
                continue
            d = 0
            for t in range(nw):
                x[t] = seg_words[p, t] ^ qwords[t]
                d += _popcount(x[t])
            if d > bound:
                continue
            first = True
            for jj in range(bands):
                dj = 0
                for t in range(nw):
                    dj += _popcount(x[t] & band_masks[jj, t])
                if dj < s_lo or (jj < j and dj <= s_hi):
                    first = False
                    break
            if not first:
                continue
            keys[c] = d * n + seg_rows[p]
            hist[d] += 1
            c += 1
    rows, dist = _select(keys, hist, c, n, k)
    return rows, dist, c


@nb.njit(cache=True, nogil=True)
def scan_rank(words: U64, qwords: U64, k: int) -> tuple[I64, I64]:
    """Top-k rows of all ``words`` by Hamming distance to ``qwords``, ordered by (distance, row)."""
    return _scan_into(words, qwords, k, np.empty(words.shape[0], np.int64))


@nb.njit(cache=True, nogil=True)
def _scan_into(words: U64, qwords: U64, k: int, dist: I64) -> tuple[I64, I64]:
    """:func:`scan_rank` with ``dist`` (at least ``n`` long) as its scratch space: a caller that
    scans for many queries passes one buffer, not a fresh allocation each time (a large one is
    an mmap and its page faults per query; Dask workers, whose ``MALLOC_TRIM_THRESHOLD_`` keeps
    every allocation over 128 KB an mmap, ran exact kNN 3x slower)."""
    n = words.shape[0]
    nw = qwords.shape[0]
    hist = np.zeros(nw * 64 + 1, np.int64)
    for r in range(n):
        d = 0
        for t in range(nw):
            d += _popcount(words[r, t] ^ qwords[t])
        dist[r] = d
        hist[d] += 1
    threshold, acc = _threshold(hist, k)
    keys = np.empty(acc, np.int64)
    c = 0
    for r in range(n):
        if dist[r] <= threshold:
            keys[c] = dist[r] * n + r
            c += 1
    keys = np.sort(keys[:c])[:k]
    return keys % n, keys // n


@nb.njit(cache=True, nogil=True)
def knn_batch(
    seg_keys: npt.NDArray[np.uint32], seg_dir: npt.NDArray[np.int32], shift: int, seg_rows: npt.NDArray[np.int32],
    seg_words: U64, words: U64, qbytes: npt.NDArray[np.uint8], qwords: U64, band_masks: U64, w: int, flips: I64,
    flip_starts: I64, k: int, budget: float,
) -> tuple[I64, I64]:
    """Exact top-k rows of every query (``qbytes`` ``(nq, n_bytes)``, ``qwords`` ``(nq, n_words)``)
    by (distance, row), a whole batch in one call (no Python per query).

    Multi-index search, band by band: round ``s`` probes the flips of radius ``s``
    (``flips[flip_starts[s]:flip_starts[s + 1]]``) in band 0, then band 1, ..., reporting only
    codes no earlier probe found. Once round ``s`` is done in bands ``0..j``, a code not yet found
    has those bands at least ``s + 1`` bits from the query's and the others at least ``s``: its
    distance is at least ``m * s + j + 1``, so a query stops as soon as its k-th distance is below
    that (not only at the end of a round: a k-th distance of 8 in 4 bands stops after band 0 of
    round 2, a quarter of that round's probes). A query scans every code instead once the
    entries it has visited plus those its next band would visit exceed ``budget``, or the radii
    given run out. Returns ``(nq, k)`` rows and distances (-1 where fewer than k codes exist)."""
    nq = qbytes.shape[0]
    n = words.shape[0]
    m = band_masks.shape[0]
    n_rounds = flip_starts.shape[0] - 1
    out_rows = np.full((nq, k), -1, np.int64)
    out_dist = np.full((nq, k), -1, np.int64)
    empty = np.zeros(0, np.uint8)
    widest = np.max(flip_starts[1:] - flip_starts[:-1])
    los = np.empty(widest, np.int64)
    his = np.empty(widest, np.int64)
    buf = np.empty(1024, np.int64)  # the probes' scratch, grown as needed and kept across queries
    scratch = np.empty(0, np.int64)  # a scan's distances, allocated at the first scan
    want = min(k, n)
    nbits = qwords.shape[1] * 64
    for q in range(nq):
        rows = np.zeros(0, np.int64)
        dist = np.zeros(0, np.int64)
        seen = 0.0
        done = False
        over = False
        s = 0
        while s < n_rounds and not done and not over:
            f = flips[flip_starts[s]:flip_starts[s + 1]]
            nf = f.shape[0]
            for j in range(m):
                _band_ranges(seg_keys, seg_dir, shift, n, qbytes[q], j, w, f, los[:nf], his[:nf])
                need = int((his[:nf] - los[:nf]).sum())  # the entries this band's probes visit
                if s > 0:
                    if seen + need + nf > budget:
                        over = True
                        break
                    seen += need
                if need > buf.shape[0]:
                    buf = np.empty(max(need, 2 * buf.shape[0]), np.int64)
                bound = dist[-1] if rows.shape[0] == want else nbits
                r, d, _ = _probe_into(seg_rows, seg_words, n, qwords[q], band_masks, nf, s, s, k, empty,
                                      los[:nf], his[:nf], buf, j, bound)
                if r.shape[0] > 0:
                    keys = np.concatenate((dist * n + rows, d * n + r))
                    keys = np.sort(keys)[:k]
                    rows = keys % n
                    dist = keys // n
                if rows.shape[0] == want and (want == n or dist[-1] < m * s + j + 1):
                    done = True
                    break
            s += 1
        if not done:
            if scratch.shape[0] < n:
                scratch = np.empty(n, np.int64)
            rows, dist = _scan_into(words, qwords[q], k, scratch)
        out_rows[q, :rows.shape[0]] = rows
        out_dist[q, :rows.shape[0]] = dist
    return out_rows, out_dist


@nb.njit(cache=True, nogil=True)
def merge_topk(a_ids: I64, a_dist: npt.NDArray[np.int16], b_ids: I64, b_dist: npt.NDArray[np.int16],
               k: int) -> tuple[I64, npt.NDArray[np.int16]]:
    """Row by row, the first ``k`` of two lists each sorted by (distance, id) (``(n, ka)`` and
    ``(n, kb)``; an id of -1 pads a short list and sorts after every real id at its distance):
    a linear merge, where a sort of the rows side by side costs ~50x more."""
    n = a_ids.shape[0]
    ka, kb = a_ids.shape[1], b_ids.shape[1]
    out_ids = np.empty((n, k), np.int64)
    out_dist = np.empty((n, k), np.int16)
    for r in range(n):
        i = 0
        j = 0
        for t in range(k):
            take_a = j >= kb
            if i < ka and j < kb:
                da, db = a_dist[r, i], b_dist[r, j]
                if da != db:
                    take_a = da < db
                else:
                    ia, ib = a_ids[r, i], b_ids[r, j]
                    take_a = ib < 0 or (ia >= 0 and ia <= ib)
            if take_a and i < ka:
                out_ids[r, t] = a_ids[r, i]
                out_dist[r, t] = a_dist[r, i]
                i += 1
            elif j < kb:
                out_ids[r, t] = b_ids[r, j]
                out_dist[r, t] = b_dist[r, j]
                j += 1
            else:
                out_ids[r, t] = -1
                out_dist[r, t] = np.iinfo(np.int16).max
    return out_ids, out_dist
