"""Run int8.onnx and fp32.onnx on pictures.npy with onnxruntime alone (CPU EP, 1 thread); print
per-picture cosine of int8 vs the shipped reference and fp32 vs x86 fp32."""
import os
import platform
import sys
import time

import numpy as np
import onnxruntime as ort

d = sys.argv[1]
tag = sys.argv[2] if len(sys.argv) > 2 else platform.machine()
pics = np.load(f"{d}/pictures.npy")

def cos(a, b):
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)

def run(model):
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    o.add_session_config_entry("session.intra_op.allow_spinning", "0")
    o.log_severity_level = 3
    t = time.time()
    s = ort.InferenceSession(f"{d}/{model}", o, providers=["CPUExecutionProvider"])
    t1 = time.time()
    f = np.asarray(s.run(["features"], {"pixels": pics})[0], np.float32)
    return f, t1 - t, time.time() - t1

print(f"[{tag}] python {platform.python_version()} {platform.machine()} onnxruntime {ort.__version__} numpy {np.__version__}")
words = set()
for line in open("/proc/cpuinfo", errors="replace").read().splitlines():
    if line.lower().startswith(("flags", "features")):
        words.update(line.split(":", 1)[-1].split())
print(f"[{tag}] /proc/cpuinfo int8 flags (imgstore's cpu_int8_flags):",
      [w for w in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp") if w in words])
try:
    hw = open("/proc/self/auxv", "rb").read()
except OSError:
    hw = b""
a = np.frombuffer(hw, np.uint64).reshape(-1, 2) if hw else np.zeros((0, 2), np.uint64)
aux = {int(k): int(v) for k, v in a}
if platform.machine() == "aarch64" and 16 in aux:
    h, h2 = aux[16], aux.get(26, 0)
    print(f"[{tag}] AT_HWCAP=0x{h:x} asimddp={(h >> 20) & 1} sve={(h >> 22) & 1}; AT_HWCAP2=0x{h2:x} i8mm={(h2 >> 13) & 1}")
i8, ld8, t8 = run("int8.onnx")
c8 = cos(i8, np.load(f"{d}/reference_int8.npy"))
print(f"[{tag}] int8 vs shipped reference: per picture {np.round(c8, 6).tolist()} min {c8.min():.6f}"
      f"  (load {ld8:.1f}s, run {t8:.1f}s)  -> {'ACCEPTED' if c8.min() >= 0.999 else 'REFUSED'} at 0.999")
c8x = cos(i8, np.load(f"{d}/x86_int8.npy"))
print(f"[{tag}] int8 vs this x86 host's int8: min {c8x.min():.6f}; max abs diff {np.abs(i8 - np.load(f'{d}/x86_int8.npy')).max():.3g}")
f32, ld, t = run("fp32.onnx")
c = cos(f32, np.load(f"{d}/x86_fp32.npy"))
print(f"[{tag}] fp32 vs x86 fp32: per picture {np.round(c, 7).tolist()} min {c.min():.7f}"
      f"  max abs diff {np.abs(f32 - np.load(f'{d}/x86_fp32.npy')).max():.3g}  (load {ld:.1f}s, run {t:.1f}s)")
c2 = cos(i8, f32)
os.makedirs(f"{d}/out", exist_ok=True)
np.save(f"{d}/out/{tag}_int8.npy", i8)
np.save(f"{d}/out/{tag}_fp32.npy", f32)
print(f"[{tag}] int8 vs fp32 (same CPU): min {c2.min():.4f} mean {c2.mean():.4f}")
