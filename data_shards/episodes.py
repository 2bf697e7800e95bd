"""Episodic (few-shot) sampling over webdataset shards, with random access by class.

The manifest's per-shard label lists give class -> (shard, position); `wids` (webdataset's indexed reader, its
own package) gives position -> sample from an index of each shard's tar headers. Remote shards are fetched
whole once (to a temporary file). Decoded samples are cached for splits up to `cache_max` samples (the
embedded digits: all of it).

Fixed episodes: `ways` classes drawn among `classes`, `shots` support and `queries` query images per
class, without overlap. Episode i depends only on (seed, i).

variable=True follows Meta-Dataset's variable-way variable-shot sampler (Triantafillou et al. 2020),
simplified: ways ~ U[min(5, n), min(50, n)] over the n usable classes; queries per class
q = min(10, floor(n_min / 2)) with n_min the smallest chosen class; support budget
|S| = min(500, sum_c ceil(beta * min(100, n_c - q))), beta ~ U(0, 1]; shots per class
k_c = min(floor(R_c / sum R * (|S| - ways)) + 1, n_c - q) with R_c = exp(U[log 0.5, log 2]).
`ways`, `shots`, `queries` are ignored in that mode.

Images go through `transform` (data_shards.transforms): its train transform with augment=True (training
episodes), its eval transform otherwise (validation and test episodes). The augmentation of an image is a
function of (seed, episode, position in the episode); the episode index carries the epoch.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from wids.wids import IndexedTarSamples

from .manifest import file_location, read_manifest
from .reader import ShardError, _reason, _remote, _seed_of, decode_sample
from .transforms import make_transform
from .verify import verify_split


class _Shards:
    """Random access to sample j of shard s: wids' IndexedTarSamples, an index of one shard's tar headers
    over an mmap of the file, so one sample costs two slices. Remote shards are fetched once through
    webdataset's gopen into an anonymous temporary file (wids' own ShardListDataset does not fit: it copies
    even local shards into a cache folder, runs `pipe:` URLs as download-to-file commands where ours stream
    to stdout, does not check sample counts, and decodes with default decoders that unpickle)."""

    def __init__(self, ds, info, split):
        s = info["splits"][split]
        self.ds, self.names, self.lengths = ds, s["shards"], s["shard_lengths"]
        self._open = {}

    def __getstate__(self):  # mmaps do not pickle: a copy reopens its shards
        return {**self.__dict__, "_open": {}}

    def _shard(self, s):
        if s not in self._open:
            loc = file_location(self.ds, self.names[s])
            try:
                if _remote(self.ds):
                    stream = tempfile.TemporaryFile()
                    with wds.gopen(loc, "rb") as f:
                        shutil.copyfileobj(f, stream)
                    stream.flush()
                    samples = IndexedTarSamples(stream=stream)
                else:
                    samples = IndexedTarSamples(path=loc)
            except Exception as e:
                raise ShardError(f"corrupt or truncated shard {loc}: {_reason(e)}") from e
            if len(samples) != self.lengths[s]:
                last = samples[len(samples) - 1]["__key__"] if len(samples) else None
                raise ShardError(f"shard {loc} holds {len(samples)} samples where the manifest says "
                                 f"{self.lengths[s]} (truncated?); last sample key {last}")
            self._open[s] = (loc, samples)
        return self._open[s]

    def read(self, s, j):
        loc, samples = self._shard(s)
        try:
            sample = samples[j]
        except Exception as e:
            raise ShardError(f"cannot read sample #{j} of shard {loc}: {_reason(e)}") from e
        # wids names files by their extension with its dot, as file objects
        raw = {"__key__": sample["__key__"]}
        raw.update({k.lstrip(".").lower(): v.getvalue() for k, v in sample.items() if k != "__key__"})
        return loc, raw


class EpisodeSampler:
    def __init__(self, ds_dir, split, classes, ways, shots, queries, seed=0, image_size=None, variable=False,
                 cache_max: int = 20000, transform: str = "auto", augment: bool = False):
        self.ds = ds_dir if isinstance(ds_dir, str) else str(ds_dir)
        self.info = read_manifest(self.ds)
        if split not in self.info["splits"]:
            raise KeyError(f"data set {self.info.get('name')} has no split {split!r}")
        self.split, self.ways, self.shots, self.queries = split, int(ways), int(shots), int(queries)
        self.seed, self.variable = int(seed), variable
        self.transform = make_transform(transform, self.info, image_size, train=augment)
        self.size = self.transform.size
        s = self.info["splits"][split]
        if "labels" not in s:
            raise ValueError(f"manifest of {self.ds} has no per-shard label index; rebuild the shards")
        self.pool: dict = {}  # class -> [(shard, position)]
        for si, labels in enumerate(s["labels"]):
            for j, c in enumerate(labels):
                self.pool.setdefault(int(c), []).append((si, j))
        need = 2 if variable else self.shots + self.queries
        wanted = [int(c) for c in classes]
        self.classes = [c for c in wanted if len(self.pool.get(c, [])) >= need]
        min_ways = min(5, len(self.classes)) if variable else self.ways
        if len(self.classes) < max(min_ways, 1 if variable else self.ways):
            raise ValueError(f"{split}: only {len(self.classes)} of classes {wanted} have >= {need} samples; "
                             f"an episode needs {self.ways} such classes")
        verify_split(self.ds, self.info, split)  # a changed byte (a label too) fails here, naming the shard
        self._index = _Shards(self.ds, self.info, split)
        self._cache = {} if s["num_samples"] <= cache_max else None

    def _get(self, ref, label, seed):
        # the cache keeps transformed images when the transform is fixed, encoded ones when it is random
        hit = self._cache.get(ref) if self._cache is not None else None
        if hit is not None and not self.transform.random:
            return hit
        loc, raw = hit if hit is not None else self._index.read(*ref)
        x, y = decode_sample(raw, loc, transform=self.transform, seed=seed)
        if y != label:
            raise ShardError(f"sample {raw['__key__']} in shard {loc} has label {y}, the manifest index says {label}")
        if self._cache is not None:
            self._cache[ref] = (loc, raw) if self.transform.random else x
        return x

    def _plan(self, rng):
        """[(class, n_support, n_query)] for one episode."""
        if not self.variable:
            chosen = rng.choice(self.classes, self.ways, replace=False)
            return [(int(c), self.shots, self.queries) for c in chosen]
        n = len(self.classes)
        ways = int(rng.integers(min(5, n), min(50, n) + 1))
        chosen = [int(c) for c in rng.choice(self.classes, ways, replace=False)]
        sizes = np.array([len(self.pool[c]) for c in chosen])
        q = max(1, min(10, int(sizes.min()) // 2))
        beta = 1.0 - rng.random()  # (0, 1]
        budget = min(500, int(sum(math.ceil(beta * min(100, n_c - q)) for n_c in sizes)))
        R = np.exp(rng.uniform(math.log(0.5), math.log(2.0), size=ways))
        shots = np.minimum(np.floor(R / R.sum() * max(budget - ways, 0)).astype(int) + 1, sizes - q)
        return [(c, int(k), q) for c, k in zip(chosen, shots)]

    def sample(self, i: int):
        """(support_x [S,3,H,W], support_y [S], query_x [Q,3,H,W], query_y [Q]); labels 0..ways-1."""
        rng = np.random.default_rng([self.seed, int(i)])
        sx, sy, qx, qy = [], [], [], []
        for new, (c, k, q) in enumerate(self._plan(rng)):
            picks = rng.choice(len(self.pool[c]), k + q, replace=False)  # disjoint support and query
            refs = [self.pool[c][p] for p in picks]
            seeds = [_seed_of((self.seed, int(i), len(sx) + len(qx) + n)) for n in range(k + q)]
            sx += [self._get(r, c, sd) for r, sd in zip(refs[:k], seeds[:k])]
            qx += [self._get(r, c, sd) for r, sd in zip(refs[k:], seeds[k:])]
            sy += [new] * k
            qy += [new] * q
        return (torch.stack(sx), torch.tensor(sy, dtype=torch.long), torch.stack(qx),
                torch.tensor(qy, dtype=torch.long))

    def episode_classes(self, i: int) -> list:
        """The original class ids of episode i, in relabelled order (for logging)."""
        return [c for c, _, _ in self._plan(np.random.default_rng([self.seed, int(i)]))]

    def episodes(self, n: int, start: int = 0) -> Iterator:
        for i in range(start, start + n):
            yield self.sample(i)
