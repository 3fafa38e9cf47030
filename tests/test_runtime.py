"""What runs the CNN: ONNX Runtime by default (an export of the torch model, cached), torch on request.

The export is made by the first test that needs it, into this session's model cache (conftest),
as a new user's first ingest makes it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imgstore import ImageStore
from imgstore.errors import ConfigError, ImgStoreError
from imgstore.features import get_extractor, resolve_runtime
from imgstore.features.lite import default_weights_path
from imgstore.features.onnxrt import OnnxExtractor, model_path
from PIL import Image

from .helpers import PHOTOS, photo, photo_path


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [photo(name) for name in PHOTOS]


@pytest.mark.parametrize("name", ["efficientnet-lite0", "efficientnet-lite2"])
def test_onnx_features_are_the_torch_features(name: str, photos: list[Image.Image]) -> None:
    """The same feature space: every real photo's features agree with torch fp32 to cosine >= 0.999
    (the issue's bar; measured 0.9999998), so stores made by either runtime are searched together."""
    onnx = get_extractor(name, runtime="onnx")
    torch_ex = get_extractor(name, runtime="torch", precision="fp32")
    assert isinstance(onnx, OnnxExtractor)
    assert getattr(torch_ex, "runtime", None) == "torch"
    assert onnx.preprocess_version == torch_ex.preprocess_version and onnx.dim == torch_ex.dim == 1280
    a, b = onnx.extract(photos), torch_ex.extract(photos)
    assert a.dtype == np.float32 and a.shape == (len(photos), 1280)
    assert _cosines(a, b).min() >= 0.9999
    # the same ImageNet head too (what labels will read)
    assert (onnx.classify(photos[:3]).argmax(1) == torch_ex.classify(photos[:3]).argmax(1)).all()  # type: ignore[attr-defined]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=1, max_value=5), seed=st.integers(min_value=0, max_value=2**31))
def test_a_row_does_not_depend_on_its_batch(n: int, seed: int) -> None:
    """The exported graph's batch axis is free: a picture's features are the same alone or among others."""
    ex = get_extractor("efficientnet-lite0", runtime="onnx")
    rng = np.random.default_rng(seed)
    batch = rng.integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)
    together = ex.extract_arrays(batch)
    alone = np.concatenate([ex.extract_arrays(batch[i:i + 1]) for i in range(n)])
    assert together.shape == (n, 1280)
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-4)


def test_the_export_is_made_once_and_again_for_new_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "cache"))
    first = get_extractor("efficientnet-lite0", runtime="onnx")
    assert isinstance(first, OnnxExtractor) and first.path.is_file()
    made = first.path.stat().st_mtime_ns
    again = get_extractor("efficientnet-lite0", runtime="onnx")
    assert isinstance(again, OnnxExtractor) and again.path == first.path and first.path.stat().st_mtime_ns == made
    # a reinstalled weights package is another file (here: a copy): another export, beside the first
    copy = tmp_path / "weights.pth"
    shutil.copy(default_weights_path("lite0"), copy)
    other = get_extractor("efficientnet-lite0", runtime="onnx", weights=str(copy))
    assert isinstance(other, OnnxExtractor) and other.path != first.path
    assert other.path == model_path("efficientnet-lite0", copy, 224)
    os.utime(copy, ns=(made, made + 10**9))  # the same name, changed: not the old export
    assert model_path("efficientnet-lite0", copy, 224) != other.path
    kept = sorted(p.name for p in (tmp_path / "cache" / "models").iterdir())  # each model with its head, no leftovers
    assert kept == sorted([first.path.name, first.path.stem + ".head.npz", other.path.name, other.path.stem + ".head.npz"])


def test_a_damaged_export_is_made_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photos: list[Image.Image]) -> None:
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(tmp_path / "cache"))
    good = get_extractor("efficientnet-lite0", runtime="onnx")
    expected = good.extract(photos[:2])
    assert isinstance(good, OnnxExtractor)
    good.path.write_bytes(good.path.read_bytes()[:1000])  # a truncated file
    healed = get_extractor("efficientnet-lite0", runtime="onnx")
    np.testing.assert_allclose(healed.extract(photos[:2]), expected, rtol=1e-5, atol=1e-5)


