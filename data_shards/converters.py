"""Converters from publishers' on-disk layouts to shards: `bench shards make NAME --root DIR`.

Each converter lists (image reference, label) pairs per split; `build` encodes them shard by shard.
- Validation: 5% of train (seeded permutation, seed 0) becomes split `val` unless the source has one
  (folder trees with a `val/` folder); recorded in the manifest. Train order is shuffled (seed 0) so
  the "first n" of a split is a mix of classes.
- `--size S` resizes the shorter side to S (keep aspect); without it images are stored as published.
- Resume: each shard is written to a temporary name, renamed, and then recorded in `_progress/` with
  a hash of what it should contain; a rerun skips recorded shards whose file still matches. The manifest is
  written last; its presence means the data set is complete.
- Publisher formats: CIFAR's python batches are pickles (the publisher's format, read here with
  `pickle`); our shards hold only png/jpg/cls.
- Options: a converter may take named options (`Converter.options`, `bench shards make NAME --split ...`);
  the manifest's `source` records them, and a folder built with other options is refused, not reused.
- Caltech-256, `--split random` (default): the clutter class `257.clutter` is excluded (it is background, not
  an object category; the usual protocol classifies the 256 object classes). Per class, a seeded (seed 0)
  permutation gives min(150, n - ceil(0.2 n)) training images and the rest test: 150/class as in the usual
  protocol, while the few classes with fewer than ~190 images still keep 20% for testing.
- Caltech-256, `--split authors`: AutoLoRa's split (their transfer_datasets.py): all 257 folders (clutter
  included) listed in sorted order, each folder's .jpg files in file order, as one flat list; train is, for
  each class's first position s, the positions s .. s+149 of that flat list. A class with fewer than 150
  images therefore spills into the next class(es): their first images enter train again (under their own
  label), so train holds 257 x 150 entries with repeats, as the authors' Subset samples them. Test is every
  other image. The validation images (5% of train) leave train with all their copies.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

from .manifest import MANIFEST, write_manifest
from .writer import TAR_MTIME, encode_image, make_sample, sha256_file

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
VAL_FRACTION = 0.05
SEED = 0


@dataclass
class Source:
    classes: list
    splits: dict  # split -> list of (ref, label); ref: a file path (str) or a uint8 HxWx3 array
    meta: dict = field(default_factory=dict)
    image_format: str = "jpg"  # default when the user gives no --format
    fewshot: Optional[dict] = None


@dataclass
class Converter:
    name: str
    describe: str
    read: Optional[Callable]  # (root, **options) -> Source
    options: dict = field(default_factory=dict)  # option -> (choices, default)


CONVERTERS: dict = {}


def register(name: str, describe: str, options: Optional[dict] = None):
    def deco(fn):
        CONVERTERS[name] = Converter(name, describe, fn, dict(options or {}))
        return fn
    return deco


def _need(path: Path, what: str, name: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{name}: expected {path} ({what})")
    return path


def _images_in(d: Path):
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


# ---------------------------------------------------------------------------------------- sources
def _unpickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")  # the publisher's format (python pickles)


def _cifar_arrays(d: Path, files, label_key: bytes):
    xs, ys = [], []
    for fn in files:
        b = _unpickle(d / fn)
        xs.append(np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.extend(int(v) for v in b[label_key])
    x = np.concatenate(xs)
    return [(x[i], ys[i]) for i in range(len(ys))]


def _find(root: Path, sub: str, first: str, what: str, name: str) -> Path:
    """Accept either the parent folder or the data set's own folder as --root; check one telltale file."""
    if (root / sub).is_dir():
        root = root / sub
    elif not (root / first).exists():
        raise FileNotFoundError(f"{name}: expected {root / sub / first} ({what})")
    return root


@register("cifar10", "CIFAR-10, torchvision's cifar-10-batches-py (python batches)")
def read_cifar10(root: Path) -> Source:
    d = _find(root, "cifar-10-batches-py", "batches.meta", "torchvision's CIFAR-10 python batches", "cifar10")
    for f in ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        _need(d / f, "torchvision's CIFAR-10 python batches", "cifar10")
    classes = [c.decode() for c in _unpickle(d / "batches.meta")[b"label_names"]]
    return Source(classes, {"train": _cifar_arrays(d, [f"data_batch_{i}" for i in range(1, 6)], b"labels"),
                            "test": _cifar_arrays(d, ["test_batch"], b"labels")},
                  meta={"layout": "cifar-10-batches-py"}, image_format="png")


