"""Shared fixtures: offline W&B, a per-session torch-extensions cache, the embedded digits shards."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed compiles a small CPU op once (~40 s); keep it in the repo's ignored cache, reused across runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory) -> Path:
    """A shards root holding the embedded default data set, built once per session."""
    from data_shards.digits import make_digits

    root = tmp_path_factory.mktemp("shards")
    make_digits(root)
    return root


@pytest.fixture(scope="session")
def digits_dir(shards_root) -> Path:
    return shards_root / "digits"


def _restamp(ds_dir: Path, name: str) -> None:
    from data_shards.manifest import read_manifest, write_manifest
    from data_shards.writer import sha256_file

    info = read_manifest(ds_dir)
    for split in info["splits"].values():
        if name in split["shards"]:
            split["sha256"][name] = sha256_file(Path(ds_dir) / name)
    write_manifest(ds_dir, info)


@pytest.fixture
def restamp():
    """``restamp(ds_dir, shard_name)``: give the manifest a damaged shard's sha256, so that reading gets past
    the verification against the manifest (as a remote shard does, data_shards/verify.py) to the readers'
    own checks of truncation and decoding."""
    return _restamp


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
