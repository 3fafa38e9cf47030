"""Feature extractors and the decode + extract pipeline, on real images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgstore.decode import DecodedImage, load_image
from imgstore.errors import ConfigError, DecodeError, ExtractorError, WeightsNotFoundError
from imgstore.features import available_extractors, get_extractor
from imgstore.features.base import Extractor, resize_square
from imgstore.features.pipeline import extract_stream

skimage = pytest.importorskip("skimage")
SKIMAGE_DATA = Path(skimage.__file__).parent / "data"


def photo(name: str) -> Image.Image:
    return load_image(SKIMAGE_DATA / name).image


@pytest.fixture(scope="module")
def effnet() -> Extractor:
    return get_extractor("efficientnet-lite0", precision="fp32")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    return [photo("chelsea.png"), photo("coffee.png"), photo("astronaut.png")]


def test_importing_features_does_not_import_torch() -> None:
    code = (
        "import sys, imgstore.features, imgstore.features.pipeline, imgstore.decode; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry() -> None:
    names = available_extractors()
    assert names[0] == "efficientnet-lite0" and {"resnet50", "color"} <= set(names)
    with pytest.raises(ConfigError, match="unknown extractor"):
        get_extractor("vgg16")
    with pytest.raises(ConfigError, match="option"):
        get_extractor("color", colour_bins=3)
    with pytest.raises(ConfigError, match="bad option"):
        get_extractor("efficientnet-lite0", colour_bins=3)
    with pytest.raises(ConfigError, match="precision"):
        get_extractor("efficientnet-lite0", precision="fp8")


def test_efficientnet_classifies_imagenet_photos(effnet: Extractor, photos: list[Image.Image]) -> None:
    """The 1000-class head on the same features proves weights, architecture and scaling are right."""
    logits = effnet.classify(photos[:2])  # type: ignore[attr-defined]
    assert logits.shape == (2, 1000)
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert set(top5[0]) & {281, 282, 283, 284, 285}, f"chelsea (a cat) top 5: {top5[0]}"
    assert set(top5[1]) & {967, 968, 504}, f"coffee top 5: {top5[1]}"


def test_efficientnet_features_shape_dtype_determinism(effnet: Extractor, photos: list[Image.Image]) -> None:
    assert (effnet.name, effnet.dim) == ("efficientnet-lite0", 1280)
    a = effnet.extract(photos)
    b = effnet.extract(photos[::-1])[::-1]
    assert a.shape == (3, 1280) and a.dtype == np.float32 and np.isfinite(a).all()
    assert (a >= 0).all()  # pooled ReLU6 outputs
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # batch composition does not matter
    np.testing.assert_array_equal(a, effnet.extract(photos))
    assert effnet.preprocess(photos[0]).shape == (224, 224, 3)


def test_bf16_features_close_to_fp32(effnet: Extractor, photos: list[Image.Image]) -> None:
    # explicit bf16 runs on any CPU (emulated where there is no native bf16: slower, same numerics)
    bf = get_extractor("efficientnet-lite0", precision="bf16")
    a, b = effnet.extract(photos), bf.extract(photos)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert b.dtype == np.float32 and (cos > 0.99).all(), cos


def test_precision_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from imgstore.features._torch import resolve_precision

    monkeypatch.setenv("IMGSTORE_PRECISION", "fp32")
    assert resolve_precision(None) == "fp32"
    assert resolve_precision("bf16") == "bf16"
    monkeypatch.setenv("IMGSTORE_PRECISION", "int4")
    with pytest.raises(ConfigError):
        resolve_precision(None)


def test_missing_efficientnet_weights_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match="weights=PATH"):
        get_extractor("efficientnet-lite0", weights=tmp_path / "none.pth")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ExtractorError):
        get_extractor("efficientnet-lite0", weights=bad)


def test_resnet50_from_weights_file(tmp_path: Path, photos: list[Image.Image]) -> None:
    import torch
    from torchvision.models import resnet50

    path = tmp_path / "resnet50-random.pth"
    torch.manual_seed(0)
    torch.save(resnet50(weights=None).state_dict(), path)
    ex = get_extractor("resnet50", weights=path, precision="fp32")
    feats = ex.extract(photos[:2])
    assert ex.dim == 2048 and feats.shape == (2, 2048) and feats.dtype == np.float32
    assert np.isfinite(feats).all()


def test_resnet50_offline_without_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No file, no env var, empty torch cache, no network: a clear error, never random weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("IMGSTORE_RESNET50_WEIGHTS", raising=False)
    for proxy in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # fail fast even where a network exists
    with pytest.raises(WeightsNotFoundError, match="IMGSTORE_RESNET50_WEIGHTS"):
        get_extractor("resnet50")
    monkeypatch.setenv("IMGSTORE_RESNET50_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        get_extractor("resnet50")


def test_color_descriptor(photos: list[Image.Image]) -> None:
    ex = get_extractor("color")
    feats = ex.extract(photos)
    assert feats.shape == (3, 464) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(feats, ex.extract(photos))
    flipped = ex.extract([photos[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)])[0]
    assert float(feats[0] @ flipped) > float(feats[0] @ feats[1])  # near-duplicate closer than another photo


def test_resize_modes() -> None:
    img = Image.new("RGB", (300, 100), (0, 0, 0))
    img.paste((255, 255, 255), (100, 0, 200, 100))  # white centre third
    assert resize_square(img, 32, "squash").shape == (32, 32, 3)
    crop = resize_square(img, 32, "crop")
    assert crop.shape == (32, 32, 3) and crop.min() > 200  # the centre square is all white
    with pytest.raises(ConfigError, match="resize mode"):
        get_extractor("efficientnet-lite0", resize="stretch")


# --- pipeline --------------------------------------------------------------------------------


def _write_inputs(tmp_path: Path) -> list[Path | str]:
    items: list[Path | str] = []
    for i, name in enumerate(["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "horse.png"]):
        p = tmp_path / f"{i}.jpg"
        photo(name).save(p, quality=90)
        items.append(p)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    items.insert(2, bad)
    items.insert(4, "SKIP")
    items.append(tmp_path / "missing.jpg")
    return items


def test_extract_stream_keeps_order_and_records_errors(tmp_path: Path, effnet: Extractor) -> None:
    items = _write_inputs(tmp_path)

    def load(item: Path | str) -> DecodedImage | None:
        if item == "SKIP":
            return None  # e.g. a duplicate: no model work
        return load_image(item, draft_size=effnet.draft_size)

    batches = list(extract_stream(items, load, effnet, batch_size=2, workers=2))
    results = [r for b in batches for r in b]
    assert [r.item for r in results] == items
    assert all(sum(r.features is not None for r in b) <= 2 for b in batches)
    by_item = {str(r.item): r for r in results}
    assert isinstance(by_item[str(tmp_path / "bad.jpg")].error, DecodeError)
    assert isinstance(by_item[str(tmp_path / "missing.jpg")].error, DecodeError)
    assert by_item["SKIP"].skipped and by_item["SKIP"].decoded is None
    good = [r for r in results if r.features is not None]
    assert len(good) == 5 and all(r.error is None and r.decoded is not None for r in good)
    direct = effnet.extract([r.decoded.image for r in good])  # type: ignore[union-attr]
    np.testing.assert_allclose(np.stack([r.features for r in good]), direct, rtol=1e-4, atol=1e-4)


def test_extract_stream_bugs_propagate_and_early_stop(tmp_path: Path) -> None:
    ex = get_extractor("color")
    img = Image.new("RGB", (20, 20), (1, 2, 3))

    def broken(item: int) -> DecodedImage | None:
        if item == 3:
            raise ZeroDivisionError("a bug, not a bad file")
        return load_image(img)

    with pytest.raises(ZeroDivisionError):
        for _ in extract_stream(range(10), broken, ex, batch_size=2, workers=2):
            pass
    # abandoning a long stream early returns promptly and keeps memory bounded
    stream = extract_stream(range(10**9), lambda i: load_image(img), ex, batch_size=4, workers=2)
    first = next(stream)
    assert [r.item for r in first] == [0, 1, 2, 3]
    stream.close()
    assert list(extract_stream([], broken, ex)) == []


def test_efficientnet_lite2_loads_strictly_and_classifies(photos: list[Image.Image]) -> None:
    """The larger sibling: its released weights load into the Lite2 layout with strict=True (a
    wrong channel or repeat count would refuse them), it classifies the sample photos, and its
    features live in their own space (260 px input)."""
    lite2 = get_extractor("efficientnet-lite2", precision="fp32")
    assert (lite2.name, lite2.dim) == ("efficientnet-lite2", 1280) and "efficientnet-lite2" in available_extractors()
    assert lite2.preprocess_version.startswith("squash260-") and lite2.image_size == 260  # type: ignore[attr-defined]
    logits = lite2.classify(photos[:2])  # type: ignore[attr-defined]
    top5 = np.argsort(-logits, axis=1)[:, :5]
    assert set(top5[0]) & {281, 282, 283, 284, 285}, f"chelsea (a cat) top 5: {top5[0]}"
    assert set(top5[1]) & {967, 968, 504}, f"coffee top 5: {top5[1]}"
    features = lite2.extract(photos)
    assert features.shape == (3, 1280) and features.dtype == np.float32 and np.isfinite(features).all()
    assert np.array_equal(features, lite2.extract(photos))  # deterministic
    with pytest.raises(WeightsNotFoundError, match="EfficientNet-Lite2"):
        get_extractor("efficientnet-lite2", weights="/nonexistent/lite2.pth")


def test_color_texture_block_is_invariant_to_brightness_and_quarter_turns(photos: list[Image.Image]) -> None:
    """The texture part of ``color`` (riu2 local binary patterns): a monotonic brightness change
    leaves every code as it was, and a quarter turn permutes the grid cells but keeps the
    whole image's histogram; another photo's differs."""
    from imgstore.features.color import _lbp_grid

    gray = np.asarray(photos[0].convert("L").resize((64, 64)), dtype=np.float32)
    other = np.asarray(photos[1].convert("L").resize((64, 64)), dtype=np.float32)
    for r in (1, 2):
        h = _lbp_grid(gray, r)
        assert h.shape == (40,) and h.sum() == (64 - 2 * r) ** 2
        np.testing.assert_array_equal(h, _lbp_grid(0.5 * gray + 7.0, r))
        whole = h.reshape(4, 10).sum(axis=0)
        np.testing.assert_array_equal(whole, _lbp_grid(np.ascontiguousarray(np.rot90(gray)), r).reshape(4, 10).sum(axis=0))
        assert not np.array_equal(whole, _lbp_grid(other, r).reshape(4, 10).sum(axis=0))
