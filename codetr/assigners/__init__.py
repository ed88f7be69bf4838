"""Assigners: one-to-one matchers (Hungarian) and one-to-many assigners (ATSS, Max-IoU, plugins).

:func:`build_one_to_many` is the single way a head fills an assigner slot from its config, so a registered
plugin assigner works in every slot (ATSS head, Faster R-CNN RPN and RoI stage).
"""

from __future__ import annotations

from codetr.core.interfaces import OneToManyAssigner
from codetr.core.registry import ComponentConfig, registry

__all__ = ["build_one_to_many"]


def build_one_to_many(cfg: ComponentConfig, slot: str) -> OneToManyAssigner:
    """Build the ``codetr.assigners`` component of ``cfg`` for ``slot`` (a recipe path, for the message).

    Raises:
        ValueError: the component is not a :class:`OneToManyAssigner` (e.g. a one-to-one matcher).
    """
    assigner = registry.build("assigners", cfg)
    if not isinstance(assigner, OneToManyAssigner):
        raise ValueError(f"{slot}: {cfg.type!r} builds a {type(assigner).__name__}, not a one-to-many assigner "
                         "(codetr.core.interfaces.OneToManyAssigner); choose e.g. 'atss' or 'max_iou'")
    return assigner
