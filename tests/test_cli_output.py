"""What the CLI prints says what happened: the ingest summary counts vanished paths and says why
it found nothing, ``verify --prune`` lists what it marked, ``export`` speaks JSON like every other
command, counts agree with their nouns, and the dedup table's columns line up."""

from __future__ import annotations

import json
import re
import shutil
from itertools import takewhile
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from imgstore import ImageStore
from imgstore.cli import cli

from .helpers import photo, write_variants


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def ingest(db: str, *args: str) -> Result:
    result = run("--db", db, "ingest", *args, "--extractor", "color", "--no-progress")
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Three cats and three rockets (near copies within each), and one cat byte for byte twice."""
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root, "cat", 3)
    write_variants(photo("rocket"), root, "rocket", 3)
    shutil.copyfile(root / "cat_000.png", root / "cat_copy.png")
    return root


def test_the_ingest_summary_counts_vanished_paths(db_url: str, photos: Path) -> None:
    ingest(db_url, str(photos))
    (photos / "rocket_001.jpg").unlink()
    dry = ingest(db_url, str(photos), "--dry-run")
    assert "would mark gone 1 " in dry.output, dry.output
    done = ingest(db_url, str(photos))
    assert "6 files: added 0, unchanged 6, duplicates 0, failed 0, gone 1 " in done.output, done.output
    assert json.loads(ingest(db_url, str(photos), "--json").output)["gone"] == 0  # marked once


def test_verify_prune_lists_what_it_marked(db_url: str, photos: Path) -> None:
    ingest(db_url, str(photos))
    (photos / "rocket_001.jpg").unlink()
    text = run("--db", db_url, "verify", "--prune")
    assert text.exit_code == 0, text.output
    assert f"marked gone: {photos / 'rocket_001.jpg'}\n1 path marked not current\n" in text.output, text.output
    (photos / "rocket_002.jpg").unlink()
    as_json = json.loads(run("--db", db_url, "verify", "--prune", "--json").output)
    assert as_json["pruned"] == [str(photos / "rocket_002.jpg")] and as_json["vanished_files"] == as_json["pruned"]
    again = json.loads(run("--db", db_url, "verify", "--prune", "--json").output)
    assert again["pruned"] == [] and again["vanished_files"] == []
    assert "pruned" not in json.loads(run("--db", db_url, "verify", "--json").output)  # not asked, not said
    assert "0 paths marked not current" in run("--db", db_url, "verify", "--prune").output
    # without the file check there is nothing to prune: said, not silently ignored
    refused = run("--db", db_url, "verify", "--prune", "--no-files")
    assert refused.exit_code == 2 and "drop --no-files" in refused.output


def test_export_speaks_json_like_every_command(db_url: str, photos: Path, tmp_path: Path) -> None:
    assert json.loads(ingest(db_url, str(tmp_path / "photos" / "cat_000.png"), "--json").output)["added"] == 1
    one = run("--db", db_url, "export", "--format", "json")
    assert one.exit_code == 0, one.output
    assert json.loads(one.output) == [json.loads(line) for line in run("--db", db_url, "export").output.splitlines()]
    assert one.output == json.dumps(json.loads(one.output), indent=2) + "\n"  # laid out as every --json
    ingest(db_url, str(photos))
    array = run("--db", db_url, "export", "--json", "--neighbours", "2")
    rows = json.loads(array.output)
    assert len(rows) == 6 and all(len(r["neighbours"]) == 2 for r in rows)
    assert array.output == run("--db", db_url, "export", "--format", "json", "--neighbours", "2").output
    assert array.output == json.dumps(rows, indent=2) + "\n"
    target = tmp_path / "images.json"
    assert run("--db", db_url, "export", "--json", "-o", str(target)).exit_code == 0
    assert [r["id"] for r in json.loads(target.read_text())] == [r["id"] for r in rows]
    # an empty store is an empty array, still valid JSON
    with ImageStore(tmp_path / "empty.db"):
        pass
    assert json.loads(run("--db", str(tmp_path / "empty.db"), "export", "--json").output) == []


def columns_line_up(output: str) -> int:
    """Every data row of every dedup table puts each field under its header: ``keep`` and the
    path start where their headers start, the numbers end where theirs end. Returns the rows."""
    lines = output.splitlines()
    checked = 0
    for at, header in enumerate(lines):
        if header.split()[:2] != ["keep", "id"]:
            continue
        cols = {m.group(): m.span() for m in re.finditer(r"\S+", header)}
        assert list(cols) == ["keep", "id", "hamming", "cosine", "path"], header
        path_at, ends = cols["path"][0], {cols[name][1] for name in ("id", "hamming", "cosine")}
        for row in takewhile(lambda line: line.startswith("  "), lines[at + 1 :]):
            assert row[path_at - 1] == " " and row[path_at] != " ", (header, row)
            fields = list(re.finditer(r"\S+", row[:path_at]))
            assert {m.end() for m in fields if m.group() != "keep"} == ends, (header, row)
            assert all(m.span() == cols["keep"] for m in fields if m.group() == "keep"), (header, row)
            checked += 1
    return checked


def test_dedup_columns_line_up_with_and_without_an_index(db_url: str, photos: Path) -> None:
    ingest(db_url, str(photos), "--no-auto-index")
    plain = run("--db", db_url, "dedup", "--no-geometry")
    assert plain.exit_code == 0, plain.output
    assert columns_line_up(plain.output) >= 4, plain.output
    assert re.search(r"^ +\d+ +- +[01]\.\d{3}  /", plain.output, re.M), "a row without a Hamming distance"
    with ImageStore(db_url) as store:
        store.create_index("lsh", 32, extractor="color")
    indexed = run("--db", db_url, "dedup", "--no-geometry")
    assert columns_line_up(indexed.output) >= 4, indexed.output
    assert re.search(r"^ +\d+ +[1-9]\d* +[01]\.\d{3}  /", indexed.output, re.M), "a row with a Hamming distance"


def test_counts_agree_with_their_nouns(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "one"
    root.mkdir()
    photo("chelsea").resize((96, 96)).save(root / "cat.png")
    shutil.copyfile(root / "cat.png", root / "cat-copy.png")
    photo("rocket").resize((96, 96)).save(root / "rocket.png")
    added = ingest(db_url, str(root / "cat.png"))
    assert added.output.startswith("1 file: added 1,"), added.output
    ingest(db_url, str(root))
    found = run("--db", db_url, "dedup", "--no-geometry")
    assert "group 1 (exact, 2 files):" in found.output and found.output.endswith("\n1 group\n"), found.output
    with ImageStore(db_url) as store:
        store.create_index("lsh", 32, extractor="color", n_bands=1)
        cat = store.image(str(root / "cat.png")).id
    listed = run("--db", db_url, "index", "list").output
    assert "1 band of 32 bits" in listed and "2 images" in listed, listed
    removed = run("--db", db_url, "rm", str(root / "rocket.png"))
    assert "removed 1 image: " in removed.output, removed.output
    for line in [*found.output.splitlines(), *listed.splitlines(), *removed.output.splitlines(),
                 *run("--db", db_url, "info").output.splitlines(), *run("--db", db_url, "verify").output.splitlines()]:
        assert not re.search(r"(?<![\d.])1 (groups|files|images|paths|bands|buckets|codes)\b", line), line
        assert "(s)" not in line, line
    shown = run("--db", db_url, "show", str(cat)).output
    assert "feature spaces 1, indexes 1" in shown, shown


def hint(result: Result) -> str:
    lines = result.output.splitlines()
    assert len(lines) == 2 and lines[0].startswith("0 files:"), result.output  # the counts, then one line of why
    return lines[1]


def test_an_ingest_that_finds_nothing_says_why(sqlite_url: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert hint(ingest(sqlite_url, str(empty))) == f"no image files found in {empty} (the folder is empty)"

    links = tmp_path / "links"
    links.mkdir()
    photo("chelsea").resize((64, 64)).save(tmp_path / "cat.png")
    (links / "cat.png").symlink_to(tmp_path / "cat.png")
    said = hint(ingest(sqlite_url, str(links)))
    assert said == f"no image files found in {links} (1 symbolic link skipped: add --follow-symlinks to follow them)"
    assert json.loads(ingest(sqlite_url, str(links), "--json").output)["skipped_symlinks"] == 1
    assert "added 1," in ingest(sqlite_url, str(links), "--follow-symlinks").output  # the option named is real

    other = tmp_path / "notes"
    other.mkdir()
    (other / "a.txt").write_text("not an image")
    (other / "b.pdf").write_bytes(b"%PDF-1.4")
    assert hint(ingest(sqlite_url, str(other), "--dry-run")).endswith("(2 files without an image extension such as .jpg ignored)")

    nested = tmp_path / "nested"
    (nested / "inner").mkdir(parents=True)
    photo("rocket").resize((64, 64)).save(nested / "inner" / "rocket.png")
    assert hint(ingest(sqlite_url, str(nested), "--no-recursive")).endswith("(1 sub-folder not searched: drop --no-recursive)")
    assert "added 1," in ingest(sqlite_url, str(nested)).output

    help_text = run("ingest", "--help").output
    assert "--follow-symlinks" in help_text and "--no-recursive" in help_text


def test_small_answers_are_never_blank_or_all(sqlite_url: str, tmp_path: Path) -> None:
    """``meta REF`` of an image without metadata says so; ``errors --limit`` takes 1 or more, and
    the API's ``errors(0)`` lists none (it listed every error)."""
    root = tmp_path / "mixed"
    root.mkdir()
    photo("horse").resize((64, 64)).save(root / "horse.png")
    (root / "broken.jpg").write_text("not a jpeg")
    ingest(sqlite_url, str(root))
    assert run("--db", sqlite_url, "meta", str(root / "horse.png")).output == "no metadata\n"
    assert run("--db", sqlite_url, "errors", "--limit", "0").exit_code == 2
    assert run("--db", sqlite_url, "errors", "--limit", "1").output.count("\n") == 1
    with ImageStore(sqlite_url) as store:
        assert store.errors(0) == [] and len(store.errors()) == 1


def test_ingest_and_watch_take_the_same_ingest_options() -> None:
    """The options both commands ingest with are declared once (``ingest_options``): the same
    names, types, defaults and callbacks; only the help of --recursive, --extractor and --meta is
    each command's own."""
    shared = ("recursive", "extractor", "batch_size", "workers", "tags", "meta", "no_auto_index", "weights")

    def options(name: str) -> dict[str, dict[str, object]]:
        command = cli.commands[name]
        return {p.name: {"opts": (tuple(p.opts), tuple(p.secondary_opts)), "type": p.type.to_info_dict(), "default": p.default,
                         "multiple": p.multiple, "flag": getattr(p, "is_flag", False),
                         "callback": p.callback is not None}
                for p in command.params if p.name in shared}

    assert options("ingest") == options("watch") and set(options("ingest")) == set(shared)
    parsed = cli.commands["watch"].make_context("watch", ["f", "--meta", "trip=alps", "--tag", "a", "--batch-size", "8"])
    assert parsed.params["meta"] == {"trip": "alps"} and parsed.params["tags"] == ("a",)
    assert parsed.params["batch_size"] == 8 and parsed.params["recursive"] is True
