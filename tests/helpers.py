"""Shared test helpers: real image files (scikit-image's bundled photos and transformed copies),
synthetic feature vectors stored as images, brute-force Hamming kNN, and a bucket check."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import BinaryIO, NoReturn

import skimage
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageEnhance
from sqlalchemy import text

from imgstore.hashing.bits import as_words, hamming_distances
from imgstore.models import Image as ImageRow
from imgstore.sqlhelpers import insert_ignore
from imgstore.vectors import features_table, get_or_create_space, vector_to_bytes

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "hubble_deep_field", "ihc", "motorcycle_left", "retina"]


def photo_path(name: str) -> Path:
    """A real photo shipped in the scikit-image wheel."""
    for ext in (".png", ".jpg"):
        if (SKIMAGE_DATA / f"{name}{ext}").exists():
            return SKIMAGE_DATA / f"{name}{ext}"
    raise FileNotFoundError(name)


def photo(name: str) -> Image.Image:
    with Image.open(photo_path(name)) as img:
        return img.convert("RGB")


def write_variants(img: Image.Image, folder: Path, stem: str, n: int) -> list[Path]:
    """``n`` distinct near-copies of ``img`` as JPEG/PNG files (different bytes each)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        v = img.resize((max(16, img.width // (1 + i % 3)), max(16, img.height // (1 + i % 3))))
        v = ImageEnhance.Brightness(v).enhance(0.8 + 0.05 * i)
        if i % 2:
            v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{stem}_{i:03d}.{'png' if i % 4 == 0 else 'jpg'}"
        v.save(path, quality=70 + i % 25) if path.suffix == ".jpg" else v.save(path)
        out.append(path)
    return out


def make_collection(root: Path, per_photo: int = 3) -> dict[str, int]:
    """A folder tree: photos in nested folders, an exact duplicate, a truncated JPEG, a text file
    named .jpg, and a non-image file that must be ignored. Returns the expected counts."""
    n_images = 0
    for i, name in enumerate(PHOTOS):
        sub = root / f"group{i % 3}" / ("nested" if i % 2 else "")
        write_variants(photo(name), sub, name, per_photo)
        n_images += per_photo
    first = sorted(root.rglob("*.jpg"))[0]
    (root / "copy_of_first.jpg").write_bytes(first.read_bytes())  # same bytes: one image, two paths
    data = first.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (root / "notes.jpg").write_text("this is not an image")
    (root / "README.txt").write_text("ignored: not an image extension")
    return {"images": n_images, "paths": n_images + 1, "failed": 2}


def assert_buckets_match_codes(conn, hasher_id: int) -> None:  # type: ignore[no-untyped-def]
    """The band buckets of an index hold exactly its stored codes, each once per band."""
    import numpy as np
    from sqlalchemy import select

    from imgstore.hashing.bits import band_values
    from imgstore.models import Code, CodeBucket, HashIndex

    n_bits, n_bands, width = conn.execute(
        select(HashIndex.n_bits, HashIndex.n_bands, HashIndex.band_width).where(HashIndex.id == hasher_id)
    ).one()
    expected = set()
    for image_id, code in conn.execute(select(Code.image_id, Code.code).where(Code.hasher_id == hasher_id)):
        bands = band_values(np.frombuffer(code, dtype=np.uint8).reshape(1, -1), n_bands, width)[0]
        expected |= {(j, int(v), int(image_id), bytes(code)) for j, v in enumerate(bands)}
    found = []
    for band, value, n, ids, codes in conn.execute(
        select(CodeBucket.band, CodeBucket.value, CodeBucket.n, CodeBucket.image_ids, CodeBucket.codes).where(CodeBucket.hasher_id == hasher_id)
    ):
        ids = np.frombuffer(ids, dtype="<i8")
        assert len(ids) == n and len(codes) == n * (n_bits // 8)
        found += [(band, value, int(i), bytes(codes[k * (n_bits // 8) : (k + 1) * (n_bits // 8)])) for k, i in enumerate(ids)]
    assert len(found) == len(set(found)), "an entry is in a bucket twice"
    assert set(found) == expected


def populate(conn, vectors):  # type: ignore[no-untyped-def]
    """Store synthetic feature vectors as images of a feature space; returns the space id."""
    space_id = get_or_create_space(conn, "synthetic", vectors.shape[1], "v1")
    insert_ignore(conn, ImageRow.__table__, [
        {"sha256": f"{i:064x}", "width": 1, "height": 1, "format": None, "byte_size": 1, "meta": {}}
        for i in range(len(vectors))
    ])
    ids = [r[0] for r in conn.execute(text("SELECT id FROM images ORDER BY id"))]
    insert_ignore(conn, features_table, [
        {"space_id": space_id, "image_id": i, "vector": vector_to_bytes(v)} for i, v in zip(ids, vectors)
    ])
    return space_id


def brute_force(ids, codes, q, k):  # type: ignore[no-untyped-def]
    d = hamming_distances(as_words(q.reshape(1, -1))[0], as_words(codes)).astype(int)
    order = np.lexsort((ids, d))[:k]
    return [(int(ids[i]), int(d[i])) for i in order]


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + b"IHDR"
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def missing_tool(message: str, tests: str) -> NoReturn:
    """A program some tests drive is not installed: they fail in CI (``CI`` set), where they must
    run, and skip elsewhere, saying so either way."""
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run {tests}")
    pytest.skip(message)


def ctrl_c_default() -> None:
    """``preexec_fn`` of a child a test sends Ctrl-C: SIGINT back to its default disposition. An
    ignored SIGINT is inherited across exec (a background job of a non-interactive shell starts
    so, and so does the pytest process after some tests), and Python in the child then installs
    no KeyboardInterrupt handler: the child would run on through the test's interrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def write_heic(img: Image.Image, path: Path | BinaryIO, **kw: object) -> Path | BinaryIO:
    """``img`` as a HEIC (quality 92) at ``path`` (a file name or a binary stream), through
    pillow-heif; ``thumbnails=[320]`` embeds a thumbnail as a phone does."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    img.save(path, format="HEIF", quality=92, **kw)
    return path
