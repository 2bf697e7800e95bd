"""The `_info.json` manifest written beside each data set's shards.

Keys: name, classes, num_classes, image_size [H, W], image_format, splits{split: {num_samples, shards,
shard_lengths, sha256, labels}}, validation{from, fraction, seed}, fewshot{base_classes, novel_classes}
(optional), source (free dict). `labels` is the per-shard list of labels in order: the index that episodic
sampling uses for random access by class.
"""
from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

MANIFEST = "_info.json"


def file_location(ds, fname: str) -> str:
    """Location of file `fname` of data set `ds` (a folder, an http(s) base URL, or a template with `{}`)."""
    ds = str(ds)
    if "{}" in ds:  # e.g. "pipe:aws s3 cp s3://bucket/digits/{} -"
        return ds.replace("{}", fname)
    if ds.startswith(("http://", "https://")):
        return ds.rstrip("/") + "/" + fname
    return str(Path(ds) / fname)


def read_manifest(ds_dir) -> dict:
    loc = file_location(ds_dir, MANIFEST)
    s = str(ds_dir)
    if s.startswith(("http://", "https://")):
        with urllib.request.urlopen(loc, timeout=60) as r:
            return parse_manifest(r.read(), loc)
    if s.startswith("pipe:"):
        import webdataset as wds

        with wds.gopen(loc, "rb") as f:
            return parse_manifest(f.read(), loc)
    p = Path(loc)
    if not p.is_file():
        raise FileNotFoundError(f"no manifest {p}; build the shards with: python -m bench shards make NAME")
    return parse_manifest(p.read_bytes(), str(p))


def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest in ``data`` (read from ``where``, which every error names: json's own message does not)."""
    rebuild = f"rebuild the data set with: python -m bench shards make {Path(where).parent.name or 'NAME'}"
    try:
        info = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not a text (UTF-8) manifest (byte {e.start}); {rebuild}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg.removesuffix(' at')}) at line {e.lineno} column "
                         f"{e.colno}; {rebuild}") from None
    if not isinstance(info, dict):
        raise ValueError(f"{where}: expected a JSON object (a data set's manifest), got {type(info).__name__}")
    return info


def write_manifest(ds_dir, info: dict) -> Path:
    """Atomic write (tmp + os.replace): a reader never sees half a manifest, and its presence means done."""
    p = Path(ds_dir) / MANIFEST
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(info, indent=1))
    os.replace(tmp, p)
    return p
