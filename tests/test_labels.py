"""Labels: the extractor's own ImageNet classifier applied to the stored features."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from imgstore import ImageStore, SearchFilter
from imgstore.errors import NotFoundError
from imgstore.labels import MIN_PROB, TOP, imagenet_classes, probabilities, top_labels
from imgstore.models import Label
from imgstore.serve import Thumbnails, create_app
from sqlalchemy import delete, func, select

from .helpers import photo_path

# photos a person names at a glance, and ImageNet classes that name them
NAMED = {
    "chelsea": {"tabby", "tiger cat", "Egyptian cat"},
    "coffee": {"espresso", "cup", "coffee mug"},
    "rocket": {"missile", "projectile", "space shuttle"},
    "motorcycle_left": {"moped", "motor scooter", "crash helmet", "disc brake"},
}


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgstore.cli", *args], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ))


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in NAMED:
        shutil.copy(photo_path(name), folder / photo_path(name).name)
    return folder


def test_ingest_labels_what_a_person_sees(db_url: str, photo_folder: Path) -> None:
    with ImageStore(db_url) as store:
        store.ingest(photo_folder)
        for name, expected in NAMED.items():
            record = store.image(str(photo_folder / photo_path(name).name))
            names = [label.label for label in record.labels]
            assert 1 <= len(names) <= TOP
            assert expected & set(names), (name, names)
            probs = [label.prob for label in record.labels]
            assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
            assert record.as_dict()["labels"][0]["label"] == names[0]
        counts = store.label_counts()
        assert sum(c.first for c in counts) == len(NAMED)  # every image has exactly one first label
        assert all(c.images >= c.first for c in counts)
        assert store.labels_missing() == 0
        # a removed image takes its labels along
        store.remove(str(photo_folder / photo_path("coffee").name))
        with store.engine.connect() as conn:
            left = conn.scalar(select(func.count(func.distinct(Label.image_id))))
        assert left == len(NAMED) - 1


def test_labels_of_images_stored_before_labels(db_url: str, photo_folder: Path) -> None:
    """A store made before labels existed (rows deleted here): `update_labels` computes the same
    labels from the stored features, without reading a file (the folder is gone)."""
    with ImageStore(db_url) as store:
        store.ingest(photo_folder)
        before = {name: store.image(str(photo_folder / photo_path(name).name)).labels for name in NAMED}
        ids = {name: store.image(str(photo_folder / photo_path(name).name)).id for name in NAMED}
        with store.engine.begin() as conn:
            conn.execute(delete(Label))
        assert store.labels_missing() == len(NAMED)
        shutil.rmtree(photo_folder)
        seen: list[tuple[int, int]] = []
        assert store.update_labels(progress=lambda done, total: seen.append((done, total))) == len(NAMED)
        assert seen[-1] == (len(NAMED), len(NAMED))
        assert store.update_labels() == 0  # nothing left to do
        for name in NAMED:
            after = store.image(ids[name]).labels
            assert [a.label for a in after] == [b.label for b in before[name]]
            assert np.allclose([a.prob for a in after], [b.prob for b in before[name]], atol=1e-6)


def test_labels_command(tmp_path: Path, photo_folder: Path) -> None:
    db = str(tmp_path / "store.db")
    assert _cli("--db", db, "ingest", str(photo_folder)).returncode == 0
    out = _cli("--db", db, "labels", "--limit", "3")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["label", "images", "first"] and len(lines) <= 5
    data = json.loads(_cli("--db", db, "labels", "--json").stdout)
    assert data["images_without_labels"] == 0
    assert sum(row["first"] for row in data["labels"]) == len(NAMED)
    assert all(row["label"] in imagenet_classes() for row in data["labels"])
    shown = _cli("--db", db, "show", str(photo_folder / photo_path("chelsea").name))
    assert "labels " in shown.stdout and "cat" in shown.stdout.split("labels ")[1]
    # a store of colour histograms has no classifier: one line saying where labels come from
    colour = str(tmp_path / "colour.db")
    assert _cli("--db", colour, "ingest", str(photo_folder), "--extractor", "color").returncode == 0
    refused = _cli("--db", colour, "labels")
    assert refused.returncode == 1 and "no labels" in refused.stderr and "Traceback" not in refused.stderr
    with ImageStore(colour) as store, pytest.raises(NotFoundError):
        store.label_counts()


@settings(max_examples=60, deadline=None)
@given(features=arrays(np.float32, st.tuples(st.integers(0, 6), st.just(16)),
                       elements=st.floats(-20, 20, width=32)),
       seed=st.integers(0, 2**31))
def test_top_labels_properties(features: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    head = (rng.normal(0, 1, (30, 16)).astype(np.float32), rng.normal(0, 1, 30).astype(np.float32))
    probs = probabilities(features, head)
    assert probs.shape == (len(features), 30)
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4) and (probs >= 0).all()
    for row, labels in zip(probs, top_labels(features, head)):
        assert 1 <= len(labels) <= TOP
        assert labels[0][0] == int(np.argmax(row)) or np.isclose(row[labels[0][0]], row.max())
        assert all(p >= MIN_PROB for _, p in labels[1:])
        assert [p for _, p in labels] == sorted((p for _, p in labels), reverse=True)
        assert len({c for c, _ in labels}) == len(labels)


def test_labels_on_the_pages_the_api_and_the_query_filter(tmp_path: Path, photo_folder: Path) -> None:
    """The image page lists its labels with their probabilities, each a link to the images
    labelled so (and to the similar ones that are); ``GET /api/images/{id}`` carries them; the
    collection page offers the common ones as filters; ``query --label`` keeps only those."""
    db = str(tmp_path / "store.db")
    with ImageStore(db) as store:
        store.ingest(photo_folder)
        cat = store.image(str(photo_folder / photo_path("chelsea").name))
        first = cat.labels[0]
        web = TestClient(create_app(store, thumbnails=Thumbnails(store, tmp_path / "thumbs")))
        page = web.get(f"/images/{cat.id}", headers={"Accept": "text/html"})
        listed = page.text.split('<ul class="labels"', 1)[1].split("</ul>", 1)[0]
        for label in cat.labels:
            assert f'href="/collection?label={quote(label.label)}"' in listed
            assert f'href="/?id={cat.id}&amp;label={quote(label.label)}"' in listed
            assert f"{label.prob * 100:.0f}%" in listed
        api = web.get(f"/api/images/{cat.id}").json()
        assert [x["label"] for x in api["labels"]] == [x.label for x in cat.labels]
        browse = web.get(f"/collection?label={quote(first.label)}", headers={"Accept": "text/html"})
        assert browse.status_code == 200
        tiles = {int(i) for i in re.findall(r'<figure class="card tile">\s*<a href="/images/(\d+)"', browse.text)}
        assert cat.id in tiles and tiles == {i.image_id for i in store.browse(SearchFilter(labels=first.label)).items}
        chips = re.findall(r'<a class="chip( on)?" href="[^"]+"[^>]*>([^<]+)<span class="count">', browse.text)
        assert {name.strip() for _, name in chips} == {c.name for c in store.label_counts()}
        assert (" on", first.label) in [(on, name.strip()) for on, name in chips]
        similar = web.get(f"/?id={cat.id}&label={quote(first.label)}", headers={"Accept": "text/html"})
        assert {int(i) for i in re.findall(r'class="name" href="/images/(\d+)"', similar.text.split('id="results"', 1)[1])
                } <= tiles
    done = _cli("--db", db, "query", str(cat.id), "--label", first.label.upper(), "--json")
    assert done.returncode == 0, done.stderr
    assert {r["image_id"] for r in json.loads(done.stdout)[0]["results"]} == tiles
    refused = _cli("--db", db, "query", str(cat.id), "--label", "tabby cat")
    assert refused.returncode == 2 and "'tabby cat' is not an ImageNet label; did you mean 'tabby'" in refused.stderr