@register("cifar100", "CIFAR-100 (fine labels), torchvision's cifar-100-python")
def read_cifar100(root: Path) -> Source:
    d = _find(root, "cifar-100-python", "meta", "torchvision's CIFAR-100 python files", "cifar100")
    for f in ("meta", "train", "test"):
        _need(d / f, "torchvision's CIFAR-100 python files", "cifar100")
    classes = [c.decode() for c in _unpickle(d / "meta")[b"fine_label_names"]]
    return Source(classes, {"train": _cifar_arrays(d, ["train"], b"fine_labels"),
                            "test": _cifar_arrays(d, ["test"], b"fine_labels")},
                  meta={"layout": "cifar-100-python"}, image_format="png")


@register("dtd", "Describable Textures, partition 1 (train1+val1 -> train, test1 -> test)")
def read_dtd(root: Path) -> Source:
    d = _find(root, "dtd", "labels/train1.txt", "DTD's labels/{train,val,test}1.txt", "dtd")
    lab = d / "labels"
    files = {k: _need(lab / f"{k}1.txt", "DTD's labels/{train,val,test}1.txt", "dtd") for k in ("train", "val", "test")}
    img = _need(d / "images", "DTD's images/CLASS/*.jpg", "dtd")
    classes = sorted(p.name for p in img.iterdir() if p.is_dir())
    idx = {c: i for i, c in enumerate(classes)}

    def items(*keys):
        out = []
        for k in keys:
            for line in files[k].read_text().split():
                out.append((str(_need(img / line, "an image listed in " + files[k].name, "dtd")), idx[line.split("/")[0]]))
        return out
    return Source(classes, {"train": items("train", "val"), "test": items("test")}, meta={"partition": 1})


def _mat_strings(a) -> list:
    """Strings from a MATLAB cell array as scipy loads it (nested object arrays)."""
    out = []
    for v in np.asarray(a, dtype=object).ravel():
        while isinstance(v, np.ndarray):
            v = v.ravel()[0] if v.size else ""
        out.append(str(v))
    return out


@register("dogs", "Stanford Dogs: Images/ with train_list.mat / test_list.mat")
def read_dogs(root: Path) -> Source:
    from scipy.io import loadmat

    img = _need(root / "Images", "Stanford Dogs' Images/<wnid>-<breed>/*.jpg", "dogs")
    lists = {k: _need(root / f"{k}_list.mat" if (root / f"{k}_list.mat").exists() else root / "lists" / f"{k}_list.mat",
                      "Stanford Dogs' lists (train_list.mat, test_list.mat)", "dogs") for k in ("train", "test")}
    folders = sorted(p.name for p in img.iterdir() if p.is_dir())
    idx = {f: i for i, f in enumerate(folders)}
    splits = {}
    for k, p in lists.items():
        files = _mat_strings(loadmat(str(p))["file_list"])
        splits[k] = [(str(_need(img / f, "an image listed in " + p.name, "dogs")), idx[f.split("/")[0]]) for f in files]
    classes = [f.split("-", 1)[1] if "-" in f else f for f in folders]
    return Source(classes, splits, meta={"wnids": [f.split("-", 1)[0] for f in folders]})


@register("cub200", "CUB-200-2011: images.txt, train_test_split.txt, image_class_labels.txt")
def read_cub200(root: Path) -> Source:
    d = _find(root, "CUB_200_2011", "images.txt", "CUB_200_2011's metadata files", "cub200")
    what = "CUB_200_2011's metadata files"
    images = dict(l.split(maxsplit=1) for l in _need(d / "images.txt", what, "cub200").read_text().splitlines() if l.strip())
    is_train = dict(l.split() for l in _need(d / "train_test_split.txt", what, "cub200").read_text().splitlines() if l.strip())
    labels = dict(l.split() for l in _need(d / "image_class_labels.txt", what, "cub200").read_text().splitlines() if l.strip())
    cfile = d / "classes.txt"
    if cfile.exists():
        classes = [l.split(maxsplit=1)[1] for l in cfile.read_text().splitlines() if l.strip()]
    else:
        classes = [str(i) for i in range(1, max(int(v) for v in labels.values()) + 1)]
    splits = {"train": [], "test": []}
    for i in sorted(images, key=int):
        p = str(_need(d / "images" / images[i], "an image listed in images.txt", "cub200"))
        splits["train" if is_train[i] == "1" else "test"].append((p, int(labels[i]) - 1))
    return Source(classes, splits)


