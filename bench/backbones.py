"""Backbones by name: ``create_backbone(name, num_classes)`` and ``list_backbones()``, on timm's registry.

The suite's own backbones (:data:`SUITE_BACKBONES`) are timm models, registered here with
``@register_model`` and a ``pretrained_cfg``: after ``import bench.backbones``,
``timm.create_model("cifar_resnet18_aa", pretrained=True)`` gives pyautoattack's CIFAR-10 ResNet-18 with
its shipped weights, inside the suite or not. No suite model has a hub address: pretrained weights come
from a local file or not at all, never a download. Local weights for any timm model are
``NAME@/path/to/weights`` (timm's ``pretrained_cfg_overlay=dict(file=...)``: timm's own loader and
checkpoint filters, e.g. a ViT's position embeddings resampled to ``image_size``).

Every backbone comes back as an :class:`ImageClassifier`: inputs in pixel space [0, 1] (normalisation is
part of the model, so attacks and eps work in pixel space), ``features(x)`` gives pooled features and a
fresh ``head`` maps them to the downstream classes.

``input_resize`` (``BaseConfig.input_resize``) resizes every input (nearest) inside the model, before
normalisation, as AutoLoRa's authors' model does (``F.interpolate(x, 224)``, then normalise): the data, the
attack and eps stay on the stored image (32x32 for CIFAR) while the encoder sees the resized one.
"""
from __future__ import annotations

import importlib.util
import logging
import re
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The suite's own names in timm's registry (timm's other names work too, see create_backbone).
SUITE_BACKBONES = ("cifar_resnet18_aa", "tiny_cnn", "madry_resnet18", "madry_resnet50")


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
    return list(SUITE_BACKBONES) + ["<any timm model name>", "<NAME@/path/to/weights.{pt,pth,safetensors}>"]


def check_backbone(name: str) -> tuple[str, Path | None]:
    """``(timm name, local weights or None)`` for a backbone name, or a one-line error before any work."""
    arch, weights = name.split("@", 1) if "@" in name else (name, None)
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone {name!r}; valid: {', '.join(SUITE_BACKBONES)}, any timm model name "
                         f"(timm.list_models()), or NAME@/path/to/weights")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"backbone {name!r}: weights file {weights} does not exist")
    return arch, Path(weights) if weights is not None else None


def create_backbone(name: str, num_classes: int, *, pretrained: bool = False, image_size: int | None = None,
                    input_resize: int | None = None) -> ImageClassifier:
    """A suite backbone, a timm model name, or ``timm_name@/path/to/weights``.

    ``image_size``: the size the loader yields; ``input_resize``: the model resizes its inputs to that size
    (nearest) before normalisation, so the encoder (a ViT's position embeddings) is built for it.

    ``pretrained`` asks timm for a timm model's published weights (hub or cache); a suite backbone whose
    weights ship as a local file always loads them, one without weights is randomly initialised."""
    arch, weights = check_backbone(name)
    image_size = input_resize or image_size
    kwargs = {}
    if image_size is not None and "vit" in arch:
        kwargs["img_size"] = image_size  # timm's loader resamples the position embeddings to it
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
        pretrained = True
    elif arch in SUITE_BACKBONES:
        pretrained = bool(timm.models.get_pretrained_cfg(arch).file)
    with _strict_load(name):
        encoder = timm.create_model(arch, pretrained=pretrained, num_classes=0, **kwargs)
    if weights is not None:
        print(f"loaded {weights} into {arch} (head left out)")
    cfg = encoder.pretrained_cfg or {}
    mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
    return ImageClassifier(encoder, encoder.num_features, num_classes, mean=mean, std=std,
                           input_resize=input_resize)


@contextmanager
def _strict_load(name: str):
    """Make a checkpoint that does not fit an error, not a partly random backbone.

    timm loads non-strictly whenever the head is replaced (always here: ``num_classes=0``) and only logs
    the keys it could not match; those log records are collected and turned into one error."""
    report = {"missing": [], "unexpected": []}

    class Collect(logging.Handler):
        def emit(self, record):
            msg = record.getMessage()
            found = re.match(r"(Missing|Unexpected) keys \((.*)\) (discovered|found) while loading", msg)
            if found:
                report[found.group(1).lower()] += [k for k in found.group(2).split(", ") if k]

    timm_log = logging.getLogger("timm.models._builder")
    handler, level = Collect(logging.INFO), timm_log.level
    timm_log.addHandler(handler)
    timm_log.setLevel(logging.INFO)
    try:
        yield report
    finally:
        timm_log.removeHandler(handler)
        timm_log.setLevel(level)
    if report["missing"] or report["unexpected"]:
        hint = ""
        if any(k.startswith(("model.", "attacker.model.")) for k in report["unexpected"]):
            hint = " (a MadryLab robustness checkpoint? use madry_resnet18@PATH or madry_resnet50@PATH)"
        raise ValueError(f"checkpoint of backbone {name!r} does not fit: {len(report['missing'])} missing keys "
                         f"(e.g. {report['missing'][:3]}), {len(report['unexpected'])} unexpected "
                         f"(e.g. {report['unexpected'][:3]}){hint}")


