"""Real phone and camera HEIC/HEIF files for the format tests, fetched once.

No camera's file can be written by a test: an encoder run here makes files as libheif makes
them, not as an iPhone, a Galaxy or a Sony camera does (their thumbnails, tiling, 10-bit
depth, colour boxes and metadata). pillow-heif's own source package ships such files with its
test suite: iPhone 8 Plus, XS and 13 Pro photos, an Apple Vision Pro spatial photo, Galaxy S24
Ultra (200 MP) and S25 Ultra photos, a Xiaomi photo, 10-bit Sony .HIF files, Nokia's
reference images, and damaged ones. ``make samples`` (run by ``make test``) asks pip for the
source package of the pillow-heif version installed and unpacks those images, and only them,
into ``.cache/camera-samples/pillow-heif-<version>/`` (ignored by git). Nothing else is taken
from the package; the images are never copied into this repository.

    python tests/camera_samples.py          # fetch (if missing) and print the folder
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
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path, PurePosixPath

ROOT = Path(__file__).resolve().parent.parent / ".cache" / "camera-samples"
#: the folders of pillow-heif's ``tests/images`` that are unpacked
FOLDERS = ("heif", "heif_other", "heif_special", "heif_corrupted", "heif_truncated")
SUFFIXES = (".heic", ".heif", ".hif", ".txt")
MANIFEST = "MANIFEST.json"


def folder() -> Path | None:
    """The unpacked images of the installed pillow-heif's source package, or None when they
    have not been fetched (``make samples``)."""
    try:
        wanted = ROOT / f"pillow-heif-{version('pillow-heif')}"
    except PackageNotFoundError:
        return None
    return wanted if (wanted / MANIFEST).is_file() else None


def fetch() -> Path:
    """Fetch and unpack (once) the images; returns their folder. Written beside the final
    folder and renamed into place, so an interrupted fetch leaves nothing that looks complete."""
    got = folder()
    if got is not None:
        return got
    v = version("pillow-heif")
    dest = ROOT / f"pillow-heif-{v}"
    ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT, prefix=".fetch-") as tmp:
        work = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"pillow-heif=={v}", "-d", str(work / "sdist")], check=True, timeout=900)
        (archive,) = (work / "sdist").iterdir()
        stage = work / "images"
        files: dict[str, str] = {}
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                # <package>-<version>/tests/images/<folder>/.../<file>, regular files only
                if (not member.isfile() or len(parts) < 5 or parts[1:3] != ("tests", "images")
                        or parts[3] not in FOLDERS or ".." in parts
                        or PurePosixPath(member.name).suffix.lower() not in SUFFIXES):
                    continue
                rel = PurePosixPath(*parts[3:])
                source = tar.extractfile(member)
                if source is None:
                    continue
                data = source.read()
                target = stage.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                files[str(rel)] = hashlib.sha256(data).hexdigest()
        if not files:
            raise RuntimeError(f"pillow-heif {v}'s source package holds no test images under tests/images")
        (stage / MANIFEST).write_text(json.dumps({"pillow-heif": v, "files": files}, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(stage, dest)
    return dest


if __name__ == "__main__":
    try:
        print(fetch())
    except (OSError, RuntimeError, subprocess.SubprocessError, PackageNotFoundError) as exc:
        print(f"could not fetch the camera sample files ({exc}); the camera-file tests will say so", file=sys.stderr)
        sys.exit(1)