CALTECH_TRAIN_PER_CLASS = 150


@register("caltech256", "Caltech-256: 256_ObjectCategories; --split random: 150/class train (seed 0), clutter "
          "excluded (default); --split authors: AutoLoRa's first 150 per class in file order, 257 classes",
          options={"split": (("random", "authors"), "random")})
def read_caltech256(root: Path, split: str = "random") -> Source:
    d = root / "256_ObjectCategories" if (root / "256_ObjectCategories").is_dir() else root
    folders = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.endswith("clutter"))
    if not folders:
        where = d if d.name == "256_ObjectCategories" else d / "256_ObjectCategories"
        raise FileNotFoundError(f"caltech256: expected class folders like {where}/001.ak47")
    if split == "authors":
        return _caltech256_authors(d)
    rng = np.random.RandomState(SEED)
    splits = {"train": [], "test": []}
    for c, f in enumerate(folders):
        files = _images_in(f)
        perm = rng.permutation(len(files))
        ntr = min(150, len(files) - math.ceil(0.2 * len(files)))
        splits["train"] += [(str(files[j]), c) for j in perm[:ntr]]
        splits["test"] += [(str(files[j]), c) for j in sorted(perm[ntr:])]
    classes = [f.name.split(".", 1)[1] if "." in f.name else f.name for f in folders]
    return Source(classes, splits, meta={"split": "random", "clutter": "excluded", "train_per_class": 150})


def _caltech256_authors(d: Path) -> Source:
    """AutoLoRa's Caltech-256 split (see the module's docstring), index for index."""
    folders = sorted(p for p in d.iterdir() if p.is_dir())  # clutter included: 257 classes
    flat = [(str(f), c) for c, folder in enumerate(folders)
            for f in sorted(p for p in folder.iterdir() if p.is_file() and ".jpg" in p.name)]
    y = [c for _, c in flat]
    starts = [0] + [i for i in range(1, len(flat)) if y[i] == y[i - 1] + 1]
    train_idx = [i for s in starts for i in range(s, s + CALTECH_TRAIN_PER_CLASS)]
    if train_idx and train_idx[-1] >= len(flat):
        raise ValueError(f"caltech256 --split authors: the last class ({folders[-1].name}) has fewer than "
                         f"{CALTECH_TRAIN_PER_CLASS} images, so the authors' split reads past the end")
    test_idx = sorted(set(range(1, len(flat))) - set(train_idx))  # the authors' range starts at 1: 0 is train
    classes = [f.name.split(".", 1)[1] if "." in f.name else f.name for f in folders]
    meta = {"split": "authors", "clutter": "included", "train_per_class": CALTECH_TRAIN_PER_CLASS,
            "train_entries": len(train_idx), "train_unique": len(set(train_idx))}
    return Source(classes, {"train": [flat[i] for i in train_idx], "test": [flat[i] for i in test_idx]}, meta=meta)


@register("folder", "any class-per-folder tree, with train/[val/]test folders or without (20% test, seed 0)")
def read_folder(root: Path) -> Source:
    if not root.is_dir():
        raise FileNotFoundError(f"folder: expected a folder of class folders at {root}")
    split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise FileNotFoundError(f"folder: expected {root / 'train'} beside {', '.join(str(p) for p in split_dirs.values())}")
    if split_dirs:
        classes = sorted(p.name for p in split_dirs["train"].iterdir() if p.is_dir())
        idx = {c: i for i, c in enumerate(classes)}
        splits = {}
        for s, d in split_dirs.items():
            for cd in sorted(p for p in d.iterdir() if p.is_dir()):
                if cd.name not in idx:
                    raise ValueError(f"folder: class {cd.name} in {d} is not in {split_dirs['train']}")
                splits.setdefault(s, []).extend((str(f), idx[cd.name]) for f in _images_in(cd))
        meta = {"layout": "split folders"}
    else:
        cds = sorted(p for p in root.iterdir() if p.is_dir())
        if not cds:
            raise FileNotFoundError(f"folder: expected class folders (e.g. {root}/CLASS/IMAGE.jpg) under {root}")
        classes = [p.name for p in cds]
        rng = np.random.RandomState(SEED)
        splits = {"train": [], "test": []}
        for c, cd in enumerate(cds):
            files = _images_in(cd)
            perm = rng.permutation(len(files))
            nte = math.ceil(0.2 * len(files)) if len(files) > 1 else 0
            splits["test"] += [(str(files[j]), c) for j in sorted(perm[:nte])]
            splits["train"] += [(str(files[j]), c) for j in perm[nte:]]
        meta = {"layout": "class folders", "test": {"fraction": 0.2, "seed": SEED}}
    return Source(classes, splits, meta=meta)


