"""File names that are not UTF-8 (and names with % or backslashes) are stored reversibly:
``show``, ``rm`` and ``verify`` find the real file, and migration 0005 converts old stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import text

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.paths import from_stored, printable, to_stored

from .helpers import photo

NAMES = [b"caf\xe9-latin1.png", b"plain.png", b"100%25-literal.png", b"back\\xe9slash.png", "ümlaut-utf8.png".encode()]


@pytest.mark.parametrize("name", NAMES + [b"%", b"%%41", b"\xff\xfe", b"a%E9b"])
def test_stored_form_round_trips(name: bytes) -> None:
    path = os.fsdecode(b"/photos/" + name)
    stored = to_stored(path)
    stored.encode("utf-8")  # any database accepts it
    assert from_stored(stored) == path
    assert os.fsencode(from_stored(stored)) == b"/photos/" + name
    printable(path).encode("utf-8")


def test_ordinary_names_are_stored_as_they_are() -> None:
    assert to_stored("/photos/Ümlaut and spaces/cat.jpg") == "/photos/Ümlaut and spaces/cat.jpg"


def write_names(root: Path) -> list[str]:
    root.mkdir(parents=True)
    out = []
    for i, name in enumerate(NAMES):
        path = os.path.join(os.fsencode(root), name)
        photo("chelsea").resize((48 + 8 * i, 48)).save(os.fsdecode(path), format="PNG")
        out.append(os.fsdecode(path))
    return out


def test_show_rm_and_verify_find_undecodable_names(db_url: str, tmp_path: Path) -> None:
    files = write_names(tmp_path / "names")
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "names"), "--extractor", "color"]).exit_code == 0
    with ImageStore(db_url) as store:
        for path in files:
            record = store.image(path)
            assert record.paths[0].path == path and os.path.exists(record.paths[0].path)
        report = store.verify()
        assert report.ok and report.vanished_files == [] and report.changed_files == []
        hit = store.search(files[0], k=1)[0]
        assert hit.paths == [files[0]]
    latin1 = files[0]
    assert runner.invoke(cli, ["--db", db_url, "show", latin1]).exit_code == 0  # the text form prints it escaped
    shown = runner.invoke(cli, ["--db", db_url, "show", latin1, "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["paths"][0]["path"] == latin1  # JSON escapes the surrogate; it round-trips
    verify = runner.invoke(cli, ["--db", db_url, "verify"])
    assert verify.exit_code == 0 and "vanished files: 0" in verify.output
    removed = runner.invoke(cli, ["--db", db_url, "rm", latin1])
    assert removed.exit_code == 0, removed.output
    with ImageStore(db_url) as store:
        assert store.counts().images == len(NAMES) - 1


def test_0005_converts_backslash_escaped_paths(db_url: str, tmp_path: Path) -> None:
    files = write_names(tmp_path / "names")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "names"], extractor="color")
        store.downgrade("0004")
        with store.engine.connect() as conn:
            old = sorted(r[0] for r in conn.execute(text("SELECT path FROM image_paths")))
        # what 0004 and earlier wrote: undecodable bytes as \xNN, everything else (a real % too) as is
        legacy = sorted(p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in files)
        assert old == legacy
        store.upgrade()
        assert sorted(p.path for r in files for p in store.image(r).paths) == sorted(files)
        assert store.verify().ok and store.verify().vanished_files == []
