"""Faults, concurrency and hostile input on SQLite and PostgreSQL.

Hostile files come from a seeded mutator (truncations and bit flips of real JPEG, PNG, GIF,
WebP and TIFF files) plus hand-made cases; every file must end up either stored correctly or
recorded with a reason, the process must not crash, and the store must stay consistent.
"""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import inspect

from imgstore import ImageStore

from .helpers import png_with_header, photo, write_variants
from .test_ingest import check_consistent

FORMATS = {"JPEG": ".jpg", "PNG": ".png", "GIF": ".gif", "WEBP": ".webp", "TIFF": ".tif"}


def mutants(seed: int, n: int) -> list[tuple[str, bytes]]:
    """``n`` damaged image files: truncated at a random point or with random bytes flipped."""
    rng = random.Random(seed)
    base = photo("astronaut").resize((96, 96))
    originals = {}
    for fmt, ext in FORMATS.items():
        buf = io.BytesIO()
        base.save(buf, format=fmt)
        originals[ext] = buf.getvalue()
    out = []
    for i in range(n):
        ext = rng.choice(sorted(originals))
        data = bytearray(originals[ext])
        if rng.random() < 0.5:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randrange(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        out.append((f"mutant_{i:03d}{ext}", bytes(data)))
    return out


def hostile_folder(root: Path, seed: int = 1234, n_mutants: int = 40) -> int:
    """Write the hostile corpus; returns the number of files written."""
    root.mkdir(parents=True)
    files: list[tuple[str | bytes, bytes]] = list(mutants(seed, n_mutants))
    files.append(("bomb.png", png_with_header(100_000, 100_000)))
    files.append(("empty.jpg", b""))
    files.append(("text.png", b"hello, not a png"))
    good = photo("coffee")
    for name, img, fmt in [
        ("one_pixel.png", Image.new("RGB", (1, 1), (255, 0, 0)), "PNG"),
        ("strip.png", Image.new("RGB", (30_000, 2), (0, 128, 0)), "PNG"),
        ("palette.gif", good.convert("P"), "GIF"),
        ("cmyk.jpg", good.convert("CMYK"), "JPEG"),
        ("sixteen.png", good.convert("L").point(lambda v: v * 256).convert("I;16"), "PNG"),
        ("alpha.png", good.convert("RGBA"), "PNG"),
        ("bilevel.tif", good.convert("1"), "TIFF"),
    ]:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        files.append((name, buf.getvalue()))
    one_pixel = files[-7][1]
    files.append(("x" * 240 + ".png", one_pixel))  # a very long name (same bytes: a duplicate)
    files.append((b"caf\xe9-latin1.png", one_pixel + b"\0"))  # not UTF-8; trailing byte: new content
    for name, data in files:
        path = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else os.fsencode(name))
        with open(path, "wb") as f:
            f.write(data)
    (root / "folder.jpg").mkdir()  # a directory named like an image
    (root / "loop").symlink_to(root)
    return len(files)


