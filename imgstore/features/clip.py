"""CLIP weights the user has on disk: extractor specs, feature-space names and where each file lies.

``--extractor clip:ARCH:PATH`` (``clip:ViT-B-32:/models/vit_b32.bin``) embeds images with the open_clip
model ``ARCH`` and the weights in ``PATH`` (:mod:`.clip_model`, torch). Its features go to the
feature space ``clip:ARCH:DIGEST``: the first :data:`DIGEST_LEN` hex digits of the file's SHA-256,
so two different weights files never share a space, and a file that is moved or copied keeps
its space.

A stored space names its digest, not the file: to embed a query into it, this module finds the
file again. Every file hashed here is remembered in the user's cache folder (``clip-weights.json``
beside the exported ONNX models, :func:`~imgstore.features.onnxrt.cache_dir`), keyed by its
path, size and modification time (so it is hashed again only when it changes), and checked
against the digest before use. A store searched on another machine needs the spec with the
path once there (``--extractor clip:ARCH:PATH``).

Torch-free and open_clip-free: the CLI and the store parse specs and name spaces without
importing either.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError, ExtractorError, WeightsNotFoundError
from .onnxrt import cache_dir

log = logging.getLogger(__name__)

PREFIX = "clip:"
#: hex digits of the weights file's SHA-256 in a space's name (48 bits: no two files a user has collide)
DIGEST_LEN = 12
PIP_HINT = "pip install 'imgstore[clip]'"
#: the longest feature-space name the database stores (``feature_spaces.extractor``)
MAX_NAME = 64
REGISTRY_FILE = "clip-weights.json"
#: a few architectures to name in messages (open_clip's own tokenizer, weights published for each)
EXAMPLE_ARCHS = ("ViT-B-32", "ViT-B-16", "ViT-L-14", "RN50", "convnext_base_w")

_DIGEST = re.compile(f"[0-9a-f]{{{DIGEST_LEN}}}")
_CHUNK = 1 << 22

_lock = threading.Lock()
#: (resolved path, size, mtime_ns) -> SHA-256 hex: a file's digest, hashed once per change
_digests: dict[tuple[str, int, int], str] = {}


@runtime_checkable
class TextEmbedder(Protocol):
    """An extractor that also embeds words into its own feature space (CLIP's text tower)."""

    name: str
    dim: int

    def embed_text(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Texts to (n, dim) float32 unit vectors, comparable by cosine with the image features."""
        ...


@dataclass(frozen=True)
class ClipWeights:
    """One CLIP model to build: its open_clip architecture, its weights file and the feature
    space its features go to (``clip:ARCH:DIGEST``)."""

    arch: str
    path: Path
    digest: str

    @property
    def name(self) -> str:
        return f"{PREFIX}{self.arch}:{self.digest[:DIGEST_LEN]}"


def is_clip(name: str) -> bool:
    """``name`` is a CLIP extractor spec or a CLIP feature space's name."""
    return name.startswith(PREFIX)


def split(spec: str) -> tuple[str, str]:
    """``clip:ARCH:REST`` -> (ARCH, REST); REST is a path (which may hold colons) or a digest."""
    arch, sep, rest = spec[len(PREFIX):].partition(":")
    arch = arch.strip().replace("/", "-")  # open_clip's own spelling: ViT-B/32 is ViT-B-32
    if not arch or not sep or not rest.strip():
        raise ConfigError(f"a CLIP extractor is clip:ARCH:PATH, e.g. clip:ViT-B-32:/models/vit_b32.bin; got {spec!r}")
    return arch, rest.strip()


def space_name(spec: str) -> str:
    """The feature space the extractor ``spec`` writes, without building it: a ``clip:ARCH:PATH``
    reads the file's digest (remembering where the file is); every other name is its own."""
    if not is_clip(spec):
        return spec
    arch, rest = split(spec)
    if _names_digest(rest):
        return f"{PREFIX}{arch}:{rest}"
    return _checked(resolve(spec).name)


def resolve(spec: str, weights: str | os.PathLike[str] | None = None) -> ClipWeights:
    """The model a CLIP spec names: ``clip:ARCH:PATH``, or a stored space's ``clip:ARCH:DIGEST``
    whose file is ``weights`` when given, else a file this machine has seen with that digest.

    Raises WeightsNotFoundError when the file is missing or unknown, ExtractorError when it
    cannot be read or is not the file the digest names.
    """
    arch, rest = split(spec)
    if not _names_digest(rest):
        path = Path(rest).expanduser()
        found = ClipWeights(arch, path, file_digest(path))
        _checked(found.name)
        return found
    if weights is not None:
        path = Path(weights).expanduser()
        digest = file_digest(path)
        if not digest.startswith(rest):
            raise ExtractorError(f"{path} is not the weights file of the feature space {PREFIX}{arch}:{rest} (its "
                                 f"digest starts {digest[:DIGEST_LEN]}); give the file those features were made with")
        return ClipWeights(arch, path, digest)
    for path in _known_files(rest):
        try:
            digest = file_digest(path)
        except ExtractorError:
            continue
        if digest.startswith(rest):
            return ClipWeights(arch, path, digest)
    raise WeightsNotFoundError(
        f"the feature space {PREFIX}{arch}:{rest} was made with a CLIP weights file this machine has not seen (or it "
        f"moved); give it once: --extractor {PREFIX}{arch}:PATH (API: extractor='{PREFIX}{arch}:PATH')"
    )


def require_open_clip() -> None:
    """Raise ConfigError, saying what to install, when open_clip is missing."""
    if importlib.util.find_spec("open_clip") is None:
        raise ConfigError(f"CLIP extractors need open_clip (open_clip_torch): `{PIP_HINT}`")


def file_digest(path: Path) -> str:
    """The SHA-256 (hex) of a weights file, hashed once per path, size and modification time in
    this process and on this machine (the cache folder's ``clip-weights.json``)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise WeightsNotFoundError(
            f"no CLIP weights file at {path}: give the path of an open_clip state dict (.pt, .bin or .safetensors; "
            "the README says how to get one)"
        ) from None
    except OSError as exc:
        raise ExtractorError(f"cannot read the CLIP weights file {path}: {exc.strerror or exc}") from None
    if not path.is_file():
        raise WeightsNotFoundError(f"{path} is not a file: give the path of an open_clip state dict (.pt, .bin or "
                                   ".safetensors)")
    real = str(path.resolve())
    key = (real, st.st_size, st.st_mtime_ns)
    with _lock:
        known = _digests.get(key)
    if known is None:
        entry = _remembered().get(real, {})
        stored = entry.get("sha256")
        if (entry.get("size"), entry.get("mtime_ns")) == (st.st_size, st.st_mtime_ns) and isinstance(stored, str):
            known = stored
        else:
            known = _hash(path)
            _remember(real, st.st_size, st.st_mtime_ns, known)
        with _lock:
            _digests[key] = known
    return known


def _names_digest(rest: str) -> bool:
    """REST of a spec is a stored space's digest (and no file of that name is here)."""
    return _DIGEST.fullmatch(rest) is not None and not os.path.exists(rest)


def _checked(name: str) -> str:
    if len(name) > MAX_NAME:
        raise ConfigError(f"the feature space name {name!r} is longer than {MAX_NAME} characters: the architecture "
                          "name is too long")
    return name


def _hash(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ExtractorError(f"cannot read the CLIP weights file {path}: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _registry() -> Path:
    return cache_dir() / REGISTRY_FILE


def _remembered() -> dict[str, dict[str, object]]:
    """Path -> {size, mtime_ns, sha256} of every weights file hashed on this machine."""
    try:
        data = json.loads(_registry().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return {str(k): v for k, v in files.items() if isinstance(v, dict)} if isinstance(files, dict) else {}


def _known_files(digest: str) -> list[Path]:
    """Files hashed in this process or remembered on this machine whose digest starts with ``digest``."""
    with _lock:
        seen = [Path(real) for (real, _, _), sha in _digests.items() if sha.startswith(digest)]
    remembered = [Path(real) for real, entry in _remembered().items()
                  if str(entry.get("sha256", "")).startswith(digest)]
    return list(dict.fromkeys(seen + remembered))


def _remember(real: str, size: int, mtime_ns: int, sha256: str) -> None:
    """Add one file to ``clip-weights.json`` (atomically; a folder that cannot be written only
    means the file is hashed again next time)."""
    target = _registry()
    with _lock:
        files = _remembered()
        files[real] = {"size": size, "mtime_ns": mtime_ns, "sha256": sha256}
        files = {k: v for k, v in files.items() if os.path.exists(k)}  # forget files that are gone
        tmp: str | None = None
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".clip-weights-", suffix=".json")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"version": 1, "files": files}, f, indent=1)
            os.replace(tmp, target)
        except OSError as exc:
            log.info("cannot remember the CLIP weights file %s in %s: %s", real, target, exc)
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)
