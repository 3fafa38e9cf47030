"""imgstore.decode on real files written here and decoded by Pillow."""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import imgstore.decode as decode_module
from imgstore import ImageStore
from imgstore.decode import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    check_size,
    decode_bytes,
    load_image,
    parse_pixels,
    read_file,
)
from imgstore.errors import ConfigError, DecodeError, ImageTooLargeError, ImgStoreError

from .helpers import png_with_header


def encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def pixel(d: DecodedImage, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(v) for v in d.image.getpixel((x, y)))


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def pillow_globals_untouched():
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    yield
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == before


# --- good images -----------------------------------------------------------------------------


def test_plain_jpeg_from_path(tmp_path: Path) -> None:
    path = write(tmp_path, "a.jpg", encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG"))
    d = load_image(path)
    assert (d.width, d.height, d.format, d.captured_at) == (64, 48, "JPEG", None)
    assert d.image.mode == "RGB" and d.image.size == (64, 48)
    assert close(pixel(d, 5, 5), (10, 200, 30))


def test_exif_orientation_and_capture_time(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turned 90 degrees clockwise
    exif.get_ifd(0x8769)[0x9003] = "2021:05:04 10:11:12"
    d = load_image(write(tmp_path, "rot.jpg", encode(img, "JPEG", exif=exif, quality=95)))
    assert (d.width, d.height) == (20, 40) and d.image.size == (20, 40)
    assert close(pixel(d, 10, 5), (255, 0, 0), 40)  # left became top
    assert close(pixel(d, 10, 35), (0, 0, 255), 40)
    assert d.captured_at == datetime(2021, 5, 4, 10, 11, 12)


def test_datetime_fallback_and_garbage_exif(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0132] = "2019:01:02 03:04:05"
    d = decode_bytes(encode(Image.new("RGB", (8, 8)), "JPEG", exif=exif))
    assert d.captured_at == datetime(2019, 1, 2, 3, 4, 5)
    bad = Image.Exif()
    bad[0x0112] = 99
    bad[0x0132] = "0000:00:00 00:00:00"
    bad.get_ifd(0x8769)[0x9003] = "not a date at all"
    d = decode_bytes(encode(Image.new("RGB", (8, 6)), "JPEG", exif=bad))
    assert (d.width, d.height, d.captured_at) == (8, 6, None)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_garbage_exif_block_does_not_fail(tmp_path: Path) -> None:
    d = decode_bytes(encode(Image.new("RGB", (8, 6)), "JPEG", exif=b"Exif\x00\x00II*\x00\xff\xff\xff\x7f junk"))
    assert (d.width, d.height) == (8, 6)


def test_jpeg_draft_keeps_original_size(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (2000, 1500), (120, 60, 30)), "JPEG")
    d = decode_bytes(data, draft_size=(448, 448))
    assert (d.width, d.height) == (2000, 1500)
    assert 448 <= min(d.image.size) < 1500
    assert decode_bytes(data).image.size == (2000, 1500)


def test_palette_with_transparency_on_white() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    d = decode_bytes(encode(img, "PNG", transparency=0))
    assert pixel(d, 0, 0) == (255, 255, 255) and pixel(d, 1, 1) == (255, 0, 0)


def test_rgba_and_la_composited_on_white() -> None:
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 0), (0, 0, 255, 255), (0, 0, 0, 128)])
    d = decode_bytes(encode(img, "PNG"))
    assert pixel(d, 0, 0) == (255, 255, 255) and pixel(d, 1, 0) == (0, 0, 255)
    assert close(pixel(d, 2, 0), (127, 127, 127), 2)
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (50, 255)])
    d = decode_bytes(encode(la, "PNG"))
    assert pixel(d, 0, 0) == (255, 255, 255) and pixel(d, 1, 0) == (50, 50, 50)


def test_greyscale_and_one_bit() -> None:
    d = decode_bytes(encode(Image.new("L", (5, 5), 77), "PNG"))
    assert d.image.mode == "RGB" and pixel(d, 2, 2) == (77, 77, 77)
    one = Image.new("1", (8, 8), 0)
    one.putpixel((3, 3), 1)
    d = decode_bytes(encode(one, "PNG"))
    assert pixel(d, 0, 0) == (0, 0, 0) and pixel(d, 3, 3) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 65535, 32768, 25700, 1000]], dtype=np.uint16)
    d = decode_bytes(encode(Image.fromarray(values), "PNG"))
    assert np.asarray(d.image)[0, :, 0].tolist() == [0, 255, 128, 100, 4]


