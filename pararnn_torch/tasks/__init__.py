"""The ParaRNN paper's synthetic tasks (parity, MQAR, k-hop induction, keep-nth): generators,
single-layer models (any cell, a linear-recurrence baseline, a causal Transformer), a trainer and
the ``pararnn-tasks`` command (pararnn_torch.tasks.cli)."""

from pararnn_torch.tasks.data import IGNORE, TASKS, TaskSettings, generate
from pararnn_torch.tasks.linear_cell import LINEAR_CELL, LinearGatedCell
from pararnn_torch.tasks.models import TaskModel
from pararnn_torch.tasks.presets import RunSettings, paper_settings, preset_settings
from pararnn_torch.tasks.trainer import make_data, train_run

__all__ = [
    "IGNORE",
    "LINEAR_CELL",
    "TASKS",
    "LinearGatedCell",
    "RunSettings",
    "TaskModel",
    "TaskSettings",
    "generate",
    "make_data",
    "paper_settings",
    "preset_settings",
    "train_run",
]
