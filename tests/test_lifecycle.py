"""Paths follow the files: a rescan marks vanished paths not current, prune covers the rest,
``rm PATH`` removes that path (and its image only with its last current path), and images whose
files all went are hidden from results unless asked."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import NotFoundError

from .helpers import photo, write_variants


def folder(root: Path) -> dict[str, Path]:
    """Three different photos, one of them also copied byte for byte under another name."""
    root.mkdir(parents=True)
    files = {}
    for name in ("chelsea", "rocket", "coffee"):
        files[name] = root / f"{name}.png"
        photo(name).resize((96, 96)).save(files[name])
    files["copy"] = root / "chelsea-copy.png"
    shutil.copyfile(files["chelsea"], files["copy"])
    return files


def current(store: ImageStore, path: Path) -> bool:
    return next(p.is_current for p in store.image(str(path)).paths if p.path == str(path))


def test_rescan_marks_vanished_paths_and_follows_moves(db_url: str, tmp_path: Path) -> None:
    files = folder(tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"], extractor="color")
        moved = tmp_path / "photos" / "sub" / "rocket-moved.png"
        moved.parent.mkdir()
        files["rocket"].rename(moved)
        files["coffee"].unlink()
        again = store.ingest([tmp_path / "photos"], extractor="color")
        assert (again.added, again.gone) == (0, 2)
        assert not current(store, files["rocket"]) and current(store, moved)
        assert not current(store, files["coffee"])  # history kept, not current
        assert store.verify().vanished_files == []
        # the coffee image has no current path left: hidden from results unless asked
        coffee_id = store.image(str(files["coffee"])).id
        visible = [r.image_id for r in store.search(coffee_id, k=10)]
        assert coffee_id not in visible and len(visible) == 2
        with_stale = store.search(coffee_id, k=10, include_stale=True)
        assert with_stale[0].image_id == coffee_id and with_stale[0].paths == []
        for group in store.find_duplicates(min_cosine=0.01):  # a loose rule: coffee would join a group
            assert coffee_id not in [m.image_id for m in group.members]


def test_a_missing_root_marks_nothing(db_url: str, tmp_path: Path) -> None:
    folder(tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"], extractor="color")
        shutil.move(str(tmp_path / "photos"), str(tmp_path / "elsewhere"))  # e.g. a drive not mounted
        with pytest.raises(NotFoundError):
            store.ingest([tmp_path / "photos"], extractor="color")
        assert len(store.verify().vanished_files) == 4  # still current, reported by verify


def test_prune_covers_paths_outside_the_rescanned_roots(db_url: str, tmp_path: Path) -> None:
    files = folder(tmp_path / "a")
    other = write_variants(photo("horse"), tmp_path / "b", "horse", 2)
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "a"), str(tmp_path / "b"), "--extractor", "color"]).exit_code == 0
    other[0].unlink()
    files["coffee"].unlink()
    dry = runner.invoke(cli, ["--db", db_url, "prune", "--dry-run", "--json"])
    assert sorted(json.loads(dry.output)["paths"]) == sorted([str(other[0]), str(files["coffee"])])
    with ImageStore(db_url) as store:
        assert len(store.verify().vanished_files) == 2  # the dry run changed nothing
    verify = runner.invoke(cli, ["--db", db_url, "verify", "--prune"])
    assert verify.exit_code == 0
    with ImageStore(db_url) as store:
        assert store.verify().vanished_files == []
        assert store.prune() == []
        assert not current(store, other[0])


def test_rm_path_keeps_the_image_while_another_path_holds_it(db_url: str, tmp_path: Path) -> None:
    files = folder(tmp_path / "photos")
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color"]).exit_code == 0
    with ImageStore(db_url) as store:
        cat = store.image(str(files["chelsea"])).id
        n_images = store.counts().images
    dry = runner.invoke(cli, ["--db", db_url, "rm", str(files["copy"]), "--dry-run", "--json"])
    assert json.loads(dry.output) == {"paths": [str(files["copy"])], "images": [], "dry_run": True}
    out = runner.invoke(cli, ["--db", db_url, "rm", str(files["copy"])])
    assert out.exit_code == 0 and "removed 0 images" in out.output
    with ImageStore(db_url) as store:
        assert store.counts().images == n_images
        assert [p.path for p in store.image(cat).paths] == [str(files["chelsea"])]
        # the last current path takes the image with it
        removal = store.remove([str(files["chelsea"])])
        assert removal.images == [cat] and store.counts().images == n_images - 1
        # an id removes the image and every path
        rocket = store.image(str(files["rocket"])).id
        assert store.remove([rocket]).images == [rocket]
        assert store.counts().images == n_images - 2 and store.verify().ok
        # the file itself is never touched
        assert files["chelsea"].exists() and files["copy"].exists() and files["rocket"].exists()


def test_images_added_without_a_path_are_never_stale(db_url: str, tmp_path: Path) -> None:
    with ImageStore(db_url) as store:
        buf = io.BytesIO()
        photo("rocket").resize((96, 96)).save(buf, format="PNG")
        added = store.add(buf.getvalue(), extractor="color")
        photo("chelsea").resize((96, 96)).save(tmp_path / "cat.png")
        store.ingest([tmp_path / "cat.png"], extractor="color")
        hits = store.search(added, k=5)
        assert hits[0].image_id == added and hits[0].paths == [] and len(hits) == 2


def test_query_index_option(db_url: str, tmp_path: Path) -> None:
    folder(tmp_path / "photos")
    runner = CliRunner()
    assert runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color"]).exit_code == 0
    with ImageStore(db_url) as store:
        first = store.create_index("lsh", 32, extractor="color")
        store.create_index("lsh", 16, extractor="color")  # now the active one
    out = runner.invoke(cli, ["--db", db_url, "query", "1", "-k", "2", "--index", str(first), "--no-rerank", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)[0]["results"][0]["distance"] == 0
    bad = runner.invoke(cli, ["--db", db_url, "query", "1", "--index", "99"])
    assert bad.exit_code == 1 and "no index with id 99" in bad.output


def test_metadata_from_the_cli(db_url: str, tmp_path: Path) -> None:
    files = folder(tmp_path / "photos")
    runner = CliRunner()
    first = runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color", "--tag", "a"])
    assert first.exit_code == 0, first.output
    # a second ingest adds to images already stored (unchanged files are not read again)
    again = runner.invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "photos"), "--extractor", "color",
                                "--tag", "b", "--meta", "trip=alps"])
    assert again.exit_code == 0, again.output
    with ImageStore(db_url) as store:
        meta = store.image(str(files["rocket"])).meta
        assert meta == {"tags": ["a", "b"], "trip": "alps"}
    out = runner.invoke(cli, ["--db", db_url, "meta", str(files["rocket"]), "species=rocket", "--tag", "c", "--unset", "trip", "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"tags": ["a", "b", "c"], "species": "rocket"}
    shown = runner.invoke(cli, ["--db", db_url, "meta", str(files["rocket"])])
    assert "species=rocket" in shown.output and "tags=a, b, c" in shown.output
    bad = runner.invoke(cli, ["--db", db_url, "meta", str(files["rocket"]), "novalue"])
    assert bad.exit_code == 2 and "KEY=VALUE" in bad.output
    with ImageStore(db_url) as store:
        from imgstore.indexing import labels_from

        with store.engine.connect() as conn:
            assert labels_from(conn, "tag:species") == {store.image(str(files["rocket"])).id: "rocket"}


def test_two_ingests_started_at_once_into_a_new_store(db_url: str, tmp_path: Path) -> None:
    """Two `imgstore ingest` processes started together on a store that does not exist yet: on
    SQLite one failed with "database is locked", on PostgreSQL the second printed a raw
    duplicate-key error (both created the tables). Both succeed, and the store is consistent,
    whichever reaches the schema first."""
    import subprocess
    import sys

    from .helpers import photo, write_variants

    for name in ("one", "two"):
        write_variants(photo("chelsea" if name == "one" else "rocket"), tmp_path / name, name, 6)
    exe = str(Path(sys.executable).with_name("imgstore"))
    procs = [subprocess.Popen([exe, "--db", db_url, "ingest", str(tmp_path / name), "--extractor", "color", "--no-progress"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("one", "two")]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    with ImageStore(db_url) as store:
        assert store.counts().images == 12
        report = store.verify(check_files=False)
        assert report.ok, report.as_dict()
