"""Trainers: sparse dictionaries, objectives, the sharded train loop, checkpoints, export."""

from allscope.trainers.config import TrainConfig
from allscope.trainers.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
