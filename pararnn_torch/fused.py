"""``mode="fused"`` for PyTorch: the whole solve, and its adjoint, in one native kernel each.

The ops ``pararnn::fused_forward`` / ``pararnn::fused_backward`` are defined in
C++ (csrc/scan/scan_ops.cpp) with one implementation per device type:

- CPU: the generated exact sequential sweep and its adjoint, compiled per cell
  at first use into a small library (pararnn_core.codegen.native) whose entry
  points are registered with the extension (csrc/fused/fused_glue.cpp);
- CUDA: the Newton solve and the adjoint of csrc/fused/fused_kernels.cuh. The
  built-in cells are compiled into the extension; any other cell is compiled
  at first use with NVRTC (pararnn_torch/nvrtc.py) and its kernels registered
  by handle (csrc/fused/fused_cuda_glue.cpp), launched with the same geometry.

Cells are named to the ops by their definition hash (a custom op cannot take a
Python object). Here the ops get their fake implementations (torch.compile,
meta tensors) and autograd, and :func:`solve_fused` turns the forward's
per-sequence Newton iterations and residuals into a :class:`SolveInfo` under
the shared failure policy (pararnn_core.newton).
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from pararnn_core.cell import Cell, get_cell
from pararnn_core.codegen import BUILTIN_CELLS, CodegenError, NativeBuildError, cell_sources, definition_hash
from pararnn_core.codegen.native import compiler, load_cpu_library
from pararnn_core.codegen.sources import shipped_paths
from pararnn_core.newton import NewtonConfig, SolveInfo, report_nonconvergence
from pararnn_torch import _ext
from pararnn_torch.solver import refuse_higher_order, solve_sequential

OPS = ("fused_forward", "fused_backward")
_WHAT_ELSE = "use mode='parallel' or 'sequential'"

# definition hash -> state size K, for the fake implementations
_state_sizes: dict[str, int] = {}
# cell -> definition hash, and cell -> {device: None or why fused cannot run}: computed once per cell
# instance, so a forward pays for no sympy, hashing or file read (weak: cells made in a loop are not kept)
_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_reasons: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_any_cell: dict = {}
_named: dict[str, Cell] = {}
# keys whose CPU kernels are registered, with the loaded library kept alive
_cpu_libraries: dict[str, ctypes.CDLL] = {}
_cuda_registered: set = set()


def _device_of(device) -> torch.device:
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def fused_unavailable_reason(cell: Cell | str | None, device) -> str | None:
    """None when ``mode='fused'`` runs ``cell`` (any cell when None) on ``device``; else why not and what to do.

    The first call per (cell, device) builds, loads and registers the cell's kernels (and on CUDA launches
    them once on a tiny problem); later calls are a dictionary lookup.
    """
    device = _device_of(device)
    if isinstance(cell, str):
        cell = _named_cell(cell)
    per_cell = _any_cell if cell is None else _reasons.setdefault(cell, {})
    if device not in per_cell:
        per_cell[device] = _first_check(cell, device)
    return per_cell[device]


def _named_cell(name: str) -> Cell:
    """One instance per cell name, so checks by name are cached like checks by instance."""
    if name not in _named:
        _named[name] = get_cell(name)
    return _named[name]


def _first_check(cell: Cell | None, device: torch.device) -> str | None:
    if device.type not in ("cpu", "cuda"):
        return f"the fused kernels run on CPU and CUDA devices, not {device.type}; {_WHAT_ELSE}"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device is available to torch; {_WHAT_ELSE}"
    for op in OPS:
        missing = _ext.missing_reason(device, op)
        if missing is not None:
            return f"{missing}; or {_WHAT_ELSE}"
    try:
        if device.type == "cpu":
            if cell is None:
                compiler()
            else:
                _register_cpu(cell)
        else:
            _register_cuda(cell if cell is not None else _named_cell("gru"), device)
    except (CodegenError, NativeBuildError, RuntimeError, OSError) as exc:
        return f"{exc} ({_WHAT_ELSE})"
    except Exception as exc:  # cuda-bindings / the driver raise their own types; any failure to load means no fused
        return f"{type(exc).__name__}: {exc} ({_WHAT_ELSE})"
    return None


def cell_key(cell: Cell) -> str:
    """The name the fused ops know ``cell`` by (its definition hash; computed once per cell instance)."""
    key = _keys.get(cell)
    if key is None:
        key = _keys[cell] = definition_hash(cell)
        _state_sizes[key] = cell.state_size
    return key


def _shape(cell: Cell) -> list[int]:
    return [cell.state_size, cell.num_gates, len(cell.params)]


def _register_cpu(cell: Cell):
    key = cell_key(cell)
    if key in _cpu_libraries:
        return
    library = ctypes.CDLL(str(load_cpu_library(cell).path))  # the same handle the loader opened: no reload
    entries = ("forward_f32", "forward_f64", "backward_f32", "backward_f64")
    addresses = [ctypes.cast(getattr(library, f"pr_fused_{e}"), ctypes.c_void_p).value for e in entries]
    torch.ops.pararnn.fused_register_cpu(key, _shape(cell), addresses)
    _cpu_libraries[key] = library


def _is_builtin(cell: Cell) -> bool:
    """Whether the extension's compiled-in kernels are this cell's (a built-in name with the shipped definition)."""
    return cell.name in BUILTIN_CELLS and cell_sources(cell).paths == shipped_paths(cell.name)


def _register_cuda(cell: Cell, device: torch.device):
    key = cell_key(cell)
    if (key, device) not in _cuda_registered:
        # the compiled-in kernels when this is a built-in cell and the build has them, else NVRTC
        if not (_is_builtin(cell) and torch.ops.pararnn.fused_use_builtin_cuda(key, cell.name, _shape(cell))):
            from pararnn_torch import nvrtc

            functions = nvrtc.cell_kernels(cell, device)
            torch.ops.pararnn.fused_register_cuda(key, _shape(cell), device.index, functions)
        _probe(cell, key, device)
        _cuda_registered.add((key, device))


def _probe(cell: Cell, key: str, device: torch.device):
    """One tiny forward and backward: raises unless the kernels really run on this GPU."""
    u = torch.zeros(1, 3, cell.num_gates, 2, device=device)
    recurrent = torch.zeros(len(cell.params), 2, device=device)
    traj, _, _ = torch.ops.pararnn.fused_forward(u, recurrent, None, None, None, key, 4, 1e-6, 1.0)
    torch.ops.pararnn.fused_backward(u, recurrent, None, None, None, traj, torch.ones_like(traj), key)
    torch.cuda.synchronize(device)
    if not bool(torch.isfinite(traj).all()):
        raise RuntimeError(f"the fused CUDA kernels of cell {cell.name!r} computed non-finite values on {device}")


def release_cpu_outputs():
    """Frees the storage the fused CPU ops keep for reuse (their trajectories and dL/du) that no tensor holds.

    The ops keep it so the next training step does not first-touch fresh pages; call this when done
    training, or before measuring memory, to hand it back.
    """
    if _ext.has_op("fused_release_cpu_outputs"):
        torch.ops.pararnn.fused_release_cpu_outputs()


# -- fake implementations and autograd of the C++ ops ---------------------------------


def _register_python_side():
    @torch.library.register_fake("pararnn::fused_forward")
    def _forward_fake(u, recurrent, bias, h0, resets, cell_key, max_its=12, tol=1e-6, damping=1.0):
        batch, steps, _, channels = u.shape
        traj = u.new_empty((batch, steps, _state_sizes[cell_key], channels))
        return traj, u.new_empty((batch, channels), dtype=torch.int32), u.new_empty((batch, channels),
                                                                                     dtype=torch.float32)

    @torch.library.register_fake("pararnn::fused_backward")
    def _backward_fake(u, recurrent, bias, h0, resets, traj, grad, cell_key):
        batch, _, gates, channels = u.shape
        return (
            torch.empty_like(u, memory_format=torch.contiguous_format),
            torch.empty_like(recurrent, memory_format=torch.contiguous_format),
            u.new_empty((gates, channels)),
            u.new_empty((batch, traj.shape[2], channels)),
        )

    def setup_context(ctx, inputs, output):
        u, recurrent, bias, h0, resets, key = inputs[:6]
        ctx.cell_key = key
        ctx.save_for_backward(u, recurrent, bias, h0, resets, output[0])

    def backward(ctx, grad_traj, _grad_iterations, _grad_residual):
        refuse_higher_order("fused")
        u, recurrent, bias, h0, resets, traj = ctx.saved_tensors
        d_u, d_rec, d_bias, d_h0 = torch.ops.pararnn.fused_backward(
            u, recurrent, bias, h0, resets, traj, grad_traj.contiguous(), ctx.cell_key
        )
        needs = ctx.needs_input_grad
        return (
            d_u if needs[0] else None,
            d_rec if needs[1] else None,
            d_bias if bias is not None and needs[2] else None,
            d_h0 if h0 is not None and needs[3] else None,
            None, None, None, None, None,
        )  # fmt: skip

    torch.library.register_autograd("pararnn::fused_forward", backward, setup_context=setup_context)


if all(_ext.has_op(op) for op in OPS):
    _register_python_side()


# -- the solve ----------------------------------------------------------------------------


def solve_fused(cell: Cell, u, recurrent, h0, resets, bias=None, config: NewtonConfig | None = None):
    """Trajectory [B, T, K, N] of ``cell`` over gates ``u + bias`` with the fused kernels, and its SolveInfo.

    Differentiable in u, recurrent, bias and h0. Passing the bias separately lets the kernels add it in
    registers instead of a pass over u. On the CPU the sweep is exact (no Newton: iterations and residual
    None); on CUDA the Newton solve honours max_its, tol, damping and on_failure of ``config``.
    """
    reason = fused_unavailable_reason(cell, u.device)
    if reason is not None:
        raise RuntimeError(f"mode='fused' cannot run cell {cell.name!r}: {reason}")
    config = config or NewtonConfig()
    tol = config.tolerance(u.element_size())
    with torch.autocast(u.device.type, enabled=False):
        traj, iterations, residual = torch.ops.pararnn.fused_forward(
            u, recurrent, bias, h0, resets, _keys[cell], config.max_its, tol, config.damping
        )
    if u.device.type == "cpu":
        return traj, SolveInfo(mode="fused", iterations=None, residual=None, converged=True, exact=True)
    if torch.compiler.is_compiling():  # nothing may be read back inside a graph
        return traj, SolveInfo(mode="fused", iterations=None, residual=None, converged=None)
    return _newton_report(cell, traj, iterations, residual, u, recurrent, h0, resets, bias, config, tol)


def _newton_report(cell, traj, iterations, residual, u, recurrent, h0, resets, bias, config, tol):
    """SolveInfo from the per-sequence results (one read-back), then the failure policy of every Newton mode."""
    if iterations.numel() == 0:
        return traj, SolveInfo(mode="fused", iterations=0, residual=0.0, converged=True)
    # max propagates NaN, so a non-finite sequence reads as not converged
    most, worst = torch.stack([iterations.max().to(residual.dtype), residual.max()]).tolist()
    info = SolveInfo(mode="fused", iterations=int(most), residual=worst, converged=worst <= tol)
    if not info.converged:
        report_nonconvergence(cell, info, config, tol)
        if config.on_failure == "fallback":
            traj, _ = solve_sequential(cell, u if bias is None else u + bias, recurrent, h0, resets)
            info.fell_back = True
    return traj, info
