"""Backbones by name, timm-style: ``create_backbone(name, num_classes)`` and ``list_backbones()``.

Every backbone comes back as an :class:`ImageClassifier`: inputs in pixel space [0, 1] (normalisation is
part of the model, so attacks and eps work in pixel space), ``features(x)`` gives pooled features and a
fresh ``head`` maps them to the downstream classes.

``input_resize`` (``BaseConfig.input_resize``) resizes every input (nearest) inside the model, before
normalisation, as AutoLoRa's authors' model does (``F.interpolate(x, 224)``, then normalise): the data, the
attack and eps stay on the stored image (32x32 for CIFAR) while the encoder sees the resized one.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

import torch
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_BACKBONES: dict[str, Callable[..., "ImageClassifier"]] = {}


def register_backbone(name: str):
    def wrap(fn):
        _BACKBONES[name] = fn
        return fn

    return wrap


class ImageClassifier(nn.Module):
    """[nearest resize to input_resize ->] normalise -> encoder (pooled features) -> head."""

    def __init__(self, encoder: nn.Module, feat_dim: int, num_classes: int,
                 mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_resize: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.feat_dim = feat_dim
        self.input_resize = input_resize
        self.head = nn.Linear(feat_dim, num_classes)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # Under DeepSpeed bf16 the weights (and these buffers) are bf16 while data and attacks stay fp32.
        x = x.to(self.head.weight.dtype)
        if self.input_resize is not None and tuple(x.shape[-2:]) != (self.input_resize, self.input_resize):
            # nearest copies pixels: the gradient w.r.t. the stored image sums over each pixel's copies
            x = torch.nn.functional.interpolate(x, size=self.input_resize, mode="nearest")
        return self.encoder((x - self.mean.to(x.dtype)) / self.std.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).float()


def list_backbones() -> list[str]:
    return sorted(_BACKBONES) + ["<any timm model name>", "<path to a .pt/.pth/.safetensors checkpoint>"]


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False, image_size: int | None = None,
                    input_resize: int | None = None) -> ImageClassifier:
    """A registered name, a timm model name, or ``timm_name@/path/to/weights`` / a checkpoint path.

    ``image_size``: the size the loader yields; ``input_resize``: the model resizes its inputs to that size
    (nearest) before normalisation, so the encoder (a ViT's position embeddings) is built for it."""
    model = _create_backbone(name, num_classes, pretrained=pretrained, image_size=input_resize or image_size)
    model.input_resize = input_resize
    return model


def _create_backbone(name: str, num_classes: int, *, pretrained: bool, image_size: int | None) -> ImageClassifier:
    if name in _BACKBONES:
        return _BACKBONES[name](num_classes=num_classes, pretrained=pretrained, image_size=image_size)
    import timm

    weights = None
    if "@" in name:  # timm architecture with local weights: resnet18@/path/w.pth
        name, weights = name.split("@", 1)
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(sorted(_BACKBONES))}, any timm model "
                         f"name (timm.list_models()), or NAME@/path/to/weights")
    kwargs = {}
    if image_size is not None and "vit" in name:
        kwargs["img_size"] = image_size  # timm interpolates position embeddings when loading weights
    encoder = timm.create_model(name, pretrained=pretrained and weights is None, num_classes=0, **kwargs)
    cfg = encoder.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))
    if weights is not None:
        state = load_state_dict_file(weights)
        if is_madry_checkpoint(state):
            state, mean, std = convert_madry_checkpoint(state)
        if "vit" in name:  # resamples position embeddings to the requested image size
            from timm.models.vision_transformer import checkpoint_filter_fn

            state = checkpoint_filter_fn(state, encoder)
        report = load_report(encoder, state)
        if report["missing"] or report["unexpected"]:
            raise ValueError(f"checkpoint {weights} does not fit {name}: {len(report['missing'])} missing keys "
                             f"(e.g. {report['missing'][:3]}), {len(report['unexpected'])} unexpected "
                             f"(e.g. {report['unexpected'][:3]})")
        print(f"loaded {weights} into {name}: {report['matched']} tensors matched, head left out")
    return ImageClassifier(encoder, encoder.num_features, num_classes, mean=mean, std=std)


