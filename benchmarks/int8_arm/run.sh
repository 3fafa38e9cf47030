#!/bin/bash
# imgstore efficientnet-lite0-int8 on emulated Arm (aarch64) vs the shipped x86-VNNI reference.
# Results: benchmarks/results/int8_arm.md. Work folder: $ARM_WORK (default /tmp/arm64), holding (made
# once, see "setup" below) root/ (an arm64 sysroot) and wheels/ (aarch64 wheels).
# Optional: QEMU=/path/to/qemu-aarch64 (>= 8.1 emulates /proc/cpuinfo itself; default: the system's).
#
# setup (done once, as root, Debian bookworm host):
#   apt-get update && apt-get install -y qemu-user                     # QEMU 7.2
#   dpkg --add-architecture arm64 && apt-get update
#   mkdir -p /tmp/arm64/debs /tmp/arm64/root && cd /tmp/arm64/debs
#   apt-get download python3.11-minimal:arm64 libpython3.11-minimal:arm64 libpython3.11-stdlib:arm64 libc6:arm64 \
#     libexpat1:arm64 zlib1g:arm64 libffi8:arm64 libssl3:arm64 libgcc-s1:arm64 libstdc++6:arm64 libbz2-1.0:arm64 \
#     liblzma5:arm64 libsqlite3-0:arm64 libncursesw6:arm64 libtinfo6:arm64 libreadline8:arm64 libuuid1:arm64 \
#     libnsl2:arm64 libtirpc3:arm64 libdb5.3:arm64 libgdbm6:arm64 libcrypt1:arm64
#   for f in *.deb; do dpkg -x $f /tmp/arm64/root; done
#   <repo>/.venv/bin/pip download --only-binary=:all: --platform manylinux2014_aarch64 \
#     --platform manylinux_2_17_aarch64 --platform manylinux_2_28_aarch64 --python-version 3.11 \
#     --implementation cp --abi cp311 onnxruntime==1.32.0 numpy==2.4.6 -d /tmp/arm64/wheels
#   (optional newer QEMU: apt-get download qemu-user from bookworm-backports (10.0.2, static-pie) and
#    dpkg -x it into /tmp/arm64/qemu10; then QEMU=/tmp/arm64/qemu10/usr/bin/qemu-aarch64)
set -euo pipefail
D=${ARM_WORK:-/tmp/arm64}
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VPY=${VPY:-$REPO/.venv/bin/python}
QEMU=${QEMU:-qemu-aarch64}
CPUS=${CPUS:-"neoverse-n1 cortex-a76 cortex-a72 cortex-a53 max"}
# SKIP_CIFAR=1: only the 4 reference pictures on Arm (the 100-image CIFAR-10 runs take 50-110 s each)
cd "$D"
"$QEMU" --version | head -1
if [ ! -d site/onnxruntime ]; then
  mkdir -p site && for w in wheels/*.whl; do "$VPY" -m zipfile -e "$w" site; done
fi
# x86 side: models (made with imgstore's own functions, in a private cache), pictures, reference, x86 features
(cd "$REPO" && IMGSTORE_CACHE_DIR=$D/cache "$VPY" "$HERE/prep_x86.py" $D)
[ -f cifar.npy ] || (cd "$REPO" && IMGSTORE_CACHE_DIR=$D/cache "$VPY" "$HERE/prep_cifar.py" $D)
"$VPY" "$HERE/feats.py" $D x86-host
"$VPY" "$HERE/feats_cifar.py" $D x86-host

# does this QEMU emulate /proc/cpuinfo? (QEMU 7.2 shows the host's x86 one, and onnxruntime's cpuinfo
# library then segfaults while importing; >= 8.1 shows the emulated CPU's)
if PYTHONPATH=$D/site "$QEMU" -L $D/root -cpu max $D/root/usr/bin/python3.11 -c \
     "import sys; sys.exit(0 if 'CPU implementer' in open('/proc/cpuinfo').read() else 1)"; then FAKE=0; else FAKE=1; fi
echo "QEMU emulates /proc/cpuinfo: $((1 - FAKE))"
for c in $CPUS; do
  if [ $FAKE = 1 ]; then
    # a Linux-style /proc/cpuinfo made from the emulated CPU's HWCAPs and MIDR_EL1, bind-mounted in a private
    # mount namespace (root needed)
    mkdir -p $D/cpuinfo
    PYTHONPATH=$D/site "$QEMU" -L $D/root -cpu $c $D/root/usr/bin/python3.11 "$HERE/fake_cpuinfo.py" "$(nproc)" > $D/cpuinfo/$c
    WRAP=(unshare -m sh -c "mount --bind $D/cpuinfo/$c /proc/cpuinfo && exec \"\$@\"" sh)
  else
    WRAP=()
  fi
  SCRIPTS="feats.py feats_cifar.py"; [ -n "${SKIP_CIFAR:-}" ] && SCRIPTS=feats.py
  for s in $SCRIPTS; do
    /usr/bin/time -f "[$c] $s wall %es" env PYTHONPATH=$D/site "${WRAP[@]}" \
      "$QEMU" -L $D/root -cpu $c $D/root/usr/bin/python3.11 "$HERE/$s" $D $c
  done
done
# x86 without VNNI, for comparison (QEMU TCG has AVX2, not AVX-512/VNNI; /proc/cpuinfo stays the host's)
QX=$(dirname "$(command -v "$QEMU")")/qemu-x86_64
/usr/bin/time -f "[x86-Haswell-noTSX] wall %es" "$QX" -cpu Haswell-noTSX "$VPY" "$HERE/feats.py" $D x86-qemu-Haswell-noTSX \
  2> >(grep -v "TCG doesn't support" >&2)
