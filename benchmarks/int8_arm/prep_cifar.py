"""x86: 100 CIFAR-10 test images (10 per class), through imgstore's own preprocessing, as (100,224,224,3) uint8."""
import io
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
from imgstore.features.base import stack_preprocessed
from imgstore.features.onnxrt import lite_extractor
from PIL import Image

out = sys.argv[1]
imgs, n = [], {}
archive = os.environ.get("IMGSTORE_CIFAR") or Path(__file__).resolve().parents[3] / "shared" / "datasets" / "cifar10-test.tar.gz"
with tarfile.open(archive) as t:
    for m in sorted(t.getmembers(), key=lambda m: m.name):
        if m.isfile() and m.name.endswith(".jpg"):
            cls = m.name.split("/")[1]
            if n.get(cls, 0) < 10:
                n[cls] = n.get(cls, 0) + 1
                imgs.append(Image.open(io.BytesIO(t.extractfile(m).read())).convert("RGB"))
ext = lite_extractor("lite0", num_threads=1)
arr = np.ascontiguousarray(stack_preprocessed(ext, imgs), np.uint8)
print(arr.shape, arr.dtype)
np.save(f"{out}/cifar.npy", arr)
