"""Settings of a run: the paper's (arXiv 2510.21450, Tables 1 and 6) and a CPU preset per task."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pararnn_torch.tasks.data import TaskSettings

#: per task: (vocab_size, task parameter, mixer only); the parameter is kappa, k or n
PAPER_TASKS = {
    "parity": (2, 0, True),
    "mqar": (128, 2, False),
    "khop": (5, 2, False),
    "keepnth": (128, 5, False),
}


@dataclass(frozen=True)
class RunSettings:
    """Everything that defines one training run except the model and the seed."""

    task: str
    seq_len: int = 100
    vocab_size: int = 2
    task_param: int = 0
    mixer_only: bool = False
    #: mixer (+ MLP) blocks; the paper's models have one
    layers: int = 1
    d_model: int = 64
    state_size: int = 64
    num_heads: int = 4
    #: solver mode of the recurrent layers (auto: the fastest on the device)
    mode: str = "auto"
    train_samples: int = 10_000
    test_samples: int = 100_000
    batch_size: int = 16
    steps: int = 10_000
    lr: float = 5e-4
    #: per-model learning rates that replace ``lr`` for those models, as (model, lr) pairs
    model_lr: tuple = ()
    warmup_steps: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eval_every: int = 250
    #: held-out sequences scored at every evaluation (the curve); the final score uses all of them
    eval_samples: int = 1_000
    #: stop early once the curve's held-out accuracy reaches this (1.0: only when perfect)
    stop_at: float = 1.0
    data_seed: int = 0

    def __post_init__(self):
        self.task_settings  # noqa: B018 - a run whose task is ill-defined is refused when it is made

    @property
    def task_settings(self) -> TaskSettings:
        """The task's own settings, checked together (length, vocabulary, parameter)."""
        return TaskSettings(self.task, self.seq_len, self.vocab_size, self.task_param)

    def lr_for(self, model: str) -> float:
        return dict(self.model_lr).get(model, self.lr)

    def replace(self, **changes) -> RunSettings:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def paper_settings(task: str) -> RunSettings:
    """The paper's setup: single layer, d = N = 64, 4 heads, L = 100, 10k train / 100k test, AdamW,
    cosine from 5e-4, batch 16. The number of steps is ours (not in the issue's summary of the paper)."""
    if task not in PAPER_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(PAPER_TASKS)}")
    vocab, param, mixer_only = PAPER_TASKS[task]
    return RunSettings(task=task, vocab_size=vocab, task_param=param, mixer_only=mixer_only)


#: the CPU preset's changes to the paper's settings, per task (length stays 100 everywhere)
_CPU_CHANGES = {
    # tuned on seeds 0-2 here: ParaGRU failed one seed at 1e-2 and ParaLSTM one at 3e-3 and at 5e-3
    "parity": {"test_samples": 2_000, "steps": 1_500, "lr": 1e-2, "model_lr": (("paragru", 3e-3),),
               "eval_every": 100, "eval_samples": 500},
    "mqar": {"test_samples": 2_000, "steps": 1_000, "lr": 3e-3, "eval_every": 100, "eval_samples": 500},
    "khop": {"test_samples": 2_000, "steps": 1_500, "lr": 3e-3, "eval_every": 100, "eval_samples": 500},
    "keepnth": {"test_samples": 2_000, "steps": 1_500, "lr": 3e-3, "eval_every": 100, "eval_samples": 500},
}

PRESETS = ("paper", "cpu")


def preset_settings(task: str, preset: str) -> RunSettings:
    base = paper_settings(task)
    if preset == "paper":
        return base
    if preset == "cpu":
        return base.replace(**_CPU_CHANGES[task])
    raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
