"""``efficientnet-lite0-int8``: an int8 model on ONNX Runtime, its own feature space, refused on a
CPU whose int8 arithmetic gives other features.

The int8 model is made by the first test that needs it, from the fp32 export, in this session's
model cache (conftest), as a new user's first ingest with it makes it. The refusal is tested on a
real CPU without int8 dot products: QEMU's user-mode emulation of a Haswell (AVX2, no VNNI), where
ONNX Runtime picks its AVX2 kernels as it would on such a laptop.

The machine running the tests may itself lack int8 dot products (an AVX2-only CPU): every load is
then refused, which is what the features and CLI tests check there (their int8 features can only
be checked on a CPU with VNNI or AMX); the tests of how the model is made, cached, checked and
logged compare it with this CPU's own features instead (:func:`reference_here`).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from imgstore import ImageStore
from imgstore.errors import ConfigError, ExtractorError, UnsupportedCpuError
from imgstore.features import get_extractor
from imgstore.features import int8
from imgstore.features.onnxrt import fp32_model_path
from imgstore.labels import head_of
from PIL import Image

from .helpers import PHOTOS, missing_tool, photo, photo_path

NAME = "efficientnet-lite0-int8"
#: of int8.reference_pictures(): the shipped reference features are of exactly these pixels
REFERENCE_PICTURES_SHA256 = "e8d407f676c3b0f8"


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgstore.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


#: whether ONNX Runtime's int8 sums are exact on this CPU (x86 with VNNI or AMX, any Arm): the
#: shipped reference features hold only there
INT8_CPU = bool(int8.exact_int8_cpu())
REFUSED_HERE = "no int8 dot-product instructions"


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [photo(name) for name in PHOTOS]


@pytest.fixture(scope="session")
def own_reference(tmp_path_factory: pytest.TempPathFactory) -> Path | None:
    """On a CPU without int8 dot products: this CPU's features of the test pictures by the model
    (made in this session's cache as any first use makes it, then refused), as a reference file."""
    if INT8_CPU:
        return None
    with pytest.raises(UnsupportedCpuError, match=REFUSED_HERE):
        get_extractor(NAME)
    dest = tmp_path_factory.mktemp("int8") / "reference-of-this-cpu.json"
    int8.write_reference(int8.int8_model_path(fp32_model_path("lite0", None, 224)), dest)
    return dest


@pytest.fixture
def reference_here(own_reference: Path | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference every load compares with, in this process: the shipped one on a CPU with
    int8 dot products, else this CPU's own (see the module doc)."""
    if own_reference is not None:
        monkeypatch.setattr(int8, "REFERENCE", own_reference)


def test_int8_features_are_close_to_fp32_but_their_own_space(photos: list[Image.Image]) -> None:
    """On real photos: close to fp32's features (the same picture found), not equal (its own space,
    kept apart by its name), and this CPU's features of the test pictures are the reference's.
    A CPU without int8 dot products refuses the model in one line instead."""
    if not INT8_CPU:
        with pytest.raises(UnsupportedCpuError, match=f"{REFUSED_HERE}.*use efficientnet-lite0") as info:
            get_extractor(NAME)
        assert "\n" not in str(info.value)
        return
    ex = get_extractor(NAME)
    fp32 = get_extractor("efficientnet-lite0", runtime="onnx")
    assert isinstance(ex, int8.Int8Extractor) and ex.precision == "int8" and ex.name == NAME
    assert ex.reference_cosine >= int8.MIN_REFERENCE_COSINE
    assert ex.preprocess_version == fp32.preprocess_version and ex.dim == 1280
    a, b = ex.extract(photos), fp32.extract(photos)
    cos = _cosines(a, b)
    assert a.dtype == np.float32 and a.shape == (len(photos), 1280)
    assert cos.mean() >= 0.95 and cos.min() >= 0.85, cos
    assert cos.max() < 0.9999, "int8 features equal to fp32's: not a quantised model"
    # each photo's int8 features are nearest to its own fp32 features among all of them
    sims = (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T
    assert (sims.argmax(1) == np.arange(len(photos))).all()
    # the classifier head is fp32's: labels of int8 features are the ImageNet classes
    head = head_of(ex)
    assert head is not None and head[0].shape == (1000, 1280)
    assert (ex.classify(photos[:4]).argmax(1) == fp32.classify(photos[:4]).argmax(1)).sum() >= 3  # type: ignore[attr-defined]


def test_the_int8_model_is_made_once_and_again_when_damaged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            photos: list[Image.Image], reference_here: None) -> None:
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "cache"))
    first = get_extractor(NAME)
    assert isinstance(first, int8.Int8Extractor) and first.path.is_file()
    assert first.path.parent == tmp_path / "cache" / "models"
    made = first.path.stat().st_mtime_ns
    expected = first.extract(photos[:2])
    again = get_extractor(NAME)
    assert isinstance(again, int8.Int8Extractor) and again.path == first.path
    assert first.path.stat().st_mtime_ns == made
    np.testing.assert_array_equal(again.extract(photos[:2]), expected)
    first.path.write_bytes(first.path.read_bytes()[:5000])  # truncated
    # work folders of quantisations killed mid-way: an hour-old one is removed, a recent one kept
    abandoned, running = (first.path.parent / f".{first.path.stem}.{tag}" for tag in ("dead", "live"))
    for folder in (abandoned, running):
        folder.mkdir()
        (folder / "prepared.onnx").write_bytes(b"x" * 1000)
    os.utime(abandoned, (made / 1e9 - 2 * int8.ABANDONED_S, made / 1e9 - 2 * int8.ABANDONED_S))
    os.utime(running, None)
    healed = get_extractor(NAME)
    np.testing.assert_array_equal(healed.extract(photos[:2]), expected)
    assert not abandoned.exists() and running.exists()
    shutil.rmtree(running)
    # damaged inside where ONNX Runtime may still load it: its digest says so, and it is made again
    data = bytearray(healed.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    healed.path.write_bytes(bytes(data))
    again = get_extractor(NAME)
    np.testing.assert_array_equal(again.extract(photos[:2]), expected)
    assert int8.digest_path(again.path).read_text() == hashlib.sha256(again.path.read_bytes()).hexdigest()
    # no temporary files left beside the models
    assert sorted(p.suffix for p in (tmp_path / "cache" / "models").iterdir()) == [".npz", ".npz", ".onnx", ".onnx",
                                                                                  ".sha256"]


def test_a_broken_reference_is_said_and_the_model_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       reference_here: None) -> None:
    """An unreadable reference (a damaged install) is said in one line naming the fix, and the
    cached model is not thrown away and made again for it."""
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "cache"))
    made = get_extractor(NAME)
    assert isinstance(made, int8.Int8Extractor)
    stamp = made.path.stat().st_mtime_ns
    broken = tmp_path / "reference.json"
    broken.write_text('{"features": [[1, 2]]}')
    monkeypatch.setattr(int8, "REFERENCE", broken)
    with pytest.raises(ExtractorError, match="reinstall imgstore") as info:
        get_extractor(NAME)
    assert "\n" not in str(info.value) and not isinstance(info.value, UnsupportedCpuError)
    assert made.path.stat().st_mtime_ns == stamp


