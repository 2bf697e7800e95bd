"""Writer/reader round trip, worker split, corrupt shards, digits, check, CLI."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.check import check_dataset
from data_shards.manifest import MANIFEST, read_manifest
from data_shards.paths import dataset_dir, default_root
from data_shards.reader import ShardError, load_split, make_loader, num_samples
from data_shards.writer import write_dataset

N, C = 90, 3


def _img(i):
    # pixel (0,0) red channel encodes the sample index, so every sample can be identified after decoding
    a = np.full((12, 12, 3), 50, np.uint8)
    a[0, 0, 0] = i
    a[1:, :, 1] = (i * 7) % 256
    return a


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "tiny"
    write_dataset(d, "tiny", {"train": [(_img(i), i % C) for i in range(N)],
                              "test": [(_img(i), i % C) for i in range(20)]},
                  classes=["a", "b", "c"], maxcount=25)
    return d


def _ids(x):
    return [int(round(v * 255)) for v in x[:, 0, 0, 0].tolist()]


def test_manifest(tiny):
    info = read_manifest(tiny)
    s = info["splits"]["train"]
    assert info["num_classes"] == 3 and info["image_size"] == [12, 12] and info["image_format"] == "png"
    assert s["num_samples"] == N and s["shard_lengths"] == [25, 25, 25, 15]
    assert s["shards"] == [f"train-{i:06d}.tar" for i in range(4)] and set(s["sha256"]) == set(s["shards"])
    assert sum(s["labels"], []) == [i % C for i in range(N)]
    assert num_samples(tiny, "test") == 20
    assert dataset_dir(tiny) == tiny.resolve() and dataset_dir("tiny", root=tiny.parent) == tiny


def test_dataset_dir_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        dataset_dir("nope", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "no shards for data set 'nope'" in msg
    # a converter that exists: the name's own, else the class-folder one
    assert "no converter is named 'nope'" in msg
    assert f"python -m bench shards make folder --root DIR --out {tmp_path}" in msg
    assert f"then rename {tmp_path / 'folder'} to {tmp_path / 'nope'}" in msg
    with pytest.raises(FileNotFoundError, match=f"python -m bench shards make cifar10 --root DIR --out {tmp_path} "):
        dataset_dir("cifar10", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=f"python -m bench shards make digits --out {tmp_path}$"):
        dataset_dir("digits", root=tmp_path)


def test_default_root(monkeypatch, tmp_path):
    monkeypatch.setenv("BENCH_SHARDS", str(tmp_path))
    assert default_root() == tmp_path.resolve()
    monkeypatch.delenv("BENCH_SHARDS")
    assert default_root() == (Path.cwd() / "shards").resolve()


def test_round_trip_eval_order(tiny):
    X, Y = load_split(tiny, "train")
    assert X.dtype == torch.float32 and X.shape == (N, 3, 12, 12) and Y.dtype == torch.int64
    assert 0 <= X.min() and X.max() <= 1
    assert _ids(X) == list(range(N)) and Y.tolist() == [i % C for i in range(N)]
    X5, _ = load_split(tiny, "train", max_samples=30)
    assert _ids(X5) == list(range(30))
    L = make_loader(tiny, "train", 16)
    got = [(x, y) for x, y in L]
    assert len(got) == len(L) == 6 and all(len(y) == 16 for _, y in got[:-1])
    assert _ids(torch.cat([x for x, _ in got])) == list(range(N))
    assert torch.equal(torch.cat([x for x, _ in got]), X)  # streaming and eager decode agree exactly


def test_train_shuffles_and_covers(tiny):
    L = make_loader(tiny, "train", 10, train=True, shuffle_buffer=50, seed=3)
    e1 = sum((_ids(x) for x, _ in L), [])
    e2 = sum((_ids(x) for x, _ in L), [])
    assert sorted(e1) == sorted(e2) == list(range(N))
    assert e1 != list(range(N)) and e1 != e2  # shuffled, differently per epoch
    L2 = make_loader(tiny, "train", 10, train=True, shuffle_buffer=50, seed=3)
    assert sum((_ids(x) for x, _ in L2), []) == e1  # reproducible from the seed


def test_two_workers_each_sample_once(tiny):
    L = make_loader(tiny, "train", 8, train=True, num_workers=2, seed=1)
    for _ in range(2):
        ids, labels = [], []
        for x, y in L:
            ids += _ids(x)
            labels += y.tolist()
        assert sorted(ids) == list(range(N))
        assert all(l == i % C for i, l in zip(ids, labels))
    assert len(L) == 12


def test_max_samples_augment_resize_drop_last(tiny):
    L = make_loader(tiny, "train", 8, train=True, augment=True, max_samples=40, image_size=24, drop_last=True)
    batches = list(L)
    assert len(batches) == len(L) == 5 and all(x.shape == (8, 3, 24, 24) for x, _ in batches)


def test_resampled(tiny):
    L = make_loader(tiny, "train", 10, train=True, resampled=True, epoch_len=35, num_workers=2)
    n = sum(len(y) for _, y in L)
    assert n == 35 and len(L) == 4
    with pytest.raises(ValueError):
        make_loader(tiny, "train", 10, train=True, resampled=True)


def _copy(tiny, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(tiny, d)
    return d


def _label_member(shard, nth=0):
    """(offset, byte) of the label digit of the nth sample of a shard (its .cls member's data)."""
    import tarfile

    with tarfile.open(shard) as tf:
        member = [m for m in tf.getmembers() if m.name.endswith(".cls")][nth]
        return member.offset_data, tf.extractfile(member).read()[:1]


def _change_label(shard, nth=0):
    """Change the first digit of sample nth's label to another digit: the tar stays valid and decodes."""
    offset, digit = _label_member(shard, nth)
    b = bytearray(shard.read_bytes())
    b[offset] = ord("1") if digit != b"1" else ord("2")
    shard.write_bytes(bytes(b))


def test_changed_label_byte_fails_before_reading_naming_the_shard(tiny, tmp_path):
    """A label changed in place keeps the tar valid, so only the manifest's sha256 can tell: every reader
    (streaming, eager, episodic) refuses the shard in one line that names it."""
    from data_shards.episodes import EpisodeSampler

    d = _copy(tiny, tmp_path)
    assert len(load_split(d, "train")[1]) == N  # fine before (and now stamped as verified)
    p = d / "train-000001.tar"
    _change_label(p, 3)
    for read in (lambda: load_split(d, "train"), lambda: list(make_loader(d, "train", 8, train=True)),
                 lambda: EpisodeSampler(d, "train", [0, 1, 2], ways=2, shots=1, queries=1)):
        with pytest.raises(ShardError) as e:
            read()
        msg = str(e.value)
        assert "\n" not in msg and f"shard {p} differs from its manifest" in msg
    assert load_split(d, "test")[0].shape[0] == 20  # the other split's shards are fine and still read


def test_verified_shards_are_stamped_and_not_hashed_again(tiny, tmp_path, monkeypatch):
    import data_shards.verify as verify

    d = _copy(tiny, tmp_path)
    monkeypatch.setattr(verify, "_VERIFIED", {})
    hashed = []
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    load_split(d, "test")
    assert hashed == ["test-000000.tar"]
    load_split(d, "test")  # the same process: remembered
    monkeypatch.setattr(verify, "_VERIFIED", {})  # a new process: the stamp beside the shards
    load_split(d, "test")
    assert hashed == ["test-000000.tar"]
    stamp = json.loads((d / verify.STAMP).read_text())["test-000000.tar"]
    assert stamp[2] == read_manifest(d)["splits"]["test"]["sha256"]["test-000000.tar"]
    _change_label(d / "test-000000.tar")  # new mtime: hashed again, and refused
    monkeypatch.setattr(verify, "_VERIFIED", {})
    with pytest.raises(ShardError, match="test-000000.tar differs from its manifest"):
        load_split(d, "test")
    assert hashed == ["test-000000.tar"] * 2


def test_truncated_shard_names_shard_and_key(tiny, tmp_path, restamp):
    d = _copy(tiny, tmp_path)
    p = d / "train-000001.tar"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2 + 100])  # cut inside a member
    with pytest.raises(ShardError, match="train-000001.tar differs from its manifest"):
        load_split(d, "train")
    restamp(d, "train-000001.tar")
    with pytest.raises(ShardError) as e:
        load_split(d, "train")
    assert "train-000001.tar" in str(e.value) and "train_000" in str(e.value)
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(make_loader(d, "train", 8, train=True, num_workers=0))
    assert any("train-000001.tar" in p for p in check_dataset(d))


