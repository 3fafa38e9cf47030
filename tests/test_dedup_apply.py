"""``dedup --apply --move-to DIR`` moves every copy but the keeper (journalled, never overwriting,
tags merged into the keeper), an interrupted apply is finished by the next, ``--undo`` puts every
file and row back, and ``prune --moved`` forgets what is no longer to be undone."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgstore import ImageStore, dedup_apply
from imgstore.cli import cli

from .helpers import photo


def collection(root: Path) -> dict[str, Path]:
    for sub in ("a", "b", "c"):
        (root / sub).mkdir(parents=True)
    cat = photo("chelsea").resize((160, 120))
    files = {"original": root / "a" / "cat.png", "half": root / "b" / "cat-half.jpg", "copy": root / "c" / "cat-copy.png",
             "other": root / "a" / "rocket.png"}
    cat.save(files["original"])
    cat.resize((80, 60)).save(files["half"], quality=85)
    shutil.copyfile(files["original"], files["copy"])
    photo("rocket").resize((160, 120)).save(files["other"])
    return files


def state(store: ImageStore, path: Path) -> tuple[bool, str | None]:
    with store.engine.connect() as conn:
        from sqlalchemy import text

        row = conn.execute(text("SELECT is_current, moved_to FROM image_paths WHERE path = :p"), {"p": str(path)}).one()
    return bool(row[0]), row[1]


def test_apply_moves_copies_and_undo_puts_them_back(db_url: str, tmp_path: Path) -> None:
    files = collection(tmp_path / "photos")
    bin_ = tmp_path / "dups"
    (bin_ / "b").mkdir(parents=True)
    (bin_ / "b" / "cat-half.jpg").write_bytes(b"someone else's file")  # must not be overwritten
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--no-progress"]).exit_code == 0
    with ImageStore(db_url) as store:
        half_id = store.image(str(files["half"])).id
        keeper_id = store.image(str(files["original"])).id
        store.set_meta(half_id, {"tags": ["from-b"]})
        keeper_meta = store.image(keeper_id).meta
    out = runner.invoke(cli, ["--db", db_url, "dedup", "--apply", "--move-to", str(bin_), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    moved = {Path(m["from"]).name: m["to"] for m in report["moved"]}
    assert moved == {"cat-half.jpg": str(bin_ / "b" / "cat-half (1).jpg"), "cat-copy.png": str(bin_ / "c" / "cat-copy.png")}
    assert (bin_ / "b" / "cat-half.jpg").read_bytes() == b"someone else's file"
    assert files["original"].exists() and files["other"].exists()
    assert not files["half"].exists() and not files["copy"].exists()
    with ImageStore(db_url) as store:
        assert state(store, files["half"]) == (False, str(bin_ / "b" / "cat-half (1).jpg"))
        assert state(store, files["original"]) == (True, None)
        assert "from-b" in store.image(keeper_id).meta["tags"]
        assert store.verify().ok and store.verify().vanished_files == []
        assert half_id not in [r.image_id for r in store.search(keeper_id, k=5)]  # nothing left on disk there
        assert store.find_duplicates() == []
    undo = runner.invoke(cli, ["--db", db_url, "dedup", "--undo", report["journal"]])
    assert undo.exit_code == 0, undo.output
    assert files["half"].exists() and files["copy"].exists()
    assert not (bin_ / "b" / "cat-half (1).jpg").exists()
    with ImageStore(db_url) as store:
        assert state(store, files["half"]) == (True, None) and state(store, files["copy"]) == (True, None)
        assert store.image(keeper_id).meta == keeper_meta
        assert len(store.find_duplicates()) == 1
        assert store.verify().vanished_files == [] and store.verify().changed_files == []
    again = runner.invoke(cli, ["--db", db_url, "dedup", "--undo", report["journal"]])
    assert again.exit_code == 0 and "0 files put back, 0 not" in again.output


@pytest.mark.parametrize("harm", ["damaged", "gone"])
def test_copies_are_never_moved_away_from_a_kept_file_that_does_not_decode(db_url: str, tmp_path: Path, harm: str) -> None:
    """The file a group keeps is damaged (or deleted) after it was stored: apply moves none of its
    copies, says why for each, and still moves what other groups allow."""
    files = collection(tmp_path / "photos")
    other_copy = tmp_path / "photos" / "c" / "rocket-copy.png"
    shutil.copyfile(files["other"], other_copy)
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--no-progress"]).exit_code == 0
    with ImageStore(db_url) as store:
        groups = store.find_duplicates()
    kept = {Path(g.keeper_path).name for g in groups if g.keeper_path}
    assert kept == {"cat.png", "rocket.png"} or kept == {"cat.png", "rocket-copy.png"}, kept
    if harm == "damaged":
        files["original"].write_bytes(files["original"].read_bytes()[:300])
    else:
        files["original"].unlink()
    out = runner.invoke(cli, ["--db", db_url, "dedup", "--apply", "--move-to", str(tmp_path / "dups"), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert set(failed) == {"cat-half.jpg", "cat-copy.png"}, report
    assert all("cat.png" in reason and "nothing of the group was moved" in reason for reason in failed.values())
    assert files["half"].exists() and files["copy"].exists()
    assert [Path(m["from"]).name for m in report["moved"]] in (["rocket-copy.png"], ["rocket.png"])


def test_an_interrupted_apply_is_finished_by_the_next(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = collection(tmp_path / "photos")
    bin_ = tmp_path / "dups"
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"])
        real = dedup_apply._record_move

        def crash(ctx, entry):  # type: ignore[no-untyped-def]
            raise KeyboardInterrupt  # killed after the file moved, before the store knew

        monkeypatch.setattr(dedup_apply, "_record_move", crash)
        with pytest.raises(dedup_apply.ApplyInterrupted) as interrupted:  # a KeyboardInterrupt naming its journal
            store.apply_duplicates(store.find_duplicates(), bin_)
        first_journal = interrupted.value.journal
        assert isinstance(interrupted.value, KeyboardInterrupt) and Path(first_journal).is_file()
        monkeypatch.setattr(dedup_apply, "_record_move", real)
        moved_first = [p for p in (files["half"], files["copy"]) if not p.exists()]
        assert len(moved_first) == 1 and state(store, moved_first[0])[0] is True  # moved, not yet recorded
        report = store.apply_duplicates(store.find_duplicates(), bin_)
        assert report.resumed == 1
        assert state(store, files["half"])[0] is False and state(store, files["copy"])[0] is False
        assert not files["half"].exists() and not files["copy"].exists() and files["original"].exists()
        assert store.verify().vanished_files == []
        # the rerun continued the interrupted run's journal: one undo puts back what both moved
        assert report.journal == first_journal
        assert [j.path for j in dedup_apply.journals(str(bin_))] == [first_journal]
        undone = store.undo_duplicates(first_journal)
        assert len(undone.restored) == 2 and undone.failed == []
        assert files["half"].exists() and files["copy"].exists()
        # a run that completed ends its journal: the next apply starts a new one
        again = store.apply_duplicates(store.find_duplicates(), bin_)
        assert again.journal != first_journal and len(again.moved) == 2


def test_undo_refuses_a_file_that_is_no_journal(db_url: str, tmp_path: Path) -> None:
    """`dedup --undo` of any other file exited 0 having done nothing: it says what it wants."""
    collection(tmp_path / "photos")
    assert CliRunner().invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color"]).exit_code == 0
    for content in ("", "not json at all\n", '{"op": "move", "id": 1}\n'):
        other = tmp_path / "notes.jsonl"
        other.write_text(content)
        out = CliRunner().invoke(cli, ["--db", db_url, "dedup", "--undo", str(other)])
        assert out.exit_code == 1 and "is not a journal" in out.output and "Traceback" not in out.output, out.output


def test_moves_across_devices_copy_then_unlink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "a" / "x.jpg"
    src.parent.mkdir()
    src.write_bytes(b"payload")
    os.utime(src, (1_000_000_000, 1_000_000_000))
    real_link = os.link
    calls = []

    def link(a, b):  # type: ignore[no-untyped-def]
        calls.append(a)
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_link(a, b)

    monkeypatch.setattr(os, "link", link)
    dst = tmp_path / "other-device" / "x.jpg"
    dedup_apply.move_file(str(src), str(dst))
    assert not src.exists() and dst.read_bytes() == b"payload" and dst.stat().st_mtime == 1_000_000_000
    assert [p.name for p in dst.parent.iterdir()] == ["x.jpg"]  # no partial file left
    src.write_bytes(b"new")
    with pytest.raises(FileExistsError):
        dedup_apply.move_file(str(src), str(dst))
    assert dst.read_bytes() == b"payload" and src.read_bytes() == b"new"


def test_prune_moved_forgets_moved_copies(db_url: str, tmp_path: Path) -> None:
    files = collection(tmp_path / "photos")
    bin_ = tmp_path / "dups"
    runner = CliRunner()
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"])
        half_id = store.image(str(files["half"])).id
        n_images = store.counts().images
        store.apply_duplicates(store.find_duplicates(), bin_)
    out = runner.invoke(cli, ["--db", db_url, "prune", "--moved"])
    assert out.exit_code == 0 and "forgot 2 moved paths and 1 image left" in out.output, out.output
    with ImageStore(db_url) as store:
        assert store.counts().images == n_images - 1  # the half-size copy; the exact copy was the keeper's bytes
        with pytest.raises(Exception):
            store.image(half_id)
        assert store.verify().ok
    assert (bin_ / "b" / "cat-half.jpg").exists() and (bin_ / "c" / "cat-copy.png").exists()  # files never deleted


def test_apply_needs_a_folder(db_url: str, tmp_path: Path) -> None:
    collection(tmp_path / "photos")
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color"]).exit_code == 0
    assert runner.invoke(cli, ["--db", db_url, "dedup", "--apply"]).exit_code == 2
    (tmp_path / "file").write_text("x")
    out = runner.invoke(cli, ["--db", db_url, "dedup", "--apply", "--move-to", str(tmp_path / "file")])
    assert out.exit_code in (1, 2)
    missing = runner.invoke(cli, ["--db", db_url, "dedup", "--undo", str(tmp_path / "nope.jsonl")])
    assert missing.exit_code in (1, 2) and "Traceback" not in missing.output


def test_an_interrupted_apply_names_its_journal(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during `dedup --apply` said only "every finished batch is kept": it names the
    journal that holds the moves so far, and how to finish or undo them."""
    collection(tmp_path / "photos")
    bin_ = tmp_path / "dups"
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color"]).exit_code == 0

    def interrupt(ctx, entry):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # as Ctrl-C between the move and its record

    monkeypatch.setattr(dedup_apply, "_record_move", interrupt)
    out = runner.invoke(cli, ["--db", db_url, "dedup", "--apply", "--move-to", str(bin_)])
    (journal,) = dedup_apply.journals(str(bin_))
    assert out.exit_code == 130, out.output
    assert journal.path in out.output and "--undo" in out.output
