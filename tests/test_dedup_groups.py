"""Duplicate groups never mix two pictures (issue 26, item 4): no member is a different
picture from its keeper, and different low-texture pictures do not pair up.

The set: low-texture pictures (a sky gradient with one small disc, sixteen colourings), each
with a copy rotated 10 degrees on its canvas (black corners) and a copy carrying the same
caption band. The features call different skies alike and the geometric check called their
ramps copies of each other, so accepted pairs chained 43 of the 48 images into one connected
component on f45f253.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from imgstore import ImageStore
from imgstore.dedup import GeometricCheck
from imgstore.geometry import DIFFERENT


def sky(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(60, 230, 3), rng.integers(60, 230, 3)
    t = np.linspace(0, 1, 240)[:, None, None]
    img = Image.fromarray(((top * (1 - t) + bottom * t) * np.ones((240, 320, 1))).astype(np.uint8))
    x = int(rng.integers(10, 60))
    ImageDraw.Draw(img).ellipse((x, 180, x + 40, 220), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def caption(img: Image.Image) -> Image.Image:
    out = img.copy()
    w, h = out.size
    band = h // 10
    draw = ImageDraw.Draw(out)
    draw.rectangle((0, h - band, w, h), fill=(255, 255, 255))
    draw.text((w // 40, h - band + band // 8), "Holiday 2024 - imgstore", fill=(0, 0, 0),
              font=ImageFont.load_default(size=int(band * 0.7)))
    return out


@pytest.fixture
def skies(tmp_path: Path) -> Path:
    root = tmp_path / "skies"
    root.mkdir()
    for i in range(16):
        img = sky(i)
        img.save(root / f"s{i}__orig.png")
        img.rotate(10, resample=Image.Resampling.BICUBIC).save(root / f"s{i}__rot10.jpg", quality=90)
        caption(img).save(root / f"s{i}__caption.jpg", quality=90)
    return root


def test_no_member_is_a_different_picture_from_its_keeper(db_url: str, skies: Path) -> None:
    with ImageStore(db_url) as store:
        store.ingest([skies])
        groups = [g for g in store.find_duplicates() if g.kind == "near"]
        assert groups
        with store.ctx.read("test") as conn:
            check = GeometricCheck.for_store(conn)
            for group in groups:
                others = np.array([m.image_id for m in group.members if m.image_id != group.keeper], dtype=np.int64)
                verdicts = check.verdicts(np.full(len(others), group.keeper, dtype=np.int64), others)
                assert (verdicts != DIFFERENT).all(), f"group of {len(group.members)}: {int((verdicts == DIFFERENT).sum())} " \
                                                      "members are different pictures from the keeper"


def test_no_group_mixes_two_pictures(db_url: str, skies: Path) -> None:
    """Different skies paired directly: their centres are ramps without detail, which the edit
    search once called copies of each other (a ramp correlates with any ramp), and their shared
    caption band or black rotation corners made the features agree."""
    with ImageStore(db_url) as store:
        store.ingest([skies])
        mixed = [g for g in store.find_duplicates()
                 if len({Path(p).name.split("__")[0] for m in g.members for p in m.paths}) > 1]
        assert not mixed, [sorted(Path(p).name for m in g.members for p in m.paths) for g in mixed]
        # and the copies still found: each caption copy beside its original
        together = {Path(p).name.split("__")[0] for g in store.find_duplicates()
                    if {Path(p).name.split("__")[1] for m in g.members for p in m.paths} >= {"orig.png", "caption.jpg"}
                    for m in g.members for p in m.paths}
        assert len(together) == 16


def test_a_stretched_keeper_does_not_split_its_group(db_url: str, tmp_path: Path) -> None:
    """The keeper rule ("most picture") picks a copy stretched to 16:9 over its original; the
    group is checked against its hub (the original, paired with every copy), not that keeper,
    which the check calls different from the copy squeezed to 4:3 (7/4 apart in aspect)."""
    from tests.helpers import photo

    root = tmp_path / "coins"
    root.mkdir()
    img = photo("coins").convert("RGB")
    w, h = img.size
    img.save(root / "original.png")
    img.resize((w * 4 // 3, h)).save(root / "wide.jpg", quality=90)
    img.resize((w * 3 // 4, h)).save(root / "narrow.jpg", quality=90)
    img.resize((w // 2, h // 2)).save(root / "half.jpg", quality=90)
    with ImageStore(db_url) as store:
        store.ingest([root])
        groups = [g for g in store.find_duplicates() if g.kind == "near"]
        assert [sorted(Path(p).name for m in g.members for p in m.paths) for g in groups] == [
            ["half.jpg", "narrow.jpg", "original.png", "wide.jpg"]]


def test_dedup_remembers_its_verdicts(db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The geometric check's verdicts are kept in the store: a second dedup, in a new process
    (a new ImageStore), checks no pair and reads no image, and finds the same groups; verdicts
    of another version of the check are not used."""
    import logging

    import imgstore.dedup as dedup_module
    from tests.helpers import photo

    root = tmp_path / "photos"
    root.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        img = photo(name).convert("RGB")
        img.save(root / f"{name}.png")
        img.rotate(10, resample=Image.Resampling.BICUBIC).save(root / f"{name}-rotated.jpg", quality=90)
        caption(img).save(root / f"{name}-caption.jpg", quality=90)

    def run() -> tuple[list[list[str]], list[str]]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="imgstore.dedup"), ImageStore(db_url) as store:
            groups = store.find_duplicates()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("geometric check:")]
        return sorted(sorted(Path(p).name for m in g.members for p in m.paths) for g in groups), lines

    with ImageStore(db_url) as store:
        store.ingest([root])
    first, log1 = run()
    assert len(first) == 3 and all(len(g) == 3 for g in first)
    assert log1 and " 0 pairs" not in log1[0]
    second, log2 = run()
    assert second == first
    assert log2 and log2[0].startswith("geometric check: 0 pairs") and "0 images read" in log2[0], log2
    monkeypatch.setattr(dedup_module, "CHECK_VERSION", dedup_module.CHECK_VERSION + 1)  # a new check: its own verdicts
    third, log3 = run()
    assert third == first and " 0 pairs" not in log3[0], log3
