"""Files real phones and cameras wrote (issue 27): iPhone, Galaxy, Sony, Xiaomi and Nokia
HEIC/HEIF, from pillow-heif's source package (:mod:`tests.camera_samples`, ``make samples``).

test_formats writes its HEICs with libheif; these are what people's folders hold: Apple's 512-px
tiles and 320-px thumbnails, Samsung's 512-px thumbnails (one of a 200 MP photo), 10-bit Sony
.HIF files whose thumbnails are 8-bit (so not scaled copies of the image), a spatial photo,
image sequences, broken files. The facts asserted (sizes, makers, capture times) are the
files' own, read from their headers and EXIF by pillow-heif and Pillow, not imgstore.
"""

from __future__ import annotations

import io
import json
import shutil
from datetime import datetime
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from click.testing import CliRunner
from PIL import Image, ImageEnhance

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.decode import load_fitted, load_image
from imgstore.dedup import DEFAULT_MIN_COSINE
from imgstore.errors import DecodeError, ImageTooLargeError
from imgstore.features import get_extractor
from imgstore.geometry import COPY, DIFFERENT, WORK_SIDE, PairVerifier

from . import camera_samples
from .helpers import missing_tool

#: name: (folder, EXIF make, EXIF model, width, height) as the file says (upright)
CAMERA = {
    "arrow.heic": ("heif_other", "Apple", "iPhone 8 Plus", 3024, 4032),
    "pug.heic": ("heif_other", "Apple", "iPhone 13 Pro", 4032, 3024),
    "empty_icc.heic": ("heif_other", "Apple", "iPhone XS", 1025, 900),
    "spatial_photo.heic": ("heif_other", "Apple", "Apple Vision Pro", 2560, 2560),
    "200MP.heic": ("heif_special", "samsung", "Galaxy S24 Ultra", 12240, 16320),
    "aux_YCbCr.heic": ("heif_special", "samsung", "Galaxy S25 Ultra", 4000, 1848),
    "xiaomi.heic": ("heif_special", "Xiaomi", "M2012K11AG", 2592, 1944),
    "cat.hif": ("heif_other", "SONY", "ILCE-7SM3", 4240, 2832),
    "guitar_cw90.hif": ("heif_special", "SONY", "ILCE-7M4", 4672, 7008),
    "stereo_1200x800.heic": ("heif_other/nokia", None, None, 1200, 800),
    "bird_burst.heic": ("heif_other/nokia", None, None, 1280, 720),
    "alpha.heic": ("heif_other/nokia", None, None, 1440, 960),
}
#: phone photos whose embedded thumbnail covers EfficientNet-Lite0's 224 x 224 input
THUMBNAILED = ("arrow.heic", "200MP.heic", "aux_YCbCr.heic", "stereo_1200x800.heic")
#: none (pug, xiaomi), or none that is a scaled copy (Sony's are 8-bit thumbnails of 10-bit images)
DECODED_WHOLE = ("pug.heic", "xiaomi.heic", "cat.hif", "guitar_cw90.hif")
DAMAGED = {"corrupted.heic": "heif_corrupted", "corrupted.hif": "heif_corrupted", "empty.heic": "heif_corrupted",
           "truncated.heic": "heif_truncated"}


@pytest.fixture(scope="module")
def samples() -> Path:
    got = camera_samples.folder()
    if got is None:
        missing_tool("the camera sample files are not fetched (`make samples`)", "the camera-file tests")
    return got


def source(samples: Path, name: str) -> Path:
    return samples / (CAMERA[name][0] if name in CAMERA else DAMAGED[name]) / name


def exif_facts(path: Path) -> tuple[str | None, str | None, datetime | None]:
    """The file's EXIF make, model and capture time (DateTimeOriginal, else DateTime; the
    wall-clock time the camera wrote, its offset left aside, as imgstore stores it), read by
    pillow-heif and Pillow."""
    exif = Image.Exif()
    raw = pillow_heif.open_heif(path).info.get("exif")
    if raw:
        exif.load(raw)
    when = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)
    make, model = exif.get(0x010F), exif.get(0x0110)
    return (make.strip("\0 ") if make else None, model.strip("\0 ") if model else None,
            datetime.strptime(when.strip("\0 ")[:19].replace("-", ":").replace("T", " "), "%Y:%m:%d %H:%M:%S")
            if when else None)


