"""Every file Pillow's own tests read (~1,000: every format and mode it knows, files its fuzzers
crashed it with, truncated files, decompression bombs), fetched from Pillow's source package
by ``make samples`` (:mod:`tests.camera_samples`): each decodes, or is one clear error.

Nobody listed these cases; they found a DDS variant whose NotImplementedError escaped as a
traceback from ``imgstore query``, and Pillow's warnings about files it still decoded (corrupt
EXIF, a malformed MPO or APNG) printed with Pillow's source lines over an ingest's report.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from imgstore import ImageStore
from imgstore.decode import load_fitted, load_image
from imgstore.errors import DecodeError
from imgstore.serve import Thumbnails, create_app

from . import camera_samples
from .helpers import missing_tool, photo
from .test_serve import running


@pytest.fixture(scope="module")
def pillow_files() -> list[Path]:
    got = camera_samples.folder(camera_samples.PILLOW)
    if got is None:
        missing_tool("Pillow's test images are not fetched (`make samples`)", "the tests of Pillow's files")
    files = sorted(p for p in got.rglob("*") if p.is_file() and p.name != camera_samples.MANIFEST)
    assert len(files) > 500  # the collection, not a stray folder
    return files


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, about files it still decodes (corrupt EXIF, ...)
def test_every_file_decodes_or_is_one_clear_error(pillow_files: list[Path]) -> None:
    """As ingest reads a file (draft and thumbnail for a 224-px input) and as a page shows it
    (fitted in 128 px): an RGB picture, or DecodeError, one line, naming the file."""
    wrong: list[str] = []
    decoded = refused = 0
    for path in pillow_files:
        for name, read in (("ingest", lambda p: load_image(p, draft_size=(224, 224), thumbnail_size=(224, 224)).image),
                           ("fitted", lambda p: load_fitted(p, 128))):
            try:
                img = read(path)
            except DecodeError as exc:
                refused += 1
                if "\n" in str(exc) or path.name not in str(exc):
                    wrong.append(f"{path.name} ({name}): {exc!r}")
            except Exception as exc:  # noqa: BLE001 - what this test looks for
                wrong.append(f"{path.name} ({name}): {type(exc).__name__}: {exc}")
            else:
                decoded += 1
                if not isinstance(img, Image.Image) or img.mode != "RGB" or img.width < 1 or img.height < 1:
                    wrong.append(f"{path.name} ({name}): {img!r}")
                elif name == "fitted" and max(img.size) > 128:
                    wrong.append(f"{path.name} ({name}): {img.size} is not within 128 px")
    assert not wrong, "\n".join(wrong[:40])
    assert decoded > refused > 50  # most are pictures; the broken ones are many too


def test_a_folder_of_them_ingests_with_a_one_line_report_per_failure(pillow_files: list[Path], tmp_path: Path) -> None:
    """``imgstore ingest`` of the whole folder, a real process: it finishes (exit 0), every file
    it tried is added, a duplicate or one failure with a one-line reason, and no Python warning
    or traceback reaches the terminal (libtiff's own C messages may: Pillow gives no way to route them)."""
    root = pillow_files[0].parent
    while root.parent != camera_samples.ROOT:
        root = root.parent
    db = tmp_path / "odd.db"
    out = subprocess.run([sys.executable, "-m", "imgstore.cli", "--db", str(db), "ingest", str(root), "--extractor",
                          "color", "--json", "--no-progress"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["added"] > 500 and summary["failed"] > 20, summary
    assert summary["added"] + summary["duplicates"] + summary["failed"] == summary["files_seen"], summary
    assert len(summary["errors"]) == summary["failed"]
    assert all(e["reason"] and "\n" not in e["reason"] for e in summary["errors"])
    noise = [line for line in out.stderr.splitlines() if "Traceback" in line or "Warning" in line or "warnings.warn" in line]
    assert not noise, "\n".join(noise[:20])
    with ImageStore(db) as store:
        assert store.info().counts.images == summary["added"]


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's, about files it still decodes
def test_every_file_uploaded_to_a_real_server_is_an_answer_or_a_clear_refusal(pillow_files: list[Path],
                                                                              tmp_path: Path) -> None:
    """Each file as a search upload and as an added image (``allow_writes``) on a real uvicorn
    server: 200, or 4xx with a one-line JSON ``error``; never a 5xx. Every image added is then
    searchable by its id."""
    store = ImageStore(tmp_path / "served.db", cache_codes=True)
    seed = tmp_path / "seed"
    seed.mkdir()
    photo("chelsea").save(seed / "chelsea.png")
    store.ingest([seed], extractor="color")
    wrong: list[str] = []
    added: list[int] = []
    refused = 0
    try:
        app = create_app(store, allow_writes=True, thumbnails=Thumbnails(store, tmp_path / "thumbs"))
        with running(app) as port, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            for path in pillow_files:
                data = path.read_bytes()
                for method, url in (("search", "/api/search"), ("add", "/api/images")):
                    got = http.post(url, params={"k": 2} if method == "search" else None,
                                    files={"image": (path.name, data, "application/octet-stream")})
                    if got.status_code == 200:
                        if method == "add":
                            added.append(int(got.json()["image_id"]))
                        continue
                    refused += 1
                    detail = got.json().get("error") if got.headers.get("content-type", "").startswith(
                        "application/json") else None
                    if got.status_code >= 500 or not isinstance(detail, str) or "\n" in detail:
                        wrong.append(f"{path.name} ({method}): {got.status_code} {got.text[:300]}")
            assert not wrong, "\n".join(wrong[:40])
            assert len(added) > 500 and refused > 100, (len(added), refused)
            for image_id in sorted(set(added))[:: max(1, len(set(added)) // 50)]:  # a sample: each found by its id
                hits = http.get("/api/search", params={"id": image_id, "k": 1})
                assert hits.status_code == 200, hits.text
    finally:
        store.close()