def test_the_reference_pictures_are_fixed() -> None:
    """Integer arithmetic only: the same bytes on every numpy (the reference was made of these)."""
    pictures = int8.reference_pictures()
    assert pictures.shape == (4, 224, 224, 3) and pictures.dtype == np.uint8
    assert hashlib.sha256(pictures.tobytes()).hexdigest()[:16] == REFERENCE_PICTURES_SHA256
    assert 100 < pictures.mean() < 156 and pictures.std() > 40  # structured, not flat


def test_other_ranges_are_another_model(tmp_path: Path) -> None:
    """The model's file name follows the ranges it was made with (and the export, the settings and
    ONNX Runtime's version): changed ranges never reuse a model made from others."""
    fp32 = Path("/cache/models/efficientnet-lite0-224-0123456789abcdef.onnx")
    doc = json.loads(int8.RANGES.read_text())
    name, entry = next(iter(doc["data"].items()))
    entry["highest"]["data"] = float(entry["highest"]["data"]) * 2
    other = tmp_path / "ranges.json"
    other.write_text(json.dumps(doc))
    assert int8.int8_model_path(fp32, other) != int8.int8_model_path(fp32)
    assert int8.int8_model_path(fp32, int8.RANGES) == int8.int8_model_path(fp32)
    assert int8.int8_model_path(fp32.with_name("efficientnet-lite0-224-fedcba9876543210.onnx")) != \
        int8.int8_model_path(fp32)


