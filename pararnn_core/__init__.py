"""ParaRNN core: backend-free cell definitions, solvers and layer layout."""

from pararnn_core.cell import Cell, Constant, Fields, Normal, Timescales, get_cell, registered_cells
from pararnn_core.layer_spec import LayerSpec
from pararnn_core.newton import (
    NewtonConfig,
    NewtonConvergenceError,
    NewtonConvergenceWarning,
    SolveInfo,
)
from pararnn_core.solvers import MODES

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
