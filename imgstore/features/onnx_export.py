"""Export an EfficientNet-Lite from torch to an ONNX model ONNX Runtime runs fast, checked before it is kept.

Imported only when a model is not in the cache yet (it imports torch and onnx). The exported
graph takes uint8 NHWC pixels (the scaling to (x - 127) / 128 inside it, so the preprocessing is
the torch extractor's own) and gives the 1280-d pooled features and the ImageNet logits (the
1000-class head on them); the batch size is free. TensorFlow
"SAME" padding of the strided convolutions exports as Pad nodes fed by shape arithmetic, behind
which ONNX Runtime fuses nothing: each is folded into its convolution's own ``pads`` (the model
then runs about 1.4x faster). The export is compared with torch on a batch of test pictures and
written to its final name only when every feature vector agrees (cosine >= 0.9999).
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from ..errors import ExtractorError
from .lite import head_path

if TYPE_CHECKING:
    import onnx

log = logging.getLogger(__name__)

OPSET = 17
#: the least cosine between torch's and the export's features on the check batch
MIN_COSINE = 0.9999


def check_pictures(size: int, n: int = 8) -> npt.NDArray[np.uint8]:
    """``n`` deterministic test pictures (n, size, size, 3): smooth colour fields with edges and
    noise, so that every layer sees structure, not just flat or random input."""
    rng = np.random.default_rng(20261206)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0.5, 6.0, 3)
        base = np.stack([np.sin(a * xx * 6.28 + i), np.cos(b * yy * 6.28), np.sin(c * (xx + yy) * 3.14)], -1)
        img = 127.5 + 100 * base + rng.normal(0, 12, (size, size, 3))
        x0, y0 = rng.integers(0, size // 2, 2)
        img[y0:y0 + size // 3, x0:x0 + size // 4] = rng.uniform(0, 255, 3)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def export_lite(variant: str, weights: Path, image_size: int, dest: Path) -> None:
    """Export EfficientNet-Lite ``variant`` with ``weights`` at ``image_size`` to ``dest`` (atomic:
    a half-written or unchecked file never has the final name)."""
    import onnx
    import torch

    from .efficientnet import load_network

    log.info("exporting %s (%d px) to %s: done once per weights file", variant, image_size, dest)
    net = load_network(weights, variant)
    net.fuse_batchnorm()
    net.fix_padding(image_size)

    class Pixels(torch.nn.Module):
        """uint8 (n, h, w, 3) -> (x - 127) / 128 in NCHW -> pooled features."""

        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            scaled = (x.permute(0, 3, 1, 2).float() - 127.0) / 128.0
            features: torch.Tensor = self.net.features(scaled)
            return features, self.net._fc(features)

    model = Pixels().eval()
    pictures = check_pictures(image_size)
    with torch.inference_mode():
        expected = model(torch.from_numpy(pictures))[0].numpy()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.stem + ".", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise ExtractorError(f"cannot write the ONNX model cache in {dest.parent}: {exc.strerror or exc}; set "
                             "IMGSTORE_CACHE_DIR to a writable folder, or use --runtime torch") from None
    tmp = Path(tmp_name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation and constant-folding notes
            torch.onnx.export(model, (torch.from_numpy(pictures[:2]),), str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=["pixels"], output_names=["features", "logits"],
                              dynamic_axes={"pixels": {0: "n"}, "features": {0: "n"}, "logits": {0: "n"}})
        graph = onnx.load(str(tmp))
        folded = fold_pads(graph)
        onnx.checker.check_model(graph)
        onnx.save(graph, str(tmp))
        _check(tmp, pictures, expected, variant)
        # the classifier head beside it (labels are computed from stored features with it), written
        # first: a model in the cache always has its head
        head_tmp = tmp.with_name(tmp.name + ".head.npz")
        np.savez(head_tmp, weight=net._fc.weight.detach().numpy().astype(np.float32),
                 bias=net._fc.bias.detach().numpy().astype(np.float32))
        os.chmod(head_tmp, 0o644)
        os.replace(head_tmp, head_path(dest))
        os.chmod(tmp, 0o644)  # mkstemp made it private; a cache is readable like any other file
        os.replace(tmp, dest)
        log.info("exported %s: %d pads folded into their convolutions", dest.name, folded)
    finally:
        tmp.unlink(missing_ok=True)


def fold_pads(model: onnx.ModelProto) -> int:
    """Fold every zero-constant Pad that feeds only a Conv into the Conv's ``pads``; drop what
    no longer feeds anything. Returns how many were folded."""
    import onnx
    import onnxruntime as ort

    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    pads_nodes = [n for n in graph.node if n.op_type == "Pad" and len(consumers.get(n.output[0], [])) == 1
                  and consumers[n.output[0]][0].op_type == "Conv"
                  and (len(n.input) < 3 or not n.input[2])  # no constant_value: zeros
                  and all(a.name != "mode" or a.s in (b"", b"constant") for a in n.attribute)]
    if not pads_nodes:
        return 0
    # the pads come out of shape arithmetic: read their values by running the graph up to them
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for node in pads_nodes:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(node.input[1], onnx.TensorProto.INT64, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    shape = [d.dim_value or 1 for d in graph.input[0].type.tensor_type.shape.dim]
    values = session.run([n.input[1] for n in pads_nodes], {graph.input[0].name: np.zeros(shape, np.uint8)})
    for node, pads in zip(pads_nodes, values):
        begin_h, begin_w, end_h, end_w = (int(pads[2]), int(pads[3]), int(pads[6]), int(pads[7]))
        if any(int(p) for p in (*pads[:2], *pads[4:6])):  # padding of the batch or channel axis: leave it
            continue
        conv = consumers[node.output[0]][0]
        own = [0, 0, 0, 0]
        for attr in list(conv.attribute):
            if attr.name == "pads":
                own = list(attr.ints)
                conv.attribute.remove(attr)
        merged = [own[0] + begin_h, own[1] + begin_w, own[2] + end_h, own[3] + end_w]
        conv.attribute.append(onnx.helper.make_attribute("pads", merged))
        conv.input[0] = node.input[0]
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            return len(pads_nodes)
        for node in dead:
            graph.node.remove(node)


def _check(path: Path, pictures: npt.NDArray[np.uint8], expected: npt.NDArray[np.float32], variant: str) -> None:
    import onnxruntime as ort

    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["features"], {"pixels": pictures})[0]
    cos = (got * expected).sum(1) / np.maximum(np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1), 1e-12)
    if got.shape != expected.shape or float(cos.min()) < MIN_COSINE:
        raise ExtractorError(f"the ONNX export of {variant} does not match torch (cosine {float(cos.min()):.6f} < "
                             f"{MIN_COSINE}); use --runtime torch, and report it")

