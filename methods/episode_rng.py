"""Per-episode randomness of test-time procedures: AMT's merge scoring (its DiffAugment draw) and randomised
singular-value trimming (``torch.svd_lowrank``), PMF's test-time fine-tuning (its DiffAugment draws).

An episode's draws are a function of (the setting's seed, the episode's key, the stream): two episodes get
different draws, and a rerun of one episode repeats its draws exactly, whatever ran before it. The key is
what ``episode_classifier(..., episode=...)`` receives; bench's few-shot evaluation passes
``(sampler seed, episode index)``, so the validation episodes (sampler seed 1234) and the test episodes
(seed + 10000) of the same index do not share draws. Streams keep the procedures of one episode apart
(the merge's augmentation never replays the fine-tuning's).

Mixing: ``numpy.random.SeedSequence(entropy, spawn_key=(stream,))`` over the uint64 words
``[seed, len(key), *key]`` (integers modulo 2**64), 64 bits of its state shifted to 63 (a seed every torch
generator takes). Unlike ``seed * C + episode`` it has no linear collisions (seed 0 episode C vs seed 1
episode 0) and gives unrelated streams for neighbouring keys. The length word and the fixed 64-bit width
matter: SeedSequence pads its entropy with zeros and splits big integers into 32-bit words, so the plain
lists [s] and [s, 0], or [s, 2**32] and [s, 0, 1], mix to the same state.

Without a key (``episode=None``: a caller that does not number its episodes) each stream has one generator,
seeded from (seed, stream) when the method is built, that advances from call to call, as the authors'
global generator does (their code seeds once, then draws for every episode): episodes still differ, but an
episode's draws depend on the episodes evaluated before it in the same process.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence, Union

import numpy as np
import torch

EpisodeKey = Union[int, Sequence[int]]

# streams of one episode's randomness
MERGE_AUGMENT = 0  # AMT: the DiffAugment draw every member is scored on
MERGE_TRIM = 1  # AMT: torch.svd_lowrank's random projections (trim_svd: lowrank)
FINETUNE = 2  # PMF / AMT-FT: the DiffAugment draws of the test-time fine-tuning steps


def episode_seed(seed: int, episode: EpisodeKey, stream: int = 0) -> int:
    """A 63-bit seed from (``seed``, the episode key ``episode``: an int or a sequence of ints, ``stream``)."""
    key = [episode] if np.ndim(episode) == 0 else list(episode)
    entropy = np.array([int(v) % 2**64 for v in (seed, len(key), *key)], dtype=np.uint64)
    state = np.random.SeedSequence(entropy, spawn_key=(int(stream) % 2**64,)).generate_state(1, np.uint64)
    return int(state[0]) >> 1


class EpisodeRandomness:
    """Generators for the episodes of one method under one seed (see the module's docstring)."""

    def __init__(self, seed: int):
        self.seed = int(seed)
        self._running: dict[int, torch.Generator] = {}  # episode=None: one advancing generator per stream

    def _advancing(self, stream: int) -> torch.Generator:
        if stream not in self._running:
            self._running[stream] = torch.Generator().manual_seed(episode_seed(self.seed, (), stream))
        return self._running[stream]

    def generator(self, episode: EpisodeKey | None, stream: int) -> torch.Generator:
        """A CPU generator for ``stream`` of ``episode``: fresh, seeded from the key; or, for None, the
        stream's advancing generator."""
        if episode is None:
            return self._advancing(stream)
        return torch.Generator().manual_seed(episode_seed(self.seed, episode, stream))

    def seed_for(self, episode: EpisodeKey | None, stream: int) -> int:
        """A seed for ``stream`` of ``episode`` (for functions that draw from torch's global generator); for
        None, the next draw of the stream's advancing generator."""
        if episode is None:
            return int(torch.randint(0, 2**62, (), generator=self._advancing(stream)))
        return episode_seed(self.seed, episode, stream)


@contextmanager
def seeded_global_rng(seed: int, device: torch.device | str = "cpu") -> Iterator[None]:
    """torch's global generator of ``device`` seeded with ``seed`` inside the block and restored after it, for
    functions that take no generator (``torch.svd_lowrank``). Only that device's generator is seeded (and
    the CPU's, which ``fork_rng`` always saves), so other GPUs' generators are left alone."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        else:
            torch.default_generator.manual_seed(seed)
        yield