def test_a_model_that_disagrees_with_the_reference_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              reference_here: None) -> None:
    """The check every load makes: features of the test pictures against the shipped ones. A
    reference from another arithmetic (here: the same pictures' features slightly rotated, as
    saturating sums move them) is refused in one line naming what to use instead."""
    ex = get_extractor(NAME)
    assert isinstance(ex, int8.Int8Extractor)
    doc = json.loads(int8.REFERENCE.read_text())
    feats = np.asarray(doc["features"], np.float32)
    rng = np.random.default_rng(7)
    moved = feats + rng.normal(0, 1, feats.shape).astype(np.float32) * feats.std() * 0.2
    assert 0.9 < _cosines(moved, feats).min() < int8.MIN_REFERENCE_COSINE
    other = tmp_path / "reference.json"
    other.write_text(json.dumps({**doc, "features": moved.tolist()}))
    with pytest.raises(UnsupportedCpuError, match="use efficientnet-lite0") as info:
        int8.Int8Extractor(ex.path, resize="squash", resample="bilinear", num_threads=1, reference=other)
    assert "\n" not in str(info.value)
    # the reason given: no int8 dot products; another onnxruntime (with the version that agrees)
    monkeypatch.setattr(int8, "exact_int8_cpu", lambda: False)
    with pytest.raises(UnsupportedCpuError, match="no int8 dot-product instructions"):
        int8.check_reference(ex._session, other)
    monkeypatch.setattr(int8, "exact_int8_cpu", lambda: True)
    other.write_text(json.dumps({**doc, "onnxruntime": "0.0.1", "features": moved.tolist()}))
    with pytest.raises(UnsupportedCpuError, match=r"pip install onnxruntime==0\.0\.1` may agree\); or use efficientnet"):
        int8.check_reference(ex._session, other)
    # the reference itself (the shipped one where this CPU has int8 dot products): this machine's features agree
    assert int8.check_reference(ex._session) >= int8.MIN_REFERENCE_COSINE
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ExtractorError, match="reinstall imgstore"):
        int8.check_reference(ex._session, broken)


def test_options_that_would_leave_its_space_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSTORE_RUNTIME", raising=False)
    with pytest.raises(ConfigError, match="runs on ONNX Runtime only"):
        get_extractor(NAME, runtime="torch")
    with pytest.raises(ConfigError, match="weights=PATH is an option of efficientnet-lite0"):
        get_extractor(NAME, weights="/nowhere.pth")
    with pytest.raises(ConfigError, match="computes in int8"):
        get_extractor(NAME, precision="bf16")
    with pytest.raises(ConfigError, match="calibrated at 224 pixels"):
        get_extractor(NAME, image_size=260)
    with pytest.raises(ConfigError, match="runs on the CPU"):
        get_extractor(NAME, device="cuda")


