"""LoRA wiring for conv and linear layers, on PEFT's adapter machinery.

Two forms of conv LoRA:

- ``reference``: loralib's conv form, as the AutoLoRa authors' code uses it (``ConvLoRA`` in their
  ``LoRA.py``): for a k x k conv with weight W (out, in, k, k), A has shape (r*k, in*k) ~ N(0, 1), B has
  shape (out*k, r*k) = 0, and the conv runs with W + (B @ A).view(W.shape) * alpha / r. The effective rank
  of the update is up to r*k, not r.
- ``peft``: PEFT's own Conv2d LoRA: A is a k x k conv from in to r channels (Kaiming init), B a 1 x 1 conv
  from r to out channels (zeros); rank r.

The reference form is hosted in PEFT through its (experimental) custom-module API
(``LoraConfig._register_custom_module({nn.Conv2d: ReferenceConv2dLora})``): the layer subclasses PEFT's
``lora.Conv2d`` and only replaces the shapes of A and B, their init, the delta weight and the forward. So
both forms share PEFT's injection by ``target_modules``, adapter naming (``lora_A.default.weight``), merge
and enable/disable, and a model carries the same structure whichever form it uses.

Linear targets (ViT attention and MLP layers) use PEFT's Linear LoRA in both forms: loralib's Linear form
is the same factorisation (A (r, in), B (out, r) = 0).
"""
from __future__ import annotations

import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_FORMS = ("reference", "peft")

# Convs inside residual blocks, stem and head excluded, including the 1x1 projection shortcut:
#   CIFAR ResNets (pyautoattack, robustness lib CIFAR): encoder.layerN.M.conv1/conv2/shortcut.0
#   timm / torchvision ResNets (incl. the robustness lib ImageNet ResNets): layerN.M.conv1/2/3, downsample.0
RESNET_TARGETS = r"(.*\.)?layer\d+\.\d+\.(conv\d+|shortcut\.0|downsample\.0)"
# timm ViTs: the attention (qkv, proj) and MLP (fc1, fc2) linears of every block.
VIT_TARGETS = r"(.*\.)?blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"

# Where, among the modules ``target_modules`` matches, the LoRA branch acts:
# - ``reference``: the convs of the LAST block of each ResNet stage, never the 1x1 projection shortcut. This is
#   what the AutoLoRa authors' code effectively trains: every block carries LoRA weights, but its branch
#   selector reaches only the last module of each stage's Sequential (their ``SequentialWithArgs``), so the
#   other blocks always run their main branch (ResNet-50: layer1.2, layer2.3, layer3.5, layer4.2 = 12 convs;
#   ResNet-18: layerN.1 = 8 convs). Table 2's numbers come from it.
# - ``all_blocks``: every matched module (every block conv and the projection shortcut for the ResNet regex).
LORA_PLACEMENTS = ("reference", "all_blocks")
_BLOCK_CONV = re.compile(r"(?P<stage>(.*\.)?layer\d+)\.(?P<block>\d+)\.conv\d+")
_BLOCK = re.compile(r"(?P<stage>(.*\.)?layer\d+)\.(?P<block>\d+)")


def _peft_lora():
    from peft.tuners.lora import layer as lora_layer

    return lora_layer


def _reference_conv_class():
    """Built lazily so that importing this module does not import PEFT."""
    global _REFERENCE_CONV
    if _REFERENCE_CONV is not None:
        return _REFERENCE_CONV
    lora_layer = _peft_lora()

    class ReferenceConv2dLora(lora_layer.Conv2d):
        """loralib's conv LoRA form inside PEFT's Conv2d LoRA layer (see the module docstring)."""

        def update_layer(self, adapter_name, r, lora_alpha, config, **kwargs):
            base = self.get_base_layer()
            if base.groups != 1 or base.kernel_size[0] != base.kernel_size[1]:
                raise ValueError("the reference conv LoRA form needs groups=1 and a square kernel; "
                                 "use lora_form=peft for this layer")
            # PEFT sets up r, scaling, dropout, bookkeeping; then the factors get loralib's shapes.
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)
            k = base.kernel_size[0]
            w = base.weight
            # A (r*k, in*k) and B (out*k, r*k), held as bias-free Linear modules so that PEFT's code that
            # reads ``lora_A[name].weight`` (dtype casts, device moves, trainable marking) works unchanged.
            a = nn.Linear(base.in_channels * k, r * k, bias=False, device=w.device, dtype=w.dtype)
            b = nn.Linear(r * k, base.out_channels * k, bias=False, device=w.device, dtype=w.dtype)
            if config.init_lora_weights:
                # The reference (AutoLoRa's ConvLoRA.reset_parameters): A ~ N(0, 1), B = 0.
                nn.init.normal_(a.weight)
                nn.init.zeros_(b.weight)
            self.lora_A[adapter_name] = a
            self.lora_B[adapter_name] = b
            self.set_adapter(self.active_adapters)

        def get_delta_weight(self, adapter) -> torch.Tensor:
            w = self.get_base_layer().weight
            a = self.lora_A[adapter].weight
            b = self.lora_B[adapter].weight
            return (b @ a).view(w.shape) * self.scaling[adapter]

        def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.get("adapter_names") is not None:
                raise NotImplementedError("mixed-adapter batches are not supported by the reference conv form")
            base = self.get_base_layer()
            if self.disable_adapters:
                if self.merged:
                    self.unmerge()
                return base(x)
            if self.merged:
                return base(x)
            # One conv with the summed weight, as loralib does: cheaper than a second conv path.
            weight = base.weight
            for name in self.active_adapters:
                if name in self.lora_A.keys():
                    weight = weight + self.get_delta_weight(name).to(weight.dtype)
            return base._conv_forward(x, weight, base.bias)

        def __repr__(self) -> str:
            return "lora_ref." + nn.Module.__repr__(self)

    _REFERENCE_CONV = ReferenceConv2dLora
    return _REFERENCE_CONV


