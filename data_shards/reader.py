"""Streaming readers over webdataset shards.

We decode only `png`/`jpg`/`cls`, by hand: webdataset's default decoders would unpickle `.pyd`/`.pickle`
keys, so any other key is an error. Images go through a named transform (data_shards.transforms: train
or eval, chosen per loader) and become float32 CHW tensors in [0, 1]; normalisation belongs to the model so
that attacks work in pixel space. Training streams shuffle encoded samples and decode after the shuffle.

Locations (`ds_dir`): a local folder, an `http(s)://` base URL (manifest and shards fetched from
`BASE/_info.json`, `BASE/{shard}`), or a template containing `{}` replaced by the file name, for example
`pipe:aws s3 cp s3://bucket/digits/{} -` for object stores.

Multi-node: with train=True shards are split by node (torch.distributed rank or RANK/WORLD_SIZE) then by
DataLoader worker, so one epoch sees each sample once across all of them (needs >= nodes*workers shards to
keep everyone busy). With `resampled=True` every node/worker draws shards with replacement from its own
seeded stream and an epoch is a fixed `epoch_len` samples per node: no shard count constraint.
"""
from __future__ import annotations

import hashlib
import io
import math
import random
import tarfile
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

import torch
from PIL import Image

from .manifest import file_location, read_manifest
from .transforms import fit as _fit
from .transforms import make_transform, pil_to_uint8

ALLOWED_KEYS = {"__key__", "png", "jpg", "jpeg", "cls"}


def _remote(loc) -> bool:
    return isinstance(loc, str) and (loc.startswith(("http://", "https://", "pipe:")) or "{}" in loc)


def _seed_of(key) -> int:
    # hash() of a str differs between processes (PYTHONHASHSEED); sha256 does not
    return int(hashlib.sha256(str(key).encode()).hexdigest()[:15], 16)


class ShardError(RuntimeError):
    """A shard or a sample in it cannot be read; the message names the shard and the sample key."""


def open_location(loc: str):
    if loc.startswith(("http://", "https://")):
        return urllib.request.urlopen(loc, timeout=60)
    if loc.startswith("pipe:"):
        import webdataset as wds

        return wds.gopen(loc, "rb")
    return open(loc, "rb")


def _split_name(fname: str):
    # webdataset convention: key = path up to the first dot of the base name
    d, _, base = fname.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (d + "/" + stem if d else stem), ext.lower()


