"""Loader throughput: the shard reader (webdataset's pipeline) against the hand-written reader it replaced
(bench/perf/hand_reader.py) and torchvision's ImageFolder, on the same images.

All read the same encoded files (PNG at 32x32, JPEG at 224x224) from local disk and produce float CHW
tensors in [0, 1] in batches of 64. Each figure is the best of `ROUNDS` full epochs, the loaders taking
turns, so that a load spike on a shared machine hits them alike; the ratio is hand over webdataset.
"""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

BATCH = 64
ROUNDS = 3


def _images(n: int, size: int, classes: int = 10):
    """Natural-ish images (smooth low-res noise upscaled) so codecs see realistic content."""
    rng = np.random.RandomState(0)
    for i in range(n):
        small = Image.fromarray(rng.randint(0, 255, (8, 8, 3), dtype=np.uint8))
        yield np.asarray(small.resize((size, size), Image.BILINEAR)), i % classes


def _prepare(root: Path, n: int, size: int, fmt: str):
    from data_shards.writer import encode_image, write_dataset

    items = list(_images(n, size))
    shards = write_dataset(root / "shards", "perf", {"train": items}, classes=[str(c) for c in range(10)],
                           image_format=fmt, maxcount=max(1, n // 8))
    folder = root / "folder"
    for i, (a, y) in enumerate(items):
        d = folder / f"{y:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:06d}.{fmt}").write_bytes(encode_image(a, fmt))
    return shards, folder


def _rate(iterable_factory, n_expected: int) -> float:
    it = iter(iterable_factory())
    t0 = time.perf_counter()
    n = 0
    for x, _ in it:
        n += len(x)
    dt = time.perf_counter() - t0
    assert n == n_expected, (n, n_expected)
    return n / dt


def _best_rates(factories: dict, n_expected: int, rounds: int = ROUNDS) -> dict:
    """images/s of each loader: the best of `rounds` epochs, the loaders taking turns."""
    best = dict.fromkeys(factories, 0.0)
    for _ in range(rounds):
        for name, factory in factories.items():
            best[name] = max(best[name], _rate(factory, n_expected))
    return best


def loader_benchmark(quick: bool = True) -> dict:
    import torch
    import torchvision
    from torchvision import transforms

    from bench.perf.hand_reader import HandLoader
    from data_shards.reader import make_loader

    torch.set_num_threads(1)  # decode is per-process; keep the comparison about the loaders
    sizes = {32: (2048 if quick else 20000, "png"), 224: (256 if quick else 2000, "jpg")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, (n, fmt) in sizes.items():
            root = Path(tmp) / str(size)
            shards, folder = _prepare(root, n, size, fmt)
            for workers in (0, 2):
                # train=True: shard shuffle, sample shuffle buffer and split by worker, as in training
                ds = torchvision.datasets.ImageFolder(str(folder), transform=transforms.ToTensor())
                rates = _best_rates({
                    "webdataset": lambda: make_loader(shards, "train", BATCH, train=True, num_workers=workers,
                                                      shuffle_buffer=1000),
                    "hand": lambda: HandLoader(shards, "train", BATCH, train=True, num_workers=workers,
                                               shuffle_buffer=1000),
                    "imagefolder": lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                                                       num_workers=workers),
                }, n)
                rows.append({"image_size": size, "format": fmt, "workers": workers, "images": n,
                             "shards_images_per_s": round(rates["webdataset"], 1),
                             "hand_reader_images_per_s": round(rates["hand"], 1),
                             "imagefolder_images_per_s": round(rates["imagefolder"], 1),
                             "ratio_hand_over_webdataset": round(rates["hand"] / rates["webdataset"], 3),
                             "ratio_shards_over_imagefolder": round(rates["webdataset"] / rates["imagefolder"], 3)})
    return {"batch_size": BATCH, "quick": quick, "rounds": ROUNDS, "load_avg_1min": os.getloadavg()[0],
            "rows": rows}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(loader_benchmark(quick="--full" not in sys.argv), indent=1))