def test_32bit_integer_and_float_images() -> None:
    i32 = Image.fromarray(np.array([[0, 65535, 257 * 10]], dtype=np.int32), mode="I")
    assert np.asarray(load_image(i32).image)[0, :, 0].tolist() == [0, 255, 10]
    f = Image.fromarray(np.array([[0.0, 1.0, 0.5]], dtype=np.float32), mode="F")
    assert np.asarray(load_image(f).image)[0, :, 0].tolist() == [0, 255, 128]


def test_cmyk_jpeg() -> None:
    d = decode_bytes(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    assert d.image.mode == "RGB" and close(pixel(d, 8, 8), (255, 0, 0), 40)


def test_ycbcr_and_pil_input_not_modified() -> None:
    src = Image.new("RGB", (4, 4), (200, 100, 50)).convert("YCbCr")
    d = load_image(src)
    assert src.mode == "YCbCr" and d.image.mode == "RGB" and close(pixel(d, 1, 1), (200, 100, 50), 4)
    assert d.format is None


def test_animated_gif_and_apng_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    for fmt in ("GIF", "PNG"):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
        assert Image.open(io.BytesIO(data)).n_frames == 3
        d = decode_bytes(data)
        assert d.format == fmt and close(pixel(d, 5, 5), (255, 0, 0), 4)


def test_animated_webp_first_frame() -> None:
    from PIL import features

    if not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    frames = [Image.new("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 0, 255))]
    d = decode_bytes(encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert close(pixel(d, 5, 5), (255, 0, 0), 4)


def test_sources_bytes_path_and_str() -> None:
    data = encode(Image.new("RGB", (3, 2)), "PNG")
    assert load_image(data).image.size == (3, 2)
    assert load_image(bytearray(data)).image.size == (3, 2)
    with pytest.raises(ConfigError):
        load_image(12345)  # type: ignore[arg-type]


# --- limits ----------------------------------------------------------------------------------


def test_max_pixels_checked_from_header(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    with pytest.raises(DecodeError, match="over the limit of 399"):
        decode_bytes(data, max_pixels=399)
    assert decode_bytes(data, max_pixels=400).width == 20
    assert DEFAULT_MAX_PIXELS >= 100_000_000


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def test_decompression_bomb_header(tmp_path: Path) -> None:
    """A 100k x 100k PNG that is a few hundred bytes on disk: refused without decoding."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    path = write(tmp_path, "bomb.png", data)
    with pytest.raises(DecodeError, match="too large|limit") as info:
        load_image(path)
    assert info.value.path == str(path)
    with pytest.raises(DecodeError, match="over the limit"):  # our limit, when Pillow's is not hit
        ihdr = struct.pack(">IIBBBBB", 9000, 9000, 8, 2, 0, 0, 0)
        decode_bytes(data[:8] + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat), max_pixels=10**6)


@pytest.fixture(scope="module")
def png_95mp() -> bytes:
    """A real 10000 x 9500 PNG: 95 MP, over Pillow's 89 MP warning and under our 200 MP limit.
    One flat grey, so the file is about 100 KB and decodes in a second into 95 MB."""
    return encode(Image.new("L", (10_000, 9_500), 77), "PNG")


def test_a_large_photo_under_the_limit_decodes_without_warning(png_95mp: bytes) -> None:
    filters = list(warnings.filters)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning (or any other) fails the test
        d = decode_bytes(png_95mp, draft_size=(448, 448))
    assert (d.width, d.height, d.format) == (10_000, 9_500, "PNG")  # the file's size...
    assert d.image.size == (477, 453) and d.image.mode == "RGB"  # ...reduced 21x: still covers 448 x 448
    assert pixel(d, 100, 100) == (77, 77, 77)
    assert warnings.filters == filters  # the library never touches the process's warning filters


def test_between_pillows_refusal_and_our_limit_ours_decides() -> None:
    """Pillow refuses above twice its 89 MP warning size; a 190 MP photo is under our 200 MP."""
    data = png_with_header(14_000, 13_600)  # 190.4 MP; the header only, no pixel data
    assert check_size(data) == (14_000, 13_600)
    with pytest.raises(DecodeError, match="truncated") as info:  # decoded (and found empty), not refused
        decode_bytes(data, draft_size=(448, 448))
    assert not isinstance(info.value, ImageTooLargeError)
    for refuse in (lambda: decode_bytes(data, max_pixels=190_000_000), lambda: check_size(data, max_pixels=190_000_000)):
        with pytest.raises(ImageTooLargeError, match="= 190400000 pixels, over the limit of 190000000 pixels"):
            refuse()


def test_over_the_limit_the_error_names_the_fix() -> None:
    with pytest.raises(ImageTooLargeError) as info:
        decode_bytes(png_with_header(15_000, 14_000))
    message = str(info.value)
    assert "15000x14000 = 210000000 pixels, over the limit of 200000000 pixels" in message
    assert "--max-pixels" in message and "IMGSTORE_MAX_PIXELS" in message and "ImageStore(max_pixels=" in message
    assert "\n" not in message and "Pillow" not in message


def test_limit_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    monkeypatch.setenv("IMGSTORE_MAX_PIXELS", "399")
    with pytest.raises(ImageTooLargeError, match="over the limit of 399 pixels"):
        decode_bytes(data)
    assert decode_bytes(data, max_pixels=400).width == 20  # given outright, a limit wins
    with ImageStore(tmp_path / "a.db") as store:
        assert store.max_pixels == 399
    with ImageStore(tmp_path / "a.db", max_pixels=10**9) as store:
        assert store.max_pixels == 10**9
    monkeypatch.setenv("IMGSTORE_MAX_PIXELS", "0.0004M")
    assert decode_bytes(data).width == 20
    monkeypatch.setenv("IMGSTORE_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match=r"\$IMGSTORE_MAX_PIXELS must be a number of pixels"):
        decode_bytes(data)
    monkeypatch.delenv("IMGSTORE_MAX_PIXELS")
    assert ImageStore(tmp_path / "b.db").max_pixels == DEFAULT_MAX_PIXELS
    for bad in (0, -1, True, 1.5, "1M"):
        with pytest.raises(ConfigError, match="max_pixels must be a whole number"):
            ImageStore(tmp_path / "c.db", max_pixels=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "pixels"), [("250000000", 250_000_000), ("250_000_000", 250_000_000),
                                              ("250M", 250_000_000), (" 250 mp ", 250_000_000), ("1.5M", 1_500_000)])
def test_parse_pixels(text: str, pixels: int) -> None:
    assert parse_pixels(text) == pixels


@pytest.mark.parametrize("text", ["", "0", "-5", "1.5", "lots", "nanM", "infM", "1e30M"])
def test_parse_pixels_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match="must be a number of pixels"):
        parse_pixels(text)


@pytest.mark.parametrize(("mode", "fmt", "fill", "expected"), [
    ("RGB", "PNG", (10, 200, 30), (10, 200, 30)),
    ("RGB", "TIFF", (10, 200, 30), (10, 200, 30)),
    ("RGBA", "PNG", (255, 0, 0, 0), (255, 255, 255)),  # transparent: white
    ("LA", "PNG", (0, 128), (127, 127, 127)),  # half-transparent black on white
    ("P", "GIF", (200, 40, 40), (200, 40, 40)),
    ("1", "PNG", 1, (255, 255, 255)),
    ("I;16", "PNG", 65535, (255, 255, 255)),
])
def test_every_mode_is_reduced_to_the_draft_size_with_its_colours(mode: str, fmt: str, fill: object,
                                                                   expected: tuple[int, ...],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Formats without a JPEG draft are reduced after decoding, palette and 16-bit images too
    (from REDUCE_FROM_PIXELS up: lowered here, so that a small image shows it; below it an
    image is never reduced, so that features stay what they were)."""
    size = (2000, 1500)
    img = Image.new("RGB", size, fill).quantize(4) if mode == "P" else Image.new(mode, size, fill)  # type: ignore[arg-type]
    assert decode_bytes(encode(img, fmt), draft_size=(200, 200)).image.size == size
    monkeypatch.setattr(decode_module, "REDUCE_FROM_PIXELS", 1_000_000)
    d = decode_bytes(encode(img, fmt), draft_size=(200, 200))
    assert (d.width, d.height) == size
    assert d.image.size == (286, 215) and d.image.mode == "RGB"  # 7x: the largest factor still covering 200 x 200
    assert close(pixel(d, 100, 100), expected, tol=2)
    assert decode_bytes(encode(img, fmt)).image.size == size  # no draft size: every pixel
    # a PIL image is reduced as its file is: the same pixels, so the same features
    assert np.array_equal(np.asarray(load_image(img, draft_size=(200, 200)).image), np.asarray(d.image))
    assert img.size == size and img.mode == ("P" if mode == "P" else mode)  # the caller's image is left as it was


def test_a_large_jpeg_is_drafted_then_reduced(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (8000, 6000), (30, 60, 90)), "JPEG", quality=80)
    assert decode_bytes(data, draft_size=(224, 224)).image.size == (1000, 750)  # the draft alone below the threshold
    monkeypatch.setattr(decode_module, "REDUCE_FROM_PIXELS", 500_000)
    d = decode_bytes(data, draft_size=(224, 224))
    assert (d.width, d.height) == (8000, 6000)
    assert d.image.size == (334, 250)  # 1/8 in the decoder (1000 x 750), then 3x (rounded up)
    assert close(pixel(d, 10, 10), (30, 60, 90))


def test_read_file_size_cap(tmp_path: Path) -> None:
    path = write(tmp_path, "a.png", encode(Image.new("RGB", (30, 30)), "PNG"))
    with pytest.raises(DecodeError, match="too large"):
        read_file(path, max_bytes=10)


# --- bad files: DecodeError with a short reason, never a raw Pillow error ------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated(tmp_path: Path, fmt: str) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = encode(img, fmt)
    path = write(tmp_path, f"cut.{fmt.lower()}", data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated or corrupt") as info:
        load_image(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert "Traceback" not in str(info.value) and len(info.value.reason) < 220


def test_corrupt_jpeg_body(tmp_path: Path) -> None:
    data = bytearray(encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG"))
    data[200:] = b"\xff" * (len(data) - 200)
    with pytest.raises(DecodeError):
        decode_bytes(bytes(data))


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "empty.jpg", b"")
    with pytest.raises(DecodeError, match="empty"):
        load_image(path)
    with pytest.raises(DecodeError, match="empty"):
        decode_bytes(b"")


def test_text_file(tmp_path: Path) -> None:
    path = write(tmp_path, "notes.jpg", b"hello, this is not an image\n" * 10)
    with pytest.raises(DecodeError, match="not a recognised image format"):
        load_image(path)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="directory"):
        load_image(tmp_path)


def test_missing(tmp_path: Path) -> None:
    with pytest.raises(DecodeError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DecodeError, match="not found"):
        load_image(tmp_path / "no-such-dir" / "nope.jpg")
    not_a_dir = write(tmp_path, "file", b"x")
    with pytest.raises(DecodeError, match="not found"):
        load_image(not_a_dir / "child.jpg")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(DecodeError, match="not a regular file"):
        load_image(fifo)


UNREADABLE_CHECK = """
import os, sys
from imgstore.decode import read_file
from imgstore.errors import DecodeError
if os.geteuid() == 0:
    os.setgid(65534)
    os.setuid(65534)  # root reads everything: check as 'nobody'
try:
    read_file(sys.argv[1])
except DecodeError as exc:
    print(exc.reason)
"""


def test_unreadable_chmod(tmp_path: Path) -> None:
    """A real chmod 000 file; as root the check runs in a subprocess that drops to 'nobody'."""
    import subprocess
    import sys

    folder = tmp_path / "open"
    folder.mkdir()
    folder.chmod(0o755)
    for parent in [tmp_path, *tmp_path.parents]:  # let 'nobody' reach the folder
        if parent == Path(parent.anchor):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    path = write(folder, "secret.jpg", encode(Image.new("RGB", (4, 4)), "JPEG"))
    path.chmod(0)
    try:
        out = subprocess.run([sys.executable, "-c", UNREADABLE_CHECK, str(path)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "permission denied" in out.stdout
    finally:
        path.chmod(0o644)


def test_unreadable_simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root can read a chmod 000 file, so the EACCES from open() is injected instead."""
    path = write(tmp_path, "secret.jpg", encode(Image.new("RGB", (4, 4)), "JPEG"))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(decode_module, "open", denied, raising=False)
    with pytest.raises(DecodeError, match="permission denied"):
        read_file(path)


def test_decode_error_is_imgstore_error(tmp_path: Path) -> None:
    with pytest.raises(ImgStoreError):
        decode_bytes(b"GIF89a garbage")
