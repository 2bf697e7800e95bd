"""Verify a shard folder against its manifest: files present, sha256, sample counts and labels."""
from __future__ import annotations

from pathlib import Path

from .manifest import MANIFEST, read_manifest
from .reader import ShardError, iter_shard
from .writer import sha256_file


def check_dataset(ds_dir, deep: bool = True) -> list:
    """Problems found (empty list when fine). deep=True also reads every sample's key/label back."""
    d = Path(ds_dir)
    if not (d / MANIFEST).is_file():
        return [f"no manifest {d / MANIFEST}"]
    try:
        info = read_manifest(d)
    except Exception as e:  # a half-written or hand-edited manifest
        return [f"unreadable manifest {d / MANIFEST}: {e}"]
    problems = []
    for split, s in info.get("splits", {}).items():
        if sum(s["shard_lengths"]) != s["num_samples"]:
            problems.append(f"{split}: shard_lengths sum to {sum(s['shard_lengths'])}, num_samples is {s['num_samples']}")
        for i, name in enumerate(s["shards"]):
            p = d / name
            if not p.is_file():
                problems.append(f"{split}: missing shard {p}")
                continue
            want = s.get("sha256", {}).get(name)
            got = sha256_file(p)
            if want != got:
                problems.append(f"{split}: sha256 mismatch for {p} (manifest {want}, file {got})")
                continue
            if deep:
                try:
                    labels = [int(x["cls"]) for x in iter_shard(str(p), expected=s["shard_lengths"][i])]
                except (ShardError, KeyError, ValueError) as e:
                    problems.append(f"{split}: {e}")
                    continue
                if "labels" in s and labels != list(s["labels"][i]):
                    problems.append(f"{split}: labels in {p} differ from the manifest index")
    return problems