_REFERENCE_CONV = None


def matched_modules(model: nn.Module, target_modules: str | list[str]) -> list[str]:
    """Names of the modules PEFT's ``target_modules`` selects: a regex over the full name (fullmatch), or a
    list of names (a name equals an entry or ends with ``.entry``)."""
    names = [n for n, _ in model.named_modules() if n]
    if isinstance(target_modules, str):
        return [n for n in names if re.fullmatch(target_modules, n)]
    wanted = list(target_modules)
    return [n for n in names if any(n == t or n.endswith("." + t) for t in wanted)]


def placement_targets(model: nn.Module, target_modules: str | list[str], placement: str) -> list[str]:
    """The module names LoRA goes on under ``placement`` (see ``LORA_PLACEMENTS``); raises if none."""
    if placement not in LORA_PLACEMENTS:
        raise ValueError(f"lora_placement={placement!r}; valid: {', '.join(LORA_PLACEMENTS)}")
    matched = matched_modules(model, target_modules)
    if placement == "all_blocks":
        chosen = matched
    else:
        # the last block of a stage: the highest block index among the stage's children in the model
        last: dict[str, int] = {}
        for n, _ in model.named_modules():
            m = _BLOCK.fullmatch(n)
            if m:
                last[m["stage"]] = max(last.get(m["stage"], -1), int(m["block"]))
        chosen = []
        for n in matched:
            m = _BLOCK_CONV.fullmatch(n)
            if m and int(m["block"]) == last.get(m["stage"]):
                chosen.append(n)
    if not chosen:
        hint = " (reference placement needs ResNet stages layerN.M.convK; use lora_placement=all_blocks)" \
            if placement == "reference" and matched else ""
        raise ValueError(f"target_modules={target_modules!r} with lora_placement={placement} matched no module "
                         f"of {type(model).__name__}{hint}")
    return chosen


def add_lora(model: nn.Module, *, form: str = "reference", r: int = 8, alpha: float = 1.0,
             target_modules: str | list[str] = RESNET_TARGETS, placement: str = "all_blocks") -> list[str]:
    """Inject LoRA into ``model`` in place (the model keeps its class and attributes) on the modules
    ``target_modules`` selects under ``placement``. Returns the names of the adapted modules. Adapters start
    enabled; see :func:`set_adapters_enabled`."""
    if form not in LORA_FORMS:
        raise ValueError(f"lora_form={form!r}; valid: {', '.join(LORA_FORMS)}")
    if placement != "all_blocks":
        target_modules = placement_targets(model, target_modules, placement)
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules, bias="none")
    if form == "reference":
        config._register_custom_module({nn.Conv2d: _reference_conv_class()})
    inject_adapter_in_model(config, model)
    names = [n for n, m in model.named_modules() if _is_lora_layer(m)]
    if not names:
        raise ValueError(f"target_modules={target_modules!r} matched no module of {type(model).__name__}")
    return names


def _is_lora_layer(m: nn.Module) -> bool:
    return isinstance(m, _peft_lora().LoraLayer)


def lora_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if _is_lora_layer(m)]


def is_lora_param(name: str) -> bool:
    return ".lora_" in name or name.startswith("lora_")


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_lora_param(n)]


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA layer between W + BA (enabled) and W alone (disabled).

    PEFT's ``enable_adapters`` also flips ``requires_grad`` of the adapter weights; the caller here routes
    gradients itself (and DeepSpeed needs every trainable parameter to keep ``requires_grad`` as it was at
    ``initialize``), so the flags are put back as they were.
    """
    for m in lora_layers(model):
        if m.disable_adapters == (not enabled):
            continue
        flags = [(p, p.requires_grad) for p in m.parameters()]
        m.enable_adapters(enabled)
        for p, flag in flags:
            p.requires_grad_(flag)


def adapters_enabled(model: nn.Module) -> bool:
    layers = lora_layers(model)
    return bool(layers) and not layers[0].disable_adapters


class adapters(object):
    """Context manager: run with adapters enabled (``True``) or disabled, then restore the previous state."""

    def __init__(self, model: nn.Module, enabled: bool):
        self.model, self.enabled = model, enabled

    def __enter__(self):
        self.previous = adapters_enabled(self.model)
        set_adapters_enabled(self.model, self.enabled)
        return self.model

    def __exit__(self, *exc):
        set_adapters_enabled(self.model, self.previous)
        return False


def lora_param_count(model: nn.Module, form: str, r: int) -> int:
    """Trainable LoRA parameters that ``form`` would add to the modules LoRA is (or would be) attached to,
    computed from the layer shapes, so both forms can be reported from one model."""
    total = 0
    for m in lora_layers(model):
        base = m.get_base_layer()
        if isinstance(base, nn.Conv2d):
            k = base.kernel_size[0]
            cin, cout = base.in_channels, base.out_channels
            if form == "reference":
                total += (r * k) * (cin * k) + (cout * k) * (r * k)
            else:
                total += cin // base.groups * r * k * base.kernel_size[1] + r // base.groups * cout
        elif isinstance(base, nn.Linear):
            total += r * (base.in_features + base.out_features)
    return total


def count_params(params) -> int:
    return int(sum(p.numel() for p in params))
