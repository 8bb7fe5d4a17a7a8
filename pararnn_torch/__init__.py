"""ParaRNN layers for PyTorch: parallel Newton training of nonlinear RNNs."""

from pararnn_core import NewtonConfig, NewtonConvergenceError, NewtonConvergenceWarning, SolveInfo
from pararnn_torch.layer import ParaGRU, ParaLSTM, ParaRNN

__all__ = [
    "NewtonConfig",
    "NewtonConvergenceError",
    "NewtonConvergenceWarning",
    "ParaGRU",
    "ParaLSTM",
    "ParaRNN",
    "SolveInfo",
]
