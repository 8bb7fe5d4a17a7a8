"""Model and training presets at the paper's scales: ``pararnn-train --preset 400m|1b|2.9b|7b``.

From the paper (Tables 3-4 as quoted in issue 14): the 7B ParaGRU has 32 layers and
4 heads and trains with lr 3e-3, weight decay 1e-4, 2048-token sequences, a z-loss,
and a cosine schedule to zero after a 10% warm-up; global batches are 256-2048
sequences. Everything else here is our choice (README, "Training at scale"): the
widths and depths of the smaller models (picked so the parameter count matches the
preset's name with an untied head and a 50,432-token vocabulary, GPT-NeoX's padded
to a multiple of 64), 4 heads and the 7B's lr and weight decay at every size,
z-loss weight 1e-4, global batch 256/512/1024/2048 sequences, gradient clipping 1.0,
and a token budget of 20 tokens per parameter (Chinchilla) that sets the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pararnn_core.lm_config import LMConfig

#: vocabulary the presets are sized for (the tokenizer given at training time decides the real one)
PRESET_VOCAB_SIZE = 50_432
#: training tokens per parameter that set a preset's number of steps
TOKENS_PER_PARAMETER = 20
WARMUP_FRACTION = 0.1


@dataclass(frozen=True)
class Preset:
    d_model: int
    layers: int
    heads: int
    batch_size: int  # sequences per step, over all processes
    seq_len: int = 2048
    lr: float = 3e-3
    weight_decay: float = 1e-4
    z_loss: float = 1e-4
    grad_clip: float = 1.0
    untied: bool = True
    mlp_size: int = 0  # 0: 8/3 d_model rounded up to 64 (LMConfig's rule)

    def config(self, cell: str = "gru", vocab_size: int = PRESET_VOCAB_SIZE) -> LMConfig:
        return LMConfig(cell=cell, vocab_size=vocab_size, d_model=self.d_model, n_layers=self.layers,
                        num_heads=self.heads, mlp_size=self.mlp_size, tie_embeddings=not self.untied)

    def steps(self, parameters: int) -> int:
        return math.ceil(TOKENS_PER_PARAMETER * parameters / (self.batch_size * self.seq_len))


PRESETS = {
    "400m": Preset(d_model=1024, layers=24, heads=4, batch_size=256),
    "1b": Preset(d_model=2048, layers=16, heads=4, batch_size=512),
    "2.9b": Preset(d_model=2560, layers=34, heads=4, batch_size=1024),
    "7b": Preset(d_model=4096, layers=32, heads=4, batch_size=2048),
}
#: parameter counts the paper reports (used by the tests and the dry-run's comparison)
PAPER_PARAMETERS = {"7b": 6.76e9}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None


def training_defaults(name: str, cell: str, vocab_size: int) -> dict:
    """pararnn-train argument defaults of a preset (explicit flags still win); warm-up is WARMUP_FRACTION of the
    steps actually run, so it is applied after parsing (see ``warmup_steps``)."""
    preset = get_preset(name)
    from pararnn_core.sizing import parameter_count

    return {
        "d_model": preset.d_model,
        "layers": preset.layers,
        "heads": preset.heads,
        "mlp_size": preset.mlp_size,
        "untied": preset.untied,
        "seq_len": preset.seq_len,
        "batch_size": preset.batch_size,
        "steps": preset.steps(parameter_count(preset.config(cell, vocab_size))),
        "lr": preset.lr,
        "weight_decay": preset.weight_decay,
        "z_loss": preset.z_loss,
        "grad_clip": preset.grad_clip,
        "min_lr_ratio": 0.0,  # cosine to zero
    }


def warmup_steps(steps: int) -> int:
    return max(1, round(WARMUP_FRACTION * steps))
