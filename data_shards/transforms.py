"""Named (train, eval) image transforms, built from torchvision's transforms v2: ``BaseConfig.transform``.

Every transform maps a decoded RGB PIL image to a uint8 CHW tensor of one fixed size (so a batch stacks);
the reader turns batches into float [0, 1]. No normalisation here: it belongs to the model, so that attacks
and eps live in pixel space.

| name | train | eval |
|---|---|---|
| cifar | pad-4 random crop + horizontal flip at the stored size (or image_size) | the stored image (or image_size) |
| imagenet224 | Resize(256) + RandomResizedCrop(224) + RandomHorizontalFlip | Resize(256) + CenterCrop(224) |
| amt128 | RandomResizedCrop(128) + ColorJitter(0.4, 0.4, 0.4) + RandomHorizontalFlip | Resize(146) + CenterCrop(128) |
| none | the stored image at image_size | the same |
| auto | cifar when every stored image has one size of at most 64 pixels (CIFAR, the digits), else imagenet224 | |

imagenet224 is AutoLoRa's transform for its 224-pixel sets (DTD, Dogs, CUB, Caltech-256); amt128 is AMT's and
PMF's (their transform.py). With ``image_size`` set, imagenet224 and amt128 crop to that size instead and scale
their resize by the same factor (256/224, 146/128): a cheap stand-in for tests and CPU runs, never the papers'.
"Fitting" an image to a size (cifar, none) resizes it to cover the size and center-crops (a plain resize when
the aspect ratios agree), as the reader always did.

Randomness: a random transform's draw is a function of the seed it is called with. torchvision's v2 classes
draw from torch's default generator, so each call seeds that generator with the caller's per-sample seed and
restores its state afterwards (the training loop's own randomness is untouched). The cifar transform calls
v2's functional ops with parameters drawn the same way: the v2 classes cost about 100 us of Python per image,
as much as decoding a 32-pixel PNG, while the functional ops cost about 10 us.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

TRANSFORM_NAMES = ("auto", "cifar", "imagenet224", "amt128", "none")
CIFAR_PAD = 4
# the largest stored size that "auto" treats as a CIFAR-like set (pad-crop augmentation at the stored size)
AUTO_CIFAR_MAX_SIZE = 64
# (crop size, resize size) of the 224- and 128-pixel recipes; other crop sizes scale the resize alike
_RECIPE_SIZES = {"imagenet224": (224, 256), "amt128": (128, 146)}


def resolve_transform(name: str, info: dict) -> str:
    """The concrete transform name for a manifest: ``auto`` becomes cifar or imagenet224."""
    if name not in TRANSFORM_NAMES:
        raise ValueError(f"transform={name!r}; valid: {', '.join(TRANSFORM_NAMES)}")
    if name != "auto":
        return name
    size = info.get("image_size")
    if size and not info.get("variable_size") and max(size) <= AUTO_CIFAR_MAX_SIZE:
        return "cifar"
    return "imagenet224"


def _as_hw(image_size) -> tuple[int, int]:
    return (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)


def output_size(name: str, info: dict, image_size=None) -> tuple[int, int]:
    """(H, W) of every image the transform yields on this manifest."""
    name = resolve_transform(name, info)
    if name in _RECIPE_SIZES:
        return _as_hw(image_size) if image_size is not None else _as_hw(_RECIPE_SIZES[name][0])
    if image_size is not None:
        return _as_hw(image_size)
    if info.get("image_size"):  # a varying-size set converted with --size S records [S, S]: fitted to that
        return tuple(info["image_size"])
    raise ValueError(f"data set {info.get('name')} has images of varying size: pass image_size "
                     f"(transform {name} keeps the stored size)")


def fit(im: Image.Image, size) -> Image.Image:
    """Resize so that the image covers `size` (H, W), then center-crop: a plain resize when aspects agree."""
    H, W = size
    if (im.height, im.width) == (H, W):
        return im
    s = max(H / im.height, W / im.width)
    nh, nw = max(H, round(im.height * s)), max(W, round(im.width * s))
    im = im.resize((nw, nh), Image.BILINEAR)
    top, left = (nh - H) // 2, (nw - W) // 2
    return im.crop((left, top, left + W, top + H))


def pil_to_uint8(im: Image.Image) -> torch.Tensor:
    # numpy transposes HWC uint8 -> CHW about 50x faster than torch's permute().contiguous() at 224 pixels
    return torch.from_numpy(np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)))


@contextmanager
def seeded_default_generator(seed: int):
    """torch's default CPU generator seeded with `seed` inside, restored afterwards."""
    g = torch.default_generator
    state = g.get_state()
    g.manual_seed(seed)
    try:
        yield
    finally:
        g.set_state(state)


