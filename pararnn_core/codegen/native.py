"""Build and load the fused CPU kernels of a cell: generated C++ -> shared library -> ctypes.

The library is compiled once per (cell definition, kernel sources, compiler,
flags) and cached under ``<cache>/cpu/``; later processes only load it. It has
no Python or torch dependency, so pararnn_torch and pararnn_mlx share it.
Raw C++ with no framework headers compiles in a few seconds.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import numpy as np

from pararnn_core.cell import Cell, get_cell
from pararnn_core.codegen.sources import CSRC_DIR, cache_dir, cell_sources

_KERNEL_HEADERS = ("fused_cpu.h", "fused_math_cpu.h")
# -ffp-contract=fast lets FMAs form; no -ffast-math, so results stay IEEE within the polynomial errors
_BASE_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-pthread", "-fno-math-errno", "-ffp-contract=fast")
_NATIVE_FLAGS = ("-march=native",)
# libgomp: in a torch process it is torch's own runtime (same soname), so both share one thread pool
_OPENMP_FLAGS = ("-fopenmp",)
_DTYPES = {"float32": "f32", "float64": "f64"}


class NativeBuildError(RuntimeError):
    """The fused CPU kernels could not be compiled or loaded (other modes still work)."""


@lru_cache(maxsize=1)
def compiler() -> tuple[str, str]:
    """(path, version line) of the C++ compiler: $CXX, else c++, g++ or clang++ on PATH."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    for name in candidates:
        path = shutil.which(name)
        if path:
            try:
                version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            return path, version.splitlines()[0] if version else name
    raise NativeBuildError(
        f"no C++ compiler found (tried {', '.join(candidates)}); install g++ or clang++, or set CXX, "
        f"to use mode='fused' on the CPU"
    )


def _translation_unit(sources) -> str:
    return (
        f'#include "{CSRC_DIR / "fused" / "fused_cpu.h"}"\n'
        f'#include "{sources.paths["cpp"]}"\n'
        f"PR_FUSED_CPU_LIBRARY({sources.struct_name})\n"
    )


def _compile(unit: str, output: Path):
    cxx, _ = compiler()
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent) as tmp:
        src, lib = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
        src.write_text(unit)
        errors = ""
        # -march=native and OpenMP where the compiler has them, portable fallbacks otherwise
        for extra in (_NATIVE_FLAGS + _OPENMP_FLAGS, _OPENMP_FLAGS, _NATIVE_FLAGS, ()):
            cmd = [cxx, *_BASE_FLAGS, *extra, str(src), "-o", str(lib)]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(lib, output)
                return
            errors = result.stderr
        raise NativeBuildError(f"compiling the fused CPU kernels failed:\n{' '.join(cmd)}\n{errors[-4000:]}")


