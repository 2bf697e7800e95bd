"""SVD-initialised LoRA (PiSSA / AMT's "adsv" init) for the linears of ViTs and the convs of CNNs.

Every adapted weight ``W`` is split as ``W = W_res + s * B A`` with ``A = sqrt(S_r) V_r^T / sqrt(s)``,
``B = U_r sqrt(S_r) / sqrt(s)`` (the top-r singular triplets, ``s = alpha / r``); ``W_res`` is frozen, so the
adapted network computes exactly what the original did at initialisation.

- ``nn.Linear``: PEFT's LoRA layer with PEFT's own PiSSA init (``LoraLayer.pissa_init(..., "pissa")``,
  the code path of ``init_lora_weights="pissa"``).
- ``nn.Conv2d``: PEFT's LoRA conv layer (``lora_A`` a k x k conv to r channels, ``lora_B`` a 1x1 conv);
  PEFT refuses PiSSA for convs, so :func:`svd_init_conv` does the same SVD over ``W`` reshaped to
  (out, in*k*k).
- fused ``qkv`` of a ViT: the reference (loralib's ``MergedLinear``) carries one rank-r LoRA per q, k and v
  block; :class:`MergedQKVLoRA` is that form (``qkv_mode="merged"``, default). ``qkv_mode="fused"`` lets
  PEFT put one rank-r LoRA across the fused layer.

A *site* is one adapted layer. :func:`lora_sites`, :func:`site_keys` and :func:`site_delta` give a uniform
view over the three kinds, which test-time merging (``methods/merge.py``) uses.
"""
from __future__ import annotations

import re

import torch
from torch import nn

ADAPTER = "default"
# timm ViT names: blocks.0.attn.qkv, blocks.0.attn.proj, blocks.0.mlp.fc1, blocks.0.mlp.fc2
VIT_TARGETS = r"(.*\.)?(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
# convs inside residual stages (layer1..layer4 of torchvision/timm/CIFAR ResNets): block convs and shortcuts
CNN_TARGETS = r"(.*\.)?layer\d+\..*"


def resolve_targets(module: nn.Module, pattern: str = "auto") -> list[str]:
    """Names (relative to ``module``) of the Linear/Conv2d layers to adapt.

    ``pattern`` is a regular expression matched against the whole module name, or ``"auto"``: the ViT
    linears (qkv, proj, fc1, fc2) when there are any, else the convs of the residual stages (``layer*``).
    """
    kinds = (nn.Linear, nn.Conv2d)
    named = [(n, m) for n, m in module.named_modules() if isinstance(m, kinds) and n]
    if pattern == "auto":
        vit = [n for n, m in named if isinstance(m, nn.Linear) and re.fullmatch(VIT_TARGETS, n)]
        if vit:
            return vit
        cnn = [n for n, m in named if isinstance(m, nn.Conv2d) and m.groups == 1 and re.fullmatch(CNN_TARGETS, n)]
        if cnn:
            return cnn
        raise ValueError("target_modules=auto found neither ViT linears (attn.qkv/proj, mlp.fc1/fc2) nor "
                         "convs under layer*; set target_modules to a regular expression")
    names = [n for n, m in named if re.fullmatch(pattern, n) and not (isinstance(m, nn.Conv2d) and m.groups != 1)]
    if not names:
        raise ValueError(f"target_modules={pattern!r} matches no Linear/Conv2d layer")
    return names