def _read_exact(f, n: int) -> bytes:
    out = f.read(n)
    while len(out) < n:  # sockets and pipes may return short reads
        more = f.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _tar_members(f):
    """(name, data) of the regular files of a tar stream. A small ustar/pax reader: Python's tarfile spends
    more time parsing headers than PIL spends decoding 32x32 PNGs. Bad checksums and short reads raise."""
    pax = {}
    while True:
        hdr = _read_exact(f, 512)
        if len(hdr) == 0:
            return  # end of stream without the end-of-archive blocks: the count check catches truncation
        if len(hdr) < 512:
            raise EOFError("unexpected end of data in a tar header")
        if hdr == b"\0" * 512:
            return
        chk = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        if chk != sum(hdr) - sum(hdr[148:156]) + 256:
            raise tarfile.HeaderError("bad tar header checksum")
        size_field = hdr[124:136]
        size = (int.from_bytes(size_field[1:], "big") if size_field[0] & 0x80
                else int(size_field.split(b"\0", 1)[0].strip() or b"0", 8))
        typ = hdr[156:157]
        name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8")
        if hdr[257:262] == b"ustar" and hdr[345:500].strip(b"\0"):
            name = hdr[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        if "size" in pax:
            size = int(pax["size"])
        if "path" in pax:
            name = pax["path"]
        data = _read_exact(f, size)
        if len(data) < size:
            raise EOFError(f"unexpected end of data in member {name}")
        pad = (-size) % 512
        if pad and len(_read_exact(f, pad)) < pad:
            raise EOFError(f"unexpected end of data after member {name}")
        if typ in (b"x", b"g"):  # pax extended header for the next member
            pax = {}
            for rec in data.decode("utf-8").split("\n"):
                if " " in rec and "=" in rec:
                    k, v = rec.split(" ", 1)[1].split("=", 1)
                    pax[k] = v
            continue
        pax = {}
        if typ in (b"0", b"\0", b"7"):
            yield name, data


def iter_shard(loc: str, expected: Optional[int] = None, limit: Optional[int] = None) -> Iterator[dict]:
    """Raw samples (dicts of bytes) of one shard, in order. Stops after `limit` samples.

    A truncated shard is caught two ways: read errors mid-member, and a sample count that differs from
    the manifest's `expected` (a cut exactly at a member boundary reads as a clean, shorter tar).
    """
    last = None
    n = 0
    try:
        f = open_location(loc)
    except Exception as e:
        raise ShardError(f"cannot open shard {loc}: {e}") from e
    try:
        cur = None
        for fname, data in _tar_members(f):
            key, ext = _split_name(fname)
            if cur is not None and cur["__key__"] != key:
                yield cur
                n += 1
                if limit is not None and n >= limit:
                    return
                cur = None
            if cur is None:
                cur = {"__key__": key}
                last = key
            if ext in cur:
                raise ValueError(f"duplicate file {fname}")
            cur[ext] = data
        if cur is not None:
            yield cur
            n += 1
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
        raise ShardError(f"corrupt or truncated shard {loc} (at sample key {last}): {e}") from e
    finally:
        f.close()
    if expected is not None and n != expected and (limit is None or n < limit):
        raise ShardError(f"shard {loc} holds {n} samples where the manifest says {expected} "
                         f"(truncated?); last sample key {last}")


def decode_sample(sample: dict, loc: str, size=None, as_uint8: bool = False, transform=None, seed=None):
    """(float32 CHW tensor in [0,1], int label) from a raw sample; errors name the shard and the key.

    as_uint8=True returns the uint8 CHW tensor instead (the streaming pipeline converts whole batches).
    `transform` (data_shards.transforms.ImageTransform) replaces fitting to `size`; a random one draws
    from `seed`."""
    key = sample.get("__key__")
    bad = set(sample) - ALLOWED_KEYS
    if bad:
        raise ShardError(f"sample {key} in shard {loc} has keys {sorted(bad)}: only png/jpg/cls are decoded "
                         f"(never pickle)")
    try:
        data = sample.get("png") or sample.get("jpg") or sample.get("jpeg")
        if data is None:
            raise ValueError("no png/jpg image")
        im = Image.open(io.BytesIO(data))
        im.load()
        if im.mode != "RGB":
            im = im.convert("RGB")
        if transform is not None:
            x = transform(im, seed)
        else:
            if size is not None:
                im = _fit(im, size)
            x = pil_to_uint8(im)
        if not as_uint8:
            x = x.float().div_(255.0)
        y = int(sample["cls"].decode("ascii"))
    except Exception as e:
        raise ShardError(f"cannot decode sample {key} in shard {loc}: {e}") from e
    return x, y


def _shard_plan(ds, info: dict, split: str, max_samples: Optional[int]):
    """[{url, expected, limit}] in order; with max_samples only the first max_samples samples (a fixed subset)."""
    if split not in info["splits"]:
        raise KeyError(f"data set {info.get('name')} has no split {split!r}; it has {sorted(info['splits'])}")
    s = info["splits"][split]
    plan, left = [], (max_samples if max_samples is not None else math.inf)
    for name, n in zip(s["shards"], s["shard_lengths"]):
        if left <= 0:
            break
        take = n if left >= n else int(left)
        plan.append({"url": file_location(ds, name), "expected": n, "limit": None if take == n else take})
        left -= take
    return plan


def num_samples(ds_dir, split: str) -> int:
    return int(read_manifest(ds_dir)["splits"][split]["num_samples"])


def load_split(ds_dir, split: str, max_samples: Optional[int] = None, image_size=None, transform: str = "auto"):
    """The first N samples in shard order, eagerly, through the eval transform `transform`
    (data_shards.transforms): (X float [N,3,H,W], Y long [N])."""
    info = read_manifest(ds_dir)
    tf = make_transform(transform, info, image_size, train=False)
    size = tf.size
    xs, ys = [], []
    for sh in _shard_plan(ds_dir, info, split, max_samples):
        for s in iter_shard(sh["url"], sh["expected"], sh["limit"]):
            x, y = decode_sample(s, sh["url"], transform=tf)
            xs.append(x)
            ys.append(y)
    if not xs:
        return torch.zeros(0, 3, *size), torch.zeros(0, dtype=torch.long)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


class _Pipeline:
    """Per-epoch stages (plain generator functions) composed with webdataset's DataPipeline."""

    def __init__(self, ds, plan, transform, train, augment, shuffle_buffer, seed, epoch, resampled, chunk):
        self.ds, self.plan, self.transform, self.train, self.augment = ds, plan, transform, train, augment
        self.shuffle_buffer, self.seed, self.epoch, self.resampled, self.chunk = (
            shuffle_buffer, seed, epoch, resampled, chunk)

    def _rng_key(self):
        import webdataset as wds

        rank, _, worker, _ = wds.utils.pytorch_worker_info()
        return (self.seed, self.epoch, rank, worker)

    def shards(self):
        plan = list(self.plan)
        if self.resampled:
            # infinite, with replacement, its own stream per node and worker; the loader cuts at epoch_len
            rng = random.Random(str(self._rng_key()))
            draw = 0
            while True:
                # the draw names this visit of the shard in the samples' augmentation seeds
                yield dict(rng.choice(plan), draw=(*self._rng_key()[2:], draw))
                draw += 1
        if self.train:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(plan)  # same order on every node/worker
        yield from plan

    def read(self, src):
        for sh in src:
            for s in iter_shard(sh["url"], sh["expected"], sh["limit"]):
                yield sh["url"], sh.get("draw"), s

    def decode(self, src):
        """Decode and transform after the shuffle: the buffer holds encoded images, small whatever their size."""
        tf = self.transform
        for url, draw, s in src:
            # augmentation is a function of (seed, epoch, sample), whatever the worker and node layout
            seed = _seed_of((self.seed, self.epoch, s.get("__key__"), draw)) if tf.random else None
            # uint8 until the final batch: 4x less memory between processes
            yield decode_sample(s, url, transform=tf, seed=seed, as_uint8=True)

    def shuffle(self, src):
        rng = random.Random(str(self._rng_key()))
        buf = []
        for item in src:
            buf.append(item)
            if len(buf) >= self.shuffle_buffer:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def batch(self, src):
        xs, ys = [], []
        for x, y in src:
            xs.append(x)
            ys.append(y)
            if len(xs) >= self.chunk:
                yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)
                xs, ys = [], []
        if xs:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)

    def build(self):
        import webdataset as wds

        stages = [self.shards]
        if self.train and not self.resampled:
            stages += [wds.split_by_node, wds.split_by_worker]
        stages.append(self.read)
        if self.train and self.shuffle_buffer > 1:
            stages.append(self.shuffle)
        stages += [self.decode, self.batch]
        return wds.DataPipeline(*stages)


