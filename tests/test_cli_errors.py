"""Everyday CLI mistakes get one line and exit 1 (usage errors: click's exit 2), Ctrl-C exits 130
with a hint, read commands never create a database, and ``--db`` works after the command name."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import text

from imgstore import ImageStore
from imgstore.cli import cli

from .helpers import ctrl_c_default, make_collection, photo, png_with_header, write_variants


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), env=env)


def one_line_error(result: Result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output


@pytest.fixture
def small_store(db_url: str, tmp_path: Path) -> str:
    root = tmp_path / "photos"
    write_variants(photo("chelsea"), root, "cat", 3)
    write_variants(photo("rocket"), root, "rocket", 3)
    assert run("--db", db_url, "ingest", str(root), "--extractor", "color", "--no-progress").exit_code == 0
    return db_url


def test_unknown_revisions(db_url: str) -> None:
    assert run("--db", db_url, "db", "upgrade").exit_code == 0
    one_line_error(run("--db", db_url, "db", "downgrade", "bogus"), "unknown schema revision 'bogus'", "0004")
    one_line_error(run("--db", db_url, "db", "upgrade", "0099"), "unknown schema revision '0099'")


def test_bad_urls() -> None:
    one_line_error(run("--db", "postgresql://me:s3cret@localhost:abc/photos", "info"), "cannot parse database URL", "***")
    one_line_error(run("--db", "mysql://localhost/photos", "info"), "unsupported database")


def test_unwritable_outputs(small_store: str, tmp_path: Path) -> None:
    for target in (tmp_path / "missing" / "out.csv", Path("/proc/imgstore-out.csv"), Path("/dev/full")):
        one_line_error(run("--db", small_store, "export", "-o", str(target)))
    one_line_error(run("--db", small_store, "query", "1", "--montage", str(tmp_path / "missing" / "sheet.png")), "missing")
    one_line_error(run("--db", small_store, "dedup", "--montage", "/proc/imgstore-sheets"), "/proc/imgstore-sheets")


def test_buckets_dropped_by_hand(small_store: str) -> None:
    with ImageStore(small_store) as store:
        store.create_index("lsh", 32, extractor="color")
        with store.engine.begin() as conn:
            conn.execute(text("DROP TABLE code_buckets"))
    one_line_error(run("--db", small_store, "query", "1", "--no-rerank"), "cannot search", "code_buckets")
    one_line_error(run("--db", small_store, "db", "check"), "schema differs from the models", "code_buckets")


def test_db_check_names_differences(db_url: str) -> None:
    with ImageStore(db_url) as store, store.engine.begin() as conn:
        conn.execute(text("DROP INDEX ix_features_image_id"))
    result = run("--db", db_url, "db", "check")
    one_line_error(result, "add index ix_features_image_id on features")
    assert "Index(" not in result.output and "('" not in result.output


def test_read_commands_never_create_a_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "typo.db"
    for args in (["info"], ["query", "1"], ["show", "1"], ["verify"], ["dedup"], ["index", "list"], ["db", "current"],
                 ["db", "check"], ["errors"], ["export"], ["ingest", str(tmp_path), "--dry-run"]):
        one_line_error(run("--db", str(missing), *args), "no database at", str(missing))
        assert not missing.exists(), args
    # an empty IMGSTORE_DB means the default (./imgstore.db), which read commands do not create either
    monkeypatch.chdir(tmp_path)
    one_line_error(run("info", env={"IMGSTORE_DB": ""}), "no database at", "imgstore.db")
    assert not (tmp_path / "imgstore.db").exists()
    # a command that fails before any work leaves nothing behind either
    one_line_error(run("--db", str(missing), "ingest", str(tmp_path / "no-such-folder")), "no such file or folder")
    assert not missing.exists()
    one_line_error(run("--db", str(missing), "index", "create"), "no database at", str(missing))
    assert not missing.exists()
    # commands that write create it, and so does the Python API
    assert run("--db", str(missing), "db", "upgrade").exit_code == 0 and missing.exists()
    with ImageStore(tmp_path / "api.db"):
        pass
    assert (tmp_path / "api.db").exists()


def test_db_after_the_command_name(small_store: str, tmp_path: Path) -> None:
    assert run("info", "--db", small_store, "--json").exit_code == 0
    assert run("index", "list", "--db", small_store).exit_code == 0
    assert run("db", "current", "--db", small_store).exit_code == 0
    # the later --db wins
    assert run("--db", str(tmp_path / "nope.db"), "info", "--db", small_store).exit_code == 0


def test_usage_errors_keep_exit_2(small_store: str) -> None:
    assert run("--db", small_store, "query").exit_code == 2
    assert run("--db", small_store, "index", "create", "--bits", "many").exit_code == 2


def _images_so_far(path: str) -> int:
    import sqlite3

    if not os.path.exists(path):
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.05)
        try:
            return int(conn.execute("SELECT count(*) FROM images").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:  # the schema may still be being created
        return 0


def test_ctrl_c_exits_130_and_the_rerun_completes(sqlite_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    # enough work that the interrupt lands mid-run even when the poll below is slow (a loaded machine)
    expected = make_collection(root, per_photo=40)
    cmd = [sys.executable, "-m", "imgstore.cli", "--db", sqlite_url, "ingest", str(root), "--extractor", "color",
           "--batch-size", "2", "--workers", "1", "--no-progress"]
    # (in the full suite something before this test leaves SIGINT ignored in the pytest process:
    # the ingest then ran to the end through the interrupt)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if _images_so_far(sqlite_url) >= 4:  # a plain read-only look: opening a store takes longer
            break
        time.sleep(0.05)
    # hold the database's write lock: the ingest cannot write (so cannot finish) until the
    # interrupt has been sent, however fast it runs or however slowly this process is scheduled
    # (an ingest that finished while the signal was on its way exited 0)
    lock = sqlite3.connect(sqlite_url, timeout=120, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    try:
        stored = lock.execute("SELECT count(*) FROM images").fetchone()[0]
        assert proc.poll() is None and stored < expected["images"], "the ingest ended before it could be interrupted"
        proc.send_signal(signal.SIGINT)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    with ImageStore(sqlite_url) as store:
        assert store.verify(check_files=False).ok
        assert store.counts().images < expected["images"]
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    with ImageStore(sqlite_url) as store:
        assert store.counts().images == expected["images"]


READ_ONLY_CHECK = """
import csv, difflib, json, os, sys  # difflib: imported lazily by a library; nobody cannot read this stdlib
from click.testing import CliRunner
from PIL import Image
import imgstore.catalog, imgstore.dedup, imgstore.decode, imgstore.keeper, imgstore.maintenance, imgstore.search
from imgstore.cli import cli
from imgstore.features import get_extractor
Image.init()
get_extractor("color")
db = sys.argv[1]
CliRunner().invoke(cli, ["--db", db, "info"])  # everything imported while the stdlib is still readable
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # root writes everywhere: check as 'nobody'

