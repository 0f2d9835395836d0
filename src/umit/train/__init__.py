"""Training: one loop for every task (schedules, AMP, accumulation, DDP/FSDP, checkpoints, resume).

``train(task, dataset, TrainConfig(...)) -> TrainResult``. A task turns a batch into
``dict(loss=..., **logs)`` (see :mod:`umit.train.tasks`); everything else (data order,
optimizer, schedules, precision, distribution, metrics, checkpoints) is the loop's job.
"""

from umit.train.checkpoint import load_checkpoint, load_latest, save_checkpoint
from umit.train.config import TrainConfig
from umit.train.loop import ShardedSampler, Trainer, TrainResult, train
from umit.train.optim import build_optimizer, layer_id_by_blocks, param_groups
from umit.train.schedules import Schedules, cosine_schedule
from umit.train.tasks import ModuleTask, RegressionTask, Task

__all__ = [
    "ModuleTask",
    "RegressionTask",
    "Schedules",
    "ShardedSampler",
    "Task",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_optimizer",
    "cosine_schedule",
    "layer_id_by_blocks",
    "load_checkpoint",
    "load_latest",
    "param_groups",
    "save_checkpoint",
    "train",
]
