"""x86 side: make the fp32 export and the int8 model (without constructing the extractor),
save the pictures, the shipped reference features, and x86 fp32/int8 features."""
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from imgstore.features import int8, onnxrt
from imgstore.features.onnxrt import cached_model, fp32_export, fp32_model_path, open_session

out = Path(sys.argv[1])
fp32 = fp32_model_path(int8.VARIANT, None, int8.IMAGE_SIZE)
if not fp32.is_file():
    cached_model(fp32, lambda p: fp32_export(int8.VARIANT, None, int8.IMAGE_SIZE, p), lambda p: None)
q = int8.int8_model_path(fp32)
if not q.is_file():
    int8.make_int8(fp32, q)
int8.check_digest(q)
shutil.copyfile(fp32, out / "fp32.onnx")
shutil.copyfile(q, out / "int8.onnx")
pics = int8.reference_pictures()
np.save(out / "pictures.npy", pics)
ref = np.asarray(json.loads(int8.REFERENCE.read_text())["features"], np.float32)
np.save(out / "reference_int8.npy", ref)
for name, path in (("fp32", fp32), ("int8", q)):
    t = time.time()
    f = np.asarray(open_session(path, 1).run(["features"], {onnxrt.INPUT_NAME: pics})[0], np.float32)
    np.save(out / f"x86_{name}.npy", f)
    print(f"x86 {name}: {path} ({time.time()-t:.1f}s)")
print("cpu_int8_flags:", int8.cpu_int8_flags())
