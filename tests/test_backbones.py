"""Backbones on timm's registry: the suite's models, local weights through timm's loader, bad names."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from bench.backbones import SUITE_BACKBONES, create_backbone, list_backbones

ROOT = Path(__file__).resolve().parents[1]


def _madry_ckpt(path, arch="resnet18", drop=None):
    net = timm.create_model(arch, num_classes=1000)
    state = {f"module.model.{k}": v for k, v in net.state_dict().items()}
    state.update({f"module.attacker.model.{k}": v for k, v in net.state_dict().items()})
    state["module.normalizer.new_mean"] = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    state["module.normalizer.new_std"] = torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    if drop:
        state.pop(f"module.model.{drop}")
    torch.save({"model": state, "epoch": 90}, path)
    return net


def test_timm_create_model_gives_pyautoattack_weights_in_a_plain_session():
    # A fresh interpreter: only importing the suite's backbones registers them with timm.
    code = (
        "import importlib.util, pathlib, timm, torch\n"
        "import bench.backbones\n"
        "m = timm.create_model('cifar_resnet18_aa', pretrained=True)\n"
        "f = pathlib.Path(importlib.util.find_spec('pyautoattack').origin).parent / 'examples' / 'model_test.pt'\n"
        "sd = torch.load(f, map_location='cpu', weights_only=True)\n"
        "assert str(f) == m.pretrained_cfg['file'], m.pretrained_cfg\n"
        "assert torch.equal(m.layer3[1].conv2.weight, sd['layer3.1.conv2.weight'].cpu())\n"
        "assert torch.equal(m.linear.bias, sd['linear.bias'].cpu())\n"
        "print(tuple(m(torch.rand(2, 3, 32, 32)).shape))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == "(2, 10)"


def test_suite_backbones_are_timm_models_without_hub_addresses():
    assert list_backbones()[:len(SUITE_BACKBONES)] == list(SUITE_BACKBONES)
    assert set(timm.list_models(module="backbones")) == set(SUITE_BACKBONES)
    for name in SUITE_BACKBONES:
        cfg = timm.models.get_pretrained_cfg(name)
        assert not cfg.url and not cfg.hf_hub_id, name  # pretrained=True can never download


def test_cifar_resnet18_aa_backbone_has_the_shipped_weights_and_a_fresh_head():
    reference = timm.create_model("cifar_resnet18_aa", pretrained=True)
    a = create_backbone("cifar_resnet18_aa", num_classes=7)
    assert torch.equal(a.encoder.conv1.weight, reference.conv1.weight)
    assert a.head.out_features == 7 and a.encoder.num_features == 512
    assert torch.equal(a.mean.flatten(), torch.zeros(3)) and torch.equal(a.std.flatten(), torch.ones(3))


@pytest.mark.parametrize("name, error, match", [
    ("not_a_model_xyz", ValueError, "unknown backbone 'not_a_model_xyz'"),
    ("not_a_model_xyz@/tmp/w.pt", ValueError, "unknown backbone"),
    ("tiny_cnn@/nonexistent/weights.pt", FileNotFoundError, "weights file /nonexistent/weights.pt does not exist"),
])
def test_bad_backbone_is_a_one_line_error(name, error, match):
    with pytest.raises(error, match=match) as info:
        create_backbone(name, 10)
    assert "\n" not in str(info.value)


def test_madry_robustness_checkpoint_loads_through_timm(tmp_path):
    path = tmp_path / "resnet18_linf_eps4.0.ckpt"
    net = _madry_ckpt(path)
    model = create_backbone(f"madry_resnet18@{path}", num_classes=7)
    assert torch.equal(model.encoder.conv1.weight, net.conv1.weight)
    assert torch.equal(model.encoder.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert model.head.out_features == 7
    assert torch.allclose(model.std.flatten(), torch.tensor([0.2, 0.3, 0.4]))  # the checkpoint's normaliser


@pytest.mark.parametrize("backbone, drop, match", [
    ("madry_resnet18", "layer1.0.conv1.weight", "1 missing keys"),
    ("resnet18", None, "MadryLab robustness checkpoint"),  # a plain timm name does not read Madry's layout
])
def test_checkpoint_that_does_not_fit_is_an_error(tmp_path, backbone, drop, match):
    path = tmp_path / "broken.ckpt"
    _madry_ckpt(path, drop=drop)
    with pytest.raises(ValueError, match=match):
        create_backbone(f"{backbone}@{path}", num_classes=7)


def test_vit_local_weights_at_128_interpolate_position_embeddings(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", num_classes=0)
    path = tmp_path / "vit.pth"
    torch.save(src.state_dict(), path)
    model = create_backbone(f"vit_tiny_patch16_224@{path}", num_classes=5, image_size=128)
    assert model.encoder.pos_embed.shape[1] == 1 + (128 // 16) ** 2
    assert torch.equal(model.encoder.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    # timm's loader resampled the grid: the class token's embedding is kept, the patch grid is new
    assert torch.equal(model.encoder.pos_embed[:, :1], src.pos_embed[:, :1])
    assert model(torch.rand(2, 3, 128, 128)).shape == (2, 5)


# --- input_resize: the model resizes (nearest) before normalisation; data and attack stay at 32x32 --------
def _encoder_input_sizes(model, x):
    seen = []
    hook = model.encoder.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        hook.remove()
    return seen, out


@pytest.mark.parametrize("input_resize,encoder_sees", [(None, (32, 32)), (32, (32, 32)), (64, (64, 64))])
def test_input_resize_what_the_encoder_sees(input_resize, encoder_sees):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    model = create_backbone("cifar_resnet18_aa", num_classes=3, input_resize=input_resize).eval()
    seen, out = _encoder_input_sizes(model, x)
    assert seen == [encoder_sees] and out.shape == (2, 3) and model.input_resize == input_resize
    plain = create_backbone("cifar_resnet18_aa", num_classes=3).eval()
    plain.head.load_state_dict(model.head.state_dict())
    with torch.no_grad():
        same = torch.equal(plain(x), out)
        # the resize is nearest, before normalisation: feeding the upsampled image by hand is the same
        by_hand = plain(torch.nn.functional.interpolate(x, size=encoder_sees, mode="nearest"))
    assert same == (encoder_sees == (32, 32)) and torch.allclose(by_hand, out, atol=1e-5)


def test_input_resize_attack_stays_on_the_stored_image():
    from methods.attacks import eval_mode, pgd_linf

    torch.manual_seed(0)
    model = create_backbone("tiny_cnn", num_classes=4, input_resize=64)
    x, y, eps = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2]), 4 / 255
    with eval_mode(model):
        seen, _ = _encoder_input_sizes(model, x)
        x_adv = pgd_linf(model, x, y, eps=eps, step_size=1 / 255, steps=3)
    assert seen == [(64, 64)]
    assert x_adv.shape == x.shape and (x_adv - x).abs().max() <= eps + 1e-7 and not torch.equal(x_adv, x)
