"""Named transforms (data_shards.transforms) through the shard reader and the episode sampler."""
import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.episodes import EpisodeSampler
from data_shards.manifest import read_manifest
from data_shards.reader import load_split, make_loader
from data_shards.transforms import make_transform, output_size, resolve_transform
from data_shards.writer import write_dataset

NC = 4
SIZES = [(40, 60), (50, 30), (33, 33), (64, 48), (28, 90)]  # (H, W): a class-folder tree's mixed sizes


def _photo(i, hw):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (*hw, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def variable(tmp_path_factory):
    d = tmp_path_factory.mktemp("tf") / "var"
    items = [(_photo(i, SIZES[i % len(SIZES)]), i % NC) for i in range(24)]
    write_dataset(d, "var", {"train": items, "test": items[:8]}, classes=[str(c) for c in range(NC)],
                  maxcount=10)
    assert read_manifest(d)["image_size"] is None  # really of varying size
    return d


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("tf") / "small"
    items = [(_photo(100 + i, (16, 16)), i % NC) for i in range(40)]
    write_dataset(d, "small", {"train": items}, classes=[str(c) for c in range(NC)], maxcount=15)
    return d


# (transform, image_size, output H x W): every transform on images of mixed sizes
CASES = [
    ("imagenet224", None, (224, 224)),
    ("amt128", None, (128, 128)),
    ("imagenet224", 40, (40, 40)),  # a crop size of one's own: resize scaled by 256/224
    ("amt128", 24, (24, 24)),
    ("cifar", 20, (20, 20)),
    ("none", 20, (20, 20)),
    ("auto", None, (224, 224)),  # varying sizes -> imagenet224
]


@pytest.mark.parametrize("name,image_size,hw", CASES)
def test_output_size_and_range_on_variable_sizes(variable, name, image_size, hw):
    for augment in (True, False):
        L = make_loader(variable, "train", 7, train=True, augment=augment, image_size=image_size, transform=name,
                        shuffle_buffer=5)
        batches = list(L)
        assert L.size == hw and [len(y) for _, y in batches] == [7, 7, 7, 3]
        for x, _ in batches:
            assert x.dtype == torch.float32 and tuple(x.shape[1:]) == (3, *hw)
            assert 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.05  # pixels, not normalised, not blank
    X, _ = load_split(variable, "test", image_size=image_size, transform=name)
    assert tuple(X.shape) == (8, 3, *hw)


@pytest.mark.parametrize("info,expected", [
    ({"image_size": [32, 32], "variable_size": False}, "cifar"),
    ({"image_size": [16, 16]}, "cifar"),
    ({"image_size": [256, 256], "variable_size": False}, "imagenet224"),
    ({"image_size": [256, 256], "variable_size": True}, "imagenet224"),  # converted with --size 256
    ({"image_size": None}, "imagenet224"),
])
def test_auto(info, expected):
    assert resolve_transform("auto", info) == expected
    assert resolve_transform("amt128", info) == "amt128"


def test_bad_names_and_sizes(variable):
    with pytest.raises(ValueError, match=r"^transform='bogus'; valid: auto, cifar"):
        make_loader(variable, "train", 4, transform="bogus")
    for name in ("cifar", "none"):  # they keep the stored size: there is none here
        with pytest.raises(ValueError, match="varying size: pass image_size"):
            load_split(variable, "test", transform=name)


def _epoch_bytes(L):
    """Sorted per-image bytes of one epoch: equal when every sample got the same augmentation."""
    return sorted(x.numpy().tobytes() for xb, _ in L for x in xb)


@pytest.mark.parametrize("name,image_size", [("cifar", None), ("imagenet224", 24), ("amt128", 24)])
def test_augmentation_is_a_function_of_seed_epoch_sample(small, name, image_size):
    def loader(seed, workers=0, buffer=10):
        return make_loader(small, "train", 8, train=True, augment=True, seed=seed, transform=name,
                           image_size=image_size, num_workers=workers, shuffle_buffer=buffer)

    a, b = loader(3), loader(3)
    a1, a2 = [torch.cat([x for x, _ in L]) for L in (a, a)]  # epochs 0 and 1
    b1, b2 = [torch.cat([x for x, _ in L]) for L in (b, b)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # reproducible per (seed, epoch)
    assert _epoch_bytes([(a1, None)]) != _epoch_bytes([(a2, None)])  # another epoch, other draws
    assert _epoch_bytes(loader(4)) != _epoch_bytes([(a1, None)])  # another seed, other draws
    # the draw belongs to the sample, not to the stream: other shuffles and two workers give the same images
    assert _epoch_bytes(loader(3, workers=2, buffer=3)) == _epoch_bytes([(a1, None)])


def test_train_and_eval_differ_eval_is_fixed(small):
    tr = make_loader(small, "train", 40, augment=True, transform="cifar")
    ev = make_loader(small, "train", 40, augment=False, transform="cifar")
    (xt, yt), = list(tr)
    (xe, ye), = list(ev)
    assert torch.equal(yt, ye)  # train=False: shard order in both
    assert torch.equal(xe, next(iter(ev))[0]) and torch.equal(xe, load_split(small, "train", transform="cifar")[0])
    changed = [not torch.equal(a, b) for a, b in zip(xt, xe)]
    assert sum(changed) > 30  # 1 in 162 (offset 4,4 unflipped) is left as it was
    # the cifar train transform is a pad-4 crop, maybe flipped, of the stored image
    pad = torch.nn.functional.pad(xe, (4, 4, 4, 4))
    for a, p in zip(xt, pad):
        assert any(torch.equal(a, c) or torch.equal(a, c.flip(-1))
                   for c in (p[:, i:i + 16, j:j + 16] for i in range(9) for j in range(9)))


def test_loader_leaves_global_rng_alone(small):
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    for _ in make_loader(small, "train", 8, train=True, augment=True, transform="amt128", image_size=20):
        pass
    assert torch.equal(torch.rand(4), expected)


def test_imagenet224_eval_is_resize_256_center_crop_224():
    im = Image.fromarray(_photo(7, (300, 400)))
    from torchvision.transforms import v2

    ref = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.PILToTensor()])(im)
    got = make_transform("imagenet224", {"image_size": None}, train=False)(im)
    assert got.dtype == torch.uint8 and torch.equal(got, ref)
    assert output_size("amt128", {"image_size": [32, 32]}) == (128, 128)


