"""The geometric check of copy pairs (imgstore.geometry), on real photos decoded by Pillow,
and its place in duplicate finding: rotated, hard-cropped and captioned copies join their
original's group, a second shot of one scene (a stereo pair) does not."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageOps

from imgstore import ImageStore
from imgstore.geometry import COPY, DIFFERENT, UNKNOWN, PairVerifier, compare_views, edit_views, views
from tests.helpers import photo


def _rotate(img: Image.Image, degrees: float, expand: bool = False) -> Image.Image:
    return img.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=expand)


def _crop_area(img: Image.Image, area: float) -> Image.Image:
    side = area ** 0.5
    w, h = img.size
    cw, ch = round(w * side), round(h * side)
    return img.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch))


def _caption(img: Image.Image) -> Image.Image:
    out = img.copy()
    w, h = out.size
    ImageDraw.Draw(out).rectangle((0, h - h // 10, w, h), fill=(255, 255, 255))
    ImageDraw.Draw(out).text((5, h - h // 10 + 2), "Holiday 2024", fill=(0, 0, 0))
    return out


def _jpeg(img: Image.Image, quality: int = 85) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _verdict(a: Image.Image, b: Image.Image) -> tuple[int, object]:
    va, vb = views(a), views(b)
    mirrored = views(ImageOps.mirror(b)).local
    match = compare_views(va, vb, lambda: mirrored)
    return match.verdict, match


@pytest.mark.parametrize("edit", [
    lambda im: _jpeg(_rotate(im, 10)),
    lambda im: _jpeg(_rotate(im, 5, expand=True)),
    lambda im: _jpeg(_crop_area(im, 0.7)),
    lambda im: _jpeg(_caption(im)),
    lambda im: _jpeg(ImageOps.grayscale(im).convert("RGB")),
    lambda im: _jpeg(im.resize((im.width * 4 // 3, im.height))),  # aspect change
    lambda im: _jpeg(ImageOps.mirror(_crop_area(im, 0.8))),
], ids=["rotate10", "rotate5-expand", "crop70", "caption", "greyscale", "aspect", "mirror-crop80"])
@pytest.mark.parametrize("name", ["chelsea", "camera"])
def test_keypoints_find_edited_copies_of_a_photo(name: str, edit) -> None:  # type: ignore[no-untyped-def]
    original = photo(name)
    verdict, match = _verdict(original, edit(original))
    assert verdict == COPY, match
    assert getattr(match, "inliers") >= 15


def test_second_shot_of_a_scene_and_other_photos_are_not_copies() -> None:
    left, right = photo("motorcycle_left"), photo("motorcycle_right")
    verdict, match = _verdict(left, right)
    assert verdict == DIFFERENT, match  # one affine map fits part of the matches; the pixels disagree
    assert getattr(match, "agreement") is not None and getattr(match, "agreement") < 0.9
    verdict, _ = _verdict(_crop_area(left, 0.5), _jpeg(right))  # a tighter crop of one view
    assert verdict == DIFFERENT
    for other in ("camera", "coffee", "astronaut"):
        assert _verdict(photo("chelsea"), photo(other))[0] == DIFFERENT
    half = photo("astronaut")  # the two halves of one photo share no pixels
    w, h = half.size
    assert _verdict(half.crop((0, 0, w // 2, h)), half.crop((w - w // 2, 0, w, h)))[0] == DIFFERENT


def test_thumbnails_use_the_edit_search() -> None:
    thumbs = {n: photo(n).resize((32, 32), Image.Resampling.BOX) for n in ("chelsea", "coffee", "astronaut")}
    copy = _jpeg(_rotate(thumbs["chelsea"], 5), 80)
    va = views(thumbs["chelsea"])
    assert va.local is None  # too small for keypoints
    assert compare_views(va, views(copy), lambda: None).verdict == COPY
    assert compare_views(va, views(ImageOps.mirror(thumbs["chelsea"])), lambda: None).verdict == COPY
    for other in ("coffee", "astronaut"):
        assert compare_views(va, views(thumbs[other]), lambda: None).verdict == DIFFERENT
    # a flat image says nothing about a flat one, and is no copy of a textured one
    grey = Image.new("RGB", (32, 32), (128, 128, 128))
    assert compare_views(views(grey), views(Image.new("RGB", (32, 32), (90, 90, 90))), lambda: None).verdict == UNKNOWN
    assert compare_views(views(grey), va, lambda: None).verdict == DIFFERENT


def test_repetitive_pattern_falls_back_to_the_edit_search() -> None:
    board = Image.new("RGB", (200, 200), (255, 255, 255))
    draw = ImageDraw.Draw(board)
    for i in range(8):
        for j in range(8):
            if (i + j) % 2:
                draw.rectangle((i * 25, j * 25, i * 25 + 24, j * 25 + 24), fill=(0, 0, 0))
    a, b = views(board), views(_jpeg(_rotate(board, 5)))
    assert a.local is not None and not a.local.conclusive  # every corner has a twin
    assert compare_views(a, b, lambda: b.local).verdict == COPY


def test_edit_views_rows_are_unit_and_the_first_is_the_image_itself() -> None:
    grey = np.asarray(photo("coffee").convert("L"))
    ev = edit_views(grey, 32)
    assert ev.variants.shape[1] == 16 * 16
    np.testing.assert_allclose(np.linalg.norm(ev.variants, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(ev.plain, ev.variants[0])


def test_verifier_reads_each_image_once_and_survives_unreadable_ones() -> None:
    images = {1: photo("chelsea"), 2: _jpeg(_rotate(photo("chelsea"), 10)), 3: photo("coffee")}
    reads: list[int] = []

    def load(image_id: int) -> Image.Image | None:
        reads.append(image_id)
        if image_id == 4:
            raise OSError("gone")
        return images.get(image_id)

    verifier = PairVerifier(load)
    out = verifier.verdicts([1, 1, 2, 1, 5], [2, 3, 3, 4, 1])
    assert out.tolist() == [COPY, DIFFERENT, DIFFERENT, UNKNOWN, UNKNOWN]
    assert sorted(reads) == [1, 2, 3, 4, 5]
    assert verifier.stats.unreadable == 2 and verifier.stats.pairs == 5


def test_dedup_groups_rotated_and_cropped_copies_but_not_a_stereo_pair(db_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("chelsea", "camera", "coffee", "astronaut", "rocket", "motorcycle_left", "motorcycle_right"):
        photo(name).save(folder / f"{name}.png")
    for name in ("chelsea", "camera"):
        _rotate(photo(name), 10).save(folder / f"{name}-rot10.jpg", quality=90)
        _crop_area(photo(name), 0.7).save(folder / f"{name}-crop70.jpg", quality=90)
        _caption(_rotate(photo(name), 5)).save(folder / f"{name}-rot5-caption.jpg", quality=90)
    with ImageStore(db_url) as store:
        store.ingest([folder])
        groups = store.find_duplicates()
        names = sorted(sorted(Path(p).stem for m in g.members for p in m.paths) for g in groups)
        assert names == [
            ["camera", "camera-crop70", "camera-rot10", "camera-rot5-caption"],
            ["chelsea", "chelsea-crop70", "chelsea-rot10", "chelsea-rot5-caption"],
        ], names
        # verdicts are kept by content: a second run (the duplicates page) reads no file again
        (folder / "chelsea-rot10.jpg").rename(tmp_path / "elsewhere.jpg")
        assert sorted(len(g.members) for g in store.find_duplicates()) == [4, 4]
    with ImageStore(db_url) as store:
        # a new process finds the verdicts kept in the store (pair_verdicts): the same groups
        assert sorted(len(g.members) for g in store.find_duplicates()) == [4, 4]
        # without them it cannot read the moved file: the rule alone judges its pairs, no error
        from sqlalchemy import delete

        from imgstore.models import PairVerdict

        store.ctx.write(lambda conn: conn.execute(delete(PairVerdict)))
    with ImageStore(db_url) as store:
        assert sorted(len(g.members) for g in store.find_duplicates()) == [3, 4]


def _ramp(top: tuple[int, int, int], bottom: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> Image.Image:
    t = np.linspace(0, 1, size[1])[:, None, None]
    rgb = np.array(top) * (1 - t) + np.array(bottom) * t
    return Image.fromarray((rgb * np.ones((size[1], size[0], 1))).astype(np.uint8))


def test_a_ramp_is_no_content_and_colour_tells_flat_pictures_apart() -> None:
    """Two different skies (smooth ramps of other colours) are not copies of each other: a
    ramp correlates with any ramp, so the edit search removes it, and pictures with no detail
    left are compared by colour. A flat copy (JPEG, brighter, rotated 10 degrees) stays a copy;
    a greyscale one is never called different (it has no colour to compare)."""
    from PIL import ImageEnhance

    sky = _ramp((90, 140, 220), (230, 150, 120))
    other = _ramp((200, 120, 90), (80, 170, 160))
    assert _verdict(sky, other)[0] == DIFFERENT
    assert _verdict(_rotate(sky, 10), _rotate(other, 10))[0] == DIFFERENT  # the same black corners
    assert _verdict(_caption(sky), _caption(other))[0] == DIFFERENT  # the same caption band
    for copy in (_jpeg(sky), ImageEnhance.Brightness(sky).enhance(1.2), _jpeg(_rotate(sky, 10))):
        assert _verdict(sky, copy)[0] == COPY
    assert _verdict(sky, ImageOps.grayscale(sky).convert("RGB"))[0] != DIFFERENT
    # and a textured centre still decides by its detail, not by its colour
    cat = photo("chelsea").convert("RGB")
    assert _verdict(cat, ImageEnhance.Color(cat).enhance(0.3))[0] == COPY


@pytest.mark.parametrize("blur", [0, 10])
def test_a_shared_border_or_caption_is_no_shared_content(blur: int) -> None:
    """Different pictures rotated by the same angle (the same black corners), or carrying the
    same caption band, are no copies of each other, even when blurred to low texture."""
    from PIL import ImageFilter

    pictures = [photo(n).convert("RGB").resize((400, 300)).filter(ImageFilter.GaussianBlur(blur))
                for n in ("moon", "camera", "coffee", "rocket")]
    for edit in (lambda im: _jpeg(_rotate(im, 10)), lambda im: _jpeg(_rotate(im, 20, expand=True)), lambda im: _jpeg(_caption(im))):
        edited = [edit(p) for p in pictures]
        for i in range(len(edited)):
            for j in range(i + 1, len(edited)):
                assert _verdict(edited[i], edited[j])[0] != COPY, (i, j)
