"""Shards: an index's codes exported from the database into files a cluster's workers load.

A shard set is a folder: one pair of ``.npy`` files per range of image ids (``NAME.ids.npy``,
``(n,)`` int64 ascending, and ``NAME.codes.npy``, ``(n, n_bits // 8)`` uint8), and
``manifest.json`` naming the index (id, uid, layout), the generation the codes were read at, and
each shard's id range, size and a fingerprint. Workers memory-map the files
(:func:`load_shard`), so a shard read by several tasks on one machine is read from disk once.

Ranges are cut when a folder is first exported (:data:`DEFAULT_SHARD_CODES` codes each) and kept
afterwards, so exporting again rewrites only the shards whose ids changed: a range whose count
and sum of ids are unchanged holds the same codes (an index's code for an image never changes;
a removed image changes the count; SQLite may give a new image the id of a removed last one,
which can only happen in the last range, and the last range is always written again). A last
range grown past 1.5 shard sizes is cut in two. A different index (another uid) starts over.

Files are written under temporary names and renamed; the manifest is replaced last, so a
reader sees either the old set or the new one, and an export killed midway leaves the old
manifest true. PostgreSQL is read through binary ``COPY``, parsed with numpy; SQLite through its
cursor. The codes are read in one pass whose generation is checked before and after: an index
written meanwhile makes the export start again (up to :data:`EXPORT_ATTEMPTS` times).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Connection, func, select

from .context import StoreContext
from .errors import ConfigError, DatabaseError, NotFoundError
from .indexing import find_index, list_indexes
from .models import Code, HashIndex
from .types import IndexInfo

MANIFEST = "manifest.json"
#: Codes per shard when a folder is first exported: ~20M 64-bit codes are 160 MB of codes on
#: disk and ~1.8 GB as a worker's in-memory code cache (about 90 bytes a code).
DEFAULT_SHARD_CODES = 20_000_000
EXPORT_ATTEMPTS = 3
FORMAT_VERSION = 1
#: Rows per read when streaming SQLite's codes.
FETCH_ROWS = 200_000


@dataclass(frozen=True)
class Shard:
    """One range of image ids, ``first_id <= id < end_id`` (``end_id`` None: no upper bound)."""

    name: str
    first_id: int
    end_id: int | None
    n_codes: int
    id_sum: int


@dataclass(frozen=True)
class ShardSet:
    """A folder of shards and what they hold (its ``manifest.json``)."""

    folder: Path
    index: IndexInfo
    generation: int
    shards: tuple[Shard, ...]
    exported_at: str = ""

    @property
    def n_codes(self) -> int:
        return sum(s.n_codes for s in self.shards)

    def token(self) -> str:
        """Changes whenever any shard's content does: keys work done on these shards."""
        parts = [self.index.uid, str(self.generation)] + [f"{s.name}:{s.first_id}:{s.end_id}:{s.n_codes}:{s.id_sum}"
                                                          for s in self.shards]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def files(self, shard: Shard) -> tuple[Path, Path]:
        return self.folder / f"{shard.name}.ids.npy", self.folder / f"{shard.name}.codes.npy"


@dataclass
class ExportSummary:
    shards: ShardSet
    written: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"folder": str(self.shards.folder), "index": self.shards.index.id, "uid": self.shards.index.uid,
                "generation": self.shards.generation, "n_codes": self.shards.n_codes, "n_shards": len(self.shards.shards),
                "written": self.written, "kept": self.kept, "removed": self.removed, "seconds": round(self.seconds, 3)}


def read_manifest(folder: str | os.PathLike[str]) -> ShardSet:
    """The shard set in ``folder``; NotFoundError when it holds none, ConfigError when its
    manifest is damaged or from another version."""
    path = Path(folder).expanduser() / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{Path(folder)} holds no shards; export them first: `imgstore shards export {folder}`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; export the shards again into an empty folder") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path} is not a shard manifest of this imgstore (format {FORMAT_VERSION}); "
                          "export the shards again into an empty folder")
    info = dict(data["index"])
    info["created_at"] = datetime.fromisoformat(info["created_at"])
    return ShardSet(Path(folder).expanduser(), IndexInfo(**info), int(data["generation"]),
                    tuple(Shard(**s) for s in data["shards"]), str(data.get("exported_at", "")))


