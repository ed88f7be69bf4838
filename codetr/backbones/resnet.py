"""ResNet-18/34/50/101 backbone (torchvision architecture, mmdet ``ResNet`` semantics).

The network is torchvision's ``resnet{depth}`` (``weights=None``; "pytorch" style: the stride sits on
the 3x3 conv of a Bottleneck) without ``avgpool``/``fc``, and without the stages after the last one in
``out_indices``. Parameter names are torchvision's, which are also mmdet's (``conv1``, ``bn1``,
``layer{s}.{b}.conv{k}``, ``layer{s}.{b}.bn{k}``, ``layer{s}.0.downsample.{0,1}``), so both torchvision
ImageNet checkpoints and mmdet / official Co-DETR checkpoints (``backbone.*``) load directly.

Normalisation (``norm``):

* ``"frozen_bn"`` (default; what every DETR / Co-DETR recipe uses with an ImageNet-pretrained backbone):
  :class:`FrozenBatchNorm2d`, a :class:`torchvision.ops.FrozenBatchNorm2d` (eps 1e-5, fixed statistics and
  affine stored as buffers, ``num_batches_tracked`` dropped on load) whose forward calls the eval-mode
  ``F.batch_norm`` kernel. That is exactly what mmdet's ``BN(requires_grad=False)`` + ``norm_eval=True``
  computes: **bit-identical** backbone outputs on the official fixtures, whereas torchvision's
  ``x * scale + bias`` formula differs by ~8e-7 relative (2.6e-4 absolute on C5 values of ~340 in the
  Co-DINO fixture). It also keeps the input dtype under autocast (bf16 in, bf16 out).
* ``"bn"``: ordinary trainable ``BatchNorm2d`` (batch statistics in train mode). Per-GPU batches of 1-2
  large images make batch statistics noisy; use it only with reasonably large per-device batches (or
  convert to SyncBatchNorm).
* ``"gn"``: ``GroupNorm(32, C)``; the recommended choice for **training from scratch** (no pretrained
  weights): frozen BN with random weights is the identity and does not normalise anything, so a random
  frozen-BN ResNet trains badly, while GroupNorm works with any batch size.

Initialisation without weights: convs kaiming-normal (fan_out, relu), norm weight 1 / bias 0 (torchvision
and mmdet agree). mmdet additionally zero-inits the last norm of each residual block; we do so for the
trainable norms (``"bn"``, ``"gn"``) only, because a frozen zero gamma would switch the residual branches
off forever.

``frozen_stages`` follows mmdet: -1 nothing frozen; 0 the stem (``conv1``/``bn1``); ``k >= 1`` the stem
and ``layer1..layerk``. Frozen parameters get ``requires_grad=False`` and frozen stages' norm layers stay
in eval mode in ``train()``.

Pretrained weights come from a **local file only** (``weights``); nothing is ever downloaded. A missing
file raises an error telling where to get torchvision's weights.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import torchvision
from pydantic import field_validator, model_validator
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d as _TVFrozenBatchNorm2d

from codetr.backbones.common import FrozenStagesMixin, check_frozen_stages, check_out_indices
from codetr.core.registry import Component, ComponentConfig

__all__ = ["ResNetConfig", "ResNet", "FrozenBatchNorm2d", "LoadReport", "build_resnet", "official_resnet_key_map",
           "load_state_dict_file", "COMPONENT"]

logger = logging.getLogger(__name__)


class FrozenBatchNorm2d(_TVFrozenBatchNorm2d):
    """torchvision's FrozenBatchNorm2d evaluated with the eval-mode ``F.batch_norm`` kernel (mmdet numerics)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


_ARCH = {18: "resnet18", 34: "resnet34", 50: "resnet50", 101: "resnet101"}
_STAGE_WIDTHS = [64, 128, 256, 512]
_STAGE_STRIDES = [4, 8, 16, 32]


