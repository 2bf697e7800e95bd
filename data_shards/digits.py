"""The embedded default data set: scikit-learn's 8x8 digits, upscaled to 32x32 RGB (works offline).

Pixels 0..16 are scaled to 0..255 and upscaled 8x8 -> 32x32 with PIL's bilinear filter (smoother than
nearest, so 3x3 convs of a CIFAR backbone see strokes rather than blocks). Split: stratified 80/20
train/test (seed 0), then 5% of train held out as `val` (stratified, seed 0), recorded in the manifest.
Few-shot: classes 0-4 base, 5-9 novel.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .manifest import MANIFEST
from .paths import default_root
from .writer import write_dataset

NAME = "digits"
SIZE = 32
SEED = 0
VAL_FRACTION = 0.05
TEST_FRACTION = 0.2
MAXCOUNT = 500  # several shards per split, so split-by-worker has something to split


def digits_arrays():
    """(images uint8 [N,32,32,3], labels int [N]) in sklearn's order."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for a in d.images:
        im = Image.fromarray(np.clip(a * (255.0 / 16.0), 0, 255).round().astype(np.uint8), "L")
        im = im.resize((SIZE, SIZE), Image.BILINEAR).convert("RGB")
        imgs.append(np.asarray(im))
    return np.stack(imgs), d.target.astype(int)


def _splits(y):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    train, test = train_test_split(idx, test_size=TEST_FRACTION, stratify=y, random_state=SEED)
    train, val = train_test_split(train, test_size=VAL_FRACTION, stratify=y[train], random_state=SEED)
    return {"train": train, "val": val, "test": test}


def make_digits(root=None, force: bool = False, maxcount: int = MAXCOUNT) -> Path:
    """Write the embedded default under ``root``; ``maxcount`` samples per shard (tests use small shards so
    that ranks get equal shares)."""
    out = Path(root).expanduser().resolve() / NAME if root is not None else default_root() / NAME
    if (out / MANIFEST).is_file() and not force:
        return out  # the manifest is written last and atomically: its presence means complete
    X, y = digits_arrays()
    splits = _splits(y)
    write_dataset(
        out, NAME, {s: ((X[i], int(y[i])) for i in idx) for s, idx in splits.items()},
        classes=[str(c) for c in range(10)], image_format="png", maxcount=maxcount,
        extra_manifest={
            "validation": {"from": "train", "fraction": VAL_FRACTION, "seed": SEED},
            "fewshot": {"base_classes": [0, 1, 2, 3, 4], "novel_classes": [5, 6, 7, 8, 9]},
            "source": {"name": "sklearn.datasets.load_digits", "upscale": "PIL bilinear 8x8->32x32",
                       "test": {"fraction": TEST_FRACTION, "seed": SEED, "stratified": True},
                       "source_index": {s: [int(i) for i in idx] for s, idx in splits.items()}},
        })
    return out