def test_a_store_of_int8_features_through_the_cli(tmp_path: Path) -> None:
    """Ingest with the int8 extractor, then queries (which use the store's own space without
    being told), labels and a second space beside it: each photo finds itself first. On a CPU
    without int8 dot products the ingest is refused in one line, and nothing is written."""
    folder = tmp_path / "photos"
    folder.mkdir()
    files = [Path(shutil.copy(photo_path(name), folder / photo_path(name).name)) for name in PHOTOS[:6]]
    db = str(tmp_path / "store.db")
    out = _run("--db", db, "ingest", str(folder), "--extractor", NAME, "--no-progress")
    if not INT8_CPU:
        errors = [line for line in out.stderr.splitlines() if line.strip()]
        assert out.returncode == 1 and len(errors) == 1 and REFUSED_HERE in errors[0], out.stderr
        if Path(db).exists():
            with ImageStore(db) as store:
                assert all(not s.n_features for s in store.feature_spaces())
        return
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Increased scale" not in out.stderr + out.stdout
    for target in files:
        got = _run("--db", db, "query", str(target), "-k", "1", "--json")
        assert got.returncode == 0, got.stderr
        assert json.loads(got.stdout)[0]["results"][0]["paths"] == [str(target)]
    with ImageStore(db) as store:
        spaces = store.feature_spaces()
        assert [s.extractor for s in spaces] == [NAME]
    labels = _run("--db", db, "labels", "--json")
    assert labels.returncode == 0 and json.loads(labels.stdout), labels.stderr
    # a later ingest that names no extractor adds to the space the store searches: int8's
    later = tmp_path / "later"
    later.mkdir()
    newcomer = Path(shutil.copy(photo_path(PHOTOS[6]), later / photo_path(PHOTOS[6]).name))
    out = _run("--db", db, "ingest", str(later), "--no-progress")
    assert out.returncode == 0, out.stderr
    with ImageStore(db) as store:
        assert [(s.extractor, s.n_features) for s in store.feature_spaces()] == [(NAME, 7)]
    got = _run("--db", db, "query", str(newcomer), "-k", "1", "--json")
    assert got.returncode == 0 and json.loads(got.stdout)[0]["results"][0]["paths"] == [str(newcomer)], got.stderr
    # the fp32 space beside it, when asked for: a second space, not mixed into the first
    out = _run("--db", db, "ingest", str(folder), "--extractor", "efficientnet-lite0", "--no-progress")
    assert out.returncode == 0, out.stderr
    with ImageStore(db) as store:
        assert sorted(s.extractor for s in store.feature_spaces()) == ["efficientnet-lite0", NAME]
    refused = _run("--db", db, "--runtime", "torch", "ingest", str(folder), "--extractor", NAME)
    assert refused.returncode != 0 and "runs on ONNX Runtime only" in refused.stderr
    assert "Traceback" not in refused.stderr


def _qemu() -> str | None:
    return shutil.which("qemu-x86_64") if platform.machine() == "x86_64" else None


def test_a_cpu_without_int8_dot_products_refuses(tmp_path: Path, reference_here: None) -> None:
    """On an AVX2 CPU without VNNI (QEMU's Haswell, a real process of the emulated CPU) the same
    model file gives other features (cosine 0.855-0.949 to the reference, measured): an ingest is
    refused in one line, and nothing is written to the store."""
    qemu = _qemu()
    if qemu is None:
        missing_tool("qemu-user is not installed (`make test` installs it) or this is not x86_64", "the int8 refusal test")
    ex = get_extractor(NAME)  # made on this CPU, in this session's cache
    assert isinstance(ex, int8.Int8Extractor)
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(photo_path("chelsea"), folder / "chelsea.png")
    db = tmp_path / "store.db"
    out = subprocess.run([qemu, "-cpu", "Haswell-v4", sys.executable, "-m", "imgstore.cli", "--db", str(db),
                          "ingest", str(folder), "--extractor", NAME, "--no-progress"],
                         capture_output=True, text=True, timeout=900, env={**os.environ})
    errors = [line for line in out.stderr.splitlines() if not line.startswith("qemu-x86_64: warning")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert any(f"{NAME} gives other features here" in line and "use efficientnet-lite0" in line for line in errors), \
        errors
    assert not any("Traceback" in line for line in errors)
    if db.exists():
        with ImageStore(str(db)) as store:
            assert store.feature_spaces() == [] or all(not s.n_features for s in store.feature_spaces())


def test_making_the_model_leaves_the_root_logger_alone(tmp_path: Path) -> None:
    """ONNX Runtime's quantiser logs through ``logging.info``, which would give the root logger a
    stderr handler; a library must leave that to the application (its basicConfig must still work)."""
    code = ("import logging\nfrom imgstore.errors import UnsupportedCpuError\nfrom imgstore.features import get_extractor\n"
            "try:\n    get_extractor('efficientnet-lite0-int8')\n"
            "except UnsupportedCpuError:\n    pass  # made, then refused on a CPU without int8 dot products\n"
            "print(len(logging.getLogger().handlers), logging.getLogger('onnxruntime').level)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "IMGSTORE_CACHE_DIR": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"], out.stdout
    assert "Increased scale" not in out.stderr and "Performing symbolic" not in out.stderr, out.stderr
    assert list((tmp_path / "cache" / "models").glob("efficientnet-lite0-int8-*.onnx"))