CONVERTERS["digits"] = Converter("digits", "embedded default: scikit-learn digits at 32x32 (no --root)", None)


# ---------------------------------------------------------------------------------------- writing
def _load(ref, size: Optional[int]) -> Image.Image:
    if isinstance(ref, np.ndarray):
        im = Image.fromarray(ref, "RGB")
    else:
        with Image.open(ref) as f:
            im = f.convert("RGB")
    if size:
        s = size / min(im.width, im.height)
        if s != 1:
            im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BILINEAR)
    return im


def _plan_hash(items, size, fmt) -> str:
    h = hashlib.sha256(json.dumps([size, fmt]).encode())
    for ref, label in items:
        h.update((ref if isinstance(ref, str) else hashlib.sha256(ref.tobytes()).hexdigest()).encode())
        h.update(str(label).encode())
    return h.hexdigest()


def _write_shard(path: str, split: str, start: int, items, size, fmt) -> dict:
    """Encode and write one shard atomically; returns its progress record (minus the plan hash)."""
    import webdataset as wds

    tmp = path + ".tmp"
    sizes = set()
    with wds.TarWriter(tmp, encoder=False, mtime=TAR_MTIME) as sink:
        for k, (ref, label) in enumerate(items):
            try:
                im = _load(ref, size)
            except Exception as e:
                raise ValueError(f"cannot read image {ref if isinstance(ref, str) else '#%d' % (start + k)}: {e}") from e
            sizes.add((im.height, im.width))
            sink.write(make_sample(f"{split}_{start + k:08d}", im, label, fmt, encode_image(im, fmt)))
    os.replace(tmp, path)
    return {"sha256": sha256_file(path), "labels": [int(l) for _, l in items], "n": len(items),
            "sizes": sorted(sizes)}


def _with_val(source: Source):
    splits = dict(source.splits)
    rng = np.random.RandomState(SEED)
    train = [splits["train"][i] for i in rng.permutation(len(splits["train"]))]  # mixed classes in any prefix
    validation = {"from": "source", "fraction": None, "seed": None}
    if "val" not in splits:
        nval = max(1, round(VAL_FRACTION * len(train))) if len(train) > 1 else 0
        splits["val"], train = train[:nval], train[nval:]
        if any(isinstance(ref, str) for ref, _ in splits["val"]):
            # a source may list an image twice (Caltech-256's authors' split): one copy in val, none in train
            val, held = [], set()
            for ref, label in splits["val"]:
                if ref not in held:
                    val.append((ref, label))
                    held.add(ref)
            splits["val"] = val
            train = [(ref, label) for ref, label in train if ref not in held]
        validation = {"from": "train", "fraction": VAL_FRACTION, "seed": SEED}
    splits["train"] = train
    return splits, validation