@pytest.fixture(scope="module")
def camera_store(samples: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """The camera files (and the damaged ones) in one folder, ingested by the CLI with the default
    extractor."""
    base = tmp_path_factory.mktemp("camera")
    folder = base / "DCIM"
    folder.mkdir()
    for name in [*CAMERA, *DAMAGED]:
        shutil.copyfile(source(samples, name), folder / name)
    db = base / "camera.db"
    result = CliRunner().invoke(cli, ["--db", str(db), "ingest", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    return db, folder, json.loads(result.output)


def test_every_camera_photo_is_stored_upright_with_its_capture_time(camera_store: tuple[Path, Path, dict],
                                                                     samples: Path) -> None:
    db, folder, summary = camera_store
    assert (summary["added"], summary["failed"]) == (len(CAMERA), len(DAMAGED)), summary
    with ImageStore(db) as store:
        for name, (_, make, model, width, height) in CAMERA.items():
            got_make, got_model, when = exif_facts(source(samples, name))
            assert (got_make, got_model) == (make, model), name  # the sample is the camera's file
            record = store.image(str(folder / name))
            assert (record.width, record.height, record.format) == (width, height, "HEIF"), name
            assert (record.captured_at and record.captured_at.replace(tzinfo=None)) == when, name
            assert record.feature_spaces, name
    shown = CliRunner().invoke(cli, ["--db", str(db), "show", str(folder / "arrow.heic")])
    assert shown.exit_code == 0 and "captured 2018-07-31 14:52:07 (camera clock)" in shown.output, shown.output


def test_damaged_camera_files_are_one_line_errors(camera_store: tuple[Path, Path, dict]) -> None:
    summary = camera_store[2]
    errors = {Path(e["path"]).name: e["reason"] for e in summary["errors"]}
    assert set(errors) == set(DAMAGED)
    assert errors["truncated.heic"].startswith("truncated HEIC/HEIF file"), errors
    assert all(reason and "\n" not in reason for reason in errors.values()), errors


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(1, 4000))
def test_a_cut_off_phone_photo_is_refused_or_whole(samples: Path, tmp_path_factory: pytest.TempPathFactory,
                                                  cut: int) -> None:
    """An interrupted copy of an iPhone HEIC (meta first, 512-px tiles after) or a Galaxy's (tiles
    first, meta last, a trailer of Samsung's own after it), cut anywhere: libheif would decode
    the iPhone's with the missing tiles blank, or read the thumbnail Apple wrote before them;
    imgstore refuses it in one line, unless all the image data survived the cut (only the
    Galaxy's trailer is gone), and then it is the same picture."""
    for name in ("arrow.heic", "aux_YCbCr.heic"):
        data = source(samples, name).read_bytes()
        path = tmp_path_factory.mktemp("cut") / "IMG_0001.HEIC"
        path.write_bytes(data[: len(data) * cut // 4001])
        for size in (None, (224, 224)):
            try:
                got = load_image(path, thumbnail_size=size)
            except DecodeError as err:
                assert "\n" not in str(err) and "IMG_0001.HEIC" in str(err)
                assert err.reason.startswith("truncated HEIC/HEIF file"), err.reason  # never "not recognised"
            else:
                assert got.image.tobytes() == load_image(source(samples, name), thumbnail_size=size).image.tobytes()
        if name == "arrow.heic":  # its data runs to its last byte: every cut loses some
            with pytest.raises(DecodeError, match="truncated HEIC/HEIF file"):
                load_image(path)


def test_a_phone_thumbnail_stands_in_only_where_it_is_a_scaled_copy_that_covers(samples: Path) -> None:
    size = get_extractor("efficientnet-lite0").thumbnail_size
    assert size is not None
    for name in THUMBNAILED + DECODED_WHOLE:
        width, height = CAMERA[name][3:]
        got = load_image(source(samples, name), thumbnail_size=size)
        assert (got.width, got.height) == (width, height), name  # the image's size, whatever was decoded
        if name in THUMBNAILED:
            assert got.image.width < width and got.image.height < height, name
            assert got.image.width >= size[0] and got.image.height >= size[1], name
            assert abs(got.image.width * height - got.image.height * width) <= 2 * max(width, height), name
        else:
            assert got.image.size == (width, height), name


def test_a_phone_photo_read_from_its_thumbnail_is_found_by_its_full_picture(
        camera_store: tuple[Path, Path, dict], samples: Path, tmp_path: Path) -> None:
    """The thumbnail's features are not the full decode's (Apple's 320-px thumbnail is softer:
    cosine ~0.96 measured), but a query of the whole picture still finds the photo first, as a
    near-duplicate by dedup's own cosine bar."""
    db, folder, _ = camera_store
    with ImageStore(db) as store:
        for name in ("arrow.heic", "aux_YCbCr.heic", "stereo_1200x800.heic"):
            whole = load_image(source(samples, name)).image
            twin = tmp_path / f"{name}.png"
            whole.save(twin)
            hits = store.search(twin, k=2)
            assert hits[0].paths == [str(folder / name)], name
            assert hits[0].cosine is not None and hits[0].cosine >= DEFAULT_MIN_COSINE, (name, hits[0].cosine)


def test_a_200_megapixel_phone_photo(samples: Path) -> None:
    """A Galaxy S24 Ultra's 200 MP photo: under the default pixel limit it is read from its
    512-px thumbnail (features, page thumbnails); a lower limit refuses it in one line, whatever
    would have been decoded."""
    path = source(samples, "200MP.heic")
    got = load_image(path, thumbnail_size=(224, 224))
    assert (got.width, got.height) == (12240, 16320) and max(got.image.size) <= 512
    shown = load_fitted(path, 256)
    assert shown.size == (192, 256)
    assert np.asarray(shown).std() > 10  # a picture, not a blank
    for call in (lambda: load_image(path, max_pixels=100_000_000, thumbnail_size=(224, 224)),
                 lambda: load_fitted(path, 256, max_pixels=100_000_000)):
        with pytest.raises(ImageTooLargeError) as err:
            call()
        assert "\n" not in str(err.value) and "max-pixels" in str(err.value)


def test_the_geometric_check_reads_a_galaxy_thumbnail_with_the_same_verdicts(samples: Path) -> None:
    """The check works on the picture fitted in 512 x 512: a Galaxy's 512-px thumbnail covers it
    (an iPhone's 320-px one does not, so that photo decodes whole), and gives the verdicts the
    whole photo gives: its JPEG copies (as saved, cropped, brightened) are copies, the other
    phone's photo is not."""
    assert load_image(source(samples, "arrow.heic"), thumbnail_box=WORK_SIDE).image.size == (3024, 4032)
    for name, other in (("aux_YCbCr.heic", "200MP.heic"), ("200MP.heic", "aux_YCbCr.heic")):
        width, height = CAMERA[name][3:]
        thumb = load_image(source(samples, name), thumbnail_box=WORK_SIDE).image
        assert max(thumb.size) == WORK_SIDE and thumb.width * height // width in range(thumb.height - 1, thumb.height + 2)
        whole = load_image(source(samples, name), draft_size=(2048, 2048)).image
        copies = [whole, whole.crop((whole.width // 10, whole.height // 10, whole.width * 9 // 10, whole.height * 9 // 10)),
                  ImageEnhance.Brightness(whole).enhance(1.2)]
        pictures: dict[int, Image.Image] = {1: load_image(source(samples, other), thumbnail_box=WORK_SIDE).image}
        for i, copy in enumerate(copies, start=2):
            buf = io.BytesIO()
            copy.save(buf, "JPEG", quality=80)
            pictures[i] = load_image(buf.getvalue(), draft_size=(WORK_SIDE, WORK_SIDE)).image
        verdicts = []
        for photo in (thumb, load_image(source(samples, name), draft_size=(WORK_SIDE, WORK_SIDE)).image):
            verifier = PairVerifier(lambda i, photo=photo: photo if i == 0 else pictures[i], workers=1)
            verdicts.append(verifier.verdicts([0, 0, 0, 0], [1, 2, 3, 4]).tolist())
        assert verdicts[0] == verdicts[1] == [DIFFERENT, COPY, COPY, COPY], name
