"""Search by words: the sentence model (numpy MiniLM) bridging text to the classifier's labels."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imgstore import ImageStore
from imgstore.errors import ConfigError, NotFoundError
from imgstore.labels import imagenet_classes
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