class _Fit:
    def __init__(self, size):
        self.size = size

    def __call__(self, im):
        return fit(im, self.size)


class _CifarTrain:
    """Fit, then v2.RandomCrop(size, padding=4) + v2.RandomHorizontalFlip() through v2's functional ops."""

    def __init__(self, size):
        self.size = size

    def __call__(self, im):
        im = fit(im, self.size)
        H, W = self.size
        top, left = torch.randint(0, 2 * CIFAR_PAD + 1, (2,)).tolist()
        # a crop box reaching outside the image is zero-filled: pad-4 and crop in one call
        im = TF.crop(im, top - CIFAR_PAD, left - CIFAR_PAD, H, W)
        if torch.rand(()).item() < 0.5:
            im = TF.horizontal_flip(im)
        return im


class ImageTransform:
    """PIL RGB image -> uint8 CHW tensor of ``size``; ``random`` ones take a per-sample seed."""

    def __init__(self, name: str, train: bool, size: tuple[int, int], fn: Callable, random: bool):
        self.name, self.train, self.size, self.fn, self.random = name, train, size, fn, random

    def __call__(self, im: Image.Image, seed: Optional[int] = None) -> torch.Tensor:
        if self.random and seed is not None:
            with seeded_default_generator(seed):
                im = self.fn(im)
        else:
            im = self.fn(im)
        x = pil_to_uint8(im)
        if tuple(x.shape[1:]) != self.size:  # a bug in a recipe, not a data problem: batches must stack
            raise RuntimeError(f"transform {self.name} made a {tuple(x.shape[1:])} image, expected {self.size}")
        return x

    def __repr__(self):
        return f"ImageTransform({self.name}, {'train' if self.train else 'eval'}, size={self.size})"


def make_transform(name: str, info: dict, image_size=None, *, train: bool) -> ImageTransform:
    """The train (``train=True``) or eval transform ``name`` for a manifest, see the module's table."""
    name = resolve_transform(name, info)
    size = output_size(name, info, image_size)
    if name == "none" or (name == "cifar" and not train):
        return ImageTransform(name, train, size, _Fit(size), random=False)
    if name == "cifar":
        return ImageTransform(name, train, size, _CifarTrain(size), random=True)
    crop, resize = _RECIPE_SIZES[name]
    resize = round(min(size) * resize / crop)
    if name == "imagenet224":
        ops = ([v2.Resize(resize), v2.RandomResizedCrop(size), v2.RandomHorizontalFlip()] if train
               else [v2.Resize(resize), v2.CenterCrop(size)])
    else:  # amt128
        ops = ([v2.RandomResizedCrop(size), v2.ColorJitter(0.4, 0.4, 0.4), v2.RandomHorizontalFlip()] if train
               else [v2.Resize(resize), v2.CenterCrop(size)])
    return ImageTransform(name, train, size, v2.Compose(ops), random=train)


def transform_pair(name: str, info: dict, image_size=None) -> tuple[ImageTransform, ImageTransform]:
    """(train, eval) transforms ``name`` for a manifest."""
    return (make_transform(name, info, image_size, train=True), make_transform(name, info, image_size, train=False))
