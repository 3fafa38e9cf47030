"""A duplicate group is consistent as a whole: every member is a duplicate of its keeper, not
only linked to it through a chain of pairs (issue 26, item 4).

The set: low-texture pictures (a sky gradient with one small disc, sixteen colourings), each
with a copy rotated 10 degrees on its canvas (black corners) and a copy carrying the same
caption band. The features call different skies alike and the geometric check cannot tell
(flat centres), so accepted pairs chained 43 of the 48 images into one connected component.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from imgstore import ImageStore
from imgstore.dedup import (
    DEFAULT_MIN_COSINE,
    DEFAULT_MIN_SIGNATURE,
    GeometricCheck,
    Rule,
    _signatures,
    _vector_loader,
    judge_pairs,
)
from imgstore.vectors import largest_space, list_spaces


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


def test_every_member_is_a_duplicate_of_its_keeper(db_url: str, skies: Path) -> None:
    with ImageStore(db_url) as store:
        store.ingest([skies])
        groups = [g for g in store.find_duplicates() if g.kind == "near"]
        assert groups
        with store.ctx.read("test") as conn:
            space = largest_space(list_spaces(conn))
            judge = partial(judge_pairs, rule=Rule(DEFAULT_MIN_COSINE, DEFAULT_MIN_SIGNATURE),
                            load_vectors=_vector_loader(conn, space), load_signatures=partial(_signatures, conn),
                            check=GeometricCheck.for_store(conn))
            for group in groups:
                others = np.array([m.image_id for m in group.members if m.image_id != group.keeper], dtype=np.int64)
                ok, _ = judge(np.full(len(others), group.keeper, dtype=np.int64), others)
                assert ok.all(), f"group of {len(group.members)}: {int((~ok).sum())} members are no duplicates of the keeper"
                # and every member says how far it is from the keeper
                assert all(m.cosine is not None for m in group.members)


@pytest.mark.xfail(strict=True, reason="issue 26 item 4, left open: different low-texture pictures whose features "
                   "agree and whose centres are flat (the geometric check cannot tell) still pair up directly; "
                   "a shared caption or rotation border is not yet discounted as shared content")
def test_no_group_mixes_two_pictures(skies: Path, tmp_path: Path) -> None:
    with ImageStore(tmp_path / "s.db") as store:
        store.ingest([skies])
        mixed = [g for g in store.find_duplicates()
                 if len({Path(p).name.split("__")[0] for m in g.members for p in m.paths}) > 1]
        assert not mixed