class ShardLoader:
    """Re-iterable: each `iter()` is one epoch of (x float32 [B,3,H,W], y int64 [B]); len() = batches.

    Images go through `transform` (data_shards.transforms): its train transform with augment=True, its
    eval transform otherwise."""

    def __init__(self, ds_dir, split, batch_size, *, train=False, augment=False, image_size=None,
                 shuffle_buffer=2000, max_samples=None, num_workers=0, seed=0, resampled=False,
                 epoch_len=None, drop_last=False, transform="auto"):
        self.ds = ds_dir if _remote(ds_dir) else str(Path(ds_dir))
        self.info = read_manifest(self.ds)
        self.split, self.batch_size = split, int(batch_size)
        self.train, self.augment = train, augment
        self.transform = make_transform(transform, self.info, image_size, train=augment)
        self.size = self.transform.size
        self.shuffle_buffer, self.num_workers, self.seed = shuffle_buffer, num_workers, seed
        self.resampled, self.drop_last = resampled, drop_last
        self.plan = _shard_plan(self.ds, self.info, split, max_samples)
        total = sum(p["limit"] if p["limit"] is not None else p["expected"] for p in self.plan)
        if resampled:
            if not epoch_len:
                raise ValueError("resampled=True needs epoch_len (samples per epoch per node)")
            total = int(epoch_len)
        elif train:
            import webdataset as wds

            rank, world, _, _ = wds.utils.pytorch_worker_info()
            if world > 1:  # split by node: this node sees its share of the shards (shuffled: about that many)
                total = sum(p["limit"] or p["expected"] for p in self.plan[rank::world])
        self.samples_per_epoch = total
        self.epoch = 0

    def __len__(self):
        n = self.samples_per_epoch
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _batches(self, pipe):
        if self.num_workers > 0:
            return iter(torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.num_workers,
                                                    persistent_workers=False))
        return iter(pipe)

    def __iter__(self):
        pipe = _Pipeline(self.ds, self.plan, self.transform, self.train, self.augment, self.shuffle_buffer,
                         self.seed, self.epoch, self.resampled, chunk=self.batch_size).build()
        self.epoch += 1  # a different shuffle next epoch, reproducible from (seed, epoch)
        left = self.samples_per_epoch
        # workers hand over partial chunks at shard ends; re-batch here so every batch but the last is full
        bx, by, have = [], [], 0
        for x, y in self._batches(pipe):
            if left <= 0:
                break
            if len(y) > left:
                x, y = x[:left], y[:left]
            left -= len(y)
            if have == 0 and len(y) == self.batch_size:  # the common case: no copy
                yield x.float().div_(255.0), y
                continue
            bx.append(x)
            by.append(y)
            have += len(y)
            while have >= self.batch_size:
                X, Y = torch.cat(bx), torch.cat(by)
                yield X[:self.batch_size].float().div_(255.0), Y[:self.batch_size]
                bx, by, have = [X[self.batch_size:]], [Y[self.batch_size:]], have - self.batch_size
        if have and not self.drop_last:
            yield torch.cat(bx).float().div_(255.0), torch.cat(by)


def make_loader(ds_dir, split, batch_size, *, train=False, augment=False, image_size=None, shuffle_buffer=2000,
                max_samples=None, num_workers=0, seed=0, resampled=False, epoch_len=None, drop_last=False,
                transform="auto"):
    """See ShardLoader; train=False reads in deterministic shard order (so 'first n' is well defined)."""
    return ShardLoader(ds_dir, split, batch_size, train=train, augment=augment, image_size=image_size,
                       shuffle_buffer=shuffle_buffer, max_samples=max_samples, num_workers=num_workers,
                       seed=seed, resampled=resampled, epoch_len=epoch_len, drop_last=drop_last,
                       transform=transform)
