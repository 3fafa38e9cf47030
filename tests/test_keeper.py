"""The suggested keeper is the original: not a re-encoded JPEG of the same size (even a larger
file), not a copy rotated onto a bigger canvas; ``--keep`` picks another rule; exact copies
name one keeper path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import ConfigError
from imgstore.keeper import border_fraction

from .helpers import photo


def copies(root: Path) -> dict[str, Path]:
    root.mkdir(parents=True)
    img = photo("astronaut").resize((192, 192))
    out = {"original": root / "original.png", "jpeg": root / "reencoded.jpg", "rotated": root / "rotated.png"}
    img.save(out["original"])
    img.save(out["jpeg"], quality=100, subsampling=0)
    with open(out["jpeg"], "ab") as f:  # data after the end marker, which decoders ignore: the largest file
        f.write(b"\0" * 200_000)
    img.rotate(6, resample=Image.Resampling.BICUBIC, expand=True).save(out["rotated"])  # a bigger canvas
    photo("coffee").resize((192, 192)).save(root / "other.png")
    return out


def group_of(groups: list, path: Path):  # type: ignore[no-untyped-def]
    return next(g for g in groups if any(str(path) in m.paths for m in g.members))


def test_the_original_is_kept(db_url: str, tmp_path: Path) -> None:
    files = copies(tmp_path / "photos")
    assert files["jpeg"].stat().st_size > files["original"].stat().st_size
    with Image.open(files["rotated"]) as r, Image.open(files["original"]) as o:
        assert r.width * r.height > o.width * o.height
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "photos"], extractor="efficientnet-lite0")
        rule = dict(min_cosine=0.8)
        group = group_of(store.find_duplicates(**rule), files["original"])
        names = sorted(Path(p).name for m in group.members for p in m.paths)
        assert names == ["original.png", "reencoded.jpg", "rotated.png"]
        assert group.keeper_path == str(files["original"])
        assert store.image(str(files["original"])).id == group.keeper
        # the rule before this one kept the rotated copy (most pixels); --keep largest still does
        assert group_of(store.find_duplicates(keep="largest", **rule), files["original"]).keeper_path == str(files["rotated"])
        assert group_of(store.find_duplicates(keep="smallest", **rule), files["original"]).keeper_path != str(files["jpeg"])
        with pytest.raises(ConfigError, match="unknown keeper rule"):
            store.find_duplicates(keep="best")
    out = CliRunner().invoke(cli, ["--db", db_url, "dedup", "--min-cosine", "0.8", "--format", "csv"])
    rows = [line.split(",") for line in out.output.strip().splitlines()[1:]]
    kept = [r[-1] for r in rows if r[2] == "true"]
    assert kept == [str(files["original"])] and {r[2] for r in rows} == {"true", "false"}


def test_border_of_a_rotated_copy(tmp_path: Path) -> None:
    img = photo("chelsea").resize((160, 120))
    img.save(tmp_path / "plain.png")
    img.rotate(8, expand=True).save(tmp_path / "rot.png")
    padded = Image.new("RGB", (200, 120), (255, 255, 255))
    padded.paste(img, (20, 0))
    padded.save(tmp_path / "padded.png")
    assert border_fraction(str(tmp_path / "plain.png")) == 0.0
    assert 0.1 < border_fraction(str(tmp_path / "rot.png")) < 0.4
    assert border_fraction(str(tmp_path / "padded.png")) == 0.0  # whole columns of white: not a rotation border
    assert border_fraction(str(tmp_path / "gone.png")) == 0.0


def test_exact_copies_name_one_keeper_path(db_url: str, tmp_path: Path) -> None:
    root = tmp_path / "photos"
    (root / "deeper" / "still").mkdir(parents=True)
    photo("rocket").resize((100, 100)).save(root / "rocket.png")
    shutil.copyfile(root / "rocket.png", root / "deeper" / "still" / "rocket.png")
    with ImageStore(db_url) as store:
        store.ingest([root], extractor="color")
        (group,) = store.find_duplicates()
        assert group.kind == "exact" and group.keeper_path == str(root / "rocket.png")


def test_featureless_images_need_the_same_content(db_url: str, tmp_path: Path) -> None:
    """A solid black and a solid white image, and noise images of different seeds, look alike to
    a CNN; they are not copies. The same solid colour at two sizes, and a real resized copy, are."""
    import numpy as np

    root = tmp_path / "flat"
    root.mkdir()
    Image.new("RGB", (120, 120), (0, 0, 0)).save(root / "black.png")
    Image.new("RGB", (120, 120), (255, 255, 255)).save(root / "white.png")
    Image.new("RGB", (60, 60), (0, 0, 0)).save(root / "black-small.png")
    for seed in (1, 2, 3):
        noise = np.random.default_rng(seed).integers(0, 256, (120, 120, 3), dtype=np.uint8)
        Image.fromarray(noise).save(root / f"noise-{seed}.png")
    cat = photo("chelsea").resize((160, 120))
    cat.save(root / "cat.png")
    cat.resize((80, 60)).save(root / "cat-half.jpg", quality=80)
    with ImageStore(db_url) as store:
        store.ingest([root])
        groups = store.find_duplicates()
        found = sorted(sorted(Path(p).name for m in g.members for p in m.paths) for g in groups)
        assert found == [["black-small.png", "black.png"], ["cat-half.jpg", "cat.png"]]


def test_a_plain_background_is_not_a_border(db_url: str, tmp_path: Path) -> None:
    """A logo on white (its corners uniform) is the original beside its rotated JPEG copy (same
    canvas, black corners) and beside a half-size copy."""
    root = tmp_path / "logo"
    root.mkdir()
    logo = Image.new("RGB", (200, 200), (255, 255, 255))
    inner = photo("coffee").resize((90, 90))
    logo.paste(inner, (55, 55))
    logo.save(root / "logo.png")
    logo.rotate(5, resample=Image.Resampling.BICUBIC).save(root / "logo-rotated.jpg", quality=95)
    logo.resize((100, 100)).save(root / "logo-half.png")
    with ImageStore(db_url) as store:
        store.ingest([root])
        groups = store.find_duplicates(min_cosine=0.8)
        group = group_of(groups, root / "logo.png")
        assert len(group.members) >= 2
        assert group.keeper_path == str(root / "logo.png")


def test_a_crop_in_the_group_does_not_hide_a_rotation_border(tmp_path: Path) -> None:
    """The original beside a copy straightened onto a bigger canvas (black corners) and a crop:
    the rotated copy's border accounts for its extra canvas over the original, not over the
    crop (the group's smallest), and the picture inside it is the original's, not more."""
    from imgstore.keeper import Candidate, choose

    img = photo("chelsea")
    w, h = img.size
    files = {1: (tmp_path / "cat.png", img),
             2: (tmp_path / "cat-straightened.jpg", img.rotate(8, expand=True)),
             3: (tmp_path / "cat-crop.jpg", img.crop((w // 6, h // 6, w - w // 6, h - h // 6)))}
    candidates = []
    for image_id, (path, picture) in files.items():
        picture.save(path, quality=90) if path.suffix == ".jpg" else picture.save(path)
        candidates.append(Candidate(image_id, picture.width, picture.height, "JPEG" if path.suffix == ".jpg" else "PNG",
                                    path.stat().st_size, None, None, str(path)))
    assert choose(candidates) == 1
    assert choose(candidates, "largest") == 2


@pytest.mark.parametrize("name", ["logo", "hubble_deep_field", "retina", "chelsea"])
def test_the_png_original_beside_rotated_and_cropped_copies(name: str, tmp_path: Path) -> None:
    """The demo collection's group of one photo: the lossless original, JPEG copies rotated 5
    degrees on the same canvas (black corners) and crops. A picture's own plain or starry
    background (logo on white, the Hubble deep field, a round retina on black) once measured as a
    border matching the crop's smaller area, and the rotated JPEG was kept over the PNG."""
    from imgstore.keeper import Candidate, choose

    img = photo(name).convert("RGB")
    w, h = img.size
    copies = {"original.png": img,
              "rotate_5.jpg": img.rotate(5, resample=Image.Resampling.BICUBIC),
              "rotate_-5.jpg": img.rotate(-5, resample=Image.Resampling.BICUBIC),
              "crop_90.jpg": img.crop((w // 20, h // 20, w - w // 20, h - h // 20)),
              "crop_80.jpg": img.crop((w // 10, h // 10, w - w // 10, h - h // 10))}
    candidates = []
    for image_id, (file, picture) in enumerate(copies.items(), 1):
        path = tmp_path / file
        picture.save(path, quality=90) if path.suffix == ".jpg" else picture.save(path)
        candidates.append(Candidate(image_id, picture.width, picture.height, "JPEG" if path.suffix == ".jpg" else "PNG",
                                    path.stat().st_size, None, None, str(path)))
    assert choose(candidates) == 1
    assert border_fraction(str(tmp_path / "original.png")) == 0.0


def test_only_a_rotation_shaped_border_counts(tmp_path: Path) -> None:
    """A border is four straight corner triangles at right angles (the rotated picture's
    edges), whatever the angle; a disk on black and a starry sky are not."""
    img = photo("astronaut").resize((256, 256))
    for angle in (4, 5, -5, 10, 20, -30, 45):
        img.rotate(angle, resample=Image.Resampling.BICUBIC).save(tmp_path / f"rot{angle}.png")
        assert border_fraction(str(tmp_path / f"rot{angle}.png")) > 0.01, angle
    y, x = np.mgrid[:256, :256]
    disk = np.where(((x - 128) ** 2 + (y - 128) ** 2 < 120 ** 2)[..., None], np.asarray(img), 0).astype(np.uint8)
    Image.fromarray(disk).save(tmp_path / "disk.png")
    rng = np.random.default_rng(0)
    sky = np.zeros((256, 256, 3), dtype=np.uint8)
    sky[rng.integers(0, 256, 60), rng.integers(0, 256, 60)] = 255
    Image.fromarray(sky).save(tmp_path / "sky.png")
    for name in ("disk.png", "sky.png"):
        assert border_fraction(str(tmp_path / name)) == 0.0, name
