"""Acting on duplicate groups: move every copy but the keeper out of the collection, journalled,
resumable and undoable. No file is ever deleted or overwritten.

``apply`` moves each non-keeper file of each group into ``move_to``, under its path relative to
the folder it was ingested under (``image_paths.root``; the absolute path mirrored when that is
unknown), never over an existing file (``name (1).jpg`` then), across devices by copy + fsync +
link + unlink. Before each move it appends a journal entry (``move_to/.imgstore/journal-*.jsonl``,
flushed to disk); after the move it marks the path moved in the store (the row stays, not
current, with ``moved_to``) and merges the member's tags into the keeper; then it appends
``done``; a run that completes ends its journal with ``end``. A run that was interrupted
(Ctrl-C, a crash: a journal without ``end``) is continued by the next ``apply`` into the same
folder, in the same journal: its announced moves are completed first and the new ones appended
there, so one ``undo`` of that journal puts back everything the two runs moved. ``undo`` walks a journal backwards, moves every
file back (again never overwriting) and restores the rows and the keepers' metadata.
``catalog.prune_moved`` later forgets moved rows a user no longer wants to undo.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, and_, select, update

from .catalog import merge_meta, merged_meta
from .decode import load_image
from .errors import ConfigError, ImgStoreError, NotFoundError
from .features.pipeline import default_workers
from .models import Image, ImagePath
from .paths import from_stored, printable, to_stored

if TYPE_CHECKING:  # pragma: no cover
    from .context import StoreContext
    from .dedup import DuplicateGroup

JOURNAL_DIR = ".imgstore"
#: Journals written since ``end`` entries exist; older ones (no version) are never continued.
JOURNAL_VERSION = 2


class ApplyInterrupted(KeyboardInterrupt):
    """Ctrl-C during an apply: carries the journal, so the message can name it."""

    def __init__(self, journal: str) -> None:
        super().__init__(journal)
        self.journal = journal


@dataclass
class ApplyReport:
    journal: str
    moved: list[tuple[str, str]] = field(default_factory=list)  # (from, to)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    resumed: int = 0  # entries of an interrupted run completed first

    def as_dict(self) -> dict[str, Any]:
        return {"journal": self.journal, "moved": [{"from": a, "to": b} for a, b in self.moved],
                "failed": [{"path": a, "reason": b} for a, b in self.failed], "resumed": self.resumed}


@dataclass
class UndoReport:
    journal: str
    restored: list[tuple[str, str]] = field(default_factory=list)  # (from, back to)
    failed: list[tuple[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"journal": self.journal, "restored": [{"from": a, "to": b} for a, b in self.restored],
                "failed": [{"path": a, "reason": b} for a, b in self.failed]}


# --- files -----------------------------------------------------------------------------------


def move_file(src: str, dst: str) -> None:
    """Move ``src`` to ``dst``, never over an existing file, across devices too."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)  # fails if dst exists: no overwrite, ever
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        tmp = f"{dst}.imgstore-partial-{os.getpid()}"
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        try:
            os.link(tmp, dst)
        except OSError:
            if os.path.lexists(dst):
                os.unlink(tmp)
                raise FileExistsError(errno.EEXIST, "exists", dst) from None
            os.rename(tmp, dst)  # a file system without links: the exists check above guards it
        else:
            os.unlink(tmp)
    os.unlink(src)


def destination(move_to: str, src: str, root: str | None) -> str:
    """Where ``src`` goes under ``move_to``: its path below its ingest root (or the whole
    absolute path), with `` (1)``, `` (2)``... before the extension if that name is taken."""
    rel = os.path.relpath(src, root) if root and (src == root or src.startswith(root.rstrip(os.sep) + os.sep)) else None
    if rel is None or rel.startswith(".."):
        rel = src.lstrip(os.sep)
    dst = os.path.join(move_to, rel)
    stem, ext = os.path.splitext(dst)
    n = 1
    while os.path.lexists(dst):
        dst = f"{stem} ({n}){ext}"
        n += 1
    return dst


# --- journal ---------------------------------------------------------------------------------


class Journal:
    """Append-only JSON lines, each flushed and fsynced before the step it announces."""

    def __init__(self, path: str) -> None:
        self.path = path

    def append(self, entry: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="ascii") as f:  # json escapes every non-ASCII path
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict[str, Any]]:
        out = []
        with open(self.path, encoding="ascii") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by a crash: everything before it stands
        return out

    def is_journal(self) -> bool:
        """A file this module wrote: its first entry begins an apply."""
        try:
            entries = self.entries()
        except (OSError, UnicodeDecodeError):
            return False
        return bool(entries) and isinstance(entries[0], dict) and entries[0].get("op") == "begin"



