"""Train per-task adapters (``peftmerge train`` / ``train-many``) on transformers' Trainer.

``train(TrainConfig(...))`` writes one adapter folder; ``train_many("tasks.yaml")`` a set of them;
``load_trained(folder)`` reloads one onto its base. Methods: :mod:`peftmerge.train.methods`.
"""

from .api import META_FILE, TrainResult, load_trained, read_tasks, train, train_many
from .config import TrainConfig
from .methods import names

__all__ = ["META_FILE", "TrainConfig", "TrainResult", "load_trained", "names", "read_tasks", "train", "train_many"]
