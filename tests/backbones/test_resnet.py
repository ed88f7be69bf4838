"""ResNet backbone: official-fixture parity, weight loading, freezing, norms, checkpointing, config."""

from __future__ import annotations

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torch import nn

from codetr.backbones.resnet import (COMPONENT, FrozenBatchNorm2d, ResNet, ResNetConfig, build_resnet,
                                     official_resnet_key_map)
from codetr.core.registry import Registry
from tests._reference import backbone_atol, load_int8exact_state_dict, load_safetensors_state_dict, reference_dir



def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# --------------------------------------------------------------------------- parity with official fixtures
@pytest.mark.parity
def test_parity_co_deformable_detr_official():
    d = reference_dir("co_deformable_detr_official_small")
    sd = load_safetensors_state_dict(d / "state_dict.safetensors")
    model = build_resnet(ResNetConfig(depth=18, out_indices=(2, 3, 4), frozen_stages=1))
    report = model.load_pretrained(sd, source="co_deformable_detr_official_small")
    assert not report.unexpected and report.loaded == 100
    model.eval()
    img = torch.load(d / "inputs.pt")["img"]
    ref = torch.load(d / "features.pt")["backbone"]
    with torch.no_grad():
        out = model(img)
    assert len(out) == 3 and model.out_channels == [128, 256, 512] and model.strides == [8, 16, 32]
    for o, r in zip(out, ref):
        assert _max_abs(o, r) <= backbone_atol(r)


def _dino_backbone_sd():
    d = reference_dir("co_dino_mmdet3_small")
    return load_int8exact_state_dict(d / "state_dict_int8exact.pt")


@pytest.mark.parity
def test_parity_co_dino_mmdet3_c2_c5():
    d = reference_dir("co_dino_mmdet3_small")
    model = ResNet(depth=18, out_indices=(1, 2, 3, 4))
    model.load_pretrained(_dino_backbone_sd())
    model.eval()
    ref = torch.load(d / "backbone_neck.pt")
    with torch.no_grad():
        out = model(torch.load(d / "inputs.pt")["batch_inputs"])
    assert model.strides == [4, 8, 16, 32]
    for i, o in enumerate(out):
        assert _max_abs(o, ref[f"backbone_out_{i}"]) <= backbone_atol(ref[f"backbone_out_{i}"])


@pytest.mark.parity
def test_parity_deformable_detr_mmdet3():
    """The Deformable-DETR fixture stores no backbone weights: they are the Co-DINO fixture's (README)."""
    d = reference_dir("deformable_detr_refine_twostage_mmdet3_small")
    sd = _dino_backbone_sd()
    model = ResNet(depth=18, out_indices=(2, 3, 4))
    report = model.load_pretrained(sd)
    assert "layer4.0.conv1.weight" not in report.ignored
    model.eval()
    ref = torch.load(d / "backbone_neck.pt")
    with torch.no_grad():
        out = model(torch.load(d / "inputs.pt")["batch_inputs"])
    for i, o in enumerate(out):
        assert _max_abs(o, ref[f"backbone_out_{i}"]) <= backbone_atol(ref[f"backbone_out_{i}"])


# --------------------------------------------------------------------------- weights
def test_torchvision_checkpoint_file_matches_torchvision_eval(tmp_path):
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics
        for m in tv.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)
    model = build_resnet(ResNetConfig(depth=18, out_indices=(1, 2, 3, 4), weights=path))
    assert model.load_report is not None and model.load_report.loaded == 100
    assert "fc.weight" in model.load_report.ignored and not model.load_report.unexpected
    tv.eval()
    model.eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        out = model(x)
        y = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for s, o in zip(range(1, 5), out):
            y = getattr(tv, f"layer{s}")(y)
            assert torch.equal(o, y)


def test_mmdet_checkpoint_with_prefix(tmp_path):
    src = ResNet(depth=18, out_indices=(2, 3, 4), norm="bn").state_dict()
    ckpt = {"meta": {}, "state_dict": {**{f"backbone.{k}": v for k, v in src.items()},
                                       "neck.convs.0.conv.weight": torch.zeros(1)}}
    path = tmp_path / "mmdet.pth"
    torch.save(ckpt, path)
    model = build_resnet(ResNetConfig(depth=18, weights=path))
    assert model.load_report.loaded == 100
    assert official_resnet_key_map(ckpt["state_dict"]).keys() == src.keys()


def test_missing_weights_file_error_explains_download(tmp_path):
    path = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError) as exc:
        build_resnet(ResNetConfig(depth=50, weights=path))
    msg = str(exc.value)
    assert str(path) in msg and "never downloads" in msg
    assert "https://download.pytorch.org/models/resnet50-0676ba61.pth" in msg
    assert "ResNet50_Weights.IMAGENET1K_V1" in msg


def test_wrong_depth_checkpoint_is_rejected():
    sd = ResNet(depth=18).state_dict()
    with pytest.raises(ValueError, match="missing"):
        ResNet(depth=34).load_pretrained(sd)
    sd50 = ResNet(depth=50, out_indices=(2,)).state_dict()
    with pytest.raises(ValueError, match="shape"):
        ResNet(depth=18, out_indices=(2,)).load_pretrained(sd50)