def _interrupted(entries: list[dict[str, Any]]) -> bool:
    """A journal's entries were written by a run that did not finish (versioned, no ``end``)."""
    return (bool(entries) and entries[0].get("version") == JOURNAL_VERSION
            and not any(e.get("op") == "end" for e in entries))


def _open_moves(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``move`` entries with no ``done`` or ``undone`` after them."""
    closed = {e["id"] for e in entries if e.get("op") in ("done", "undone")}
    return [e for e in entries if e.get("op") == "move" and e["id"] not in closed]


def journals(move_to: str) -> Iterator[Journal]:
    folder = Path(move_to) / JOURNAL_DIR
    if folder.is_dir():
        for path in sorted(folder.glob("journal-*.jsonl")):
            yield Journal(str(path))


# --- apply -----------------------------------------------------------------------------------


def apply(ctx: StoreContext, groups: Sequence[DuplicateGroup], move_to: str | os.PathLike[str]) -> ApplyReport:
    """Move every non-keeper file of ``groups`` into ``move_to`` (see the module docstring)."""
    target = os.path.abspath(os.path.expanduser(os.fspath(move_to)))
    if os.path.exists(target) and not os.path.isdir(target):
        raise ConfigError(f"--move-to {printable(target)} is a file; give a folder")
    os.makedirs(os.path.join(target, JOURNAL_DIR), exist_ok=True)
    resumed = 0
    continued: Journal | None = None
    last_id = 0
    for old in journals(target):
        entries = old.entries()  # read once: a long journal is thousands of lines
        for entry in _open_moves(entries):
            _finish(ctx, old, entry)
            resumed += 1
        if _interrupted(entries):
            continued = old  # the newest interrupted run's journal takes this run's moves too
            last_id = max((int(e["id"]) for e in entries if e.get("op") == "move"), default=0)
    if continued is not None:
        journal = continued
        journal.append({"op": "resume", "at": time.time(), "pid": os.getpid()})
    else:
        name = f"journal-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}.jsonl"  # unique within a second
        journal = Journal(os.path.join(target, JOURNAL_DIR, name))
        journal.append({"op": "begin", "version": JOURNAL_VERSION, "database": ctx.display_url, "move_to": target,
                        "at": time.time()})
    report = ApplyReport(journal.path, resumed=resumed)
    try:
        _move_all(ctx, journal, groups, target, report, last_id)
    except KeyboardInterrupt:
        raise ApplyInterrupted(journal.path) from None
    journal.append({"op": "end", "at": time.time()})
    return report


def _move_all(ctx: StoreContext, journal: Journal, groups: Sequence[DuplicateGroup], target: str, report: ApplyReport,
              n: int) -> None:
    """Announce, move and record each planned file; ``n``: the journal's last move id so far."""
    keeper_meta_saved: set[int] = set()
    with ctx.read("plan the moves") as conn:
        plan = _plan(conn, groups)
    keepers = {keeper: keeper_path for _, _, _, keeper, keeper_path, _ in plan}
    # keeper -> why its file does not decode, or None; decoded side by side (Pillow and libheif
    # release the GIL: a HEIC keeper is a 0.3 s decode, and an apply of a phone's library has
    # hundreds of groups)
    pool = ThreadPoolExecutor(max_workers=default_workers())
    try:
        unreadable = dict(zip(keepers, pool.map(lambda path: _undecodable(path, ctx.max_pixels), keepers.values())))
    finally:
        pool.shutdown(cancel_futures=True)  # Ctrl-C: only the decodes running are waited for
    for src, root, image_id, keeper, keeper_path, member_tags in plan:
        if unreadable[keeper] is not None:
            report.failed.append((src, f"the file kept in its group, {printable(keeper_path)}, {unreadable[keeper]}; "
                                       "nothing of the group was moved"))
            continue
        if not os.path.lexists(src):
            report.failed.append((src, "the file is gone (run `imgstore prune`)"))
            continue
        dst = destination(target, src, root)
        n += 1
        entry = {"op": "move", "id": n, "src": src, "dst": dst, "image_id": image_id, "keeper": keeper, "tags": member_tags}
        if keeper not in keeper_meta_saved:
            with ctx.read("read the keeper's metadata") as conn:
                entry["keeper_meta_before"] = dict(conn.scalar(select(Image.meta).where(Image.id == keeper)) or {})
            keeper_meta_saved.add(keeper)
        journal.append(entry)
        try:
            move_file(src, dst)
        except OSError as exc:
            journal.append({"op": "undone", "id": n, "reason": f"not moved: {exc.strerror or exc}"})
            report.failed.append((src, exc.strerror or str(exc)))
            continue
        _record_move(ctx, entry)
        journal.append({"op": "done", "id": n})
        report.moved.append((src, dst))


def _undecodable(path: str, max_pixels: int) -> str | None:
    """Why the file a group keeps does not decode whole (gone, damaged since it was stored, or
    stored from a HEIC's thumbnail while its own image is broken), or None. Checked before any
    other file of the group is moved: the copies are never moved away from an unreadable keeper."""
    try:
        load_image(path, max_pixels=max_pixels, draft_size=(512, 512))  # every byte decoded; no thumbnail
    except ImgStoreError as exc:
        return f"does not decode ({getattr(exc, 'reason', None) or exc})"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    return None


def _plan(conn: Connection, groups: Sequence[DuplicateGroup]) -> list[tuple[str, str | None, int, int, str, list[str]]]:
    """(path, its ingest root, its image, the keeper, the keeper's file, the image's tags) for
    every file to move."""
    out = []
    for group in groups:
        if group.keeper_path is None:
            continue
        for member in group.members:
            rows = conn.execute(
                select(ImagePath.path, ImagePath.root).where(
                    ImagePath.image_id == member.image_id, ImagePath.is_current.is_(True)
                )
            ).all()
            meta = conn.scalar(select(Image.meta).where(Image.id == member.image_id)) or {}
            tags = list(meta.get("tags", [])) if isinstance(meta, dict) and isinstance(meta.get("tags"), list) else []
            for path, root in rows:
                real = from_stored(path)
                if real != group.keeper_path:
                    out.append((real, from_stored(root) if root else None, int(member.image_id), int(group.keeper),
                                group.keeper_path, tags if member.image_id != group.keeper else []))
    return out


def _record_move(ctx: StoreContext, entry: dict[str, Any]) -> None:
    def work(conn: Connection) -> None:
        conn.execute(update(ImagePath).where(ImagePath.path == to_stored(entry["src"]), ImagePath.image_id == entry["image_id"])
                     .values(is_current=False, moved_to=to_stored(entry["dst"])))
        if entry.get("tags"):
            merge_meta(conn, [entry["keeper"]], {"tags": entry["tags"]})

    ctx.write(work, doing="record a moved file")


def _finish(ctx: StoreContext, journal: Journal, entry: dict[str, Any]) -> None:
    """Complete a move an interrupted run announced: move the file if it is still in place,
    then record it (recording twice changes nothing)."""
    src, dst = entry["src"], entry["dst"]
    if os.path.lexists(src) and not os.path.lexists(dst):
        move_file(src, dst)
    if os.path.lexists(dst):
        _record_move(ctx, entry)
        journal.append({"op": "done", "id": entry["id"]})
    else:
        journal.append({"op": "undone", "id": entry["id"], "reason": "neither the file nor its copy was found"})


# --- undo ------------------------------------------------------------------------------------


def undo(ctx: StoreContext, journal_path: str | os.PathLike[str]) -> UndoReport:
    """Put back every file and row a journal moved, newest first; safe to run again."""
    path = os.path.abspath(os.path.expanduser(os.fspath(journal_path)))
    if not os.path.isfile(path):
        raise NotFoundError(f"no journal at {printable(path)}; `dedup --apply` printed where it wrote one")
    journal = Journal(path)
    if not journal.is_journal():
        raise ConfigError(f"{printable(path)} is not a journal of `imgstore dedup --apply` "
                          f"(those are MOVE_TO/{JOURNAL_DIR}/journal-*.jsonl)")
    entries = journal.entries()
    undone = {e["id"] for e in entries if e.get("op") == "undone"}
    moves = [e for e in entries if e.get("op") == "move" and e["id"] not in undone]
    report = UndoReport(path)
    metas: dict[int, dict[str, Any]] = {}
    for entry in moves:
        if "keeper_meta_before" in entry:
            metas.setdefault(int(entry["keeper"]), entry["keeper_meta_before"])
    for entry in reversed(moves):
        src, dst = entry["src"], entry["dst"]
        if os.path.lexists(dst):
            if os.path.lexists(src):
                report.failed.append((dst, f"{printable(src)} exists again; left both in place"))
                continue
            try:
                move_file(dst, src)
            except OSError as exc:
                report.failed.append((dst, exc.strerror or str(exc)))
                continue
        elif not os.path.lexists(src):
            report.failed.append((dst, "the moved file is gone"))
            continue

        def work(conn: Connection, e: dict[str, Any] = entry) -> None:
            conn.execute(update(ImagePath).where(and_(ImagePath.path == to_stored(e["src"]), ImagePath.image_id == e["image_id"]))
                         .values(is_current=True, moved_to=None))

        ctx.write(work, doing="restore a moved path")
        journal.append({"op": "undone", "id": entry["id"]})
        report.restored.append((dst, src))

    def restore_meta(conn: Connection) -> None:
        for keeper, before in metas.items():
            conn.execute(update(Image).where(Image.id == keeper).values(meta=merged_meta({}, before)))

    if metas and not report.failed:
        ctx.write(restore_meta, doing="restore the keepers' metadata")
    return report
