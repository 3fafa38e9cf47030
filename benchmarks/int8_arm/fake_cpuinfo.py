"""Run under qemu-aarch64: print the /proc/cpuinfo a Linux kernel would show on this emulated CPU,
built from the emulated AT_HWCAP/AT_HWCAP2 (feature words in the kernel's order) and MIDR_EL1
(read with an mrs instruction, which QEMU user mode allows like Linux does). argv[1]: CPU count."""
import ctypes
import mmap
import sys

import numpy as np

HWCAP = ["fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid", "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm", "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"]
HWCAP2 = ["dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm", "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres", "mte3", "sme", "sme_i16i64", "sme_f64f64", "sme_i8i32", "sme_f16f32", "sme_b16f32", "sme_f32f32", "sme_fa64", "wfxt", "ebf16", "sve_ebf16", "cssc", "rprfm", "sve2p1"]
aux = dict(np.frombuffer(open("/proc/self/auxv", "rb").read(), np.uint64).reshape(-1, 2).tolist())
h, h2 = int(aux.get(16, 0)), int(aux.get(26, 0))
words = [w for i, w in enumerate(HWCAP) if h >> i & 1] + [w for i, w in enumerate(HWCAP2) if h2 >> i & 1]
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write((0xD5380000).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little"))  # mrs x0, midr_el1; ret
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(addr)()
out = []
for cpu in range(int(sys.argv[1]) if len(sys.argv) > 1 else 1):
    out += [f"processor\t: {cpu}", "BogoMIPS\t: 50.00", "Features\t: " + " ".join(words),
            f"CPU implementer\t: 0x{midr >> 24 & 0xff:02x}", "CPU architecture: 8",
            f"CPU variant\t: 0x{midr >> 20 & 0xf:x}", f"CPU part\t: 0x{midr >> 4 & 0xfff:03x}",
            f"CPU revision\t: {midr & 0xf}", ""]
print("\n".join(out))
print(f"# MIDR_EL1=0x{midr:08x} AT_HWCAP=0x{h:x} AT_HWCAP2=0x{h2:x}", file=sys.stderr)