def load_shard(shards: ShardSet, shard: Shard) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """A shard's ids and codes, memory-mapped; ConfigError when its files do not match the manifest."""
    ids_f, codes_f = shards.files(shard)
    try:
        ids = np.load(ids_f, mmap_mode="r")
        codes = np.load(codes_f, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ConfigError(f"shard {shard.name} in {shards.folder} cannot be read ({exc}); "
                          "export the shards again: `imgstore shards export FOLDER`") from None
    n_bytes = shards.index.n_bits // 8
    if ids.shape != (shard.n_codes,) or codes.shape != (shard.n_codes, n_bytes) or ids.dtype != np.int64 \
            or codes.dtype != np.uint8:
        raise ConfigError(f"shard {shard.name} in {shards.folder} does not match its manifest; "
                          "export the shards again: `imgstore shards export FOLDER`")
    return ids, codes


def export_shards(ctx: StoreContext, folder: str | os.PathLike[str], *, index_id: int | None = None,
                  shard_codes: int = DEFAULT_SHARD_CODES) -> ExportSummary:
    """Export the codes of an index (the active one by default) into ``folder``; see the module."""
    if shard_codes < 1:
        raise ConfigError(f"shard size must be at least 1 code, got {shard_codes}")
    out = Path(folder).expanduser()
    started = time.perf_counter()
    for _ in range(EXPORT_ATTEMPTS):
        summary = _export_once(ctx, out, index_id, shard_codes)
        if summary is not None:
            summary.seconds = time.perf_counter() - started
            return summary
    raise DatabaseError(f"the index was written to during each of {EXPORT_ATTEMPTS} exports; "
                        "export when no ingest or index build runs")


def _export_once(ctx: StoreContext, out: Path, index_id: int | None, shard_codes: int) -> ExportSummary | None:
    with ctx.read("export shards") as conn:
        index = find_index(list_indexes(conn, with_counts=False), index_id)
        if index is None:
            raise NotFoundError("this store has no active index; `imgstore index create` builds one")
        generation = _generation(conn, index)
        previous = _previous(out, index)
        ranges = _plan(conn, index, previous, shard_codes)
        out.mkdir(parents=True, exist_ok=True)
        summary = ExportSummary(ShardSet(out, index, generation, ()))
        shards: list[Shard] = []
        for i, (first, end, n, id_sum) in enumerate(ranges):
            old = next((s for s in previous.shards if s.first_id == first and s.end_id == end), None) if previous else None
            last = i == len(ranges) - 1
            if old is not None and not last and old.n_codes == n and old.id_sum == id_sum and \
                    all(p.exists() for p in previous.files(old)):  # type: ignore[union-attr]
                shards.append(old)
                summary.kept.append(old.name)
                continue
            name = old.name if old is not None else _new_name(out, previous, shards)
            ids, codes = _read_range(conn, index, first, end)
            if len(ids) != n:  # written meanwhile
                return None
            _save(out, name, ids, codes)
            shards.append(Shard(name, first, end, len(ids), int(ids.sum(dtype=np.int64)) if len(ids) else 0))
            summary.written.append(name)
        if _generation(conn, index) != generation:
            return None
    result = ShardSet(out, index, generation, tuple(shards), datetime.now().astimezone().isoformat(timespec="seconds"))
    _write_manifest(result)
    names = {s.name for s in shards}
    for stale in previous.shards if previous else ():
        if stale.name not in names:
            for p in previous.files(stale):  # type: ignore[union-attr]
                p.unlink(missing_ok=True)
            summary.removed.append(stale.name)
    summary.shards = result
    return summary


def write_arrays(folder: str | os.PathLike[str], index: IndexInfo, image_ids: npt.ArrayLike, codes: npt.ArrayLike, *,
                 shard_codes: int = DEFAULT_SHARD_CODES, generation: int = 0) -> ShardSet:
    """A shard set made from codes held elsewhere (``image_ids`` distinct, any order; ``codes``
    ``(n, index.n_bits // 8)`` uint8), into an empty or new ``folder``: for codes computed outside
    a store, and for benchmarks at sizes no database needs to hold."""
    out = Path(folder).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty; write a shard set into an empty or new folder")
    ids = np.asarray(image_ids, dtype=np.int64)
    arr = np.asarray(codes, dtype=np.uint8)
    if arr.ndim != 2 or arr.shape != (len(ids), index.n_bits // 8):
        raise ConfigError(f"codes must be ({len(ids)}, {index.n_bits // 8}) uint8 for {index.n_bits}-bit codes, got {arr.shape}")
    if shard_codes < 1:
        raise ConfigError(f"shard size must be at least 1 code, got {shard_codes}")
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (np.diff(ids) == 0).any():
        raise ConfigError("image ids must be distinct")
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Shard] = []
    starts = list(range(0, len(ids), shard_codes)) or [0]
    for i, start in enumerate(starts):
        part = slice(start, start + shard_codes)
        first = 0 if i == 0 else int(ids[start])
        end = int(ids[starts[i + 1]]) if i + 1 < len(starts) else None
        name = f"shard-{i:05d}"
        _save(out, name, ids[part], arr[order[part]])
        shards.append(Shard(name, first, end, len(ids[part]), int(ids[part].sum(dtype=np.int64))))
    result = ShardSet(out, index, generation, tuple(shards), datetime.now().astimezone().isoformat(timespec="seconds"))
    _write_manifest(result)
    return result


def _generation(conn: Connection, index: IndexInfo) -> int:
    return int(conn.scalar(select(HashIndex.generation).where(HashIndex.id == index.id)) or 0)


def _previous(out: Path, index: IndexInfo) -> ShardSet | None:
    if not (out / MANIFEST).exists():
        if out.exists() and any(out.iterdir()):
            raise ConfigError(f"{out} is not empty and holds no shard manifest; export into an empty or new folder")
        return None
    old = read_manifest(out)
    if old.index.uid != index.uid:
        for s in old.shards:
            for p in old.files(s):
                p.unlink(missing_ok=True)
        (out / MANIFEST).unlink(missing_ok=True)
        return None
    return old


def _stats(conn: Connection, index: IndexInfo, first: int, end: int | None) -> tuple[int, int]:
    q = select(func.count(), func.coalesce(func.sum(Code.image_id), 0)).where(Code.hasher_id == index.id,
                                                                               Code.image_id >= first)
    if end is not None:
        q = q.where(Code.image_id < end)
    n, s = conn.execute(q).one()
    return int(n), int(s)


def _plan(conn: Connection, index: IndexInfo, previous: ShardSet | None,
          shard_codes: int) -> list[tuple[int, int | None, int, int]]:
    """(first_id, end_id, n_codes, id_sum) of every range to export."""
    if previous is not None and previous.shards:
        bounds = [(s.first_id, s.end_id) for s in previous.shards]
        bounds[0] = (min(0, bounds[0][0]), bounds[0][1])
    else:
        bounds = [(0, None)]
    ranges: list[tuple[int, int | None, int, int]] = [(a, b, *_stats(conn, index, a, b)) for a, b in bounds]
    first, _, n, _ = ranges[-1]
    if n > 1.5 * shard_codes:  # the open last range grew: cut it
        ranges.pop()
        starts = [first, *_cut_points(conn, index, first, n, shard_codes)]
        ends: list[int | None] = [*starts[1:], None]
        ranges += [(a, b, *_stats(conn, index, a, b)) for a, b in zip(starts, ends, strict=True)]
    return ranges


def _cut_points(conn: Connection, index: IndexInfo, first: int, n: int, shard_codes: int) -> list[int]:
    """Ids that start the 2nd, 3rd, ... shard of the ``n`` codes from ``first`` on."""
    cuts: list[int] = []
    for offset in range(shard_codes, n - shard_codes // 2, shard_codes):
        cut = conn.scalar(select(Code.image_id).where(Code.hasher_id == index.id, Code.image_id >= first)
                          .order_by(Code.image_id).offset(offset).limit(1))
        if cut is not None and (not cuts or cut > cuts[-1]):
            cuts.append(int(cut))
    return cuts


def _read_range(conn: Connection, index: IndexInfo, first: int,
                end: int | None) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    n_bytes = index.n_bits // 8
    upper = end if end is not None else np.iinfo(np.int64).max
    if conn.dialect.name == "postgresql":
        return _copy_range(conn, index.id, first, upper, n_bytes)
    ids_parts, code_parts = [], []
    raw = conn.connection.dbapi_connection
    assert raw is not None
    cursor = raw.cursor()
    try:
        cursor.execute("SELECT image_id, code FROM codes WHERE hasher_id = ? AND image_id >= ? AND image_id < ? "
                       "ORDER BY image_id", (index.id, first, upper))
        while rows := cursor.fetchmany(FETCH_ROWS):
            ids_parts.append(np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows)))
            code_parts.append(np.frombuffer(b"".join(r[1] for r in rows), dtype=np.uint8).reshape(len(rows), n_bytes))
    finally:
        cursor.close()
    if not ids_parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
    return np.concatenate(ids_parts), np.concatenate(code_parts)


