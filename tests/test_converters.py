"""Converters on tiny fake copies in each publisher's layout; resume; streaming over HTTP (loopback)."""
import functools
import http.server
import json
import pickle
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards import converters
from data_shards.check import check_dataset
from data_shards.converters import convert
from data_shards.manifest import read_manifest
from data_shards.reader import load_split, make_loader

RNG = np.random.RandomState(0)


def _jpg(path: Path, hw=(20, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.randint(0, 255, (*hw, 3), dtype=np.uint8)).save(path)


def _labels(d, split="train"):
    return sum(read_manifest(d)["splits"][split]["labels"], [])


def _counts(d):
    return {k: v["num_samples"] for k, v in read_manifest(d)["splits"].items()}


def _pk(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


def test_cifar10(tmp_path):
    src = tmp_path / "src" / "cifar-10-batches-py"
    _pk(src / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)]})
    for i in range(1, 6):
        _pk(src / f"data_batch_{i}", {b"data": RNG.randint(0, 255, (8, 3072), dtype=np.uint8),
                                      b"labels": [(i + j) % 10 for j in range(8)]})
    test = RNG.randint(0, 255, (6, 3072), dtype=np.uint8)
    _pk(src / "test_batch", {b"data": test, b"labels": list(range(6))})
    d = convert("cifar10", root=tmp_path / "src", out_root=tmp_path / "out", workers=0, maxcount=16, progress=False)
    info = read_manifest(d)
    assert info["num_classes"] == 10 and info["image_size"] == [32, 32] and info["image_format"] == "png"
    assert _counts(d) == {"train": 38, "val": 2, "test": 6}
    assert info["validation"] == {"from": "train", "fraction": 0.05, "seed": 0}
    X, Y = load_split(d, "test")
    assert Y.tolist() == list(range(6))  # test order kept; pixels exact (png) in HWC->CHW
    assert torch.equal((X * 255).round().to(torch.uint8), torch.from_numpy(test.reshape(-1, 3, 32, 32)))
    assert sorted(_labels(d) + _labels(d, "val")) == sorted((i + j) % 10 for i in range(1, 6) for j in range(8))
    assert check_dataset(d) == []


def test_cifar100(tmp_path):
    src = tmp_path / "cifar-100-python"
    _pk(src / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)]})
    _pk(src / "train", {b"data": RNG.randint(0, 255, (40, 3072), dtype=np.uint8), b"fine_labels": list(range(40))})
    _pk(src / "test", {b"data": RNG.randint(0, 255, (5, 3072), dtype=np.uint8), b"fine_labels": [99] * 5})
    d = convert("cifar100", root=src, out_root=tmp_path / "out", workers=0, progress=False)
    assert read_manifest(d)["num_classes"] == 100 and _counts(d) == {"train": 38, "val": 2, "test": 5}
    assert _labels(d, "test") == [99] * 5


def test_dtd(tmp_path):
    root = tmp_path / "dtd"
    lines = {"train": [], "val": [], "test": []}
    for c in ("banded", "dotted", "zigzagged"):
        for j in range(6):
            f = f"{c}/{c}_{j:04d}.jpg"
            _jpg(root / "images" / f, hw=(20 + j, 24))
            lines[["train", "train", "val", "val", "test", "test"][j]].append(f)
    for k, v in lines.items():
        (root / "labels").mkdir(exist_ok=True)
        (root / "labels" / f"{k}1.txt").write_text("\n".join(v) + "\n")
    d = convert("dtd", root=tmp_path, out_root=tmp_path / "out", size=16, workers=0, progress=False)
    info = read_manifest(d)
    assert info["classes"] == ["banded", "dotted", "zigzagged"] and _counts(d) == {"train": 11, "val": 1, "test": 6}
    assert info["variable_size"] and info["image_size"] == [16, 16] and info["image_format"] == "jpg"
    assert sorted(_labels(d, "test")) == [0, 0, 1, 1, 2, 2]
    X, _ = load_split(d, "train", transform="none")  # shorter side 16, fitted to 16x16
    assert X.shape == (11, 3, 16, 16)
    X, _ = load_split(d, "train")  # auto: a set of varying sizes gets imagenet224, Resize(256) + CenterCrop(224)
    assert X.shape == (11, 3, 224, 224)