def test_truncated_at_member_boundary(tiny, tmp_path, restamp):
    import tarfile

    d = _copy(tiny, tmp_path)
    p = d / "train-000000.tar"
    with tarfile.open(p) as tf:
        members = tf.getmembers()
    cut = members[10].offset  # a clean cut: tarfile sees a shorter archive
    p.write_bytes(p.read_bytes()[:cut])
    restamp(d, "train-000000.tar")
    with pytest.raises(ShardError, match=r"train-000000.tar.*manifest says 25"):
        load_split(d, "train")


def test_undecodable_and_foreign_keys(tmp_path, restamp):
    import webdataset as wds

    d = tmp_path / "bad"
    write_dataset(d, "bad", {"test": [(_img(i), 0) for i in range(3)]}, classes=["a"])
    with wds.TarWriter(str(d / "test-000000.tar"), encoder=False) as w:
        w.write({"__key__": "s0", "png": b"not a png", "cls": b"0"})
    restamp(d, "test-000000.tar")
    with pytest.raises(ShardError, match=r"s0.*test-000000.tar|test-000000.tar.*s0"):
        load_split(d, "test")
    with wds.TarWriter(str(d / "test-000000.tar"), encoder=False) as w:
        w.write({"__key__": "s1", "pyd": b"\x80\x04K\x01.", "cls": b"0"})
    restamp(d, "test-000000.tar")
    with pytest.raises(ShardError, match="never pickle"):
        load_split(d, "test")


