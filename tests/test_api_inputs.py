"""The Python API takes what people pass: ``~`` paths, one query or any iterable of them, BytesIO,
numpy image arrays; a missing folder is an error, not a silent record."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import DecodeError, NotFoundError

from .helpers import photo


@pytest.fixture
def home_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / "Pictures"
    root.mkdir()
    for name in ("chelsea", "rocket", "coffee"):
        photo(name).resize((96, 96)).save(root / f"{name}.png")
    return root


def test_ingest_expands_home_and_takes_one_path(db_url: str, home_photos: Path) -> None:
    with ImageStore(db_url) as store:
        summary = store.ingest(["~/Pictures"], extractor="color")
        assert (summary.added, summary.failed) == (3, 0)
        assert store.ingest("~/Pictures/chelsea.png", extractor="color").unchanged == 1  # a str, not its characters
        assert store.image("~/Pictures/rocket.png").paths[0].path == str(home_photos / "rocket.png")


def test_a_missing_folder_is_an_error(db_url: str, tmp_path: Path) -> None:
    with ImageStore(db_url) as store:
        with pytest.raises(NotFoundError, match="no such file or folder"):
            store.ingest([tmp_path / "nope"], extractor="color")
        assert store.counts().errors == 0
    out = CliRunner().invoke(cli, ["--db", db_url, "ingest", str(tmp_path / "nope")])
    assert out.exit_code == 1 and "no such file or folder" in out.output


def test_query_forms(db_url: str, home_photos: Path) -> None:
    with ImageStore(db_url) as store:
        store.ingest([home_photos], extractor="color")
        cat = store.image(str(home_photos / "chelsea.png")).id
        one = store.search_many(str(home_photos / "chelsea.png"), k=1)  # one query, not its characters
        assert len(one) == 1 and one[0][0].image_id == cat
        data = (home_photos / "chelsea.png").read_bytes()
        assert store.search(io.BytesIO(data), k=1)[0].image_id == cat
        pixels = np.asarray(photo("chelsea").resize((96, 96)))
        assert pixels.dtype == np.uint8 and pixels.shape == (96, 96, 3)
        assert store.search(pixels, k=1)[0].image_id == cat
        gen = (p for p in [home_photos / "rocket.png", cat])  # any iterable
        assert [r[0].image_id for r in store.search_many(gen, k=1)][1] == cat
        with pytest.raises(DecodeError, match="uint8"):
            store.search(pixels.astype(np.float64), k=1)


def test_add_forms(db_url: str, home_photos: Path) -> None:
    with ImageStore(db_url) as store:
        data = (home_photos / "coffee.png").read_bytes()
        by_bytes = store.add(data, extractor="color")
        assert store.add(io.BytesIO(data), extractor="color") == by_bytes  # same content, same id
        pixels = np.asarray(photo("rocket").resize((64, 64)))
        first = store.add(pixels, extractor="color")
        assert store.add(pixels.copy(), extractor="color") == first
        assert store.add("~/Pictures/coffee.png", extractor="color") == by_bytes


def test_digits_that_name_a_file_are_a_path(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    photo("horse").resize((80, 80)).save(tmp_path / "1", format="PNG")  # a file called "1"
    photo("chelsea").resize((80, 80)).save(tmp_path / "cat.png")
    with ImageStore(db_url) as store:
        store.ingest([tmp_path / "cat.png"], extractor="color")  # image id 1 is the cat
        store.ingest([tmp_path / "1"], extractor="color")
        horse = store.image(str(tmp_path / "1")).id
        assert horse != 1
        assert store.image("1").id == horse  # the file wins over the id
        assert store.image(1).id == 1  # an int is always an id
        assert store.search("1", k=1)[0].image_id == horse
        assert store.search("2", k=1)[0].image_id == horse  # digits naming no file: an id
    out = CliRunner().invoke(cli, ["--db", db_url, "query", "1", "-k", "1", "--json"])
    assert out.exit_code == 0 and f'"image_id": {horse}' in out.output


def test_every_documented_query_kind(db_url: str, home_photos: Path) -> None:
    """Each kind of query ``ImageStore.search`` documents finds the cat it shows or names."""
    from PIL import Image

    cat_file = home_photos / "chelsea.png"
    with ImageStore(db_url) as store:
        store.ingest([home_photos], extractor="color")
        cat = store.image(str(cat_file)).id
        data = cat_file.read_bytes()
        pixels = np.asarray(Image.open(cat_file).convert("RGB"))
        vector = store.extractor("color").extract([Image.open(cat_file).convert("RGB")])[0]
        with open(cat_file, "rb") as opened:
            kinds = {
                "int id": cat, "numpy id": np.int64(cat), "digits": str(cat), "str path": str(cat_file),
                "PathLike": cat_file, "~ path": "~/Pictures/chelsea.png", "bytes": data, "bytearray": bytearray(data),
                "memoryview": memoryview(data), "BytesIO": io.BytesIO(data), "file opened rb": opened,
                "PIL image": Image.open(cat_file), "uint8 RGB": pixels,
                "uint8 RGBA": np.dstack([pixels, np.full(pixels.shape[:2], 255, np.uint8)]),
                "float vector": np.asarray(vector, dtype=np.float64),
            }
            for kind, query in kinds.items():
                assert store.search(query, k=1)[0].image_id == cat, kind
        grey = np.asarray(Image.open(cat_file).convert("L"))
        assert grey.shape == pixels.shape[:2] and len(store.search(grey, k=1)) == 1
        # search_many: one query of any kind on its own, or an iterable; a 2-D float array is one vector per row
        assert [r[0].image_id for r in store.search_many(np.stack([vector, vector]), k=1)] == [cat, cat]
        assert len(store.search_many(pixels, k=1)) == 1 and len(store.search_many(data, k=1)) == 1


def test_add_takes_what_it_documents(db_url: str, home_photos: Path) -> None:
    from PIL import Image

    data = (home_photos / "rocket.png").read_bytes()
    with ImageStore(db_url) as store:
        by_bytes = store.add(data, extractor="color")
        assert store.add(memoryview(data), extractor="color") == store.add(bytearray(data), extractor="color") == by_bytes
        with open(home_photos / "rocket.png", "rb") as opened:
            assert store.add(opened, extractor="color") == by_bytes
        assert isinstance(store.add(Image.open(home_photos / "coffee.png"), extractor="color"), int)
        grey = np.asarray(Image.open(home_photos / "coffee.png").convert("L"))
        assert isinstance(store.add(grey, extractor="color"), int)
        assert store.add(home_photos / "rocket.png", extractor="color") == by_bytes  # a PathLike, its path recorded
        assert [p.path for p in store.image(by_bytes).paths] == [str(home_photos / "rocket.png")]
