"""ParaRNN core: backend-free cell definitions, solvers and layer layout."""

from pararnn_core.cell import Cell, Constant, Fields, Normal, Timescales, get_cell, registered_cells
from pararnn_core.layer_spec import MODES, LayerSpec
from pararnn_core.newton import (
    NewtonConfig,
    NewtonConvergenceError,
    NewtonConvergenceWarning,
    SolveInfo,
)

__all__ = [
    "Cell",
    "Constant",
    "Fields",
    "LayerSpec",
    "MODES",
    "NewtonConfig",
    "NewtonConvergenceError",
    "NewtonConvergenceWarning",
    "Normal",
    "SolveInfo",
    "Timescales",
    "get_cell",
    "registered_cells",
]
