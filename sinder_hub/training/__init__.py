"""The repair loop, SINDER's Algorithm 1, in three rooms: one image's loss (``losses``), the run's
state and checkpoints (``state``; one optimiser step in ``step``), and the run itself (``run``:
checks, set-up, loop, finish). ``config`` holds every hyperparameter."""

from .config import COMPILE_BACKENDS, DIRECTIONS_METHODS, PRECISIONS, RepairConfig
from .losses import ImageLoss, compiled_image_loss, fast_image_loss, gives_loss, naive_image_loss
from .run import RepairResult, repair, set_precision
from .state import DataPlan, TrainState

__all__ = [
    "COMPILE_BACKENDS",
    "DIRECTIONS_METHODS",
    "PRECISIONS",
    "DataPlan",
    "ImageLoss",
    "RepairConfig",
    "RepairResult",
    "TrainState",
    "compiled_image_loss",
    "fast_image_loss",
    "gives_loss",
    "naive_image_loss",
    "repair",
    "set_precision",
]
