"""Episodic sampler: N distinct classes, K and Q right, no support/query overlap, reproducible by seed."""
import numpy as np
import pytest
import torch

from data_shards.episodes import EpisodeSampler
from data_shards.writer import write_dataset

NC, PER = 8, 14


def _img(i):
    a = np.zeros((8, 8, 3), np.uint8)
    a[0, 0, 0], a[0, 0, 1] = i % 256, i // 256  # sample id, to detect overlap and check labels
    return a


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    d = tmp_path_factory.mktemp("ep") / "eps"
    items = [(_img(i), i % NC) for i in range(NC * PER)]  # class of sample i is i % NC
    write_dataset(d, "eps", {"train": items}, classes=[str(c) for c in range(NC)], maxcount=30)
    return d


def _ids(x):
    p = (x[:, :2, 0, 0] * 255).round().long()
    return (p[:, 0] + 256 * p[:, 1]).tolist()


@pytest.mark.parametrize("shots", [1, 5])
def test_fixed_episode(ds, shots):
    classes = [1, 2, 3, 5, 6, 7]
    s = EpisodeSampler(ds, "train", classes, ways=5, shots=shots, queries=4, seed=0)
    for i in range(10):
        sx, sy, qx, qy = s.sample(i)
        assert sx.shape == (5 * shots, 3, 8, 8) and qx.shape == (20, 3, 8, 8)
        assert sy.tolist() == sorted(sy.tolist()) and torch.bincount(sy).tolist() == [shots] * 5
        assert torch.bincount(qy).tolist() == [4] * 5
        sid, qid = _ids(sx), _ids(qx)
        assert not set(sid) & set(qid) and len(set(sid)) == len(sid) and len(set(qid)) == len(qid)
        orig = s.episode_classes(i)
        assert len(set(orig)) == 5 and set(orig) <= set(classes)
        # relabelling: new label j means original class orig[j], for every image
        assert all(k % NC == orig[y] for k, y in zip(sid + qid, sy.tolist() + qy.tolist()))


def test_reproducible_and_seeded(ds):
    a = EpisodeSampler(ds, "train", range(NC), 5, 1, 3, seed=7)
    b = EpisodeSampler(ds, "train", range(NC), 5, 1, 3, seed=7)
    c = EpisodeSampler(ds, "train", range(NC), 5, 1, 3, seed=8)
    for i in (0, 5):
        assert all(torch.equal(u, v) for u, v in zip(a.sample(i), b.sample(i)))
    assert _ids(a.sample(4)[0]) == _ids(b.sample(4)[0])
    assert any(_ids(a.sample(i)[2]) != _ids(c.sample(i)[2]) for i in range(3))
    assert _ids(a.sample(0)[2]) != _ids(a.sample(1)[2])
    eps = list(a.episodes(3))
    assert len(eps) == 3 and torch.equal(eps[2][0], a.sample(2)[0])


def test_no_cache_path_and_resize(ds):
    s = EpisodeSampler(ds, "train", range(NC), 3, 2, 2, seed=1, image_size=16, cache_max=0)
    sx, sy, qx, qy = s.sample(0)
    assert sx.shape == (6, 3, 16, 16) and qx.shape == (6, 3, 16, 16)


def test_variable_way_shot(ds):
    s = EpisodeSampler(ds, "train", range(NC), 5, 1, 15, seed=0, variable=True)
    for i in range(8):
        sx, sy, qx, qy = s.sample(i)
        ways = int(sy.max()) + 1
        assert 5 <= ways <= NC and int(qy.max()) + 1 == ways
        q = torch.bincount(qy).tolist()
        assert len(set(q)) == 1 and 1 <= q[0] <= 10
        k = torch.bincount(sy, minlength=ways)
        assert (k >= 1).all() and len(sy) <= 500 and (k + q[0] <= PER).all()
        assert not set(_ids(sx)) & set(_ids(qx))


def test_not_enough_classes(ds):
    with pytest.raises(ValueError, match="classes"):
        EpisodeSampler(ds, "train", [0, 1, 2], ways=5, shots=1, queries=1)
    with pytest.raises(ValueError):
        EpisodeSampler(ds, "train", range(NC), ways=5, shots=10, queries=10)  # 14 per class < 20


@pytest.mark.parametrize("cut, message", [
    ("member", r"train-000000.tar"),  # inside a member: fewer samples, or a short image that fails to decode
    ("boundary", r"train-000000.tar holds \d+ samples where the manifest says 30"),
    ("header", r"corrupt or truncated shard .*train-000000.tar"),  # half a tar header at the end
])
def test_damaged_shard_names_the_shard(ds, tmp_path, cut, message, restamp):
    import shutil
    import tarfile

    from data_shards.reader import ShardError

    d = tmp_path / "eps"
    shutil.copytree(ds, d)
    p = d / "train-000000.tar"
    with tarfile.open(p) as tf:
        m = tf.getmembers()[20]
    end = {"member": m.offset_data + 20, "boundary": m.offset, "header": m.offset + 200}[cut]
    p.write_bytes(p.read_bytes()[:end])
    with pytest.raises(ShardError, match=r"train-000000.tar differs from its manifest"):
        EpisodeSampler(d, "train", range(NC), 5, 5, 4, seed=0, cache_max=0)
    restamp(d, "train-000000.tar")  # the sampler's own checks, as for a remote shard
    s = EpisodeSampler(d, "train", range(NC), 5, 5, 4, seed=0, cache_max=0)
    with pytest.raises(ShardError, match=message) as e:
        for i in range(20):
            s.sample(i)
    assert "\n" not in str(e.value)
