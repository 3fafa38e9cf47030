"""What a phone's or a camera's folder holds (issue 27): HEIC/HEIF, AVIF, WebP and camera RAW
beside JPEG and PNG, each a real file written here and decoded by the real plugins; sidecars
and videos skipped and counted.

RAW: no camera file can be fetched offline, so the RAW tests use a DNG written here (a TIFF
with the DNG tags, LinearRaw pixels, no embedded preview) that LibRaw (rawpy) reads and
develops like a camera's; the embedded-preview route of :mod:`imgstore.rawphoto` is not
exercised by a real file.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from PIL.TiffImagePlugin import ImageFileDirectory_v2

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.decode import _items_whole, check_size, decode_bytes, load_fitted, load_image
from imgstore.errors import DecodeError, ImageTooLargeError

from .helpers import photo, write_heic

ORIENT_6 = Image.Transpose.ROTATE_270  # EXIF orientation 6: turn 90 degrees clockwise to view


def exif(orientation: int = 1, when: str = "2020:01:02 03:04:05") -> bytes:
    e = Image.Exif()
    e[0x0112] = orientation
    e[0x0132] = when
    return e.tobytes()


def write_dng(img: Image.Image, path: Path, *, orientation: int = 1, when: str = "2021:07:04 10:20:30") -> Path:
    """A LinearRaw DNG: the DNG version tags, a camera model, an identity colour matrix."""
    ifd = ImageFileDirectory_v2()
    for tag, value, kind in ((50706, b"\x01\x04\x00\x00", 1), (50707, b"\x01\x01\x00\x00", 1),
                             (50708, "imgstore test camera", 2), (50721, (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), 10),
                             (50778, 21, 3), (50728, (1.0, 1.0, 1.0), 5), (262, 34892, 3),
                             (271, "imgstore", 2), (272, "test camera", 2), (306, when, 2), (274, orientation, 3)):
        ifd[tag] = value
        ifd.tagtype[tag] = kind
    img.convert("RGB").save(path, format="TIFF", tiffinfo=ifd)
    return path


def mean_abs(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b.resize(a.size), dtype=np.float32)).mean())


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF", "WEBP"])
def test_phone_formats_decode_upright_with_their_capture_time(fmt: str, tmp_path: Path) -> None:
    img = photo("chelsea").convert("RGB")
    path = tmp_path / f"IMG_0001.{'heic' if fmt == 'HEIF' else fmt.lower()}"
    if fmt == "HEIF":
        write_heic(img, path, exif=exif(6))
    else:
        img.save(path, format=fmt, quality=92, exif=exif(6))
    d = load_image(path)
    assert d.format == fmt
    assert (d.width, d.height) == (img.height, img.width) == d.image.size  # turned upright once, not twice
    assert mean_abs(d.image, img.transpose(ORIENT_6)) < 6  # the same picture, the right way round
    assert d.captured_at is not None and (d.captured_at.year, d.captured_at.month, d.captured_at.day) == (2020, 1, 2)


def test_a_dng_is_developed_upright_with_its_capture_time(tmp_path: Path) -> None:
    img = photo("chelsea").convert("RGB")
    path = write_dng(img, tmp_path / "IMG_0002.DNG", orientation=6)
    d = load_image(path, draft_size=(224, 224))
    assert d.format == "DNG"
    assert (d.width, d.height) == (img.height, img.width) == d.image.size
    assert d.captured_at is not None and d.captured_at.year == 2021
    # developed, so not the same values; but the same picture: its layout correlates
    a = np.asarray(d.image.convert("L"), dtype=np.float32).ravel()
    b = np.asarray(img.transpose(ORIENT_6).convert("L"), dtype=np.float32).ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.9
    # an upload has no name: the bytes are recognised as RAW all the same
    data = path.read_bytes()
    assert decode_bytes(data).image.size == d.image.size
    assert check_size(data) == (img.width, img.height)


def test_a_heic_thumbnail_stands_in_only_when_it_covers_the_size(tmp_path: Path) -> None:
    """A phone's HEIC carries a small thumbnail its encoder made (here 320 px on the long side):
    asked for at most that, the decode returns it, upright like the image, with the image's
    own size; asked for more, or without ``thumbnail_size``, the whole image."""
    img = photo("chelsea").convert("RGB").resize((1600, 1200))
    path = write_heic(img, tmp_path / "IMG_0001.HEIC", exif=exif(6), thumbnails=[320])
    full = load_image(path)
    small = load_image(path, thumbnail_size=(224, 224))
    assert full.image.size == (1200, 1600) and small.image.size == (240, 320)
    assert (small.width, small.height, small.format, small.captured_at) == (1200, 1600, "HEIF", full.captured_at)
    assert mean_abs(small.image, full.image) < 8  # the same picture, the same way round
    assert mean_abs(small.image, full.image.transpose(Image.Transpose.ROTATE_180)) > 20  # (which this would tell)
    assert load_image(path, thumbnail_size=(241, 241)).image.size == (1200, 1600)  # it does not cover 241
    assert load_image(path, draft_size=(224, 224)).image.size == (1200, 1600)  # a draft is for JPEGs only
    plain = write_heic(img, tmp_path / "plain.heic")  # no thumbnail
    assert load_image(plain, thumbnail_size=(32, 32)).image.size == (1600, 1200)


def test_a_page_thumbnail_of_a_heic_comes_from_its_own_thumbnail(tmp_path: Path) -> None:
    """A 256-pixel box of a 4:3 photo is 256 x 192: a phone's 320 x 240 thumbnail covers it, so
    the page's thumbnail is made from that (the same pixels as resizing it), not from the image."""
    img = photo("chelsea").convert("RGB").resize((1600, 1200))
    path = write_heic(img, tmp_path / "IMG_0002.HEIC", thumbnails=[320])
    shown = load_fitted(path, 256)
    assert shown.size == (256, 192)
    embedded = load_image(path, thumbnail_size=(256, 192)).image
    assert embedded.size == (320, 240)
    embedded.thumbnail((256, 256))
    assert np.array_equal(np.asarray(shown), np.asarray(embedded))
    whole = load_image(path).image
    whole.thumbnail((256, 256))
    assert not np.array_equal(np.asarray(shown), np.asarray(whole))
    assert load_fitted(path, 512).size == (512, 384)  # more than the thumbnail: from the image


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(width=st.integers(120, 700), height=st.integers(120, 700), box=st.sampled_from([64, 100, 160, 256]),
       orientation=st.integers(1, 8), want=st.integers(16, 300))
