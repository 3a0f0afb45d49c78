"""Training: the trainer (on accelerate), batching, lr schedules, checkpoints, `paretune train`."""

from .trainer import TrainResult, train

__all__ = ["train", "TrainResult"]
