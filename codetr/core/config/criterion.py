"""Recipe schema of ``model.criterion``: the one-to-one set-criterion losses and its matcher.

:class:`codetr.heads.criterion.SetCriterion` is built from it; the matcher is any registered assigner
(``type: hungarian`` by default), validated by its own config class.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from codetr.core.registry import component_field, registry

__all__ = ["SetCriterionConfig"]


class SetCriterionConfig(BaseModel):
    """Loss configuration of the one-to-one branch (defaults: official Deformable-DETR / Co-Deformable-DETR).

    Co-DINO: ``cls_loss="qfl", cls_weight=1.0, enc_loss="class"`` (the matching cost stays focal 2.0).
    """

    # extra="forbid" like every codetr config; not pydantic strict mode, so YAML values such as `1e-8`
    # (a string for PyYAML) and ints for float fields still validate.
    model_config = ConfigDict(extra="forbid", frozen=True)

    cls_loss: Literal["focal", "qfl"] = "focal"
    cls_weight: float = Field(2.0, ge=0)
    bbox_weight: float = Field(5.0, ge=0)
    giou_weight: float = Field(2.0, ge=0)
    focal_alpha: float = Field(0.25, ge=0, le=1)
    focal_gamma: float = Field(2.0, ge=0)
    qfl_beta: float = Field(2.0, ge=0)
    enc_loss: Literal["binary", "class", "none"] = "binary"
    sync_cls_avg_factor: bool = True
    matcher: component_field("assigners") = Field(  # type: ignore[valid-type]
        default_factory=lambda: registry.validate("assigners", {"type": "hungarian"}),
        description="one-to-one matcher: any registered assigner with match_batch (default Hungarian)")