def build(name: str, source: Source, out_dir: Path, size=None, workers: int = 2, image_format=None,
          maxcount: int = 1000, progress: bool = True) -> Path:
    from tqdm import tqdm

    fmt = image_format or source.image_format
    fmt = "jpg" if fmt in ("jpg", "jpeg") else "png"
    out_dir = Path(out_dir)
    prog = out_dir / "_progress"
    prog.mkdir(parents=True, exist_ok=True)
    splits, validation = _with_val(source)
    jobs = []  # (split, shard name, start, items, plan hash)
    for split, items in splits.items():
        for s in range(0, max(len(items), 1), maxcount):
            chunk = items[s:s + maxcount]
            if chunk:
                jobs.append((split, f"{split}-{s // maxcount:06d}.tar", s, chunk, _plan_hash(chunk, size, fmt)))
    records = {}
    todo = []
    for split, fname, start, chunk, ph in jobs:
        rp = prog / (fname + ".json")
        if rp.exists() and (out_dir / fname).exists():
            rec = json.loads(rp.read_text())
            if rec.get("plan") == ph and rec.get("sha256") == sha256_file(out_dir / fname):
                records[fname] = rec
                continue
        todo.append((split, fname, start, chunk, ph))
    bar = tqdm(total=sum(len(j[3]) for j in jobs), initial=sum(r["n"] for r in records.values()),
               desc=f"shards {name}", unit="img", disable=not progress)

    def done(fname, ph, rec):
        rec["plan"] = ph
        (prog / (fname + ".json")).write_text(json.dumps(rec))
        records[fname] = rec
        bar.update(rec["n"])

    if workers and workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(workers) as ex:
            futs = {ex.submit(_write_shard, str(out_dir / f), sp, st, ch, size, fmt): (f, ph)
                    for sp, f, st, ch, ph in todo}
            for fut in futs:  # in order; a failure stops here and leaves finished shards recorded
                f, ph = futs[fut]
                done(f, ph, fut.result())
    else:
        for sp, f, st, ch, ph in todo:
            done(f, ph, _write_shard(str(out_dir / f), sp, st, ch, size, fmt))
    bar.close()
    sizes = {tuple(s) for r in records.values() for s in r["sizes"]}
    info = {"name": name, "classes": [str(c) for c in source.classes], "num_classes": len(source.classes),
            "image_size": list(next(iter(sizes))) if len(sizes) == 1 else ([size, size] if size else None),
            "variable_size": len(sizes) > 1, "image_format": fmt, "splits": {},
            "validation": validation, "source": dict(source.meta, converter=name, shorter_side=size)}
    if source.fewshot:
        info["fewshot"] = source.fewshot
    for split in splits:
        names = [f for sp, f, *_ in jobs if sp == split]
        info["splits"][split] = {
            "num_samples": sum(records[f]["n"] for f in names), "shards": names,
            "shard_lengths": [records[f]["n"] for f in names],
            "sha256": {f: records[f]["sha256"] for f in names}, "labels": [records[f]["labels"] for f in names]}
    write_manifest(out_dir, info)
    shutil.rmtree(prog, ignore_errors=True)
    return out_dir


def convert(name: str, root=None, out_root=None, size=None, workers: int = 2, image_format=None,
            maxcount: int = 1000, progress: bool = True, options: Optional[dict] = None) -> Path:
    """Build shards for converter `name` into `out_root/name` (skipped when its manifest exists and was built
    with the same `options`, the converter's named choices such as caltech256's split)."""
    from .paths import default_root

    if name not in CONVERTERS:
        raise ValueError(f"unknown data set {name!r}; known: {', '.join(sorted(CONVERTERS))}")
    out_root = Path(out_root) if out_root is not None else default_root()
    conv = CONVERTERS[name]
    options = dict(options or {})
    for key, value in options.items():
        if key not in conv.options:
            raise ValueError(f"{name}: no option {key!r}; its options: {', '.join(conv.options) or 'none'}")
        if value not in conv.options[key][0]:
            raise ValueError(f"{name}: {key}={value!r}; valid: {', '.join(conv.options[key][0])}")
    options = {key: options.get(key, default) for key, (_, default) in conv.options.items()}
    if name == "digits":
        from .digits import make_digits

        return make_digits(out_root)
    if root is None:
        raise ValueError(f"{name}: pass --root, the folder holding the data set as its publisher ships it")
    out = out_root / name
    if (out / MANIFEST).is_file():
        built = json.loads((out / MANIFEST).read_text()).get("source", {})
        for key, value in options.items():
            was = built.get(key, conv.options[key][1])  # a manifest from before the option: its default
            if was != value:
                raise ValueError(f"{out} holds {name} built with {key}={was!r}, not {value!r}: "
                                 f"remove it or pass another --out")
        return out
    source = conv.read(Path(root).expanduser(), **options)
    return build(name, source, out, size=size, workers=workers, image_format=image_format, maxcount=maxcount,
                 progress=progress)
