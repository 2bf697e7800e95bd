"""What ``bench evaluate`` evaluates: a finished trial's selected weights, or any backbone with its own head.

A :class:`ModelRecipe` is a small picklable description of a network's architecture; with the network's
state dict (which travels separately, once, through Ray's object store) any process rebuilds the exact
network the trial evaluated. ``bench.sharded_eval`` ships one to every shard.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.backbones import ImageClassifier, check_backbone


@dataclass(frozen=True)
class ModelRecipe:
    """How to rebuild an evaluated network (its weights excluded).

    ``kind`` "method": the network a trial's method evaluates (``Method.eval_model()``), rebuilt from the
    trial's resolved config (``config``), class count and input size, with the method's own state.
    ``kind`` "backbone": ``backbone`` as published, classifier included (:func:`backbone_with_own_head`)."""

    kind: str
    backbone: str
    num_classes: int | None = None
    image_size: int | None = None
    input_resize: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    method_state: dict[str, Any] = field(default_factory=dict)

    def build(self) -> nn.Module:
        if self.kind == "backbone":
            return backbone_with_own_head(self.backbone, image_size=self.image_size, input_resize=self.input_resize)
        return self.build_method().eval_model()

    def build_method(self):
        """The trial's method (kind "method"), its own state loaded; a few-shot evaluation needs the method
        itself (its ``episode_classifier``), not only the network."""
        if self.kind != "method":
            raise ValueError(f"recipe kind {self.kind!r} has no method")
        from bench.backbones import create_backbone
        from bench.config import resolve_config
        from methods import get_method

        cfg = resolve_config(self.config["method"], {k: v for k, v in self.config.items() if k != "method"})
        backbone = create_backbone(cfg.backbone, self.num_classes, pretrained=cfg.pretrained,
                                   image_size=self.image_size, input_resize=cfg.input_resize)
        method = get_method(cfg.method)(cfg, backbone, self.num_classes)
        if self.method_state:
            method.load_state_dict(self.method_state)
        return method

    def build_with(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """The network holding ``state`` (strictly: a state that does not fit is an error), in eval mode."""
        model = self.build()
        model.load_state_dict(state)
        return model.eval()


def backbone_with_own_head(name: str, *, image_size: int | None = None,
                           input_resize: int | None = None) -> ImageClassifier:
    """``name`` (a suite backbone, a timm name, ``NAME@weights``) with the classifier it was published with:
    class i of the output is the model's class i (for cifar_resnet18_aa: CIFAR-10's), whatever data set it
    is evaluated on. The same ``ImageClassifier`` wrapper as a trial's (pixel inputs in [0, 1],
    normalisation inside), its ``head`` the model's own classifier."""
    import timm

    from bench.backbones import SUITE_BACKBONES, _strict_load

    arch, weights = check_backbone(name)
    kwargs: dict[str, Any] = {}
    size = input_resize or image_size
    if size is not None and "vit" in arch:
        kwargs["img_size"] = size
    pretrained = True
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=str(weights))
    elif arch in SUITE_BACKBONES:
        pretrained = bool(timm.models.get_pretrained_cfg(arch).file)
    with _strict_load(name):
        net = timm.create_model(arch, pretrained=pretrained, **kwargs)
    cfg = net.pretrained_cfg or {}
    classifier_path = cfg.get("classifier")
    head = net.get_submodule(classifier_path) if classifier_path else None
    if not isinstance(head, nn.Linear):
        raise ValueError(f"backbone {name!r}: its classifier ({classifier_path!r}) is not one linear layer; "
                         f"bench evaluate --backbone needs a model with a linear classifier")
    parent, _, leaf = classifier_path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())  # the encoder: pooled features
    from bench.backbones import IMAGENET_MEAN, IMAGENET_STD

    model = ImageClassifier(net, head.in_features, head.out_features, mean=tuple(cfg.get("mean") or IMAGENET_MEAN),
                            std=tuple(cfg.get("std") or IMAGENET_STD), input_resize=input_resize)
    model.head = head
    return model.eval()


# ------------------------------------------------------------------------------------------ a trial's weights
def trial_weights(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The weights a finished trial evaluated: ``checkpoints/best.pt`` (validation's choice), else its last
    epoch's checkpoint, as the trial did. Returns (state dict, the method's state, where from)."""
    from bench.engine import BEST, CLIENT_KEY, LATEST, PLAIN_STATE, _deepspeed_safe_globals, load_best

    ckpt = Path(run_dir) / "checkpoints"
    client: dict[str, Any] = {}
    latest = ckpt / LATEST
    last_state = None
    if latest.exists():
        tag = latest.read_text().strip()
        for name in ("mp_rank_00_model_states.pt", PLAIN_STATE):
            path = ckpt / tag / name
            if path.exists():
                with torch.serialization.safe_globals(_deepspeed_safe_globals()):
                    last_state = torch.load(path, map_location="cpu", weights_only=True)
                if CLIENT_KEY in last_state:
                    client = json.loads(last_state[CLIENT_KEY])
                elif "method" in last_state:
                    client = last_state
                break
    best = load_best(ckpt)
    method_state = client.get("method") or {}
    if best is not None:
        return best["model"], method_state, f"{ckpt / BEST} (epoch {best['epoch']})"
    if last_state is None or not last_state.get("module"):
        raise FileNotFoundError(f"{run_dir}: no checkpoints/{BEST} and no complete last-epoch checkpoint "
                                f"(a ZeRO-3 trial without best.pt keeps partitions only)")
    return last_state["module"], method_state, f"{ckpt / tag} (last epoch)"