class ResNetConfig(ComponentConfig):
    """ResNet backbone options.

    Attributes:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        out_indices: stages returned, 1..4 = C2..C5 (strides 4, 8, 16, 32). Default C3..C5.
        frozen_stages: -1 none; 0 stem; k >= 1 stem + layer1..layerk (mmdet semantics).
        norm: "frozen_bn" (default, for pretrained weights), "bn" (trainable BatchNorm) or "gn"
            (GroupNorm(32), for training from scratch).
        weights: local checkpoint (torchvision state dict, or an mmdet / Co-DETR checkpoint whose backbone
            keys start with ``backbone.``; ``.pth``/``.pt`` or ``.safetensors``). Never downloaded.
        with_cp: activation checkpointing of every trainable stage during training (saves memory,
            costs one extra forward of the stage). With ``norm="bn"`` the recomputation updates the running
            statistics a second time (as in mmdet).
        dilation: "DC5": C5 (``layer4``) replaces its stride 2 by dilation 2 (torchvision
            ``replace_stride_with_dilation=[False, False, True]``: the first block keeps dilation 1 in its 3x3
            conv and drops the stride, later blocks use dilation 2), so C5 has stride 16 (the size of C4) and
            its reported stride is 16. Bottleneck depths (50, 101) only; the weights are unchanged, so ImageNet
            checkpoints load as they are (DETR / Conditional-DETR / DAB-DETR DC5 models).
    """

    type: Literal["resnet"] = "resnet"
    depth: Literal[18, 34, 50, 101] = 50
    out_indices: tuple[int, ...] = (2, 3, 4)
    frozen_stages: int = 1
    norm: Literal["frozen_bn", "bn", "gn"] = "frozen_bn"
    weights: Path | None = None
    with_cp: bool = False
    dilation: bool = False

    @model_validator(mode="after")
    def _check_dilation(self) -> "ResNetConfig":
        if self.dilation and self.depth < 50:
            raise ValueError(f"dilation (DC5) needs a Bottleneck ResNet (depth 50 or 101); torchvision's BasicBlock "
                             f"(depth {self.depth}) does not support dilation")
        return self

    @field_validator("out_indices")
    @classmethod
    def _check_out_indices(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        return check_out_indices(v, "C2..C5", "mmdet's 0-based (1, 2, 3) is (2, 3, 4) here")

    @field_validator("frozen_stages")
    @classmethod
    def _check_frozen(cls, v: int) -> int:
        return check_frozen_stages(v, "stem")


@dataclass
class LoadReport:
    """What happened when loading a checkpoint into a module."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} (e.g. {', '.join(self.ignored[:3])})")
        if self.unexpected:
            parts.append(f"unexpected {len(self.unexpected)}: {', '.join(self.unexpected[:5])}")
        if self.missing:
            parts.append(f"missing {len(self.missing)}: {', '.join(self.missing[:5])}")
        return "; ".join(parts)


def _norm_layer(norm: str):
    if norm == "frozen_bn":
        return lambda c: FrozenBatchNorm2d(c, eps=1e-5)
    if norm == "bn":
        return lambda c: nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)
    if norm == "gn":
        return lambda c: nn.GroupNorm(32, c, eps=1e-5)
    raise ValueError(f"unknown norm {norm!r}")


class ResNet(FrozenStagesMixin, nn.Module):
    """ResNet trunk returning the maps of ``out_indices``.

    Attributes:
        out_channels: channels of each returned map (e.g. [512, 1024, 2048] for R50 C3..C5).
        strides: stride of each returned map in input pixels (e.g. [8, 16, 32]).
        load_report: :class:`LoadReport` of the pretrained weights, or None.
    """

    def __init__(self, depth: int = 50, out_indices: tuple[int, ...] = (2, 3, 4), frozen_stages: int = 1,
                 norm: str = "frozen_bn", with_cp: bool = False, dilation: bool = False) -> None:
        super().__init__()
        if depth not in _ARCH:
            raise ValueError(f"ResNet depth must be one of {sorted(_ARCH)}, got {depth}")
        if dilation and depth < 50:
            raise ValueError(f"dilation (DC5) needs depth 50 or 101, got {depth} (BasicBlock has no dilation)")
        tv = getattr(torchvision.models, _ARCH[depth])(
            weights=None, norm_layer=_norm_layer(norm), zero_init_residual=norm != "frozen_bn",
            replace_stride_with_dilation=[False, False, dilation])
        self.depth = depth
        self.out_indices = tuple(out_indices)
        self.frozen_stages = frozen_stages
        self.norm = norm
        self.with_cp = with_cp
        self.dilation = dilation
        self.num_stages = max(self.out_indices)
        expansion = 1 if depth < 50 else 4
        self.conv1, self.bn1, self.relu, self.maxpool = tv.conv1, tv.bn1, tv.relu, tv.maxpool
        for s in range(1, self.num_stages + 1):
            setattr(self, f"layer{s}", getattr(tv, f"layer{s}"))
        self.out_channels: list[int] = [_STAGE_WIDTHS[i - 1] * expansion for i in self.out_indices]
        stage_strides = _STAGE_STRIDES[:3] + [16 if dilation else 32]
        self.strides: list[int] = [stage_strides[i - 1] for i in self.out_indices]
        self.load_report: LoadReport | None = None
        self._freeze_stages()

    # ----------------------------------------------------------------- freezing
    def _frozen_modules(self) -> list[nn.Module]:
        mods: list[nn.Module] = []
        if self.frozen_stages >= 0:
            mods += [self.conv1, self.bn1]
        for s in range(1, min(self.frozen_stages, self.num_stages) + 1):
            mods.append(getattr(self, f"layer{s}"))
        return mods

    # ----------------------------------------------------------------- forward
    def forward(self, images: Tensor) -> list[Tensor]:
        """Args: images (B, 3, H, W) normalised RGB. Returns one (B, C_i, H/s_i, W/s_i) map per out index."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got shape {tuple(images.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outs = []
        for s in range(1, self.num_stages + 1):
            layer = getattr(self, f"layer{s}")
            if (self.with_cp and self.training and torch.is_grad_enabled()
                    and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))):
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
            if s in self.out_indices:
                outs.append(x)
        return outs

    # ----------------------------------------------------------------- weights
    def _is_unbuilt_stage(self, key: str) -> bool:
        m = re.match(r"layer(\d+)\.", key)
        return m is not None and int(m.group(1)) > self.num_stages

    def load_pretrained(self, state_dict: dict[str, Tensor], source: str = "<state dict>") -> LoadReport:
        """Load a torchvision or mmdet/official backbone state dict (keys mapped by
        :func:`official_resnet_key_map`). Raises on missing or mis-shaped tensors; reports the rest."""
        mapped = official_resnet_key_map(state_dict)
        own = self.state_dict()
        report = LoadReport(source=source)
        usable: dict[str, Tensor] = {}
        for k, v in mapped.items():
            if k in own:
                if tuple(own[k].shape) != tuple(v.shape):
                    raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)} but ResNet-{self.depth} "
                                     f"expects {tuple(own[k].shape)} (wrong depth?)")
                usable[k] = v
            elif k.endswith("num_batches_tracked") or k.startswith("fc.") or self._is_unbuilt_stage(k):
                report.ignored.append(k)
            elif self.norm == "gn" and (k.endswith("running_mean") or k.endswith("running_var")):
                report.ignored.append(k)  # BN statistics have no GroupNorm counterpart
            else:
                report.unexpected.append(k)
        report.missing = sorted(k for k in own if k not in usable and not k.endswith("num_batches_tracked"))
        if report.missing:
            raise ValueError(f"{source}: missing {len(report.missing)} backbone tensors, e.g. "
                             f"{', '.join(report.missing[:5])}. Is this a ResNet-{self.depth} checkpoint "
                             "(torchvision naming, or mmdet keys under 'backbone.')?")
        with torch.no_grad():
            for k, v in usable.items():
                own[k].copy_(v.to(own[k].dtype))
        report.loaded = len(usable)
        self.load_report = report
        logger.info("ResNet-%d weights: %s", self.depth, report)
        return report