def test_an_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Asked for ONNX: a clear error naming the fix. Chosen by "auto": the same features from torch."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("IMGSTORE_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ImgStoreError, match="IMGSTORE_CACHE_DIR") as info:
        get_extractor("efficientnet-lite0", runtime="onnx")
    assert "\n" not in str(info.value)
    fallback = get_extractor("efficientnet-lite0", runtime="auto")
    assert getattr(fallback, "runtime", None) == "torch"


def test_runtime_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMGSTORE_RUNTIME", raising=False)
    monkeypatch.delenv("IMGSTORE_PRECISION", raising=False)
    monkeypatch.delenv("IMGSTORE_DEVICE", raising=False)
    assert resolve_runtime("torch") == "torch"
    assert resolve_runtime("onnx") == "onnx"
    assert resolve_runtime("auto", precision="bf16") == "torch"  # bf16 is torch's
    assert resolve_runtime("auto", device="cuda") == "torch"
    assert resolve_runtime("auto", device="cpu") == "onnx"
    monkeypatch.setenv("IMGSTORE_RUNTIME", "torch")
    assert resolve_runtime(None) == "torch"
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; choose one of auto, torch, onnx"):
        resolve_runtime("tensorrt")
    with pytest.raises(ConfigError, match="bf16 runs on --runtime torch"):
        get_extractor("efficientnet-lite0", runtime="onnx", precision="bf16")
    with pytest.raises(ConfigError, match="--device cuda runs on --runtime torch"):
        get_extractor("efficientnet-lite0", runtime="onnx", device="cuda")
    with pytest.raises(ConfigError, match="resnet50 runs on --runtime torch only"):
        get_extractor("resnet50", runtime="onnx")
    with pytest.raises(ConfigError, match="unknown runtime"):
        ImageStore(":memory:", runtime="fast")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "imgstore.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def test_a_query_never_imports_torch(tmp_path: Path) -> None:
    """The CLI's query path: ONNX Runtime for a photo (the export already cached), no model at all
    for a stored id; torch is imported by neither (it was 3 s and 0.9 GB of each query)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    files = [shutil.copy(photo_path(name), folder / photo_path(name).name) for name in PHOTOS[:4]]
    db = str(tmp_path / "store.db")
    ingest = _run("--db", db, "ingest", str(folder))
    assert ingest.returncode == 0, ingest.stderr
    probe = (
        "import sys, runpy\n"
        "sys.argv = ['imgstore', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('imgstore.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print('loaded:', *sorted(m for m in ('torch', 'onnxruntime', 'numba') if m in sys.modules))\n"
    )
    for query, expect in ((str(files[0]), "loaded: onnxruntime"), ("1", "loaded:")):
        out = subprocess.run([sys.executable, "-c", probe, "--db", db, "query", query, "-k", "2"], capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == expect, out.stdout


def test_the_runtimes_share_one_store(tmp_path: Path) -> None:
    """Images ingested on torch are found by a query on ONNX Runtime, and the other way round:
    one feature space."""
    db = str(tmp_path / "store.db")
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    folder_a.mkdir()
    folder_b.mkdir()
    files = [Path(shutil.copy(photo_path(name), (folder_a if i % 2 else folder_b) / photo_path(name).name))
             for i, name in enumerate(PHOTOS[:6])]
    assert _run("--db", db, "--runtime", "torch", "ingest", str(folder_a)).returncode == 0
    out = _run("--db", db, "--runtime", "onnx", "ingest", str(folder_b))
    assert out.returncode == 0, out.stderr
    with ImageStore(db) as store:
        assert len(store.feature_spaces()) == 1
    for runtime in ("torch", "onnx"):
        for target in files:
            got = _run("--db", db, "--runtime", runtime, "query", str(target), "-k", "1", "--json")
            assert got.returncode == 0, got.stderr
            assert str(target) in got.stdout
    bad = _run("--db", db, "--runtime", "tensorrt", "info")
    assert bad.returncode == 2 and "tensorrt" in bad.stderr and "Traceback" not in bad.stderr