_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head_dist.")


def load_report(encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """Load ``state`` (classifier heads left out) and say what matched; shape mismatches raise in torch."""
    state = {k: v for k, v in state.items() if not k.startswith(_HEAD_PREFIXES)}
    missing, unexpected = encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    return {"matched": len(state) - len(unexpected), "missing": missing, "unexpected": list(unexpected)}


def is_madry_checkpoint(state: dict) -> bool:
    return any(k.startswith("module.model.") for k in state)


def convert_madry_checkpoint(state: dict[str, torch.Tensor]):
    """MadryLab ``robustness`` checkpoints (the AutoLoRa paper's resnet{18,50}_linf_eps4.0.ckpt).

    ``model`` holds ``module.model.*`` (torchvision ResNet names, which timm's ResNets share),
    ``module.attacker.model.*`` (a duplicate for the attacker) and ``module.normalizer.new_mean/new_std``.
    """
    weights = {k[len("module.model."):]: v for k, v in state.items() if k.startswith("module.model.")}
    mean = state.get("module.normalizer.new_mean")
    std = state.get("module.normalizer.new_std")
    mean = tuple(mean.flatten().tolist()) if mean is not None else IMAGENET_MEAN
    std = tuple(std.flatten().tolist()) if std is not None else IMAGENET_STD
    return weights, mean, std


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _pyautoattack_example(module: str) -> Path:
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("pyautoattack is not installed (pip install pyautoattack)")
    return Path(spec.origin).parent / "examples" / module


@register_backbone("cifar_resnet18_aa")
def cifar_resnet18_aa(num_classes: int, pretrained: bool = True, image_size: int | None = None) -> ImageClassifier:
    """The CIFAR-10 ResNet-18 (3x3 stem) that pyautoattack ships with its weights.

    The architecture is loaded from the file shipped beside the weights (``examples/resnet.py``): the
    examples folder is not an importable package, so it is loaded by path. Its inputs are raw [0, 1]
    pixels (no normalisation in the authors' eval script), so mean 0, std 1. Always pre-trained: the
    weights ship with the package, nothing downloads.
    """
    spec = importlib.util.spec_from_file_location("_aa_resnet", _pyautoattack_example("resnet.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class AnySizeResNet(mod.ResNet):
        """The shipped forward pools with a fixed 4x4 window (32-pixel inputs only); a window of the whole
        map is the same operation at 32 pixels and lets ``input_resize`` feed the network larger images."""

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return self.linear(nn.functional.avg_pool2d(out, out.shape[-2:]).flatten(1))

    net = AnySizeResNet(mod.BasicBlock, [2, 2, 2, 2])  # = mod.ResNet18() with that forward
    # The file holds CUDA tensors: map to CPU; weights_only keeps loading free of pickle code execution.
    state = torch.load(_pyautoattack_example("model_test.pt"), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    net.linear = nn.Identity()  # the CIFAR-10 head goes; ImageClassifier adds the downstream head
    return ImageClassifier(net, 512, num_classes)


@register_backbone("tiny_cnn")
def tiny_cnn(num_classes: int, pretrained: bool = False, image_size: int | None = None) -> ImageClassifier:
    """A randomly initialised two-block residual CNN for fast tests and smoke sweeps (no weights)."""

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.layer1 = nn.Sequential(Block(16, 16, 1))
            self.layer2 = nn.Sequential(Block(16, 32, 2))
            self.pool = nn.AdaptiveAvgPool2d(1)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            return self.pool(self.layer2(self.layer1(x))).flatten(1)

    return ImageClassifier(Net(), 32, num_classes)
