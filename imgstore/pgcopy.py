"""PostgreSQL binary ``COPY`` payloads built with numpy, for bulk loads of codes and buckets.

Pure numpy, no database: the functions return the bytes of a ``COPY ... FROM STDIN (FORMAT
BINARY)`` stream (signature, header, tuples, trailer; integers in network byte order, a bytea
field as its raw bytes). A new index's codes and buckets are millions of rows whose fields are
integers and byte strings already laid out in numpy arrays; building the stream with a few
vectorised copies avoids a Python object per row, which is what bounded the ``unnest`` INSERTs
(benchmarks/results/scale.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import numpy.typing as npt

#: The binary COPY signature, flags field (0) and header-extension length (0).
HEADER = b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00"
#: The file trailer: a tuple with field count -1.
TRAILER = b"\xff\xff"
#: Rows per slice when scattering variable-length rows (bounds the index arrays' memory).
SCATTER_ROWS = 200_000


def codes_stream(hasher_id: int, image_ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> bytes:
    """``COPY codes (hasher_id, image_id, code)`` tuples (no header or trailer: see
    :func:`framed`): fixed width, one structured array."""
    n, nb = codes.shape
    # image_id is an integer column (int4), as images.id
    dt = np.dtype(
        [("nf", ">i2"), ("l_h", ">i4"), ("h", ">i4"), ("l_i", ">i4"), ("i", ">i4"), ("l_c", ">i4"), ("c", np.uint8, (nb,))]
    )
    rows = np.empty(n, dtype=dt)
    rows["nf"], rows["l_h"], rows["h"], rows["l_i"], rows["l_c"] = 3, 4, hasher_id, 4, nb
    rows["i"] = image_ids
    rows["c"] = codes
    return rows.tobytes()


_BUCKET_HEAD = np.dtype([
    ("nf", ">i2"), ("l_h", ">i4"), ("h", ">i4"), ("l_b", ">i4"), ("b", ">i4"), ("l_v", ">i4"), ("v", ">i8"),
    ("l_c", ">i4"), ("c", ">i4"), ("l_n", ">i4"), ("n", ">i4"), ("l_ids", ">i4"),
])


def bucket_stream(hasher_id: int, band: int, values: npt.NDArray[np.int64], image_ids: npt.NDArray[np.int64],
                  codes: npt.NDArray[np.uint8], chunk_size: int) -> bytes:
    """``COPY code_buckets (hasher_id, band, value, chunk, n, image_ids, codes)`` rows of one band.

    ``values``, ``image_ids`` and ``codes`` are the band's entries sorted by (value, id); each
    value's entries are cut into chunks of at most ``chunk_size`` (numbered from 0), one row
    each, whose ``image_ids`` are little-endian int64 and ``codes`` the packed codes, as
    :mod:`imgstore.bandindex` stores them. No header or trailer (see :func:`framed`).
    """
    e = len(values)
    if e == 0:
        return b""
    nb = codes.shape[1]
    new_value = np.r_[True, values[1:] != values[:-1]]
    group_start = np.flatnonzero(new_value)
    pos = np.arange(e) - group_start[np.cumsum(new_value) - 1]  # position within the value
    starts_row = pos % chunk_size == 0
    row_start = np.flatnonzero(starts_row)
    n_rows = len(row_start)
    n_in = np.diff(np.r_[row_start, e])
    lengths = _BUCKET_HEAD.itemsize + 4 + (8 + nb) * n_in
    offset = np.r_[0, np.cumsum(lengths)[:-1]]
    head = np.empty(n_rows, dtype=_BUCKET_HEAD)
    head["nf"], head["l_h"], head["h"], head["l_b"], head["b"] = 7, 4, hasher_id, 4, band
    head["l_v"], head["v"], head["l_c"], head["c"] = 8, values[row_start], 4, pos[row_start] // chunk_size
    head["l_n"], head["n"], head["l_ids"] = 4, n_in, 8 * n_in
    codes_len = (nb * n_in).astype(">i4")
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    hs = _BUCKET_HEAD.itemsize
    row_of = np.cumsum(starts_row) - 1  # each entry's row
    within = np.arange(e) - row_start[row_of]
    ids_le = np.ascontiguousarray(image_ids, dtype="<i8").view(np.uint8).reshape(e, 8)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    for a in range(0, n_rows, SCATTER_ROWS):
        b = min(a + SCATTER_ROWS, n_rows)
        off = offset[a:b]
        _scatter(out, off, head[a:b].view(np.uint8).reshape(b - a, hs))
        _scatter(out, off + hs + 8 * n_in[a:b], codes_len[a:b].view(np.uint8).reshape(b - a, 4))
        ea, eb = row_start[a], (row_start[b] if b < n_rows else e)
        rows = row_of[ea:eb]
        _scatter(out, offset[rows] + hs + 8 * within[ea:eb], ids_le[ea:eb])
        _scatter(out, offset[rows] + hs + 8 * n_in[rows] + 4 + nb * within[ea:eb], codes[ea:eb])
    return out.tobytes()


def framed(parts: Iterable[bytes]) -> Iterator[bytes]:
    """A whole COPY stream from tuple blocks, as they come: the header, the blocks, the trailer."""
    yield HEADER
    yield from parts
    yield TRAILER


def _scatter(out: npt.NDArray[np.uint8], offsets: npt.NDArray[np.int64], block: npt.NDArray[np.uint8]) -> None:
    """``out[offsets[i] : offsets[i] + w] = block[i]`` for every row ``i`` of a (rows, w) block."""
    w = block.shape[1]
    out[(offsets[:, None] + np.arange(w)).reshape(-1)] = block.reshape(-1)
