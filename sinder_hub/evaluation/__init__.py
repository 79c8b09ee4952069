"""Feature quality of frozen backbones: the paper's evaluations on the standard datasets, streamed and distributed.

One module per idea: ``layouts`` (datasets as distributed), ``targets`` (masks and depth maps,
checked before any feature is computed), ``metrics``, ``features`` (encoders: what a backbone
gives each protocol), ``streaming`` (batches, processes, features on disk), one module per
protocol (``knn``, ``linear``, ``linseg``, ``depth``, ``kmeans``; ``dense`` is the loop linseg
and depth share), ``table`` (results.json, the Markdown table, the bar chart) and ``run`` (the
variants x datasets x protocols of one ``sinder-hub evaluate``). See docs/evaluation.md.
"""

from .depth import linear_depth
from .features import (
    Encoder,
    class_and_mean_encoder,
    class_token_encoder,
    depth_token_encoder,
    patch_token_encoder,
)
from .kmeans import kmeans, kmeans_segmentation, match_clusters
from .knn import knn_evaluate, knn_votes
from .layouts import (
    LAYOUTS,
    TASK_KINDS,
    EvalDataset,
    Sample,
    classification_split,
    dataset_for,
    detect_layout,
    open_dataset,
    segmentation_split,
)
from .linear import linear_classification
from .linseg import linear_probe_segmentation
from .metrics import confusion_matrix, depth_errors, segmentation_scores, topk_accuracy
from .streaming import Processes, Streaming
from .targets import check_targets, load_mask

TASKS = tuple(TASK_KINDS)

__all__ = [
    "LAYOUTS",
    "TASKS",
    "Encoder",
    "EvalDataset",
    "Processes",
    "Sample",
    "Streaming",
    "check_targets",
    "class_and_mean_encoder",
    "class_token_encoder",
    "classification_split",
    "confusion_matrix",
    "dataset_for",
    "depth_errors",
    "depth_token_encoder",
    "detect_layout",
    "kmeans",
    "kmeans_segmentation",
    "knn_evaluate",
    "knn_votes",
    "linear_classification",
    "linear_depth",
    "linear_probe_segmentation",
    "load_mask",
    "match_clusters",
    "open_dataset",
    "patch_token_encoder",
    "segmentation_scores",
    "segmentation_split",
    "topk_accuracy",
]