def test_any_heic_thumbnail_used_covers_the_size_and_shows_the_image(tmp_path: Path, width: int, height: int, box: int,
                                                                    orientation: int, want: int) -> None:
    """Whatever the image's shape, its thumbnail's box, its orientation and the size asked for:
    the picture decoded is the whole image, or a thumbnail that covers the size in both
    directions, has the image's aspect ratio and shows it the same way round."""
    img = photo("astronaut").convert("RGB").resize((width, height))
    path = write_heic(img, tmp_path / "x.heic", exif=exif(orientation), thumbnails=[box])
    full = load_image(path)
    got = load_image(path, thumbnail_size=(want, want))
    assert (got.width, got.height) == (full.width, full.height) == full.image.size
    w, h = got.image.size
    if (w, h) != full.image.size:
        assert w >= want and h >= want and max(w, h) <= box
        assert abs(w * full.height - h * full.width) <= 2 * max(full.width, full.height)
        others = [full.image.transpose(op) for op in Image.Transpose]  # the image any other way round
        closest_wrong = min(mean_abs(got.image, o) for o in others if o.size == full.image.size)
        assert mean_abs(got.image, full.image) < closest_wrong / 2


@pytest.fixture(scope="module")
def heic_with_thumbnail() -> bytes:
    buf = io.BytesIO()
    write_heic(photo("coffee").convert("RGB").resize((400, 300)), buf, thumbnails=[200])  # type: ignore[arg-type]
    return buf.getvalue()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(damage=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8))