def test_dogs(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "dogs"
    files = {"train": [], "test": []}
    for c in ("n02085620-Chihuahua", "n02085782-Japanese_spaniel"):
        for j in range(5):
            f = f"{c}/{c.split('-')[0]}_{j}.jpg"
            _jpg(root / "Images" / f)
            files["train" if j < 3 else "test"].append(f)
    for k, v in files.items():
        savemat(str(root / f"{k}_list.mat"), {"file_list": np.array(v, dtype=object).reshape(-1, 1),
                                              "labels": np.array([[1]] * len(v))})
    d = convert("dogs", root=root, out_root=tmp_path / "out", workers=0, progress=False)
    info = read_manifest(d)
    assert info["classes"] == ["Chihuahua", "Japanese_spaniel"] and _counts(d) == {"train": 5, "val": 1, "test": 4}
    assert sorted(_labels(d, "test")) == [0, 0, 1, 1]


def test_cub200(tmp_path):
    root = tmp_path / "CUB_200_2011"
    imgs, split, labels, classes = [], [], [], []
    k = 0
    for c in range(3):
        classes.append(f"{c + 1} {c + 1:03d}.Bird_{c}")
        for j in range(4):
            k += 1
            f = f"{c + 1:03d}.Bird_{c}/b_{j}.jpg"
            _jpg(root / "images" / f)
            imgs.append(f"{k} {f}")
            split.append(f"{k} {int(j < 3)}")
            labels.append(f"{k} {c + 1}")
    for name, v in [("images.txt", imgs), ("train_test_split.txt", split), ("image_class_labels.txt", labels),
                    ("classes.txt", classes)]:
        (root / name).write_text("\n".join(v) + "\n")
    d = convert("cub200", root=tmp_path, out_root=tmp_path / "out", workers=0, progress=False)
    assert read_manifest(d)["classes"] == ["001.Bird_0", "002.Bird_1", "003.Bird_2"]
    assert _counts(d) == {"train": 8, "val": 1, "test": 3} and _labels(d, "test") == [0, 1, 2]


def test_caltech256_clutter_excluded(tmp_path, monkeypatch):
    root = tmp_path / "256_ObjectCategories"
    for c, n in [("001.ak47", 12), ("002.american-flag", 6), ("257.clutter", 5)]:
        for j in range(n):
            _jpg(root / c / f"{j:04d}.jpg")
    (root / "001.ak47" / "notes.txt").write_text("not an image")
    d = convert("caltech256", root=tmp_path, out_root=tmp_path / "out", workers=0, progress=False)
    info = read_manifest(d)
    assert info["classes"] == ["ak47", "american-flag"] and info["source"]["clutter"] == "excluded"
    assert info["source"]["split"] == "random"
    # per class: min(150, n - ceil(0.2 n)) train -> 9 and 4; test 3 and 2; 5% of 13 train -> 1 val
    assert _counts(d) == {"train": 12, "val": 1, "test": 5}


def _caltech_tree(root, counts):
    """Caltech-256's layout and file names (CCC_NNNN.jpg, numbered from 1), plus a file that is no image."""
    for c, (name, n) in enumerate(counts):
        for k in range(1, n + 1):
            _jpg(root / "256_ObjectCategories" / name / f"{c + 1:03d}_{k:04d}.jpg", hw=(10, 12))
    (root / "256_ObjectCategories" / counts[0][0] / "notes.txt").write_text("not an image")


CALTECH = [("001.ak47", 6), ("002.american-flag", 2), ("003.backpack", 3), ("257.clutter", 5)]


def test_caltech256_authors_split_spills_into_the_next_class(tmp_path, monkeypatch):
    monkeypatch.setattr(converters, "CALTECH_TRAIN_PER_CLASS", 4)  # the authors' 150 on a 16-image tree
    _caltech_tree(tmp_path, CALTECH)
    src = converters.read_caltech256(tmp_path, split="authors")
    assert src.classes == ["ak47", "american-flag", "backpack", "clutter"]  # clutter is a class
    files = [(f"{c + 1:03d}_{k:04d}.jpg", c) for c, (_, n) in enumerate(CALTECH) for k in range(1, n + 1)]
    # flat positions: ak47 0-5, flag 6-7, backpack 8-10, clutter 11-15; train = s..s+3 for s in 0, 6, 8, 11
    want_train = [0, 1, 2, 3, 6, 7, 8, 9, 8, 9, 10, 11, 11, 12, 13, 14]
    assert [(Path(r).name, l) for r, l in src.splits["train"]] == [files[i] for i in want_train]
    assert [(Path(r).name, l) for r, l in src.splits["test"]] == [files[i] for i in (4, 5, 15)]
    assert src.meta == {"split": "authors", "clutter": "included", "train_per_class": 4, "train_entries": 16,
                        "train_unique": 13}
    d = convert("caltech256", root=tmp_path, out_root=tmp_path / "out", workers=0, progress=False,
                options={"split": "authors"})
    info = read_manifest(d)
    assert info["num_classes"] == 4 and info["source"]["split"] == "authors"
    counts = _counts(d)
    assert counts["val"] == 1 and counts["test"] == 3 and counts["train"] in (14, 15)  # 16 - val and its copies
    train, val = load_split(d, "train")[0], load_split(d, "val")[0]
    assert not any(torch.equal(val[0], x) for x in train)  # no copy of a validation image is trained on
    assert len({x.numpy().tobytes() for x in train}) + 1 == 13  # every other image is trained on
    # a folder built with the other split is refused, not silently reused
    with pytest.raises(ValueError, match="built with split='authors', not 'random'"):
        convert("caltech256", root=tmp_path, out_root=tmp_path / "out", workers=0, progress=False)


@pytest.mark.parametrize("name,options,match", [
    ("caltech256", {"split": "bogus"}, r"^caltech256: split='bogus'; valid: random, authors$"),
    ("cub200", {"split": "authors"}, r"^cub200: no option 'split'; its options: none$"),
])
def test_converter_options_checked_first(tmp_path, name, options, match):
    with pytest.raises(ValueError, match=match):
        convert(name, root=tmp_path / "nowhere", out_root=tmp_path / "out", options=options)


def test_caltech256_authors_split_reading_past_the_end(tmp_path, monkeypatch):
    monkeypatch.setattr(converters, "CALTECH_TRAIN_PER_CLASS", 6)  # clutter (5 images) cannot give 6
    _caltech_tree(tmp_path, CALTECH)
    with pytest.raises(ValueError, match="last class .257.clutter. has fewer than 6 images"):
        converters.read_caltech256(tmp_path, split="authors")


def _folder_tree(root, splits=("train", "test")):
    for s in splits:
        for c in ("cat", "dog"):
            for j in range(5 if s == "train" else 2):
                _jpg(root / s / c / f"{j}.png")


def test_folder_with_and_without_split(tmp_path):
    _folder_tree(tmp_path / "a", ("train", "val", "test"))
    d = convert("folder", root=tmp_path / "a", out_root=tmp_path / "o1", workers=0, progress=False)
    assert _counts(d) == {"train": 10, "val": 4, "test": 4} and read_manifest(d)["validation"]["from"] == "source"
    for c, n in (("x", 10), ("y", 5)):
        for j in range(n):
            _jpg(tmp_path / "b" / c / f"{j}.jpg")
    d = convert("folder", root=tmp_path / "b", out_root=tmp_path / "o2", workers=0, progress=False)
    assert read_manifest(d)["classes"] == ["x", "y"] and _counts(d) == {"train": 11, "val": 1, "test": 3}
    d2 = convert("folder", root=tmp_path / "b", out_root=tmp_path / "o3", workers=0, progress=False)
    assert _labels(d, "val") == _labels(d2, "val") and _labels(d) == _labels(d2)  # seeded, reproducible


@pytest.mark.parametrize("name,expected", [("cifar10", "cifar-10-batches-py/batches.meta"),
                                           ("cifar100", "cifar-100-python/meta"),
                                           ("dtd", "dtd/labels/train1.txt"), ("dogs", "Images"),
                                           ("cub200", "CUB_200_2011/images.txt"), ("caltech256", "256_ObjectCategories")])
def test_missing_layout_one_line(tmp_path, name, expected):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError) as e:
        convert(name, root=tmp_path / "empty", out_root=tmp_path / "out", workers=0, progress=False)
    assert "\n" not in str(e.value) and expected in str(e.value) and "expected" in str(e.value)


