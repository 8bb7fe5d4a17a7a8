"""Kernel code generation from cell definitions (docs/design.md section 3).

``derive`` evaluates a cell's step on sympy symbols and differentiates it;
``print_cell`` prints the step, Jacobian and adjoint products as device
functions for host C++, CUDA and Metal; ``cell_sources`` finds or generates
them for any cell; ``load_cpu_library`` compiles the fused CPU kernels for a
cell once (cached on disk) and loads them with ctypes, for both backends.
"""

from pararnn_core.codegen.native import CpuLibrary, NativeBuildError, load_cpu_library
from pararnn_core.codegen.printer import TARGETS, print_cell
from pararnn_core.codegen.sources import BUILTIN_CELLS, CellSources, cell_sources, write_builtin_sources
from pararnn_core.codegen.symbolic import CodegenError, Derivation, SympyOps, definition_hash, derive

__all__ = [
    "BUILTIN_CELLS",
    "CellSources",
    "CodegenError",
    "CpuLibrary",
    "Derivation",
    "NativeBuildError",
    "SympyOps",
    "TARGETS",
    "cell_sources",
    "definition_hash",
    "derive",
    "load_cpu_library",
    "print_cell",
    "write_builtin_sources",
]
