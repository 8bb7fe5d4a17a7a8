"""ParaRNN layers for MLX: the same cells, modes and weights as pararnn_torch, on Apple silicon or CPU."""

from pararnn_core import NewtonConfig, NewtonConvergenceError, NewtonConvergenceWarning, SolveInfo
from pararnn_mlx.layer import ParaGRU, ParaLSTM, ParaRNN
from pararnn_mlx.modes import unavailable_modes

__all__ = [
    "NewtonConfig",
    "NewtonConvergenceError",
    "NewtonConvergenceWarning",
    "ParaGRU",
    "ParaLSTM",
    "ParaRNN",
    "SolveInfo",
    "unavailable_modes",
]

# language-model checkpoints: pararnn_mlx.load(path) -> (model, tokenizer), usable with mlx_lm.generate
from pararnn_mlx.loader import load  # noqa: E402

__all__ += ["load"]