for args in (["info"], ["query", "1", "-k", "2", "--json"], ["show", "1"], ["verify", "--no-files"], ["dedup"],
             ["export"], ["index", "list"], ["db", "current"], ["errors"]):
    result = CliRunner().invoke(cli, ["--db", db, *args])
    print(args[0], result.exit_code, result.output.strip().splitlines()[-1] if result.output.strip() else repr(result.exception))
result = CliRunner().invoke(cli, ["--db", db, "rm", "1"])
print("rm", result.exit_code, result.output.strip())
"""


def test_a_read_only_store_can_be_queried(tmp_path: Path) -> None:
    import tempfile

    # a folder of its own under /tmp, so 'nobody' reaches it whatever pytest's folders allow
    outer = Path(tempfile.mkdtemp(prefix="imgstore-ro-", dir="/tmp"))
    outer.chmod(0o755)
    folder = outer / "ro"
    folder.mkdir()
    write_variants(photo("chelsea"), tmp_path / "photos", "cat", 3)
    db = folder / "store.db"
    assert run("--db", str(db), "ingest", str(tmp_path / "photos"), "--extractor", "color", "--no-progress").exit_code == 0
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    db.chmod(0o444)
    folder.chmod(0o555)
    try:
        out = subprocess.run([sys.executable, "-c", READ_ONLY_CHECK, str(db)], capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)
        shutil.rmtree(outer, ignore_errors=True)
    assert out.returncode == 0, out.stderr
    codes = {line.split()[0]: line for line in out.stdout.splitlines()}
    for command in ("info", "query", "show", "verify", "dedup", "export", "index", "db", "errors"):
        assert codes[command].split()[1] == "0", codes[command]
    assert codes["rm"].startswith("rm 1 Error:") and "readonly" in codes["rm"]


def test_one_json_convention(small_store: str) -> None:
    """Plain floats (no float32 noise), no binary fields, --json beside dedup's --format json."""
    hit = json.loads(run("--db", small_store, "query", "1", "-k", "1", "--json").output)[0]["results"][0]
    assert hit["cosine"] == 1.0 and repr(hit["cosine"]) == "1.0"
    rows = [json.loads(line) for line in run("--db", small_store, "export").output.splitlines()]
    assert rows and all("signature" not in r for r in rows)
    assert run("--db", small_store, "dedup", "--json").output == run("--db", small_store, "dedup", "--format", "json").output
    shown = json.loads(run("--db", small_store, "show", "1", "--json").output)
    assert shown["id"] == 1 and "signature" not in shown


