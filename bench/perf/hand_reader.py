"""The hand-written shard reader that data_shards.reader replaced (issue #16), kept only as the loader
benchmark's baseline: its own ustar/pax header parser, sample grouping, shard shuffle, sample shuffle and
batching, on the same decode, transforms and re-batching as the webdataset reader. Nothing else imports it.
"""
from __future__ import annotations

import random
import tarfile

import torch
import webdataset as wds

from data_shards.reader import ShardError, ShardLoader, _seed_of, decode_sample


def _read_exact(f, n: int) -> bytes:
    out = f.read(n)
    while len(out) < n:  # sockets and pipes may return short reads
        more = f.read(n - len(out))
        if not more:
            break
        out += more
    return out


def _tar_members(f):
    """(name, data) of the regular files of a tar stream; bad checksums and short reads raise."""
    pax = {}
    while True:
        hdr = _read_exact(f, 512)
        if len(hdr) == 0:
            return
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


def hand_iter_shard(loc: str, expected=None, limit=None):
    """Raw samples of one local shard, grouped by key by hand."""
    n, last = 0, None
    with open(loc, "rb") as f:
        try:
            cur = None
            for fname, data in _tar_members(f):
                d, _, base = fname.rpartition("/")
                stem, _, ext = base.partition(".")
                key = d + "/" + stem if d else stem
                if cur is not None and cur["__key__"] != key:
                    yield cur
                    n += 1
                    if limit is not None and n >= limit:
                        return
                    cur = None
                if cur is None:
                    cur = {"__key__": key}
                    last = key
                cur[ext.lower()] = data
            if cur is not None:
                yield cur
                n += 1
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            raise ShardError(f"corrupt or truncated shard {loc} (at sample key {last}): {e}") from e
    if expected is not None and n != expected and (limit is None or n < limit):
        raise ShardError(f"shard {loc} holds {n} samples where the manifest says {expected}")


class HandLoader(ShardLoader):
    """ShardLoader with the hand-written stages in place of webdataset's (local shards, no resampling)."""

    def pipeline(self, epoch: int) -> wds.DataPipeline:
        seed, tf, chunk, bufsize = self.seed, self.transform, self.batch_size, self.shuffle_buffer

        def shards():
            plan = list(self.plan)
            if self.train:
                random.Random(f"{seed}-{epoch}").shuffle(plan)
            yield from plan

        def read(src):
            for sh in src:
                for s in hand_iter_shard(sh["url"], sh["expected"], sh["limit"]):
                    yield sh["url"], s

        def shuffle(src):
            rank, _, worker, _ = wds.utils.pytorch_worker_info()
            rng, buf = random.Random(str((seed, epoch, rank, worker))), []
            for item in src:
                buf.append(item)
                if len(buf) >= bufsize:
                    k = rng.randrange(len(buf))
                    buf[k], buf[-1] = buf[-1], buf[k]
                    yield buf.pop()
            rng.shuffle(buf)
            yield from buf

        def decode(src):
            for url, s in src:
                aug = _seed_of((seed, epoch, s["__key__"], None)) if tf.random else None
                yield decode_sample(s, url, transform=tf, seed=aug, as_uint8=True)

        def batch(src):
            xs, ys = [], []
            for x, y in src:
                xs.append(x)
                ys.append(y)
                if len(xs) >= chunk:
                    yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)
                    xs, ys = [], []
            if xs:
                yield torch.stack(xs), torch.tensor(ys, dtype=torch.long)

        stages = [shards]
        if self.train:
            stages += [wds.split_by_node, wds.split_by_worker]
        stages.append(read)
        if self.train and bufsize > 1:
            stages.append(shuffle)
        return wds.DataPipeline(*stages, decode, batch)
