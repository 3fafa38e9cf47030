"""Word search, zero-shot: CIFAR-10 (and Fashion-MNIST) ranked by "a photo of a {class}".

    .venv/bin/python benchmarks/bench_text.py            # CIFAR-10, Fashion-MNIST when installed

For each class the prompt ranks every test image (10,000); mAP@ALL per class and mean, and the
top-1 accuracy of picking, per image, the class whose prompt scores it highest. Scored three ways
from the same EfficientNet-Lite0 features with the sentence model's weights over the 1,000
ImageNet names: the weighted log-probabilities (what the word search ships), the weighted
probabilities, the weighted probabilities of the few labels each image keeps (a search of the
labels table alone); and an oracle that maps each class to its ImageNet classes by hand (the
ceiling of the label approach). Also: top-5 label hits on the scikit-image photos a person can name. Writes
benchmarks/results/text.json and text.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from imgstore import labels, text
from imgstore.decode import load_image
from imgstore.features import get_extractor
from PIL import Image

import common

log = logging.getLogger("bench_text")

# CIFAR-10's classes -> ImageNet-1k classes that name them, by hand (indices into
# labels.imagenet_classes(); ImageNet has no deer: the nearest antelopes stand in)
ORACLE_CIFAR: dict[str, list[str]] = {
    "airplane": ["airliner", "warplane", "airship", "wing", "space shuttle"],
    "automobile": ["sports car", "convertible", "cab", "beach wagon", "jeep", "limousine", "minivan", "Model T",
                   "racer", "passenger car", "police van", "grille", "car wheel"],
    "bird": ["cock", "hen", "ostrich", "brambling", "goldfinch", "house finch", "junco", "indigo bunting", "robin",
             "bulbul", "jay", "magpie", "chickadee", "water ouzel", "kite", "bald eagle", "vulture", "great grey owl",
             "black grouse", "ptarmigan", "ruffed grouse", "prairie chicken", "peacock", "quail", "partridge",
             "African grey", "macaw", "sulphur-crested cockatoo", "lorikeet", "coucal", "bee eater", "hornbill",
             "hummingbird", "jacamar", "toucan", "drake", "red-breasted merganser", "goose", "black swan",
             "white stork", "black stork", "spoonbill", "flamingo", "little blue heron", "American egret",
             "bittern", "crane", "limpkin", "European gallinule", "American coot", "bustard", "ruddy turnstone",
             "red-backed sandpiper", "redshank", "dowitcher", "oystercatcher", "pelican", "king penguin", "albatross"],
    "cat": ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat", "cougar", "lynx"],
    "deer": ["hartebeest", "impala", "gazelle", "ibex", "bighorn", "ram", "llama", "ox"],
    "dog": [],  # filled below: every ImageNet dog breed (classes 151-268)
    "frog": ["bullfrog", "tree frog", "tailed frog"],
    "horse": ["sorrel", "zebra", "horse cart"],
    "ship": ["container ship", "liner", "fireboat", "lifeboat", "speedboat", "schooner", "yawl", "catamaran",
             "trimaran", "aircraft carrier", "pirate", "wreck", "submarine", "gondola", "paddlewheel", "canoe"],
    "truck": ["trailer truck", "fire engine", "garbage truck", "pickup", "tow truck", "moving van", "police van",
              "tractor", "forklift", "tank", "half track", "snowplow"],
}
ORACLE_FASHION: dict[str, list[str]] = {
    "T-shirt/top": ["jersey", "sweatshirt"], "Trouser": ["jean", "swimming trunks"], "Pullover": ["cardigan", "sweatshirt"],
    "Dress": ["overskirt", "gown", "hoopskirt", "miniskirt"], "Coat": ["trench coat", "fur coat", "lab coat", "poncho"],
    "Sandal": ["sandal"], "Shirt": ["jersey", "suit", "bow tie"], "Sneaker": ["running shoe"],
    "Bag": ["purse", "backpack", "mailbag", "plastic bag"], "Ankle boot": ["cowboy boot", "clog", "Loafer"],
}
FASHION_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
# photos a person names at a glance, and the ImageNet classes that name them (top-5 label hits)
NAMED_PHOTOS = {
    "chelsea.png": {"tabby", "tiger cat", "Egyptian cat"}, "coffee.png": {"espresso", "cup", "coffee mug"},
    "rocket.jpg": {"missile", "projectile", "space shuttle"}, "motorcycle_left.png": {"moped", "motor scooter"},
    "motorcycle_right.png": {"moped", "motor scooter"}, "horse.png": {"sorrel"},
    "astronaut.png": {"space shuttle", "military uniform", "suit", "bulletproof vest"},
    "clock_motion.png": {"analog clock", "wall clock"},
}


def average_precision(scores: npt.NDArray[np.floating], relevant: npt.NDArray[np.bool_]) -> float:
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    ranks = np.flatnonzero(hits) + 1
    return float((np.arange(1, len(ranks) + 1) / ranks).mean()) if len(ranks) else 0.0


def sparse_probs(probs: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """What the labels table keeps: each image's top classes (labels.top_labels), zero elsewhere."""
    out = np.zeros_like(probs)
    order = np.argsort(-probs, axis=1)[:, :labels.TOP]
    for i, classes in enumerate(order):
        for rank, c in enumerate(classes):
            if rank == 0 or probs[i, c] >= labels.MIN_PROB:
                out[i, c] = probs[i, c]
    return out