class CpuLibrary:
    """The loaded kernels of one cell. Pointer arguments are addresses (int) of contiguous buffers."""

    def __init__(self, cell: Cell, path: Path):
        self.cell = cell
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        shape = (ctypes.c_int32 * 3)()
        self._lib.pr_fused_cell_shape(shape)
        expected = (cell.state_size, cell.num_gates, len(cell.params))
        if tuple(shape) != expected:
            raise NativeBuildError(f"{path} was built for (K, G, P)={tuple(shape)}, cell {cell.name!r} has {expected}")
        p, i64, c_int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        for suffix in _DTYPES.values():
            fwd = getattr(self._lib, f"pr_fused_forward_{suffix}")
            fwd.argtypes = [p, p, p, p, p, p, i64, i64, i64, c_int]
            fwd.restype = None
            bwd = getattr(self._lib, f"pr_fused_backward_{suffix}")
            bwd.argtypes = [p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, c_int]
            bwd.restype = None

    def _fn(self, kind: str, dtype: str):
        if dtype not in _DTYPES:
            raise TypeError(f"fused CPU kernels compute in float32 or float64, got {dtype}")
        return getattr(self._lib, f"pr_fused_{kind}_{_DTYPES[dtype]}")

    def forward(self, dtype, u, params, bias, h0, resets, traj, batch, steps, channels, threads):
        """traj [B, T, K, N] <- sequential sweep over u [B, T, G, N] + bias [G, N] (bias, h0, resets may be None)."""
        self._fn("forward", dtype)(u, params, bias, h0, resets, traj, batch, steps, channels, threads)

    def backward(self, dtype, u, params, bias, h0, resets, traj, grad, du, dparams, dbias, dh0, batch, steps, channels,
                 threads):
        """du [B, T, G, N], dparams [P, N], dbias [G, N] and dh0 [B, K, N] (each may be None) <- adjoint sweep."""
        kernel = self._fn("backward", dtype)
        kernel(u, params, bias, h0, resets, traj, grad, du, dparams, dbias, dh0, batch, steps, channels, threads)


    # -- numpy convenience (pararnn_mlx on the CPU; tests) ------------------------------
    def sweep(self, u, params, bias=None, h0=None, resets=None, threads=None):
        """numpy: trajectory [B, T, K, N] over gates u [B, T, G, N] (+ bias [G, N])."""
        u, params, bias, h0 = _same_dtype_contiguous(u, params, bias, h0)
        resets = None if resets is None else np.ascontiguousarray(resets, dtype=np.uint8)
        batch, steps, _, channels = u.shape
        traj = np.empty((batch, steps, self.cell.state_size, channels), dtype=u.dtype)
        self.forward(u.dtype.name, *_addresses(u, params, bias, h0, resets, traj), batch, steps, channels,
                     threads or default_threads())
        return traj

    def adjoint_sweep(self, u, params, bias, h0, resets, traj, grad, threads=None):
        """numpy: (d_u, d_params, d_bias, d_h0 or None) of the trajectory's loss given grad = dL/dtraj."""
        u, params, bias, h0, traj, grad = _same_dtype_contiguous(u, params, bias, h0, traj, grad)
        resets = None if resets is None else np.ascontiguousarray(resets, dtype=np.uint8)
        batch, steps, gates, channels = u.shape
        d_u, d_params = np.empty_like(u), np.empty_like(params)
        d_bias = np.empty((gates, channels), dtype=u.dtype)
        d_h0 = None if h0 is None else np.empty_like(h0)
        self.backward(u.dtype.name, *_addresses(u, params, bias, h0, resets, traj, grad, d_u, d_params, d_bias, d_h0),
                      batch, steps, channels, threads or default_threads())
        return d_u, d_params, d_bias, d_h0


def _same_dtype_contiguous(first, *rest):
    first = np.ascontiguousarray(first)
    if first.dtype not in (np.float32, np.float64):
        first = first.astype(np.float32)
    return (first, *(None if a is None else np.ascontiguousarray(a, dtype=first.dtype) for a in rest))


def _addresses(*arrays):
    return [None if a is None else a.ctypes.data for a in arrays]


def default_threads() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


_loaded: dict[str, CpuLibrary] = {}
_lock = threading.Lock()


def load_cpu_library(cell) -> CpuLibrary:
    """Compile (once, cached on disk) and load the fused CPU kernels of ``cell``.

    Raises CodegenError when the cell cannot be generated and NativeBuildError
    when no compiler is available or compilation fails.
    """
    cell = get_cell(cell)
    sources = cell_sources(cell)
    unit = _translation_unit(sources)
    cxx, version = compiler()
    fingerprint = [unit, sources.text("cpp"), version, " ".join(_BASE_FLAGS + _NATIVE_FLAGS + _OPENMP_FLAGS)]
    fingerprint += [(CSRC_DIR / "fused" / h).read_text() for h in _KERNEL_HEADERS]
    key = hashlib.sha256("\0".join(fingerprint).encode()).hexdigest()[:16]
    with _lock:
        if key not in _loaded:
            path = cache_dir() / "cpu" / f"{cell.name}-{key}.so"
            if not path.exists():
                _compile(unit, path)
            _loaded[key] = CpuLibrary(cell, path)
        return _loaded[key]
