"""COCO bbox evaluation (faster-coco-eval by default, pycocotools parity mode).

See :mod:`codetr.evaluation.coco` for the guarantees (maxDets honoured in both backends, one shared
summariser, DDP gather with image-id dedup, streaming ground truth without a json file).
"""

from codetr.evaluation.coco import (
    BACKENDS,
    Backend,
    CocoEvaluator,
    CocoMetrics,
    EvaluationError,
    coco_gt_from_targets,
    evaluate_coco_results,
    evaluate_predictions_file,
    load_coco_annotations,
    load_coco_results,
    summarize_coco_arrays,
)

__all__ = [
    "BACKENDS",
    "Backend",
    "CocoEvaluator",
    "CocoMetrics",
    "EvaluationError",
    "coco_gt_from_targets",
    "evaluate_coco_results",
    "evaluate_predictions_file",
    "load_coco_annotations",
    "load_coco_results",
    "summarize_coco_arrays",
]