def _svd_factors(W2: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-r factors of a 2-D weight, PEFT's PiSSA convention (``s * B @ A`` is the rank-r part)."""
    U, S, Vh = torch.linalg.svd(W2.float(), full_matrices=False)
    r = min(r, S.numel())
    Sr = S[:r] / scaling
    A = torch.diag(Sr.sqrt()) @ Vh[:r]
    B = U[:, :r] @ torch.diag(Sr.sqrt())
    return A, B


@torch.no_grad()
def svd_init_conv(layer, adapter: str = ADAPTER) -> None:
    """SVD init of a PEFT LoRA Conv2d over W reshaped to (out, in*k*k); the residual becomes the base weight."""
    base = layer.get_base_layer()
    W = base.weight
    out_c = W.shape[0]
    scaling = layer.scaling[adapter]
    r = layer.r[adapter]
    A, B = _svd_factors(W.reshape(out_c, -1), r, scaling)
    if A.shape[0] < r:  # rank above min(out, in*k*k): pad with zero directions
        A = torch.cat([A, A.new_zeros(r - A.shape[0], A.shape[1])])
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
    layer.lora_A[adapter].weight.data = A.reshape(layer.lora_A[adapter].weight.shape).to(W.dtype).contiguous()
    layer.lora_B[adapter].weight.data = B.reshape(layer.lora_B[adapter].weight.shape).to(W.dtype).contiguous()
    base.weight.data = (W.float() - scaling * (B @ A).reshape(W.shape)).to(W.dtype)


class MergedQKVLoRA(nn.Module):
    """A fused qkv Linear with one rank-r LoRA per q, k and v block (loralib ``MergedLinear``), SVD-initialised.

    ``lora_A``: [3, r, in], ``lora_B``: [3, out/3, r]; output ``base(x) + s * cat_g(x A_g^T B_g^T)``.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, groups: int = 3):
        super().__init__()
        if base.out_features % groups:
            raise ValueError(f"qkv out_features {base.out_features} is not divisible by {groups}")
        self.base_layer = base
        self.r, self.groups = r, groups
        self.scaling = alpha / r
        out_g = base.out_features // groups
        W = base.weight.data
        As, Bs, res = [], [], []
        for g in range(groups):
            Wg = W[g * out_g:(g + 1) * out_g]
            A, B = _svd_factors(Wg, r, self.scaling)
            As.append(A)
            Bs.append(B)
            res.append(Wg.float() - self.scaling * B @ A)
        self.lora_A = nn.Parameter(torch.stack(As).to(W.dtype))
        self.lora_B = nn.Parameter(torch.stack(Bs).to(W.dtype))
        base.weight.data = torch.cat(res).to(W.dtype)

    def delta(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return self.scaling * torch.bmm(B, A).reshape(-1, A.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("...d,grd->...gr", x, self.lora_A)
        out = torch.einsum("...gr,gor->...go", h, self.lora_B)
        return self.base_layer(x) + self.scaling * out.reshape(*x.shape[:-1], -1)


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def apply_svd_lora(module: nn.Module, r: int = 8, alpha: float | None = None, target_modules: str = "auto",
                   qkv_mode: str = "merged") -> list[str]:
    """Wrap the target layers of ``module`` in SVD-initialised LoRA, in place; freeze everything else.

    Returns the adapted layer names. ``alpha=None`` means alpha = r (scale 1, as the reference).
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import layer as lora_layer

    if qkv_mode not in ("merged", "fused"):
        raise ValueError(f"qkv_mode={qkv_mode!r}; valid: merged, fused")
    alpha = float(r if alpha is None else alpha)
    names = resolve_targets(module, target_modules)
    qkv = [n for n in names if qkv_mode == "merged" and n.split(".")[-1] == "qkv"
           and isinstance(module.get_submodule(n), nn.Linear)]
    others = [n for n in names if n not in qkv]
    for p in module.parameters():
        p.requires_grad_(False)
    if others:
        # init_lora_weights=True builds the layers; the SVD init follows per layer kind (PEFT refuses
        # PiSSA for Conv2d at update_layer, so the Linear layers run PEFT's PiSSA code path explicitly).
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=others, lora_dropout=0.0, bias="none",
                         init_lora_weights=True)
        inject_adapter_in_model(cfg, module)
        for n in others:
            layer = module.get_submodule(n)
            if isinstance(layer, lora_layer.Linear):
                with torch.no_grad():
                    layer.pissa_init(ADAPTER, "pissa")
            elif isinstance(layer, lora_layer.Conv2d):
                svd_init_conv(layer)
            else:
                raise TypeError(f"{n}: unsupported LoRA layer {type(layer).__name__}")
    for n in qkv:
        _set_submodule(module, n, MergedQKVLoRA(module.get_submodule(n), r, alpha))
    for n, p in module.named_parameters():
        p.requires_grad_("lora_A" in n or "lora_B" in n)
    return names


# --- a uniform view over the adapted layers ---------------------------------------------------------
def _is_peft_lora(m: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer

    return isinstance(m, LoraLayer)


def lora_sites(root: nn.Module) -> dict[str, nn.Module]:
    """Adapted layers under ``root`` by name (relative to ``root``)."""
    return {n: m for n, m in root.named_modules() if isinstance(m, MergedQKVLoRA) or _is_peft_lora(m)}


def site_keys(name: str, m: nn.Module) -> dict[str, str]:
    """Parameter names (relative to the root ``lora_sites`` was called on) of a site's A, B and base weight."""
    p = f"{name}." if name else ""
    if isinstance(m, MergedQKVLoRA):
        return {"A": f"{p}lora_A", "B": f"{p}lora_B", "W": f"{p}base_layer.weight"}
    return {"A": f"{p}lora_A.{ADAPTER}.weight", "B": f"{p}lora_B.{ADAPTER}.weight", "W": f"{p}base_layer.weight"}


def site_delta(m: nn.Module, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``s * B A`` in the shape of the site's base weight."""
    if isinstance(m, MergedQKVLoRA):
        return m.delta(A, B)
    s = m.scaling[ADAPTER]
    W = m.get_base_layer().weight
    if A.dim() == 2:  # Linear
        return s * (B @ A)
    return s * (B.reshape(B.shape[0], -1) @ A.reshape(A.shape[0], -1)).reshape(W.shape)


def site_weight(m: nn.Module) -> torch.Tensor:
    """The full adapted weight ``W_res + s * B A`` of a site (detached)."""
    A = m.lora_A if isinstance(m, MergedQKVLoRA) else m.lora_A[ADAPTER].weight
    B = m.lora_B if isinstance(m, MergedQKVLoRA) else m.lora_B[ADAPTER].weight
    W = m.base_layer.weight if isinstance(m, MergedQKVLoRA) else m.get_base_layer().weight
    return (W + site_delta(m, A, B)).detach()
