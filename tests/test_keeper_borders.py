"""The keeper's border measure is remembered: measured on the file once, kept on the image's
row with the measure's version (``images.border_fraction``), read back by the next dedup instead
of decoding the file, and measured again when its version is not the current one."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from sqlalchemy import select, update

from imgstore import ImageStore
from imgstore.keeper import BORDER_VERSION, Borders, Candidate, border_fraction, measure_border
from imgstore.models import Image as ImageRow

from .helpers import photo, write_heic
from .test_keeper import copies, group_of


def candidate(image_id: int, path: Path | None) -> Candidate:
    return Candidate(image_id, 10, 10, "PNG", 1, None, None, str(path) if path is not None else None)


def test_borders_measure_once_and_keep_only_what_a_file_told(tmp_path: Path) -> None:
    img = photo("astronaut").resize((160, 160))
    img.rotate(7, resample=Image.Resampling.BICUBIC, expand=True).save(tmp_path / "rot.png")
    img.save(tmp_path / "plain.png")
    borders = Borders(known={3: 0.25})
    rotated = borders.of(candidate(1, tmp_path / "rot.png"))
    assert rotated == border_fraction(str(tmp_path / "rot.png")) and 0.05 < rotated < 0.4
    assert borders.of(candidate(2, tmp_path / "plain.png")) == 0.0
    assert borders.of(candidate(3, tmp_path / "plain.png")) == 0.25  # known: the file is not read
    assert borders.of(candidate(4, tmp_path / "gone.png")) == 0.0  # no file: nothing to keep
    assert borders.of(candidate(5, None)) == 0.0
    assert borders.fresh == {1: rotated, 2: 0.0}
    (tmp_path / "rot.png").unlink()
    assert borders.of(candidate(1, tmp_path / "rot.png")) == rotated  # measured once
    assert measure_border(str(tmp_path / "gone.png")) is None


def test_dedup_keeps_the_border_and_reads_it_back(db_url: str, tmp_path: Path) -> None:
    files = copies(tmp_path / "photos")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"], extractor="efficientnet-lite0")
        rule = dict(min_cosine=0.8)
        assert group_of(store.find_duplicates(**rule), files["original"]).keeper_path == str(files["original"])
        rotated = store.image(str(files["rotated"])).id
        with store.engine.connect() as conn:
            stored = dict(conn.execute(select(ImageRow.id, ImageRow.border_fraction)
                                       .where(ImageRow.border_version == BORDER_VERSION)).all())
        # only a canvas larger than another member's is measured: the rotated copy's
        assert stored[rotated] == border_fraction(str(files["rotated"])) > 0.0

        def set_border(fraction: float, version: int) -> None:
            with store.engine.begin() as conn:
                conn.execute(update(ImageRow).where(ImageRow.id == rotated)
                             .values(border_fraction=fraction, border_version=version))

        # the stored measure is what the next dedup uses: told "no border", it keeps the rotated
        # copy's larger canvas (had it read the file, it would keep the original)
        set_border(0.0, BORDER_VERSION)
        assert group_of(store.find_duplicates(**rule), files["original"]).keeper_path == str(files["rotated"])
        # a measure of another version is taken again, and the new one kept
        set_border(0.0, BORDER_VERSION - 1)
        assert group_of(store.find_duplicates(**rule), files["original"]).keeper_path == str(files["original"])
        with store.engine.connect() as conn:
            row = conn.execute(select(ImageRow.border_fraction, ImageRow.border_version)
                               .where(ImageRow.id == rotated)).one()
        assert tuple(row) == (stored[rotated], BORDER_VERSION)


def test_a_heic_border_is_measured_on_its_own_thumbnail_as_on_the_image(tmp_path: Path) -> None:
    """A rotated photo's black corners, measured on a HEIC that embeds a 320-px thumbnail (which
    covers the measure's 128-pixel box: test_formats shows load_fitted reads it) and on the same
    picture as PNG, agree."""
    rotated = photo("chelsea").convert("RGB").resize((1200, 800)).rotate(20, expand=True)
    canvas = Image.new("RGB", (rotated.width, rotated.width * 3 // 4))
    canvas.paste(rotated, (0, (canvas.height - rotated.height) // 2))
    canvas.save(tmp_path / "twin.png")
    heic = write_heic(canvas, tmp_path / "IMG_0001.HEIC", thumbnails=[320])
    png_border, heic_border = measure_border(str(tmp_path / "twin.png")), measure_border(str(heic))
    assert png_border is not None and heic_border is not None
    assert png_border > 0.2 and abs(png_border - heic_border) < 0.02, (png_border, heic_border)