def test_a_damaged_heic_reads_with_a_thumbnail_whenever_it_reads_without(heic_with_thumbnail: bytes,
                                                                       damage: list[tuple[float, int]]) -> None:
    """Bytes of a HEIC overwritten anywhere (its boxes, the image's data, the thumbnail's): asking
    for the thumbnail fails only as a DecodeError, and never where decoding the whole image works."""
    data = bytearray(heic_with_thumbnail)
    for where, value in damage:
        data[int(where * len(data))] = value
    try:
        whole = load_image(bytes(data))
    except DecodeError:
        whole = None
    try:
        small = load_image(bytes(data), thumbnail_size=(100, 100))
    except DecodeError:
        assert whole is None
    else:
        assert whole is None or (small.width, small.height) == (whole.width, whole.height)


@settings(max_examples=50, deadline=None)
@given(cut=st.floats(0, 1, exclude_max=True))
def test_a_cut_off_heic_is_refused_with_or_without_its_thumbnail(heic_with_thumbnail: bytes, cut: float) -> None:
    """An interrupted copy (the file cut off anywhere): refused in one line, never read from a
    thumbnail that survived the cut nor from what libheif makes of the image's remains; the
    whole file reads from its thumbnail."""
    data = heic_with_thumbnail[: int(cut * len(heic_with_thumbnail))]
    for size in (None, (100, 100)):
        with pytest.raises(DecodeError) as err:
            load_image(data, thumbnail_size=size)
        assert "\n" not in str(err.value)
        assert err.value.reason.startswith("truncated HEIC/HEIF file") or len(data) < 12, err.value.reason
    assert _items_whole(heic_with_thumbnail)
    assert load_image(heic_with_thumbnail, thumbnail_size=(100, 100)).image.size == (200, 150)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tail=st.binary(min_size=1, max_size=64))
def test_bytes_after_a_heic_change_nothing(heic_with_thumbnail: bytes, tail: bytes) -> None:
    """Padding or a tool's trailer after the last box (a Galaxy writes one): the same picture,
    from the thumbnail and whole."""
    for size in (None, (100, 100)):
        got = load_image(heic_with_thumbnail + tail, thumbnail_size=size)
        assert got.image.tobytes() == load_image(heic_with_thumbnail, thumbnail_size=size).image.tobytes()


@settings(max_examples=40, deadline=None)
@given(width=st.integers(1, 400), height=st.integers(1, 400), box=st.integers(1, 300))
def test_load_fitted_fits_the_box_as_a_thumbnail_of_the_image_would(width: int, height: int, box: int) -> None:
    """Any size of image and of box: what load_fitted returns has the size Image.thumbnail gives
    the whole decoded image, never a side above the box."""
    img = photo("coffee").convert("RGB").resize((width, height))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    shown = load_fitted(bytearray(buf.getvalue()), box)
    expected = img.copy()
    expected.thumbnail((box, box))
    assert shown.size == expected.size and max(shown.size) <= box


def test_one_limit_for_raw_and_heic(tmp_path: Path) -> None:
    img = photo("coffee").convert("RGB")
    small = img.width * img.height - 1
    for path in (write_dng(img, tmp_path / "a.dng"), write_heic(img, tmp_path / "a.heic")):
        with pytest.raises(ImageTooLargeError, match="max-pixels"):
            load_image(path, max_pixels=small)
        assert load_image(path, max_pixels=small + 1).width == img.width