def test_check_detects_tampering(tiny, tmp_path):
    assert check_dataset(tiny) == []
    d = _copy(tiny, tmp_path)
    p = d / "test-000000.tar"
    b = bytearray(p.read_bytes())
    b[700] ^= 0xFF
    p.write_bytes(bytes(b))
    probs = check_dataset(d)
    assert len(probs) == 1 and "sha256 mismatch" in probs[0] and "test-000000.tar" in probs[0]
    (d / "train-000002.tar").unlink()
    assert any("missing shard" in p for p in check_dataset(d))


def test_digits(tmp_path):
    from data_shards.digits import make_digits

    d = make_digits(tmp_path)
    info = read_manifest(d)
    sp = info["splits"]
    assert info["num_classes"] == 10 and info["image_size"] == [32, 32]
    assert sum(s["num_samples"] for s in sp.values()) == 1797
    ntr, nval = sp["train"]["num_samples"], sp["val"]["num_samples"]
    assert abs(nval / (ntr + nval) - 0.05) < 0.005 and sp["test"]["num_samples"] == 360
    assert info["validation"] == {"from": "train", "fraction": 0.05, "seed": 0}
    assert info["fewshot"] == {"base_classes": [0, 1, 2, 3, 4], "novel_classes": [5, 6, 7, 8, 9]}
    idx = info["source"]["source_index"]
    assert not set(idx["train"]) & set(idx["val"]) and not set(idx["test"]) & (set(idx["train"]) | set(idx["val"]))
    assert check_dataset(d) == []
    X, Y = load_split(d, "val")
    assert X.shape == (nval, 3, 32, 32) and set(Y.tolist()) == set(range(10))
    mtime = (d / MANIFEST).stat().st_mtime_ns
    assert make_digits(tmp_path) == d and (d / MANIFEST).stat().st_mtime_ns == mtime  # idempotent


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-c", "import sys; from bench.cli import main; sys.exit(main(sys.argv[1:]))",
                           *args], capture_output=True, text=True, cwd=cwd)


def test_cli(tmp_path, tiny):
    import argparse

    from bench.cli import shards as shards_cli

    p = argparse.ArgumentParser()
    shards_cli.add_parser(p.add_subparsers(dest="command"))
    a = p.parse_args(["shards", "check", str(tiny)])
    assert a.func(a) == 0
    a = p.parse_args(["shards", "make", "nosuch", "--out", str(tmp_path)])
    assert a.func(a) == 2
    a = p.parse_args(["shards", "make", "cifar10", "--root", str(tmp_path / "missing"), "--out", str(tmp_path)])
    assert a.func(a) == 2
    a = p.parse_args(["shards", "list"])
    assert a.func(a) == 0


def test_bench_run_on_changed_label_is_one_line_error_with_result(shards_root, tmp_path):
    """As a new user meets it: `bench run` over a train shard with one label changed (a valid tar that would
    train silently) names the shard in its last stderr line, prints no traceback, exits non-zero and leaves
    a result.json whose status is error."""
    import os
    import shutil

    root = tmp_path / "shards"
    shutil.copytree(shards_root / "digits", root / "digits")
    shard = root / "digits" / "train-000000.tar"
    _change_label(shard, 12)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT", "BENCH_DEBUG")}
    p = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "rft", "--dataset", "digits",
                        "--backbone", "tiny_cnn", "--set", "epochs=1", "--set", "max_train_samples=64",
                        "--no-progress", "--out", str(out), "--data-root", str(root)],
                       env=dict(env, PYTHONPATH=str(Path(__file__).resolve().parents[1])), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode != 0
    last = p.stderr.strip().splitlines()[-1]
    assert f"shard {shard} differs from its manifest" in last, p.stderr[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "error" and str(shard) in result["error"]
