"""Trainers: sparse dictionaries, objectives, the sharded train loop, checkpoints, export."""

from allscope.trainers.config import TrainConfig
from allscope.trainers.loop import TrainingDiverged, TrainResult, train
from allscope.trainers.preemption import Preempted
from allscope.trainers.state import TrainState

__all__ = ["Preempted", "TrainConfig", "TrainResult", "TrainState", "TrainingDiverged", "train"]
