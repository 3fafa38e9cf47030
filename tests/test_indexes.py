"""Indexes on SQLite and PostgreSQL: create / list / activate / drop from the CLI, supervision
from folder names, clear errors, and codes reproduced bit for bit by another process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import ConfigError, NotEnoughDataError

from .helpers import photo, write_variants


def ingest_two_classes(db_url: str, root: Path) -> None:
    write_variants(photo("chelsea"), root / "cats", "cat", 8)
    write_variants(photo("rocket"), root / "rockets", "rocket", 8)
    write_variants(photo("coffee"), root / "cups", "cup", 8)
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color", auto_index=False)


def test_index_cli_lifecycle(db_url: str, tmp_path: Path) -> None:
    ingest_two_classes(db_url, tmp_path / "photos")
    run = lambda *a: CliRunner().invoke(cli, ["--db", db_url, *a])  # noqa: E731
    first = run("index", "create", "--method", "itq", "--bits", "16", "--bands", "2")
    assert first.exit_code == 0, first.output
    second = run("index", "create", "--method", "lsh", "--bits", "32", "--no-activate")
    assert second.exit_code == 0, second.output
    listed = json.loads(run("index", "list", "--json").output)
    assert [(i["method"], i["is_active"], i["n_codes"]) for i in listed] == [("itq", True, 24), ("lsh", False, 24)]
    assert listed[0]["n_bands"] == 2 and listed[0]["band_width"] == 8
    assert run("index", "activate", str(listed[1]["id"])).exit_code == 0
    assert [i["is_active"] for i in json.loads(run("index", "list", "--json").output)] == [False, True]
    dropped = run("index", "drop", str(listed[1]["id"]))  # the active one: the newest left takes over
    assert dropped.exit_code == 0 and f"index {listed[0]['id']} is now the active one" in dropped.output
    with ImageStore(db_url) as store:
        assert store.counts().codes == 24
        assert [i.is_active for i in store.indexes()] == [True]
    last = run("index", "drop", str(listed[0]["id"]))
    assert last.exit_code == 0 and "queries scan the float features" in last.output
    made = run("index", "create", "--method", "lsh", "--bits", "32", "--json")
    assert made.exit_code == 0 and json.loads(made.output)["method"] == "lsh"
    narrow = run("index", "create", "--method", "lsh", "--bits", "32", "--bands", "5")
    assert narrow.exit_code == 1 and "at most 4 bands" in narrow.output
    small = run("index", "create", "--method", "itq", "--bits", "16", "--sample", "10")
    assert small.exit_code == 1 and "--sample 17 or more" in small.output
    missing = run("index", "drop", "999")
    assert missing.exit_code == 1 and "no index with id 999" in missing.output
    bad = run("index", "create", "--method", "nope")
    assert bad.exit_code == 1 and "unknown" in bad.output


def test_too_few_images_says_what_it_needs(db_url: str, tmp_path: Path) -> None:
    write_variants(photo("horse"), tmp_path / "p", "h", 3)
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "p"], extractor="color", auto_index=False)
        with pytest.raises(NotEnoughDataError, match="needs at least 65 images"):
            store.create_index("itq", 64)
        index_id = store.create_index("itq", 64, fallback=True)  # falls back to LSH
        assert next(i for i in store.indexes() if i.id == index_id).method == "lsh"
        with pytest.raises(ConfigError, match="does not learn from labels"):
            store.create_index("lsh", 16, labels="folder")


@pytest.mark.parametrize("method", ["centres", "deep"])
def test_supervised_index_from_folder_labels(db_url: str, tmp_path: Path, method: str) -> None:
    ingest_two_classes(db_url, tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.create_index(method, 16, labels="folder")
        info = store.indexes()[0]
        assert info.config["supervised"]
        for folder in ("cats", "rockets", "cups"):
            query = sorted((tmp_path / "photos" / folder).iterdir())[0]
            hits = store.search(query, k=8, rerank=False)
            assert all(h.cosine is None for h in hits)
            assert all(Path(h.paths[0]).parent.name == folder for h in hits)


REENCODE = """
import sys, numpy as np
from sqlalchemy import select
from imgstore import ImageStore
from imgstore.hashing import hasher_from_bytes
from imgstore.models import Code, HashIndex
from imgstore.vectors import load_features
with ImageStore(sys.argv[1]) as store, store.engine.connect() as conn:
    h = conn.execute(select(HashIndex.params, HashIndex.space_id, HashIndex.id)).one()
    ids, X = load_features(conn, h.space_id, 464)
    codes = hasher_from_bytes(h.params).encode(X)
    stored = dict(conn.execute(select(Code.image_id, Code.code).where(Code.hasher_id == h.id)).all())
    same = sum(stored[int(i)] == c.tobytes() for i, c in zip(ids, codes))
    print(same, len(ids))
"""


def test_codes_reproduced_bit_for_bit_in_another_process(db_url: str, tmp_path: Path) -> None:
    ingest_two_classes(db_url, tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.create_index("itq", 16)
    out = subprocess.run([sys.executable, "-c", REENCODE, db_url], capture_output=True, text=True, check=True)
    same, total = map(int, out.stdout.split())
    assert total == 24 and same == total


def test_features_of_an_old_preprocessing_version_are_told_and_replaced(tmp_path: Path) -> None:
    """A store whose color features came from an older preprocessing (the texture block arrived
    in version 2): a query by file names the commands that fix it; after them, it works."""
    root = tmp_path / "photos"
    ingest_two_classes(str(tmp_path / "s.db"), root)
    db = str(tmp_path / "s.db")
    run = lambda *a: CliRunner().invoke(cli, ["--db", db, *a])  # noqa: E731
    assert run("index", "create", "--method", "lsh", "--bits", "32").exit_code == 0
    with ImageStore(db) as store, store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE feature_spaces SET preprocess_version = 'hsv8x4x4-q8x2x2-hog8g4-s64-v1'")
    query = sorted((root / "cats").iterdir())[0]
    told = run("query", str(query), "-k", "3")
    assert told.exit_code == 1 and "hog8g4-s64-v1" in told.output
    assert "imgstore ingest FOLDER --extractor color" in told.output and "imgstore index create --extractor color" in told.output
    assert run("ingest", str(root), "--extractor", "color").exit_code == 0
    assert run("index", "create", "--extractor", "color", "--method", "lsh", "--bits", "32").exit_code == 0
    fixed = run("query", str(query), "-k", "3", "--json")
    assert fixed.exit_code == 0, fixed.output
    assert "cats" in json.loads(fixed.output)[0]["results"][0]["paths"][0]
