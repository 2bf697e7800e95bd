"""Loader throughput: the shard reader (webdataset's pipeline), the hand-written reader it replaced
(bench/perf/hand_reader.py, kept as the baseline) and torchvision's ImageFolder, on the same images.

All read the same encoded files (PNG at 32x32, JPEG at 224x224) from local disk and produce float CHW
tensors in [0, 1] in batches of 64. Each figure is the best of `ROUNDS` full epochs, the loaders taking
turns, so that a load spike on a shared machine hits them alike; the ratio is hand over webdataset. CPU
microseconds per image (this process and its loader workers) are reported beside images/s: on a shared
machine they are the steadier comparison.
"""
from __future__ import annotations

import gc
import os
import resource
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


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (DataLoader workers): unlike wall time, not
    inflated when other jobs share the machine."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(iterable_factory, n_expected: int) -> tuple[float, float]:
    """(images/s, CPU microseconds per image) over one epoch."""
    it = iter(iterable_factory())
    c0, t0 = _cpu_s(), time.perf_counter()
    n = 0
    for x, _ in it:
        n += len(x)
    dt = time.perf_counter() - t0
    del it
    gc.collect()  # the epoch's workers exit here, so their CPU time is counted
    cpu = _cpu_s() - c0
    assert n == n_expected, (n, n_expected)
    return n / dt, cpu / n * 1e6


def _best_rates(factories: dict, n_expected: int, rounds: int = ROUNDS) -> dict:
    """{loader: (images/s, CPU us per image)}, each the best of `rounds` epochs, the loaders taking turns."""
    best = {name: (0.0, float("inf")) for name in factories}
    for _ in range(rounds):
        for name, factory in factories.items():
            ips, cpu = _rate(factory, n_expected)
            best[name] = (max(best[name][0], ips), min(best[name][1], cpu))
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
                    "shards": lambda: make_loader(shards, "train", BATCH, train=True, num_workers=workers,
                                                  shuffle_buffer=1000),
                    "hand": lambda: HandLoader(shards, "train", BATCH, train=True, num_workers=workers,
                                               shuffle_buffer=1000),
                    "imagefolder": lambda: torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True,
                                                                       num_workers=workers),
                }, n)
                (ips, cpu), (hand_ips, hand_cpu), (tv_ips, tv_cpu) = (
                    rates["shards"], rates["hand"], rates["imagefolder"])
                rows.append({"image_size": size, "format": fmt, "workers": workers, "images": n,
                             "shards_images_per_s": round(ips, 1),
                             "hand_reader_images_per_s": round(hand_ips, 1),
                             "imagefolder_images_per_s": round(tv_ips, 1),
                             "ratio_hand_over_shards": round(hand_ips / ips, 3),
                             "ratio_shards_over_imagefolder": round(ips / tv_ips, 3),
                             "shards_cpu_us_per_image": round(cpu, 1),
                             "hand_reader_cpu_us_per_image": round(hand_cpu, 1),
                             "imagefolder_cpu_us_per_image": round(tv_cpu, 1)})
    return {"batch_size": BATCH, "quick": quick, "rounds": ROUNDS, "load_avg_1min": os.getloadavg()[0],
            "rows": rows}


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(loader_benchmark(quick="--full" not in sys.argv), indent=1))
