"""CLIP with weights on disk (``--extractor clip:ARCH:PATH``): a tiny randomly initialised open_clip
model that the test builds and saves itself, run through the CLI into real SQLite and PostgreSQL
stores. Image features, text queries in the same space (scores checked against cosines computed
here with open_clip directly), one space per weights file, the errors, and no download."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from imgstore import ImageStore
from imgstore.cli import cli
from imgstore.errors import ConfigError, ExtractorError, WeightsNotFoundError
from imgstore.features import TextEmbedder, get_extractor, space_name
from imgstore.features import clip as clip_names
from imgstore.types import SearchFilter
from imgstore.vectors import load_features
from PIL import Image

from .helpers import photo, photo_path

#: a ViT of two 64-wide layers on 64x64 images, a text tower of two layers, 32-d embeddings
TINY = "tiny"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
#: another architecture (a small ModifiedResNet) whose weights the tiny ViT's file does not fit
TINY_RN = "tiny-rn"
TINY_RN_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 32, "patch_size": None},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
PHOTOS = ["chelsea", "coffee", "rocket", "astronaut", "horse", "motorcycle_left"]


@pytest.fixture(autouse=True)
def _offline_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    # anything that tried the hub would fail rather than fetch; fp32 so cosines match to 1e-5
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("IMGSTORE_PRECISION", "fp32")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two weights files of the tiny architecture (different random initialisations)."""
    folder = tmp_path_factory.mktemp("clip-weights")
    for name, config in ((TINY, TINY_CONFIG), (TINY_RN, TINY_RN_CONFIG)):
        (folder / f"{name}.json").write_text(json.dumps(config))
        open_clip.add_model_config(folder / f"{name}.json")
    out = []
    root = logging.getLogger()
    guard = logging.NullHandler()  # open_clip logs through the root logger's functions
    root.addHandler(guard)
    try:
        for seed in (0, 1):
            torch.manual_seed(seed)
            model = open_clip.create_model(TINY, pretrained=None)
            path = folder / f"tiny-{seed}.pt"
            torch.save(model.state_dict(), path)
            out.append(path)
    finally:
        root.removeHandler(guard)
    return out[0], out[1]


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """Six real photos, two of them under pets/."""
    folder = tmp_path / "photos"
    (folder / "pets").mkdir(parents=True)
    for name in PHOTOS:
        target = folder / ("pets" if name in ("chelsea", "horse") else "") / photo_path(name).name
        shutil.copy(photo_path(name), target)
    return folder


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def ok(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if result.output.lstrip().startswith(("{", "[")) else result.output


def one_line_error(result: Result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], result.output
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Reference:
    """The tiny model run by open_clip directly: what the store's numbers must equal."""

    def __init__(self, path: Path) -> None:
        self.model = open_clip.create_model(TINY, pretrained=None)
        self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(TINY)

    def text(self, words: str) -> np.ndarray:
        with torch.inference_mode():
            out = F.normalize(self.model.encode_text(self.tokenizer([words])), dim=-1)
        return out[0].numpy().astype(np.float64)

    def images(self, images: list[Image.Image]) -> np.ndarray:
        """Through open_clip's own evaluation transform (resize, centre crop, normalise)."""
        transform = open_clip.image_transform(64, is_train=False)
        with torch.inference_mode():
            out = F.normalize(self.model.encode_image(torch.stack([transform(im) for im in images])), dim=-1)
        return out.numpy().astype(np.float64)


def stored(store: ImageStore, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(image ids, features) of the feature space ``name``."""
    space = next(s for s in store.feature_spaces() if s.extractor == name)
    with store.engine.connect() as conn:
        ids, vectors = load_features(conn, space.id, space.dim)
    return ids, vectors.astype(np.float64)


def test_the_extractor_gives_clip_embeddings(weights: tuple[Path, Path]) -> None:
    path = weights[0]
    ex = get_extractor(f"clip:{TINY}:{path}")
    assert ex.name == f"clip:{TINY}:{sha256(path)[:12]}" == space_name(f"clip:{TINY}:{path}")
    assert ex.dim == 32 and ex.preprocess_version == "crop64-bicubic-clip-v1"
    images = [photo(n) for n in PHOTOS[:3]]
    feats = ex.extract(images)
    assert feats.shape == (3, 32) and feats.dtype == np.float32
    assert np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    ref = Reference(path)
    # the same model on the same pixels: equal; open_clip's own transform resizes in two steps: close
    batch = torch.from_numpy(np.stack([ex.preprocess(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).reshape(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).reshape(1, 3, 1, 1)
    with torch.inference_mode():
        same = F.normalize(ref.model.encode_image((batch - mean) / std), dim=-1).numpy()
    assert np.allclose(feats, same, atol=1e-5)
    assert (np.sum(feats * ref.images(images), axis=1) > 0.99).all()
    assert isinstance(ex, TextEmbedder)
    words = ex.embed_text(["a photo of a cat", "a rocket"])
    assert words.shape == (2, 32) and np.allclose(words[0], ref.text("a photo of a cat"), atol=1e-5)


def test_ingest_and_query_through_the_cli(db_url: str, weights: tuple[Path, Path], photos: Path) -> None:
    spec = f"clip:{TINY}:{weights[0]}"
    summary = ok(run("--db", db_url, "ingest", str(photos), "--extractor", spec, "--no-progress", "--json"))
    assert summary["added"] == len(PHOTOS), summary
    name = f"clip:{TINY}:{sha256(weights[0])[:12]}"
    with ImageStore(db_url) as store:
        assert [s.extractor for s in store.feature_spaces()] == [name]
        ids, vectors = stored(store, name)
        paths = {i: store.image(int(i)).current_paths[0] for i in ids}
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)

    # by example: each photo finds itself first
    for name_ in ("chelsea", "rocket"):
        query = next(photos.rglob(photo_path(name_).name))
        found = ok(run("--db", db_url, "query", str(query), "-k", "3", "--json"))
        assert found[0]["results"][0]["paths"] == [str(query)], found

    # by words: the k best by the cosine to open_clip's own text embedding, scores equal to it
    words = "a photo of a cat"
    expected = vectors @ Reference(weights[0]).text(words)
    order = np.lexsort((ids, -expected))
    found = ok(run("--db", db_url, "query", "--text", words, "-k", "4", "--json"))
    assert found["understood"] == [] and len(found["results"]) == 4
    assert [r["image_id"] for r in found["results"]] == [int(i) for i in ids[order[:4]]]
    for r, i in zip(found["results"], order[:4]):
        assert r["score"] == pytest.approx(expected[i], abs=1e-4)
        assert r["paths"] == [paths[ids[i]]]
    text_out = ok(run("--db", db_url, "query", "--text", words, "-k", "2"))
    assert text_out.splitlines()[0] == f"words: {words}" and "understood" not in text_out

    # the filters narrow it; the exact scan over what they allow
    pets = ok(run("--db", db_url, "query", "--text", words, "-k", "5", "--under", str(photos / "pets"), "--json"))
    allowed = [n for n, i in enumerate(ids) if paths[i].startswith(str(photos / "pets"))]
    best = sorted(allowed, key=lambda n: (-expected[n], ids[n]))
    assert [r["image_id"] for r in pets["results"]] == [int(ids[n]) for n in best]


def test_text_search_in_the_api(sqlite_url: str, weights: tuple[Path, Path], photos: Path) -> None:
    spec = f"clip:{TINY}:{weights[0]}"
    with ImageStore(sqlite_url) as store:
        store.ingest(photos, extractor=spec)
        name = space_name(spec)
        ids, vectors = stored(store, name)
        expected = vectors @ Reference(weights[0]).text("a horse")
        found = store.search_text("a horse", k=len(PHOTOS))
        assert [h.image_id for h in found.hits] == [int(ids[n]) for n in np.lexsort((ids, -expected))]
        assert [h.score for h in found.hits] == pytest.approx(sorted(expected, reverse=True), abs=1e-5)
        assert found.understood == [] and all(h.labels == [] for h in found.hits)
        assert len(store.search_text("a horse", k=2).hits) == 2
        # a photo whose file is gone is left out unless asked for
        gone = photos / photo_path("coffee").name
        gone.unlink()
        store.prune()
        assert all(str(gone) not in h.paths for h in store.search_text("a cup", k=len(PHOTOS)).hits)
        assert len(store.search_text("a cup", k=len(PHOTOS)).hits) == len(PHOTOS) - 1
        assert len(store.search_text("a cup", k=len(PHOTOS), include_stale=True).hits) == len(PHOTOS)
        assert store.search_text("a cup", filter=SearchFilter(tags=["nothing"])).hits == []
        with pytest.raises(ConfigError, match="needs some words"):
            store.search_text("  ")
        with pytest.raises(ConfigError, match="k must be"):
            store.search_text("a cup", k=0)


def test_two_weights_files_keep_two_spaces(sqlite_url: str, weights: tuple[Path, Path], photos: Path) -> None:
    first, second = (f"clip:{TINY}:{w}" for w in weights)
    ok(run("--db", sqlite_url, "ingest", str(photos), "--extractor", first, "--no-progress"))
    ok(run("--db", sqlite_url, "ingest", str(photos), "--extractor", second, "--no-progress"))
    names = [space_name(first), space_name(second)]
    assert names[0] != names[1]
    with ImageStore(sqlite_url) as store:
        spaces = {s.extractor: s.n_features for s in store.feature_spaces()}
        assert spaces == {names[0]: len(PHOTOS), names[1]: len(PHOTOS)}
        # extractor= picks the space (a spec or the space's own name), and so its text tower
        for spec, path in zip((first, names[1]), weights):
            _, vectors = stored(store, space_name(spec))
            expected = np.sort(vectors @ Reference(path).text("a rocket"))[::-1]
            found = store.search_text("a rocket", k=3, extractor=spec)
            assert [h.score for h in found.hits] == pytest.approx(expected[:3], abs=1e-5)


def test_clip_is_preferred_for_words_and_extractor_chooses(sqlite_url: str, weights: tuple[Path, Path],
                                                           tmp_path: Path) -> None:
    photos = tmp_path / "few"
    (photos / "pets").mkdir(parents=True)
    for name in ("chelsea", "rocket", "coffee"):
        shutil.copy(photo_path(name), photos / ("pets" if name == "chelsea" else "") / photo_path(name).name)
    with ImageStore(sqlite_url, runtime="torch") as store:
        store.ingest(photos)  # EfficientNet-Lite0: a labelled space
        assert store.search_text("a cat", k=2).understood  # the label search, while no CLIP space exists
        store.ingest(photos, extractor=f"clip:{TINY}:{weights[0]}")
        assert store.search_text("a cat", k=2).understood == []  # CLIP's own text tower
        labelled = store.search_text("a cat", k=2, extractor="efficientnet-lite0")
        assert labelled.understood and labelled.hits[0].paths == [str(photos / "pets" / photo_path("chelsea").name)]


def test_a_space_found_again_from_its_name(sqlite_url: str, weights: tuple[Path, Path], photos: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A later process finds the weights from the space's name (the cache folder remembers the
    file); on a machine that has not seen the file, the error says how to give it."""
    spec = f"clip:{TINY}:{weights[0]}"
    with ImageStore(sqlite_url) as store:
        store.ingest(photos, extractor=spec)
    name = space_name(spec)
    monkeypatch.setattr(clip_names, "_digests", {})  # a new process: only the file on disk remembers
    with ImageStore(sqlite_url) as store:
        assert len(store.search_text("a cat", k=2).hits) == 2
        cat = photos / "pets" / photo_path("chelsea").name
        assert store.search(str(cat), k=1)[0].paths == [str(cat)]
    monkeypatch.setattr(clip_names, "_digests", {})
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "another-machine"))
    with ImageStore(sqlite_url) as store:
        with pytest.raises(WeightsNotFoundError, match=f"--extractor clip:{TINY}:PATH"):
            store.search_text("a cat")
        moved = tmp_path / "moved.pt"
        shutil.copy(weights[0], moved)
        assert len(store.search_text("a cat", k=2, extractor=f"clip:{TINY}:{moved}").hits) == 2
    with ImageStore(sqlite_url, extractor_options={name: {"weights": str(weights[1])}}) as store, \
            pytest.raises(ExtractorError, match="is not the weights file"):
        store.search(str(cat), k=1)
    # the CLI: an image query is told where the file is with --extractor
    monkeypatch.setattr(clip_names, "_digests", {})
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "a-third-machine"))
    one_line_error(run("--db", sqlite_url, "query", str(cat)), "--extractor clip:tiny:PATH")
    found = ok(run("--db", sqlite_url, "query", str(cat), "--extractor", spec, "-k", "1", "--json"))
    assert found[0]["results"][0]["paths"] == [str(cat)]
    assert run("--db", sqlite_url, "query", str(cat), "--extractor", "color").exit_code == 2