# --------------------------------------------------------------------------- structure / freezing / norms
@pytest.mark.parametrize("depth,channels", [(18, [128, 256, 512]), (50, [512, 1024, 2048])])
def test_shapes(depth, channels):
    model = ResNet(depth=depth).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert model.out_channels == channels and model.strides == [8, 16, 32]
    assert [tuple(o.shape) for o in out] == [(1, c, 64 // s, 96 // s) for c, s in zip(channels, [8, 16, 32])]


def test_unused_trailing_stages_are_not_built():
    model = ResNet(depth=18, out_indices=(1, 2))
    assert not hasattr(model, "layer3") and not hasattr(model, "layer4")
    assert model.out_channels == [64, 128] and model.strides == [4, 8]


@pytest.mark.parametrize("frozen,expect_frozen", [(-1, []), (0, ["conv1"]), (1, ["conv1", "layer1"]),
                                                  (3, ["conv1", "layer1", "layer2", "layer3"])])
def test_frozen_stages(frozen, expect_frozen):
    model = ResNet(depth=18, frozen_stages=frozen, norm="bn")
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        top = "conv1" if top == "bn1" else top
        assert p.requires_grad == (top not in expect_frozen), name
    model.train()
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            top = name.split(".")[0]
            top = "conv1" if top == "bn1" else top
            assert m.training == (top not in expect_frozen), name


def test_norm_choices():
    assert all(not isinstance(m, nn.BatchNorm2d) for m in ResNet(depth=18).modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in ResNet(depth=18).modules()) == 20
    gn = ResNet(depth=18, norm="gn")
    assert sum(isinstance(m, nn.GroupNorm) for m in gn.modules()) == 20
    assert torch.count_nonzero(gn.layer1[0].bn2.weight) == 0  # zero-init residual for trainable norms
    fz = ResNet(depth=18)
    assert torch.all(fz.layer1[0].bn2.weight == 1)  # frozen: no zero gamma (would kill the branch)
    assert not any(p.requires_grad for m in fz.modules() if isinstance(m, FrozenBatchNorm2d)
                   for p in m.parameters())


def test_frozen_bn_autocast_keeps_dtype():
    model = ResNet(depth=18, out_indices=(2,)).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 32, 32))
    assert out[0].dtype == torch.bfloat16


def test_with_cp_same_gradients():
    torch.manual_seed(0)
    a = ResNet(depth=18, out_indices=(2, 3), norm="gn", frozen_stages=0)
    b = ResNet(depth=18, out_indices=(2, 3), norm="gn", frozen_stages=0, with_cp=True)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.01 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 48)
    for m in (a, b):
        m.train()
        sum(o.square().mean() for o in m(x)).backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        if pa.grad is not None:
            assert torch.allclose(pa.grad, pb.grad, atol=1e-6, rtol=1e-5), n


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        ResNet(depth=18)(torch.randn(1, 4, 32, 32))


# --------------------------------------------------------------------------- config / registry
def test_config_validation():
    cfg = ResNetConfig.model_validate({"type": "resnet", "depth": 18, "out_indices": [2, 3, 4]})
    assert cfg.out_indices == (2, 3, 4) and cfg.norm == "frozen_bn" and cfg.frozen_stages == 1
    for bad in ({"out_indices": [0, 1]}, {"out_indices": [3, 2]}, {"depth": 152}, {"frozen_stages": 5},
                {"norm": "syncbn"}, {"pretrained": True}):
        with pytest.raises(ValidationError):
            ResNetConfig.model_validate({"type": "resnet", **bad})


def test_component_through_registry():
    reg = Registry()
    reg._scanned = True  # no entry-point scan: test the component in isolation
    reg.register("backbones", "resnet", COMPONENT)
    cfg = reg.validate("backbones", {"type": "resnet", "depth": 18})
    model = reg.build("backbones", cfg)
    assert isinstance(model, ResNet) and model.out_channels == [128, 256, 512]


def test_dilation_dc5_stride_16_and_torchvision_semantics():
    """``dilation: true`` = torchvision ``replace_stride_with_dilation=[False, False, True]``: C5 keeps C4's
    resolution (stride 16, reported as such), the first layer4 block drops its stride (dilation 1), the others
    dilate by 2; the weights are the undilated model's (checkpoints load unchanged)."""
    torch.manual_seed(0)
    m = build_resnet(ResNetConfig(depth=50, out_indices=(3, 4), dilation=True, norm="bn")).eval()
    assert m.strides == [16, 16]
    c4, c5 = m(torch.randn(1, 3, 64, 96))
    assert c4.shape[-2:] == c5.shape[-2:] == (4, 6)
    assert m.layer4[0].conv2.stride == (1, 1) and m.layer4[0].conv2.dilation == (1, 1)
    assert m.layer4[1].conv2.dilation == (2, 2) and m.layer4[0].downsample[0].stride == (1, 1)
    plain = ResNet(depth=50, out_indices=(3, 4), norm="bn")
    assert plain.strides == [16, 32]
    plain.load_state_dict(m.state_dict())  # same parameters
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, False, True]).eval()
    tv.load_state_dict({**m.state_dict(), **{k: v for k, v in tv.state_dict().items() if k.startswith("fc.")}})
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(m(x)[-1], ref)
    assert ResNet(depth=50, out_indices=(4,), dilation=True).strides == [16]
    with pytest.raises(ValidationError, match="dilation"):
        ResNetConfig(depth=18, dilation=True)