def official_resnet_key_map(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map a checkpoint's ResNet keys to :class:`ResNet` keys.

    * torchvision checkpoints use our names already (``fc.*`` is kept and ignored at load time).
    * mmdet / official Co-DETR / Deformable-DETR-mmdet checkpoints: the backbone keys are
      ``backbone.<torchvision name>`` -- mmdet's ResNet uses the same names as torchvision, including
      ``layerN.0.downsample.0`` (conv) / ``downsample.1`` (BN) -- so only the prefix is stripped and
      non-backbone keys (``neck.*``, ``query_head.*``, ...) are dropped.
    * detectron2 / DETR-official ``backbone.0.body.*`` prefixes are stripped too.
    """
    keys = list(state_dict)
    for prefix in ("backbone.0.body.", "module.backbone.", "backbone.body.", "backbone."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def load_state_dict_file(path: Path) -> dict[str, Tensor]:
    """Read a local checkpoint: ``.safetensors`` or a torch pickle (plain state dict, or a dict holding
    it under ``state_dict`` / ``model``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from exc
        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict):
        for key in ("state_dict", "model"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} does not contain a state dict of tensors")
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def _missing_weights_message(path: Path, depth: int) -> str:
    try:
        url = torchvision.models.get_weight(f"ResNet{depth}_Weights.IMAGENET1K_V1").url
    except Exception:  # pragma: no cover - very old / new torchvision
        url = f"(see torchvision.models.ResNet{depth}_Weights.IMAGENET1K_V1.url)"
    return (f"ResNet weights file {path} does not exist. codetr never downloads weights. To use torchvision's "
            f"ImageNet ResNet-{depth} (torchvision.models.ResNet{depth}_Weights.IMAGENET1K_V1, the checkpoint "
            f"used by the official DETR / Co-DETR recipes), download it on a machine with internet access:\n"
            f"    curl -L -o {path} {url}\n"
            f"and set backbone.weights to that file (or set weights: null to start from random init; "
            f"use norm: gn when training from scratch).")


def build_resnet(cfg: ResNetConfig) -> ResNet:
    """Build the backbone of ``cfg`` and load its local weights, if any."""
    model = ResNet(depth=cfg.depth, out_indices=cfg.out_indices, frozen_stages=cfg.frozen_stages,
                   norm=cfg.norm, with_cp=cfg.with_cp, dilation=cfg.dilation)
    if cfg.weights is not None:
        path = Path(cfg.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(_missing_weights_message(path, cfg.depth))
        model.load_pretrained(load_state_dict_file(path), source=str(path))
        model._freeze_stages()
    return model


COMPONENT = Component(
    config=ResNetConfig,
    build=build_resnet,
    summary="ResNet-18/34/50/101 (torchvision layout, frozen BN by default), returns C2..C5 maps; "
            "local torchvision / mmdet weights",
)
