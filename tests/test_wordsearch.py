"""Search by words: the sentence model (numpy MiniLM) bridging text to the classifier's labels."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import ConfigError, NotFoundError
from imgstore.labels import imagenet_classes
from imgstore.serve import Thumbnails, create_app
from imgstore.text import class_weights, encoder

from .helpers import photo_path

PHOTOS = {"chelsea": "a cat", "coffee": "a cup of coffee", "motorcycle_left": "motorbike", "rocket": "rocket launch"}


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in [*PHOTOS, "astronaut", "camera", "horse"]:
        shutil.copy(photo_path(name), folder / photo_path(name).name)
    return folder


def test_words_find_the_picture(db_url: str, photo_folder: Path) -> None:
    with ImageStore(db_url) as store:
        store.ingest(photo_folder)
        for name, words in PHOTOS.items():
            found = store.search_text(words, k=3)
            assert found.hits, words
            assert found.hits[0].paths == [str(photo_folder / photo_path(name).name)], (words, found.as_dict())
            assert found.hits[0].labels and found.understood
            scores = [h.score for h in found.hits]
            assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
            assert len(found.hits) <= 3
        as_dict = store.search_text("a cat", k=1).as_dict()
        assert as_dict["text"] == "a cat" and as_dict["results"][0]["paths"]
        # a photo whose file is gone is not found (as every search leaves stale images out)
        cat = photo_folder / photo_path("chelsea").name
        cat.unlink()
        assert store.prune() == [str(cat)]
        assert all(str(cat) not in h.paths for h in store.search_text("a cat", k=5).hits)
        # the command's table: the match score (what orders it) and each hit's best label
        table = CliRunner().invoke(cli, ["--db", db_url, "query", "--text", "a cat", "-k", "5"])
        assert table.exit_code == 0, table.output
        header, *rows = table.output.splitlines()[1:]
        assert header.split()[:5] == ["rank", "id", "match", "best", "label"]
        expected = store.search_text("a cat", k=5).hits
        assert [(int(r.split()[1]), r.split()[2]) for r in rows] == [(h.image_id, f"{h.score:.3f}") for h in expected]
        assert all(h.labels[0].label in r for r, h in zip(rows, expected) if h.labels)
        with pytest.raises(ConfigError, match="needs some words"):
            store.search_text("   ")
        with pytest.raises(ConfigError, match="k must be"):
            store.search_text("cat", k=0)


def test_a_store_without_labels_says_so(tmp_path: Path, photo_folder: Path) -> None:
    with ImageStore(tmp_path / "colour.db") as store:
        store.ingest(photo_folder, extractor="color")
        with pytest.raises(NotFoundError, match="no labels"):
            store.search_text("a cat")


def test_the_sentence_model() -> None:
    enc = encoder()
    emb = enc.encode(["puppy", "dog", "violin", "a dog on the beach"])
    assert emb.shape == (4, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1  # a puppy is nearer a dog than a violin
    names = imagenet_classes()
    for word, expected in (("violin", "violin"), ("pizza", "pizza"), ("sailboat", {"schooner", "yawl", "catamaran",
                                                                                 "trimaran", "speedboat"})):
        weights = class_weights(word, names)
        top = names[max(weights, key=lambda c: weights[c])]
        assert top in ({expected} if isinstance(expected, str) else expected), (word, top)
        assert abs(sum(weights.values()) - 1) < 1e-5


@settings(max_examples=25, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=4))
def test_a_text_is_embedded_the_same_alone_or_in_a_batch(texts: list[str]) -> None:
    """Padding to the batch's longest text must not change a shorter one's embedding (the mask)."""
    enc = encoder()
    together = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    assert np.isfinite(together).all()
    np.testing.assert_allclose(together, alone, atol=2e-5)


def test_other_commands_never_load_the_sentence_model() -> None:
    code = ("import sys\nfrom imgstore.cli import cli\n"
            "try:\n    cli(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert not {'imgstore.text', 'tokenizers', 'safetensors'} & set(sys.modules), sorted(sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]


def test_words_over_http_and_on_the_page(db_url: str, photo_folder: Path, tmp_path: Path) -> None:
    """``GET /api/search?text=`` answers what ``search_text`` answers (declared in the spec),
    with the filters; the search page's words box shows the same hits and what the words were
    understood as; wrong requests are one-line 422s."""
    with ImageStore(db_url) as store:
        store.ingest(photo_folder)
        web = TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs")))
        cat = str(photo_folder / photo_path("chelsea").name)
        got = web.get("/api/search", params={"text": "a cat", "k": 3})
        assert got.status_code == 200, got.text
        body = got.json()
        assert body == store.search_text("a cat", k=3).as_dict()
        assert set(body) == {"text", "understood", "results"} and body["results"][0]["paths"] == [cat]
        assert body["understood"] and set(body["understood"][0]) == {"label", "weight"}
        assert set(body["results"][0]) == {"image_id", "score", "paths", "labels"}
        # the filters: a label (any case), a folder
        coffee = store.image(str(photo_folder / photo_path("coffee").name))
        only = web.get("/api/search", params={"text": "a cat", "k": 5, "label": coffee.labels[0].label.upper()}).json()
        assert [h["image_id"] for h in only["results"]] == [coffee.id]
        assert web.get("/api/search", params={"text": "a cat", "under": str(tmp_path / "elsewhere")}).json()["results"] == []
        for params, message in (({"text": "a cat", "id": 1}, "give id (a stored image) or text (words)"),
                                ({"k": 3}, "give id (a stored image) or text (words)"),
                                ({"text": "x" * 1001}, "text: at most 1000 characters"),
                                ({"text": "   "}, "needs some words"),
                                ({"text": "a cat", "label": "tabby cat"}, "did you mean 'tabby'")):
            bad = web.get("/api/search", params=params)
            assert bad.status_code == 422, (params, bad.text)
            assert message in bad.json()["error"] and "\n" not in bad.json()["error"], bad.json()
        spec = web.get("/openapi.json").json()
        op = spec["paths"]["/api/search"]["get"]
        assert "text" in {p["name"] for p in op["parameters"]}
        shapes = op["responses"]["200"]["content"]["application/json"]["schema"]["anyOf"]
        assert {"#/components/schemas/WordSearchOut", "#/components/schemas/SearchHit"} == {
            s.get("$ref") or s["items"]["$ref"] for s in shapes}
        # the page: the words box, the hits as cards, what the words were understood as
        page = web.get("/", params={"text": "a cat", "k": 10}, headers={"Accept": "text/html"})
        assert page.status_code == 200
        grid = page.text.split('id="results"', 1)[1]
        shown = [int(i) for i in re.findall(r'class="name" href="/images/(\d+)"', grid)]
        assert shown == [h.image_id for h in store.search_text("a cat", k=10).hits]
        understood = page.text.split('id="understood"', 1)[1].split("</section>", 1)[0]
        assert "understood as" in understood and "/collection?label=" in understood
        assert re.search(r'name="text"[^>]* value="a cat"', page.text)
        # each card shows the match score the results are ordered by, so it never rises down the
        # list, and its best-matching label as words: no class probability that would not fall
        hits = store.search_text("a cat", k=10).hits
        matches = re.findall(r'<span class="match"[^>]*>match ([^<]+)</span>', grid)
        assert matches == [f"{h.score:.2g}" for h in hits]
        assert [float(m) for m in matches] == sorted((float(m) for m in matches), reverse=True)
        best = re.findall(r'<span class="label"[^>]*>([^<]+)</span>', grid)
        assert best == [h.labels[0].label for h in hits if h.labels] and best and not any("%" in b for b in best)
        assert "best match first" in understood
        spec_hit = spec["components"]["schemas"]["WordHitOut"]["properties"]
        assert "orders the results" in spec_hit["score"]["description"]
        assert "best-matching label" in spec_hit["labels"]["description"]
        # words typed, then the image search's button: the search by those words, at its own address
        posted = web.post("/", data={"text": " a cat ", "k": "10", "tag": ""}, follow_redirects=False,
                          headers={"Accept": "text/html"})
        assert posted.status_code == 303 and posted.headers["location"] == "/?text=a+cat&k=10"
        filtered = web.get("/", params={"text": "a cat", "label": coffee.labels[0].label}, headers={"Accept": "text/html"})
        assert [int(i) for i in re.findall(r'class="name" href="/images/(\d+)"', filtered.text.split('id="results"', 1)[1])
                ] == [coffee.id]
    with ImageStore(tmp_path / "colour.db") as colour:
        colour.ingest(photo_folder, extractor="color")
        web = TestClient(create_app(colour, thumbnails=Thumbnails(colour, tmp_path / "thumbs2")))
        refused = web.get("/api/search", params={"text": "a cat"})
        assert refused.status_code == 404 and "no labels" in refused.json()["error"]
        page = web.get("/", params={"text": "a cat"}, headers={"Accept": "text/html"})
        assert page.status_code == 404 and "no labels" in page.text and 'value="a cat"' in page.text


#: Run in a new process: a store with a labelled feature space of synthetic vectors (no model
#: ever made them), then every wrong word search through the library, the CLI and HTTP. Each
#: must be refused with its one-line error while neither the sentence model nor the CNN was
#: imported: proof that the checks come before any model loads, whatever the machine's speed.
_CHECKS_FIRST = r'''
import sys
import numpy as np
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import given, settings, strategies as st
from imgstore import ImageStore, SearchFilter
from imgstore.cli import cli
from imgstore.errors import ConfigError
from imgstore.labels import imagenet_classes
from imgstore.models import Image
from imgstore.serve import Thumbnails, create_app
from imgstore.sqlhelpers import insert_ignore
from imgstore.vectors import features_table, get_or_create_space, vector_to_bytes

MODELS = {"imgstore.text", "tokenizers", "safetensors", "onnxruntime", "torch"}
url, thumbs = sys.argv[1], sys.argv[2]

def unloaded(what):
    loaded = MODELS & set(sys.modules)
    assert not loaded, f"{what}: {sorted(loaded)} loaded before the error"

def fill(conn):
    space = get_or_create_space(conn, "efficientnet-lite0", 1280, "synthetic")
    insert_ignore(conn, Image.__table__, [{"sha256": f"{i:064x}", "width": 1, "height": 1, "format": None,
                                           "byte_size": 1, "meta": {}} for i in range(5)])
    ids = [i for (i,) in conn.exec_driver_sql("SELECT id FROM images ORDER BY id")]
    vectors = np.random.default_rng(0).normal(size=(len(ids), 1280)).astype(np.float32)
    insert_ignore(conn, features_table, [{"space_id": space, "image_id": i, "vector": vector_to_bytes(v)}
                                         for i, v in zip(ids, vectors)])

with ImageStore(url) as store:
    store.ctx.write(fill, doing="store synthetic features")
    unloaded("setup")
    # the library: a label that is no class, with the closest names
    try:
        store.search_text("a cat", filter=SearchFilter(labels="tabby cat"))
        raise AssertionError("a label that is no class was accepted")
    except ConfigError as exc:
        assert "did you mean 'tabby'" in str(exc) and "\n" not in str(exc), exc
    unloaded("search_text with a wrong label")
    known = {n.casefold() for n in imagenet_classes()}

    @settings(max_examples=40, deadline=None, database=None)
    @given(st.text(min_size=1, max_size=30))
    def any_wrong_label(name):
        try:
            f = SearchFilter(labels=name)
        except ValueError:
            return  # refused when the filter is made: nothing searched at all
        if f.labels[0] in known:
            return
        try:
            store.search_text("a cat", filter=f)
            raise AssertionError(f"{name!r} was accepted")
        except ConfigError as exc:
            assert "is not an ImageNet label" in str(exc) and "\n" not in str(exc), exc
        unloaded(f"search_text with label {name!r}")

    any_wrong_label()
    # the command: each wrong option is a one-line usage error
    for args, message in ((["--label", "nosuchlabel"], "'nosuchlabel' is not an ImageNet label"),
                          (["--under", "a\x00b"], "NUL"),
                          (["--where", "nokey"], "is not KEY=VALUE"),
                          (["--taken-after", "2024-13"], "is not a date or time"),
                          (["--index", "99"], "--index is for IMAGES")):
        got = CliRunner().invoke(cli, ["--db", url, "query", "--text", "a dog on the beach", *args])
        assert got.exit_code == 2, (args, got.output)
        assert message in got.output and got.output.strip().splitlines()[-1].startswith("Error:"), got.output
        unloaded(f"imgstore query --text ... {' '.join(args)}")
    # HTTP: 422 with one line, and the page says the same
    web = TestClient(create_app(store, thumbnails=Thumbnails(store, thumbs)))
    for params, message in (({"label": "nosuchlabel"}, "'nosuchlabel' is not an ImageNet label"),
                            ({"under": "a\x00b"}, "NUL"), ({"where": "nokey"}, "is not KEY=VALUE"),
                            ({"taken_after": "2024-13"}, "is not a date or time"),
                            ({"index": "99"}, "index: a word search scores every image")):
        got = web.get("/api/search", params={"text": "a dog on the beach", **params})
        assert got.status_code == 422 and message in got.json()["error"], (params, got.text)
        assert "\n" not in got.json()["error"]
        unloaded(f"GET /api/search?text=...&{params}")
    page = web.get("/", params={"text": "a dog", "label": "nosuchlabel"}, headers={"Accept": "text/html"})
    assert page.status_code == 422 and "is not an ImageNet label" in page.text, page.text[-500:]
    unloaded("the search page with a wrong label")
print("ok")
'''


def test_a_wrong_word_search_fails_before_any_model_loads(db_url: str, tmp_path: Path) -> None:
    """Wrong filters, a wrong label, an index given to a word search: refused at once, through
    the library, the CLI and HTTP, before the sentence model or the CNN is imported (checked in
    a new process on ``sys.modules``, not by timing)."""
    out = subprocess.run([sys.executable, "-c", _CHECKS_FIRST, db_url, str(tmp_path / "thumbs")], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.stdout[-2000:], out.stderr[-4000:])
