"""The pixel-layout signature used for copy detection: stable under the edits copies go
through, different for different photos, mirror-aware. Real photos, decoded by Pillow."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from imgstore.dedup import signature_similarity
from imgstore.samples import TRANSFORMS
from imgstore.signature import DIM, from_bytes, thumb_signature, to_bytes

from .helpers import PHOTOS, photo


def test_copies_stay_close_and_photos_differ() -> None:
    originals = {name: photo(name) for name in PHOTOS}
    sigs = {name: thumb_signature(img) for name, img in originals.items()}
    for name, img in originals.items():
        # crops and rotations move the layout (median 0.93, worst 0.66 on these photos): the
        # float features, not the signature, carry those copies
        for t in ("resize_half", "resize_quarter", "jpeg_q30", "brighter_20", "flip"):
            copy = TRANSFORMS[t](img)
            buf = io.BytesIO()
            copy.convert("RGB").save(buf, format="JPEG", quality=80)
            sim = signature_similarity(sigs[name][None, :], thumb_signature(Image.open(buf))[None, :])[0]
            assert sim >= 0.99, (name, t, sim)
    names = list(sigs)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            sim = signature_similarity(sigs[a][None, :], sigs[b][None, :])[0]
            assert sim < 0.9, (a, b, sim)


def test_round_trip_and_flat_image() -> None:
    sig = thumb_signature(photo("coffee"))
    assert sig.shape == (DIM,) and abs(float(np.linalg.norm(sig)) - 1) < 1e-5
    assert np.array_equal(from_bytes(to_bytes(sig)), sig)
    assert not thumb_signature(Image.new("RGB", (50, 50), (10, 20, 30))).any()
    assert from_bytes(None) is None and from_bytes(b"short") is None