# --- the suite's models in timm's registry ------------------------------------------------------------
def _pyautoattack_example(name: str) -> Path | None:
    """A file of pyautoattack's ``examples`` folder, found without importing pyautoattack (None if absent)."""
    spec = importlib.util.find_spec("pyautoattack")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "examples" / name


_AA_WEIGHTS = _pyautoattack_example("model_test.pt")

default_cfgs = generate_default_cfgs({  # read by @register_model: the pretrained_cfg of each model below
    # Raw [0, 1] pixels (no normalisation in the authors' eval script). The file holds CUDA tensors: timm's
    # loader maps them to the CPU and loads with weights_only=True.
    "cifar_resnet18_aa": dict(file=str(_AA_WEIGHTS) if _AA_WEIGHTS and _AA_WEIGHTS.is_file() else None,
                              num_classes=10, input_size=(3, 32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                              first_conv="conv1", classifier="linear", license="mit",
                              origin_url="https://github.com/fra31/auto-attack"),
    "tiny_cnn": dict(num_classes=10, input_size=(3, 32, 32), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                     first_conv="conv1", classifier="head"),  # no weights: random init, for tests
    # MadryLab robustness checkpoints (the AutoLoRa paper's ImageNet l_inf eps 4/255 models), not
    # distributed with anything: madry_resnet50@/path/resnet50_linf_eps4.0.ckpt.
    "madry_resnet18": dict(num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1",
                           classifier="fc", origin_url="https://github.com/MadryLab/robustness"),
    "madry_resnet50": dict(num_classes=1000, mean=IMAGENET_MEAN, std=IMAGENET_STD, first_conv="conv1",
                           classifier="fc", origin_url="https://github.com/MadryLab/robustness"),
})


def _aa_resnet18(num_classes: int = 10, **kwargs) -> nn.Module:
    """The architecture in the file shipped beside the weights (``examples/resnet.py``); the examples
    folder is not an importable package, so it is loaded by path."""
    path = _pyautoattack_example("resnet.py")
    if path is None:
        raise ModuleNotFoundError("pyautoattack is not installed (pip install pyautoattack)")
    spec = importlib.util.spec_from_file_location("_aa_resnet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class AnySizeResNet(module.ResNet):
        """The shipped forward pools with a fixed 4x4 window (32-pixel inputs only); a window of the whole
        map is the same operation at 32 pixels and lets ``input_resize`` feed the network larger images."""

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
            return self.linear(nn.functional.avg_pool2d(out, out.shape[-2:]).flatten(1))

    net = AnySizeResNet(module.BasicBlock, [2, 2, 2, 2])  # = module.ResNet18() with that forward
    if num_classes != 10:
        net.linear = nn.Linear(512, num_classes) if num_classes else nn.Identity()
    net.num_classes, net.num_features = num_classes, 512
    return net


@register_model
def cifar_resnet18_aa(pretrained: bool = False, **kwargs) -> nn.Module:
    """The CIFAR-10 ResNet-18 (3x3 stem) whose weights ship inside pyautoattack."""
    return build_model_with_cfg(_aa_resnet18, "cifar_resnet18_aa", pretrained, **kwargs)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyCNN(nn.Module):
    """A two-block residual CNN for fast tests and smoke sweeps."""

    def __init__(self, num_classes: int = 10, **kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(_Block(16, 16, 1))
        self.layer2 = nn.Sequential(_Block(16, 32, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_classes, self.num_features = num_classes, 32
        self.head = nn.Linear(32, num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.head(self.pool(self.layer2(self.layer1(x))).flatten(1))


@register_model
def tiny_cnn(pretrained: bool = False, **kwargs) -> TinyCNN:
    return build_model_with_cfg(TinyCNN, "tiny_cnn", pretrained, **kwargs)


def _madry_filter(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A robustness checkpoint's ``model`` holds ``module.model.*`` (torchvision ResNet names, which timm's
    ResNets share; timm has already cut ``module.``), ``module.attacker.model.*`` (a duplicate for the
    attacker) and ``module.normalizer.new_mean/new_std``, which become the model's mean and std."""
    if not any(k.startswith("model.") for k in state):
        raise ValueError("not a MadryLab robustness checkpoint: no module.model.* weights")
    for stat in ("mean", "std"):
        value = state.get(f"normalizer.new_{stat}")
        if value is not None:
            model.pretrained_cfg[stat] = tuple(value.flatten().tolist())
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


@register_model
def madry_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, "madry_resnet18", pretrained, pretrained_filter_fn=_madry_filter,
                                block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def madry_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    return build_model_with_cfg(ResNet, "madry_resnet50", pretrained, pretrained_filter_fn=_madry_filter,
                                block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)
