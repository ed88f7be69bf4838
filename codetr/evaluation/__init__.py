"""COCO bbox evaluation (faster-coco-eval by default, pycocotools parity mode).

Modules: ``metrics`` (the 12 stats, tables, the summariser both backends share), ``annotations`` (GT and
results inputs, validated), ``coco`` (backends, the streaming/DDP :class:`CocoEvaluator`; its docstring lists
the guarantees: maxDets honoured in both backends, DDP gather with image-id dedup, streaming ground truth
without a json file).
"""

from codetr.evaluation.annotations import coco_gt_from_targets, load_coco_annotations, load_coco_results
from codetr.evaluation.coco import CocoEvaluator, evaluate_coco_results, evaluate_predictions_file
from codetr.evaluation.metrics import BACKENDS, Backend, CocoMetrics, EvaluationError, summarize_coco_arrays

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