def test_a_broken_raw_or_heic_is_one_clear_error(tmp_path: Path) -> None:
    good = write_heic(photo("coffee").convert("RGB"), tmp_path / "ok.heic").read_bytes()
    (tmp_path / "cut.heic").write_bytes(good[: len(good) // 2])
    (tmp_path / "noise.nef").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    for name in ("cut.heic", "noise.nef"):
        with pytest.raises(DecodeError) as err:
            load_image(tmp_path / name)
        assert "\n" not in str(err.value) and name in str(err.value)


def test_a_phone_folder_ingests_and_searches(tmp_path: Path) -> None:
    """JPEG, PNG, HEIC, AVIF, WebP and a DNG of different photos, with an iPhone edit sidecar
    (.AAE), an XMP sidecar and a video: every image added, the rest counted as skipped; a HEIC
    query finds its own image first."""
    folder = tmp_path / "DCIM"
    folder.mkdir()
    names = ["chelsea", "coffee", "astronaut", "rocket", "coins", "horse"]
    pics = {n: photo(n).convert("RGB") for n in names}
    pics["chelsea"].save(folder / "IMG_0001.JPG", quality=90)
    pics["coffee"].save(folder / "IMG_0002.PNG")
    write_heic(pics["astronaut"], folder / "IMG_0003.HEIC", thumbnails=[320])  # as a phone writes it
    pics["rocket"].save(folder / "IMG_0004.avif", quality=90)
    pics["coins"].save(folder / "IMG_0005.webp", quality=90)
    write_dng(pics["horse"], folder / "IMG_0006.DNG")
    (folder / "IMG_0003.AAE").write_text("<?xml version='1.0'?><plist/>")
    (folder / "IMG_0006.xmp").write_text("<x:xmpmeta xmlns:x='adobe:ns:meta/'/>")
    (folder / "IMG_0007.MOV").write_bytes(b"\0\0\0\x14ftypqt  " + b"\0" * 64)
    db = tmp_path / "phone.db"
    result = CliRunner().invoke(cli, ["--db", str(db), "ingest", str(folder), "--extractor", "color", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert (summary["added"], summary["failed"], summary["skipped_non_images"]) == (6, 0, 3), summary
    with ImageStore(db) as store:
        formats = sorted((store.image(str(p)).format or "") for p in sorted(folder.iterdir()) if p.suffix not in
                         (".AAE", ".xmp", ".MOV"))
        assert formats == ["AVIF", "DNG", "HEIF", "JPEG", "PNG", "WEBP"]
        query = write_heic(pics["astronaut"], tmp_path / "query.heic")
        hits = store.search(query, k=3)
        assert hits[0].paths == [str(folder / "IMG_0003.HEIC")]
        pics["astronaut"].save(tmp_path / "twin.png")  # its PNG twin finds it too (the HEIC has a thumbnail that covers the input)
        assert store.search(tmp_path / "twin.png", k=3)[0].paths == [str(folder / "IMG_0003.HEIC")]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(version=st.integers(0, 3), sizes=st.integers(0, 0xFFFF), count=st.integers(0, 0xFFFFFFFF),
       body=st.binary(max_size=300))
def test_any_item_location_box_is_read_at_once(heic_with_thumbnail: bytes, version: int, sizes: int, count: int,
                                              body: bytes) -> None:
    """A hostile HEIC's ``iloc`` box (any version, field sizes, item count and contents, extents of
    no bytes that could be listed billions of times): judged in one pass over the box, a bool,
    never an exception; decoding it is one DecodeError (the box lists no real image)."""
    item_count = count.to_bytes(4 if version == 2 else 2 if count < 0x10000 else 4, "big")
    payload = bytes([version, 0, 0, 0]) + sizes.to_bytes(2, "big") + item_count + body
    iloc = (8 + len(payload)).to_bytes(4, "big") + b"iloc" + payload
    meta_body = b"\0\0\0\0" + iloc
    meta = (8 + len(meta_body)).to_bytes(4, "big") + b"meta" + meta_body
    data = b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + meta + b"\0\0\0\x10mdat" + b"\0" * 8
    assert isinstance(_items_whole(data), bool)
    with pytest.raises(DecodeError):
        load_image(data)


@settings(max_examples=30, deadline=None)
@given(cut=st.floats(0, 1, exclude_min=True, exclude_max=True))
def test_a_cut_off_avif_is_called_truncated(cut: float) -> None:
    """What is left of an AVIF after an interrupted copy: refused as truncated, not as a file of
    no known format."""
    buf = io.BytesIO()
    photo("astronaut").convert("RGB").resize((256, 256)).save(buf, format="AVIF", quality=70)
    data = buf.getvalue()[: max(1, int(cut * len(buf.getvalue())))]
    with pytest.raises(DecodeError) as err:
        load_image(data)
    assert err.value.reason.startswith("truncated") or len(data) < 12, err.value.reason  # 12: its brand