def test_a_new_process_finds_the_weights_quietly(sqlite_url: str, weights: tuple[Path, Path], photos: Path) -> None:
    """A later ``imgstore query --text`` (its own process) finds the weights from the space's
    name, and prints its answer without log lines or warnings."""
    ok(run("--db", sqlite_url, "ingest", str(photos), "--extractor", f"clip:{TINY}:{weights[0]}", "--no-progress"))
    code = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from imgstore.cli import cli; "
            "cli(sys.argv[2:], prog_name='imgstore')")
    out = subprocess.run([sys.executable, "-c", code, str(weights[0].parent), "--db", sqlite_url, "query", "--text",
                          "a cat", "-k", "2", "--json"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    # open_clip logs through the root logger's functions: without a guard every such call would
    # install a stderr handler and print "WARNING:root:..." lines into the CLI's output
    assert not [line for line in out.stderr.splitlines() if "root:" in line or "Traceback" in line or "Warning" in line], \
        out.stderr
    assert len(json.loads(out.stdout)["results"]) == 2


def test_errors_are_one_line(sqlite_url: str, weights: tuple[Path, Path], photos: Path, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    def ingest(spec: str, *before: str) -> Result:
        return run("--db", sqlite_url, *before, "ingest", str(photos), "--extractor", spec, "--no-progress")

    one_line_error(ingest(f"clip:{TINY}:{tmp_path / 'nope.pt'}"), "no CLIP weights file at", "nope.pt")
    one_line_error(ingest(f"clip:{TINY_RN}:{weights[0]}"), "do not fit open_clip's tiny-rn", "give the architecture")
    line = one_line_error(ingest(f"clip:ViT-Q-99:{weights[0]}"), "unknown CLIP architecture 'ViT-Q-99'")
    assert "ViT-B-32" in line and "RN50" in line
    junk = tmp_path / "junk.pt"
    junk.write_text("not a state dict")
    one_line_error(ingest(f"clip:{TINY}:{junk}"), "cannot read the CLIP weights file", "junk.pt")
    one_line_error(ingest(f"clip:{TINY}"), "clip:ARCH:PATH")
    one_line_error(ingest(f"clip:{TINY}:{weights[0]}", "--runtime", "onnx"), "torch only")
    one_line_error(ingest(f"clip:ViT-B-16-SigLIP:{weights[0]}"), "never downloads")
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if it were not installed
    one_line_error(ingest(f"clip:{TINY}:{weights[0]}"), "pip install 'imgstore[clip]'")


def test_nothing_is_downloaded(weights: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the model and its tokenizer and embedding words never reaches the network, nor
    open_clip's or the hub's download functions."""
    import huggingface_hub
    import open_clip.pretrained

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"a download was attempted: {args} {kwargs}")

    for module in (huggingface_hub, open_clip.pretrained, open_clip.factory):  # also where imported by name
        for attr in ("hf_hub_download", "snapshot_download", "download_pretrained", "download_pretrained_from_hf",
                     "download_pretrained_from_url"):
            if hasattr(module, attr):
                monkeypatch.setattr(module, attr, refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    ex = get_extractor(f"clip:{TINY}:{weights[1]}")
    assert isinstance(ex, TextEmbedder) and ex.embed_text(["a dog on the beach"]).shape == (1, 32)
    assert ex.extract([photo("chelsea")]).shape == (1, 32)


def test_weights_digest_is_remembered(weights: tuple[Path, Path], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is hashed once per change: the cache folder remembers path, size, time and digest."""
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(clip_names, "_digests", {})
    copy = tmp_path / "w.pt"
    shutil.copy(weights[0], copy)
    name = space_name(f"clip:{TINY}:{copy}")
    remembered = json.loads((tmp_path / "cache" / "clip-weights.json").read_text())["files"]
    assert remembered[str(copy.resolve())]["sha256"] == sha256(copy)
    hashed: list[Path] = []
    real_hash = clip_names._hash
    monkeypatch.setattr(clip_names, "_hash", lambda p: hashed.append(p) or real_hash(p))
    monkeypatch.setattr(clip_names, "_digests", {})
    assert space_name(f"clip:{TINY}:{copy}") == name and hashed == []  # from the file, not hashed again
    before = copy.stat().st_mtime_ns
    copy.write_bytes(weights[1].read_bytes())  # another file at the same path: hashed again, another space
    os.utime(copy, ns=(before + 10**9, before + 10**9))  # a coarse file system clock must not hide the change
    assert space_name(f"clip:{TINY}:{copy}") != name and hashed == [copy]