def test_resume_after_interruption(tmp_path, monkeypatch):
    for c in range(3):
        for j in range(10):
            _jpg(tmp_path / "src" / f"k{c}" / f"{j}.jpg")
    real = converters._write_shard
    calls, interrupted = [], []

    def flaky(path, *a, **k):
        calls.append(Path(path).name)
        if len(calls) == 3 and not interrupted:
            interrupted.append(1)
            raise KeyboardInterrupt  # the user pressed ctrl-C during the third shard
        return real(path, *a, **k)

    monkeypatch.setattr(converters, "_write_shard", flaky)
    kw = dict(root=tmp_path / "src", out_root=tmp_path / "out", workers=0, maxcount=5, progress=False)
    with pytest.raises(KeyboardInterrupt):
        convert("folder", **kw)
    assert not (tmp_path / "out" / "folder" / "_info.json").exists()
    first = list(calls)
    calls.clear()
    d = convert("folder", **kw)
    assert first[:2] and not set(first[:2]) & set(calls)  # the two finished shards were not redone
    assert _counts(d) == {"train": 23, "val": 1, "test": 6} and check_dataset(d) == []
    assert not (d / "_progress").exists()


def test_parallel_workers_match_serial(tmp_path):
    for c in range(2):
        for j in range(12):
            _jpg(tmp_path / "src" / f"k{c}" / f"{j}.jpg")
    a = convert("folder", root=tmp_path / "src", out_root=tmp_path / "a", workers=2, maxcount=4, progress=False)
    b = convert("folder", root=tmp_path / "src", out_root=tmp_path / "b", workers=0, maxcount=4, progress=False)
    ia, ib = read_manifest(a), read_manifest(b)
    assert ia["splits"] == ib["splits"]  # byte-identical shards (fixed tar mtime): same checksums
    assert all(torch.equal(u, v) for u, v in zip(load_split(a, "train"), load_split(b, "train")))
    assert check_dataset(a) == []