def evaluate(score: npt.NDArray[np.float32], truth: npt.NDArray[np.int64]) -> dict[str, Any]:
    """score: (n_images, n_classes)."""
    aps = [average_precision(score[:, c], truth == c) for c in range(score.shape[1])]
    return {"mAP": float(np.mean(aps)), "per_class": aps, "accuracy": float((score.argmax(1) == truth).mean())}


def table(probs: npt.NDArray[np.float32], truth: npt.NDArray[np.int64], class_names: list[str],
          oracle: dict[str, list[str]], temperatures: list[float]) -> dict[str, Any]:
    names = labels.imagenet_classes()
    index = {n: i for i, n in enumerate(names)}
    sparse = sparse_probs(probs)
    out: dict[str, Any] = {}
    for t in temperatures:
        weights = np.zeros((len(names), len(class_names)), np.float32)
        for j, cls in enumerate(class_names):
            for c, w in text.class_weights(cls.replace("/", " or "), names, temperature=t).items():
                weights[c, j] = w
        shipped = " (shipped)" if t == text.TEMPERATURE else ""
        out[f"words T={t}: log-probabilities{shipped}"] = evaluate(np.log(np.maximum(probs, 1e-12)) @ weights, truth)
        out[f"words T={t}: probabilities"] = evaluate(probs @ weights, truth)
        out[f"words T={t}: stored labels' probabilities"] = evaluate(sparse @ weights, truth)
    hand = np.zeros((len(names), len(class_names)), np.float32)
    for j, cls in enumerate(class_names):
        for n in oracle[cls]:
            hand[index[n], j] = 1.0
    out["oracle (hand map): stored labels"] = evaluate(sparse @ hand, truth)
    out["oracle (hand map): all probabilities"] = evaluate(probs @ hand, truth)
    return out


def fashion_images() -> tuple[list[Image.Image], npt.NDArray[np.int64]] | None:
    """Fashion-MNIST's 10,000 test images from Debian's dataset-fashion-mnist, if installed."""
    for root in (Path("/usr/share/datasets/fashion-mnist"), Path("/usr/share/fashion-mnist")):
        img, lab = root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"
        if img.exists() and lab.exists():
            with gzip.open(img) as f:
                pixels = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28)
            with gzip.open(lab) as f:
                truth = np.frombuffer(f.read()[8:], np.uint8).astype(np.int64)
            return [Image.fromarray(p).convert("RGB") for p in pixels], truth
    return None


def main() -> None:
    import skimage

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", default="0.02,0.05,0.1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    temps = [float(t) for t in args.temperatures.split(",")]
    names = labels.imagenet_classes()
    ORACLE_CIFAR["dog"] = list(names[151:269])
    ex = get_extractor("efficientnet-lite0", runtime="onnx")
    head = ex.classifier_head()  # type: ignore[attr-defined]
    result: dict[str, Any] = {"command": " ".join(["benchmarks/bench_text.py", *sys.argv[1:]])}

    split = common.cifar_split()
    cache = common.cache_dir() / "features-efficientnet-lite0-onnx-fp32.npz"
    feats = np.load(cache)["feats"] if cache.exists() else common.extract_paths(ex, split.q_paths + split.db_paths)
    truth = np.concatenate([split.q_labels, split.db_labels])
    result["cifar10"] = table(labels.probabilities(feats, head), truth, split.classes, ORACLE_CIFAR, temps)

    fashion = fashion_images()
    if fashion is not None:
        images, ftruth = fashion
        start = time.perf_counter()
        ffeats = np.concatenate([ex.extract(images[i:i + 64]) for i in range(0, len(images), 64)])
        log.info("Fashion-MNIST features: %.0f s", time.perf_counter() - start)
        result["fashion_mnist"] = table(labels.probabilities(ffeats, head), ftruth, FASHION_NAMES, ORACLE_FASHION, temps)

    hits = {}
    for name, expected in NAMED_PHOTOS.items():
        path = Path(skimage.__file__).parent / "data" / name
        if not path.exists():
            continue
        top = labels.top_labels(ex.extract([load_image(path).image]), head, top=5, min_prob=0.0)[0]
        got = [names[c] for c, _ in top]
        hits[name] = {"top5": got, "hit": bool(expected & set(got))}
    result["photos_top5"] = hits
    common.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (common.RESULTS_DIR / "text.json").write_text(json.dumps(result, indent=2))
    (common.RESULTS_DIR / "text.md").write_text(report(result))
    print(report(result))


def report(r: dict[str, Any]) -> str:
    lines = ["# Word search, zero-shot (EfficientNet-Lite0's ImageNet head + all-MiniLM-L6-v2)", "",
             f"`{r['command']}`. Prompt per class: \"a photo of a {{class}}\"; mAP@ALL over all 10,000 test images per "
             "class, mean over classes; accuracy: each image given the class whose prompt scores it highest "
             "(chance 0.10).", ""]
    for key, title in (("cifar10", "CIFAR-10"), ("fashion_mnist", "Fashion-MNIST")):
        if key not in r:
            continue
        lines += [f"## {title}", "", "| scoring | mean mAP@ALL | accuracy |", "|---|---:|---:|"]
        for name, v in r[key].items():
            lines.append(f"| {name} | {v['mAP']:.3f} | {v['accuracy']:.3f} |")
        lines.append("")
    hits = r["photos_top5"]
    lines += ["## Labels on photos", "",
              f"Top-5 label hit rate on the scikit-image photos a person names at a glance: "
              f"{sum(h['hit'] for h in hits.values())} of {len(hits)}.", "", "| photo | top 5 labels | hit |", "|---|---|---|"]
    for name, h in hits.items():
        lines.append(f"| {name} | {', '.join(h['top5'])} | {'yes' if h['hit'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