@pytest.mark.parametrize("name,image_size,hw", [("cifar", None, (16, 16)), ("amt128", 20, (20, 20)),
                                                ("imagenet224", 32, (32, 32))])
def test_episodes_train_augmented_eval_fixed(small, name, image_size, hw):
    def sampler(augment, seed=0):
        return EpisodeSampler(small, "train", range(NC), ways=3, shots=2, queries=3, seed=seed, augment=augment,
                              transform=name, image_size=image_size)

    tr, tr2, ev = sampler(True), sampler(True), sampler(False)
    for i in range(2):
        sx, sy, qx, qy = tr.sample(i)
        assert tuple(sx.shape) == (6, 3, *hw) and tuple(qx.shape) == (9, 3, *hw) and 0 <= sx.min() and qx.max() <= 1
        assert all(torch.equal(a, b) for a, b in zip(tr.sample(i), tr2.sample(i)))  # function of (seed, i)
        ex = ev.sample(i)
        assert torch.equal(ex[1], sy) and torch.equal(ex[3], qy)  # same images drawn
        assert not torch.equal(ex[0], sx) and not torch.equal(ex[2], qx)  # augmented, unlike the eval ones
        assert all(torch.equal(a, b) for a, b in zip(ex, ev.sample(i)))
    assert not torch.equal(tr.sample(0)[2], tr.sample(5)[2])