def test_hostile_corpus_is_recorded_or_stored(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "hostile"
    n_files = hostile_folder(root)
    with ImageStore(db_url) as store:
        s = store.ingest([root], extractor="color", follow_symlinks=True)
        assert s.files_seen == n_files
        # every file was stored (as new content or a duplicate) or recorded as an error
        assert s.added + s.duplicates + (s.failed - 1) == n_files  # minus the symlink-loop record
        reasons = {Path(p).name: r for p, r in s.errors}
        assert "too large" in reasons["bomb.png"] or "pixels" in reasons["bomb.png"]
        assert "empty" in reasons["empty.jpg"]
        for name in ("one_pixel.png", "strip.png", "palette.gif", "cmyk.jpg", "sixteen.png", "alpha.png", "bilevel.tif"):
            assert name not in reasons, reasons.get(name)
        stored = {Path(e.path).name for e in store.errors()}
        assert {"bomb.png", "empty.jpg", "text.png"} <= stored
        latin1_name = os.fsdecode(b"caf\xe9-latin1.png")  # not UTF-8: a surrogate in the str
        latin1 = store.image(str(root / latin1_name))
        assert latin1.paths[0].path == str(root / latin1_name) and os.path.exists(latin1.paths[0].path)
        assert len(store.image(str(root / ("x" * 240 + ".png"))).paths) == 2  # with one_pixel.png
        check_consistent(store)
        again = store.ingest([root], extractor="color", follow_symlinks=True)
        assert again.added == 0
        check_consistent(store)


def test_sql_metacharacters_in_names_and_tags(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "names"
    root.mkdir()
    img = photo("chelsea").resize((64, 64))
    names = ["it's.png", 'quote".png', "semi;colon; DROP TABLE images;--.png", "100%_done.png", "back\\slash.png"]
    for i, name in enumerate(names):
        img.rotate(i * 10).save(root / name)
    tag = "'); DROP TABLE images; --"
    with ImageStore(db_url) as store:
        s = store.ingest([root], extractor="color", tags=[tag, "100%"])
        assert s.added == len(names) and s.failed == 0
        assert {"images", "image_paths", "codes"} <= set(inspect(store.engine).get_table_names())
        for name in names:
            shown = store.image(str(root / name))
            assert shown.meta["tags"] == sorted([tag, "100%"])
            assert store.search(root / name, k=1)[0].paths == [str(root / name)]


INGEST = """
import sys
from imgstore import ImageStore
with ImageStore(sys.argv[1]) as store:
    s = store.ingest(sys.argv[2:], extractor="color", batch_size=4, auto_index=False)
    print(s.added, s.duplicates, s.failed)
"""

QUERY_LOOP = """
import sys, time
from imgstore import ImageStore
deadline = time.time() + float(sys.argv[3])
n = errors = 0
with ImageStore(sys.argv[1]) as store:
    while time.time() < deadline:
        try:
            res = store.search(sys.argv[2], k=5, exact=True, rerank=False)
            assert res and res[0].distance == 0, res
            n += 1
        except Exception as exc:
            errors += 1
            print("ERROR", type(exc).__name__, exc, file=sys.stderr)
print(n, errors)
"""


def test_two_overlapping_ingests_at_once(db_url: str, tmp_path: Path) -> None:
    a, b, shared = tmp_path / "a", tmp_path / "b", tmp_path / "shared"
    write_variants(photo("chelsea"), a, "a", 6)
    write_variants(photo("rocket"), b, "b", 6)
    write_variants(photo("coffee"), shared, "s", 10)
    with ImageStore(db_url):
        pass
    procs = [
        subprocess.Popen([sys.executable, "-c", INGEST, db_url, str(a), str(shared)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", INGEST, db_url, str(b), str(shared)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    with ImageStore(db_url) as store:
        counts = check_consistent(store)
        assert counts.images == 22
        assert counts.paths == 22


def test_queries_while_ingesting(db_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    files = write_variants(photo("horse"), first, "h", 6)
    more = tmp_path / "more"
    write_variants(photo("astronaut"), more, "a", 30)
    with ImageStore(db_url) as store:
        store.ingest([first], extractor="color", auto_index=False)
        store.create_index("lsh", 32, extractor="color")
    reader = subprocess.Popen([sys.executable, "-c", QUERY_LOOP, db_url, str(files[0]), "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with ImageStore(db_url) as store:
        store.ingest([more], extractor="color", batch_size=2)
    out, err = reader.communicate(timeout=120)
    n, errors = map(int, out.split())
    assert errors == 0, err
    assert n > 0


@pytest.mark.postgres
def test_postgres_restart_midway(pg_url: str, tmp_path: Path) -> None:
    """The test restarts its own server in the middle of an ingest; a rerun completes."""
    root = tmp_path / "photos"
    for name in ("chelsea", "rocket", "coffee", "astronaut", "horse"):
        write_variants(photo(name), root / name, name, 12)
    with ImageStore(pg_url):
        pass
    proc = subprocess.Popen([sys.executable, "-c", INGEST, pg_url, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    with ImageStore(pg_url) as store:
        while time.time() < deadline and store.counts().images < 4 and proc.poll() is None:
            time.sleep(0.05)
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"], check=True)
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:  # failed with a clear message, not a hang
        assert "Error" in err or "error" in err.lower()
    for _ in range(60):
        try:
            with ImageStore(pg_url) as store:
                store.ingest([root], extractor="color")
            break
        except Exception:  # noqa: BLE001 - the server may still be starting
            time.sleep(1)
    with ImageStore(pg_url) as store:
        counts = check_consistent(store)
        assert counts.images == 60 and counts.paths == 60
