"""Write (image, label) sources into webdataset shards plus an `_info.json` manifest.

A sample is `__key__`, the encoded image (`png` or `jpg` bytes) and `cls` (ASCII int). We hand TarWriter
bytes only (encoder=False), so no pickle key can ever be written.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from .manifest import write_manifest

SHARD_PATTERN = "{split}-%06d.tar"
DEFAULT_MAXCOUNT = 1000
# A fixed integer mtime: shards become byte-reproducible, and tarfile writes plain ustar headers (a float
# time.time() adds a pax header to every member, which halves read speed).
TAR_MTIME = 1_700_000_000


def to_pil(image) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB") if image.mode != "RGB" else image
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise TypeError(f"images must be uint8 HxWx3 arrays or PIL images, got dtype {a.dtype}")
    if a.ndim == 2:
        a = np.stack([a] * 3, axis=-1)
    if a.ndim != 3 or a.shape[2] != 3:
        raise TypeError(f"images must be HxWx3, got shape {a.shape}")
    return Image.fromarray(a, "RGB")


def encode_image(image, image_format: str = "png") -> bytes:
    im = to_pil(image)
    buf = io.BytesIO()
    if image_format == "png":
        im.save(buf, format="PNG", compress_level=3)  # level 3: near-default size, ~3x faster than 6
    elif image_format in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be png or jpg, got {image_format!r}")
    return buf.getvalue()


def make_sample(key: str, image, label: int, image_format: str = "png", encoded: Optional[bytes] = None) -> dict:
    ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
    data = encoded if encoded is not None else encode_image(image, ext)
    return {"__key__": key, ext: data, "cls": str(int(label)).encode("ascii")}


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_dataset(
    out_dir,
    name: str,
    splits: dict,
    classes,
    image_format: str = "png",
    maxcount: int = DEFAULT_MAXCOUNT,
    extra_manifest: Optional[dict] = None,
) -> Path:
    """Write each split's iterable of (image, label) into `out_dir/{split}-NNNNNN.tar`; returns out_dir.

    `extra_manifest` entries (validation, fewshot, source, ...) are merged into the manifest.
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ext = "jpg" if image_format in ("jpg", "jpeg") else "png"
    info = {"name": name, "classes": [str(c) for c in classes], "num_classes": len(classes),
            "image_size": None, "image_format": ext, "splits": {}}
    sizes = set()
    for split, items in splits.items():
        # maxsize huge: shards are cut on count only, so shard i holds samples [i*maxcount, (i+1)*maxcount)
        shards, lengths, labels = [], [], []
        pattern = str(out / SHARD_PATTERN.format(split=split))
        with wds.ShardWriter(pattern, maxcount=maxcount, maxsize=1 << 62, encoder=False, verbose=0, mtime=TAR_MTIME) as sink:
            for i, (image, label) in enumerate(items):
                label = int(label)
                if not 0 <= label < len(classes):
                    raise ValueError(f"label {label} out of range for {len(classes)} classes")
                im = to_pil(image)
                sizes.add((im.height, im.width))
                sink.write(make_sample(f"{split}_{i:08d}", im, label, ext))
                fname = Path(sink.fname).name
                if not shards or shards[-1] != fname:
                    shards.append(fname)
                    lengths.append(0)
                    labels.append([])
                lengths[-1] += 1
                labels[-1].append(label)
        info["splits"][split] = {
            "num_samples": sum(lengths), "shards": shards, "shard_lengths": lengths,
            "sha256": {s: sha256_file(out / s) for s in shards}, "labels": labels,
        }
        # ShardWriter opens its first file eagerly: an empty split leaves an empty tar we do not list
        first = out / (SHARD_PATTERN.format(split=split) % 0)
        if not shards and first.exists():
            first.unlink()
    if len(sizes) == 1:
        h, w = next(iter(sizes))
        info["image_size"] = [h, w]
    info["variable_size"] = len(sizes) > 1
    info.update(extra_manifest or {})
    write_manifest(out, info)
    return out


def remove_dataset(out_dir) -> None:
    shutil.rmtree(out_dir, ignore_errors=True)
