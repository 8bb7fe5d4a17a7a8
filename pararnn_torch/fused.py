"""``mode="fused"`` for PyTorch on the CPU: the generated sequential sweep and its adjoint.

The kernels come from pararnn_core.codegen (one compiled library per cell,
loaded with ctypes); here they become torch ops (``pararnn::fused_forward`` /
``pararnn::fused_backward``, with fake implementations so torch.compile can
trace through them) and one autograd Function, so the whole backward is the
adjoint kernel plus the matmuls of the input projection.
"""

from __future__ import annotations

import weakref

import torch

from pararnn_core.cell import Cell
from pararnn_core.codegen import CodegenError, NativeBuildError, definition_hash, load_cpu_library
from pararnn_core.codegen.native import compiler
from pararnn_core.newton import SolveInfo
from pararnn_torch.solver import refuse_higher_order

# libraries by definition hash: the ops take the hash, since a custom op cannot take a Python object
_libraries: dict = {}
# hash (or the reason it cannot be built) per cell instance, so a forward pays for neither sympy nor hashing
_keys: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_failures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _library_for(cell: Cell):
    key = _keys.get(cell)
    if key is None:
        key = definition_hash(cell)
        if key not in _libraries:
            _libraries[key] = load_cpu_library(cell)
        _keys[cell] = key
    return key, _libraries[key]


def fused_unavailable_reason(cell: Cell | None, device) -> str | None:
    """None when ``mode='fused'`` runs ``cell`` (any cell when None) on ``device``; else why not and what to do."""
    device = torch.device(device if device is not None else "cpu")
    if device.type != "cpu":
        return f"the fused kernels of this build run on the CPU only (input on {device}); use mode='parallel'"
    if cell is not None and cell in _failures:
        return _failures[cell]
    try:
        if cell is None:
            compiler()
        else:
            _library_for(cell)
    except (CodegenError, NativeBuildError) as exc:
        reason = f"{exc} (use mode='parallel' or 'sequential')"
        if cell is not None:
            _failures[cell] = reason
        return reason
    return None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _contiguous(t: torch.Tensor | None):
    return None if t is None else t.contiguous()


@torch.library.custom_op("pararnn::fused_forward", mutates_args=())
def fused_forward(
    u: torch.Tensor,
    recurrent: torch.Tensor,
    bias: torch.Tensor | None,
    h0: torch.Tensor | None,
    resets: torch.Tensor | None,
    cell_key: str,
) -> torch.Tensor:
    """Trajectory [B, T, K, N] of the cell over gates ``u + bias`` (u [B, T, G, N], bias [G, N])."""
    lib = _libraries[cell_key]
    batch, steps, _, channels = u.shape
    u, recurrent, bias, h0 = (_contiguous(t) for t in (u, recurrent, bias, h0))
    resets = resets.contiguous().view(torch.uint8) if resets is not None else None
    traj = u.new_empty((batch, steps, lib.cell.state_size, channels))
    lib.forward(
        _dtype_name(u), u.data_ptr(), recurrent.data_ptr(), _ptr(bias), _ptr(h0), _ptr(resets), traj.data_ptr(),
        batch, steps, channels, torch.get_num_threads(),
    )  # fmt: skip
    return traj


@fused_forward.register_fake
def _(u, recurrent, bias, h0, resets, cell_key):
    batch, steps, _, channels = u.shape
    return u.new_empty((batch, steps, _libraries[cell_key].cell.state_size, channels))


@torch.library.custom_op("pararnn::fused_backward", mutates_args=())
def fused_backward(
    u: torch.Tensor,
    recurrent: torch.Tensor,
    bias: torch.Tensor | None,
    h0: torch.Tensor | None,
    resets: torch.Tensor | None,
    traj: torch.Tensor,
    grad: torch.Tensor,
    cell_key: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_u [B, T, G, N], d_recurrent [P, N], d_bias [G, N], d_h0 [B, K, N]); d_h0 is zeros when h0 is None."""
    lib = _libraries[cell_key]
    batch, steps, gates, channels = u.shape
    u, recurrent, bias, h0, traj, grad = (_contiguous(t) for t in (u, recurrent, bias, h0, traj, grad))
    resets = resets.contiguous().view(torch.uint8) if resets is not None else None
    d_u = torch.empty_like(u)
    d_rec = torch.empty_like(recurrent)
    d_bias = u.new_empty((gates, channels))
    d_h0 = u.new_zeros((batch, lib.cell.state_size, channels))
    lib.backward(
        _dtype_name(u), u.data_ptr(), recurrent.data_ptr(), _ptr(bias), _ptr(h0), _ptr(resets), traj.data_ptr(),
        grad.data_ptr(), d_u.data_ptr(), d_rec.data_ptr(), d_bias.data_ptr(), _ptr(d_h0) if h0 is not None else None,
        batch, steps, channels, torch.get_num_threads(),
    )  # fmt: skip
    return d_u, d_rec, d_bias, d_h0


@fused_backward.register_fake
def _(u, recurrent, bias, h0, resets, traj, grad, cell_key):
    batch, _, gates, channels = u.shape
    return (
        torch.empty_like(u),
        torch.empty_like(recurrent),
        u.new_empty((gates, channels)),
        u.new_empty((batch, traj.shape[2], channels)),
    )


class _FusedSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, recurrent, bias, h0, resets, cell_key):
        traj = fused_forward(u, recurrent, bias, h0, resets, cell_key)
        ctx.cell_key = cell_key
        ctx.save_for_backward(u, recurrent, bias, h0, resets, traj)
        return traj

    @staticmethod
    def backward(ctx, grad_traj):
        refuse_higher_order("fused")
        u, recurrent, bias, h0, resets, traj = ctx.saved_tensors
        d_u, d_rec, d_bias, d_h0 = fused_backward(u, recurrent, bias, h0, resets, traj, grad_traj, ctx.cell_key)
        d_bias = d_bias if bias is not None and ctx.needs_input_grad[2] else None
        d_h0 = d_h0 if h0 is not None and ctx.needs_input_grad[3] else None
        return d_u, d_rec, d_bias, d_h0, None, None


def solve_fused(cell: Cell, u, recurrent, h0, resets, bias=None):
    """Trajectory [B, T, K, N] of ``cell`` over gates ``u + bias`` with the fused CPU kernels.

    Differentiable in u, recurrent, bias and h0. Passing the bias separately
    lets the sweep add it in registers instead of a pass over u.
    """
    reason = fused_unavailable_reason(cell, u.device)
    if reason is not None:
        raise RuntimeError(f"mode='fused' cannot run cell {cell.name!r}: {reason}")
    key, _ = _library_for(cell)
    with torch.autocast(u.device.type, enabled=False):
        traj = _FusedSolve.apply(u, recurrent, bias, h0, resets, key)
    return traj, SolveInfo(mode="fused", exact=True)