@pytest.mark.parametrize("command", [["info"], ["export", "--format", "jsonl"], ["index", "list"]])
def test_a_reader_that_stops_reading_is_no_error(small_store: str, command: list[str]) -> None:
    """`imgstore info | head -1` printed "Error: Broken pipe" and exited 1: the reader had what
    it wanted. The read end is closed before the command writes (deterministic): it exits as a
    process killed by SIGPIPE does (141, what `set -o pipefail` reports), silently."""
    exe = str(Path(sys.executable).with_name("imgstore"))
    proc = subprocess.Popen([exe, "--db", small_store, *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == "", err


def test_large_photos_ingest_quietly_and_one_over_the_limit_is_one_line(sqlite_url: str, tmp_path: Path) -> None:
    """95 MP photos (over Pillow's 89 MP warning, under our 200 MP limit) ingest with nothing on
    stderr, PNG and TIFF alike; a 210 MP one fails alone, in one line that names the fix. A real
    process: a warning printed by Python is what the user saw."""
    root = tmp_path / "large"
    root.mkdir()
    Image.new("L", (10_000, 9_500), 77).save(root / "big.png")  # flat grey: 100 KB, quick to decode
    Image.new("L", (10_000, 9_500), 150).save(root / "big.tif", compression="tiff_deflate")
    (root / "huge.png").write_bytes(png_with_header(15_000, 14_000))
    out = subprocess.run([sys.executable, "-m", "imgstore.cli", "--db", sqlite_url, "ingest", str(root),
                          "--extractor", "color", "--no-progress"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "added 2" in out.stdout and "failed 1" in out.stdout, out.stdout
    assert "Warning" not in out.stderr and "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "huge.png: image is 15000x14000 = 210000000 pixels, over the limit of 200000000 " \
        "pixels" in lines[0] and "--max-pixels" in lines[0], out.stderr
    errors = json.loads(run("--db", sqlite_url, "errors", "--json").output)
    assert [(Path(e["path"]).name, e["error_type"]) for e in errors] == [("huge.png", "ImageTooLargeError")]


def test_max_pixels_option_and_environment(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    Image.new("RGB", (1000, 1000), (10, 120, 30)).save(root / "one.png")  # 1 MP
    Image.new("RGB", (1200, 1000), (200, 20, 30)).save(root / "more.png")  # 1.2 MP

    def ingest(db: str, *options: str, env: dict[str, str] | None = None) -> list[str]:
        result = run("--db", str(tmp_path / db), *options, "ingest", str(root), "--extractor", "color", "--no-progress",
                     env=env)
        assert result.exit_code == 0, result.output
        return [e["reason"] for e in json.loads(run("--db", str(tmp_path / db), "errors", "--json").output)]

    assert ingest("a.db", "--max-pixels", "1.1M") == [
        "image is 1200x1000 = 1200000 pixels, over the limit of 1100000 pixels; if it is genuine, raise the limit "
        "(imgstore --max-pixels N, $IMGSTORE_MAX_PIXELS=N or ImageStore(max_pixels=N))"]
    assert [r[:40] for r in ingest("b.db", env={"IMGSTORE_MAX_PIXELS": "1000000"})] == [
        "image is 1200x1000 = 1200000 pixels, ove"]
    assert ingest("c.db", "--max-pixels", "2M", env={"IMGSTORE_MAX_PIXELS": "1000000"}) == []  # the option wins
    Image.new("RGB", (1200, 1000), (20, 20, 200)).save(tmp_path / "query.png")  # not stored: decoded to be searched
    query = run("--db", str(tmp_path / "c.db"), "--max-pixels", "1M", "query", str(tmp_path / "query.png"))
    one_line_error(query, "query.png: image is 1200x1000 = 1200000 pixels, over the limit of 1000000 pixels")
    for options, env in ((["--max-pixels", "lots"], None), ([], {"IMGSTORE_MAX_PIXELS": "0"})):
        bad = run("--db", str(tmp_path / "c.db"), *options, "info", env=env)
        assert bad.exit_code == 2 and "is not a pixel count" in bad.output, bad.output
