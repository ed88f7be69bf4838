"""The typed recipe schema (pydantic v2). Every section is strict: unknown keys are rejected.

Single source of truth: ``model.num_classes``, ``model.hidden_dim``, ``model.num_levels``,
``model.num_queries`` and ``model.num_decoder_layers`` are given once (``num_classes`` is normally
derived from the dataset's category list) and injected into every component config that declares a
field of the same name (see :func:`codetr.core.config.loader.inject_shared`). A component that sets one
of them to a different value is rejected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from codetr.core.config.criterion import SetCriterionConfig
from codetr.core.config.data import DataSourceConfig
from codetr.core.registry import component_field

__all__ = [
    "StrictModel",
    "AdapterConfig",
    "CoDETRConfig",
    "TestConfig",
    "ModelConfig",
    "DataConfig",
    "ParamGroupRule",
    "OptimConfig",
    "ScheduleConfig",
    "EvalConfig",
    "RuntimeConfig",
    "ReferenceResult",
    "Recipe",
]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


BackboneField = component_field("backbones")
NeckField = component_field("necks")
VariantField = component_field("variants")
AuxHeadField = component_field("aux_heads")
QueryEncoderField = component_field("query_encoders")


class EMAConfig(StrictModel):
    """``model.ema``: an exponential moving average of the weights, updated after every optimizer step;
    evaluation and ``model_final.pt`` use it (:mod:`codetr.engine.ema`)."""

    decay: float = Field(0.9998, gt=0, lt=1, description="asymptotic decay per optimizer step")
    warmup: int = Field(2000, ge=0, description="updates over which the decay ramps up: decay * (1 - exp(-t / warmup))")


class AdapterConfig(StrictModel):
    """``model.co_detr.adapter``: how the encoder output becomes the aux heads' feature pyramid (paper §3.2).

    * ``multi_scale`` (official Co-DETR): the encoder levels + ``num_extra`` stride-2 Conv3x3 + GN levels.
    * ``single_scale`` (paper §A2, for single-scale encoders such as Conditional / DAB-DETR): from the one
      encoder map of stride s, bilinear x2 + Conv3x3 + GN levels down to ``min_stride`` and stride-2 Conv3x3 +
      GN levels up to ``max_stride`` (ViTDet-like), e.g. C5 (s = 32) -> strides 8, 16, 32, 64, 128.
    * ``auto``: ``single_scale`` when ``model.num_levels`` is 1, else ``multi_scale``.
    """

    type: Literal["auto", "multi_scale", "single_scale"] = "auto"
    num_extra: int = Field(1, ge=0, description="multi_scale: extra coarser levels (official: 1)")
    min_stride: int = Field(8, ge=1, description="single_scale: finest pyramid stride (a power-of-2 fraction of s)")
    max_stride: int = Field(128, ge=1, description="single_scale: coarsest pyramid stride (a power-of-2 multiple of s)")
    norm_groups: int = Field(32, ge=1, description="GroupNorm groups of the new levels")

    @model_validator(mode="after")
    def _strides(self) -> "AdapterConfig":
        if self.min_stride > self.max_stride:
            raise ValueError(f"min_stride ({self.min_stride}) must be <= max_stride ({self.max_stride})")
        return self


class CoDETRConfig(StrictModel):
    """Collaborative hybrid assignment settings (used when ``model.aux_heads`` is non-empty)."""

    lambda_1: float = Field(1.0, ge=0, description="weight of the customized-positive-query losses")
    lambda_2: float = Field(2.0, ge=0, description="aux-head losses are multiplied by lambda_2 * num_decoder_layers")
    with_pos_queries: bool = Field(True, description="decode customized positive queries (paper eq. 4-6)")
    adapter: AdapterConfig = Field(default_factory=AdapterConfig,
                                   description="encoder output -> aux feature pyramid (multi- or single-scale)")
    eval_module: str | int = Field(
        "detr", description="what codetr eval / predict runs: detr (default), or one aux head on its own: its "
                            "index k or 'aux{k}', its type (e.g. atss, faster_rcnn, a plugin's) or the official "
                            "one-stage (first ATSS head) / two-stage (first R-CNN head)")


class SoftNMSConfig(StrictModel):
    method: Literal["linear", "gaussian"] = "linear"
    iou_threshold: float = Field(0.8, gt=0, le=1)
    sigma: float = Field(0.5, gt=0)
    max_per_image: int = Field(300, ge=1)


class TestConfig(StrictModel):
    topk: int = Field(100, ge=1, description="detections kept per image (official Deformable: 100, DINO: 300)")
    score_threshold: float = Field(0.0, ge=0, le=1)
    soft_nms: SoftNMSConfig | None = None
    exact_padding: bool = Field(
        True, description="run the CNN per image at inference so results do not depend on batch composition")


class ModelConfig(StrictModel):
    num_classes: int | None = Field(None, ge=1, description="derived from the dataset's categories when omitted")
    hidden_dim: int = Field(256, ge=8)
    num_levels: int = Field(4, ge=1)
    num_queries: int = Field(300, ge=1)
    num_decoder_layers: int = Field(6, ge=1)
    backbone: BackboneField
    neck: NeckField
    variant: VariantField
    criterion: SetCriterionConfig = Field(default_factory=SetCriterionConfig)
    aux_heads: list[AuxHeadField] = Field(default_factory=list)
    query_encoder: QueryEncoderField | None = None
    co_detr: CoDETRConfig = CoDETRConfig()
    test: TestConfig = TestConfig()
    init_from: Path | None = Field(None, description="weights-only initialisation (shape-aware, load report)")
    ema: EMAConfig | None = Field(None, description="exponential moving average of the weights (evaluated, exported)")

    @model_validator(mode="after")
    def _hidden_dim_heads(self) -> "ModelConfig":
        if self.hidden_dim % 8:
            raise ValueError(f"hidden_dim must be a multiple of 8 (attention heads), got {self.hidden_dim}")
        return self


class DataConfig(StrictModel):
    train: DataSourceConfig | None = None
    val: DataSourceConfig | None = None


class ParamGroupRule(StrictModel):
    """Parameters whose name matches ``pattern`` (a regular expression searched in the dotted name,
    e.g. ``backbone`` or ``sampling_offsets|reference_points``) get ``lr * lr_mult`` and
    ``weight_decay * weight_decay_mult``. The first matching rule wins."""

    pattern: str
    lr_mult: float = Field(1.0, ge=0)
    weight_decay_mult: float = Field(1.0, ge=0)


class OptimConfig(StrictModel):
    type: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    momentum: float = Field(0.9, ge=0)
    param_groups: list[ParamGroupRule] = Field(default_factory=list)
    clip_grad_norm: float | None = Field(0.1, gt=0)
    accumulate_steps: int = Field(1, ge=1, description="gradient accumulation: optimizer step every N batches")


class ScheduleConfig(StrictModel):
    """Training length in epochs *or* iterations (optimizer steps); milestones use the same unit."""

    epochs: int | None = Field(None, ge=1)
    iterations: int | None = Field(None, ge=1)
    milestones: list[int] = Field(default_factory=list)
    gamma: float = Field(0.1, gt=0)
    warmup_iters: int = Field(0, ge=0)
    warmup_factor: float = Field(0.001, gt=0, le=1)
    reference_batch_size: int | None = Field(
        None, ge=1, description="total batch of the published recipe; a warning is printed when yours differs")

    @model_validator(mode="after")
    def _one_length(self) -> "ScheduleConfig":
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("set exactly one of 'epochs' or 'iterations'")
        total = self.epochs or self.iterations
        bad = [m for m in self.milestones if not 0 < m <= total]
        if bad:
            unit = "epochs" if self.epochs else "iterations"
            raise ValueError(f"milestones {bad} outside 1..{total} {unit}")
        if sorted(self.milestones) != list(self.milestones):
            raise ValueError(f"milestones must be increasing, got {self.milestones}")
        return self


class EvalConfig(StrictModel):
    period: int = Field(1, ge=0, description="evaluate every N epochs (or N iterations for iteration schedules); 0 = only at the end")
    backend: Literal["faster", "pycocotools"] = "faster"
    max_dets: int = Field(100, ge=1)
    per_class: bool = True
    metric: str = Field("AP", description="metric used to keep the best checkpoint")


class RuntimeConfig(StrictModel):
    seed: int = 42
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    output_dir: Path | None = Field(None, description="default: runs/<recipe name>")
    checkpoint_period: int = Field(0, ge=0, description="also checkpoint every N iterations (0: only at epoch end)")
    keep_last: int = Field(2, ge=1, description="periodic checkpoints kept")
    log_period: int = Field(10, ge=1)
    deterministic: bool = False
    max_bad_steps: int = Field(20, ge=1, description="abort after this many consecutive non-finite losses")
    no_positive_patience: int = Field(50, ge=1, description="iterations without any positive before warning")


class ReferenceResult(StrictModel):
    """What the recipe is expected to reach, with its source (for users reproducing numbers)."""

    box_ap: float | None = None
    source: str | None = None
    notes: str | None = None


class Recipe(StrictModel):
    name: str
    description: str = ""
    model: ModelConfig
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig
    eval: EvalConfig = EvalConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    reference: ReferenceResult | None = None

    @property
    def output_dir(self) -> Path:
        return self.runtime.output_dir or Path("runs") / self.name
