"""Run int8.onnx on cifar.npy (batches of 20, 1 thread); save features; if x86 ones exist, compare."""
import os
import sys
import time

import numpy as np
import onnxruntime as ort

d, tag = sys.argv[1], sys.argv[2]
x = np.load(f"{d}/cifar.npy")
o = ort.SessionOptions(); o.intra_op_num_threads = 1; o.inter_op_num_threads = 1; o.log_severity_level = 3
o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
s = ort.InferenceSession(f"{d}/int8.onnx", o, providers=["CPUExecutionProvider"])
t = time.time()
f = np.concatenate([s.run(["features"], {"pixels": x[i:i + 20]})[0] for i in range(0, len(x), 20)]).astype(np.float32)
os.makedirs(f"{d}/out", exist_ok=True)
np.save(f"{d}/out/{tag}_cifar_int8.npy", f)
ref = f"{d}/out/x86-host_cifar_int8.npy"
if os.path.exists(ref) and tag != "x86-host":
    r = np.load(ref)
    c = (f * r).sum(1) / np.maximum(np.linalg.norm(f, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    print(f"[{tag}] CIFAR {len(x)} images int8 vs x86-VNNI int8: min {c.min():.6f} 1st pct {np.percentile(c, 1):.6f} "
          f"median {np.median(c):.6f} mean {c.mean():.6f}; bit-identical rows {int((f == r).all(1).sum())}/{len(x)}; "
          f"below 0.999: {int((c < 0.999).sum())}  (run {time.time() - t:.1f}s)")
else:
    print(f"[{tag}] CIFAR saved ({time.time() - t:.1f}s)")