@pytest.fixture
def http_root(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (free port) from a thread; shut down after the test."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(www)))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield www, f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def test_http_streaming(http_root):
    from data_shards.episodes import EpisodeSampler
    from data_shards.writer import write_dataset

    www, url = http_root
    items = [(np.full((8, 8, 3), i, np.uint8), i % 4) for i in range(60)]
    write_dataset(www / "tiny", "tiny", {"train": items, "test": items[:10]}, classes=list("abcd"), maxcount=16)
    base = f"{url}/tiny"
    L = make_loader(base, "train", 8, train=True, num_workers=2, seed=0)
    ids = sorted(int(round(float(x[0, 0, 0]) * 255)) for xb, _ in L for x in xb)
    assert ids == list(range(60)) and len(L) == 8
    X, Y = load_split(base, "test")
    assert Y.tolist() == [i % 4 for i in range(10)]
    # the same location as a template with {} for the file name (the form `pipe:` object stores use)
    X2, _ = load_split(f"{base}/{{}}", "test")
    assert torch.equal(X, X2)
    sx, sy, qx, qy = EpisodeSampler(base, "train", range(4), 3, 2, 2, seed=0).sample(0)
    assert len(sy) == 6 and len(qy) == 6
    with pytest.raises(Exception, match="404|Not Found"):
        load_split(f"{url}/nosuch", "test")


def test_pipe_template(tmp_path):
    from data_shards.writer import write_dataset

    items = [(np.full((8, 8, 3), i, np.uint8), i % 2) for i in range(10)]
    write_dataset(tmp_path / "p", "p", {"test": items}, classes=["a", "b"])
    X, Y = load_split(f"pipe:cat {tmp_path}/p/{{}}", "test")
    assert len(Y) == 10 and Y.tolist() == [i % 2 for i in range(10)]