def _copy_range(conn: Connection, hasher_id: int, first: int, upper: int,
                n_bytes: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]:
    """One range through ``COPY (SELECT ...) TO STDOUT (FORMAT BINARY)``: fixed-width tuples
    (field count, then length and value of the int4 id and of the bytea code), parsed by numpy."""
    tuple_dtype = np.dtype([("fields", ">i2"), ("id_len", ">i4"), ("id", ">i4"), ("code_len", ">i4"),
                            ("code", "u1", (n_bytes,))])
    size = tuple_dtype.itemsize
    raw = conn.connection.dbapi_connection
    assert raw is not None
    ids_parts, code_parts = [], []
    buffer = bytearray()
    header_left = 19  # signature (11), flags (4), extension length (4)

    def parse(final: bool) -> None:
        whole = len(buffer) // size
        if final and len(buffer) - whole * size not in (0, 2):  # the trailer: field count -1
            raise DatabaseError("PostgreSQL sent an unexpected COPY stream while exporting codes; export again")
        if whole:
            rows = np.frombuffer(bytes(buffer[: whole * size]), dtype=tuple_dtype)
            if (rows["fields"] != 2).any() or (rows["id_len"] != 4).any() or (rows["code_len"] != n_bytes).any():
                raise DatabaseError("a code of this index has an unexpected size; check the index with `imgstore index list`")
            ids_parts.append(rows["id"].astype(np.int64))
            code_parts.append(np.ascontiguousarray(rows["code"]))
            del buffer[: whole * size]

    sql = (f"COPY (SELECT image_id, code FROM codes WHERE hasher_id = {int(hasher_id)} AND image_id >= {int(first)} "
           f"AND image_id < {int(upper)} ORDER BY image_id) TO STDOUT (FORMAT BINARY)")
    with raw.cursor() as cursor, cursor.copy(sql) as copy:  # type: ignore[attr-defined]
        for block in copy:
            buffer += bytes(block)
            if header_left:
                take = min(header_left, len(buffer))
                del buffer[:take]
                header_left -= take
            if len(buffer) >= 1 << 22:
                parse(False)
    parse(True)
    if not ids_parts:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_bytes), dtype=np.uint8)
    return np.concatenate(ids_parts), np.concatenate(code_parts)


def _new_name(out: Path, previous: ShardSet | None, made: list[Shard]) -> str:
    used = {s.name for s in made} | ({s.name for s in previous.shards} if previous else set())
    i = 0
    while f"shard-{i:05d}" in used:
        i += 1
    return f"shard-{i:05d}"


def _save(out: Path, name: str, ids: npt.NDArray[np.int64], codes: npt.NDArray[np.uint8]) -> None:
    for suffix, array in (("ids", ids), ("codes", codes)):
        final = out / f"{name}.{suffix}.npy"
        tmp = out / f".{name}.{suffix}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.save(f, np.ascontiguousarray(array))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)


def _write_manifest(shards: ShardSet) -> None:
    index = asdict(shards.index)
    index["created_at"] = shards.index.created_at.isoformat()
    data = {"format": FORMAT_VERSION, "index": index, "generation": shards.generation,
            "exported_at": shards.exported_at, "shards": [asdict(s) for s in shards.shards]}
    tmp = shards.folder / f".{MANIFEST}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, shards.folder / MANIFEST)
