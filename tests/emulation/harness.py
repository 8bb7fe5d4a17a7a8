"""Run CUDA kernels and MLX Metal kernel bodies on the CPU (see README.md).

The unmodified kernel source is compiled with g++ against ``cuda_emu.h`` or
``metal_emu.h`` into a small shared library, loaded with ctypes and launched
with one real thread per GPU thread of a block. Libraries are cached by a hash
of everything that goes into them, so each variant compiles once per machine.

    kernel = compile_cuda(CSRC / "scan" / "scan_kernel.cuh", "pararnn::structured_scan_kernel<float, float, 2, 4>",
                          ["const float*", "const float*", "const float*", "float*", "int64_t", "int64_t", "int"])
    kernel(grid=(B * N, 1, 1), block=(64, 1, 1), args=[A, b, None, h, T, N, 0])

    kernel = compile_metal(name="scan", source=body, header=header, inputs=[("A", A), ...],
                           outputs=[("h", np.float32)], template=[("T", np.float32), ("K", 2)])
    (h,) = kernel(grid=(64, B * N, 1), threadgroup=(64, 1, 1), inputs=[A, ...], output_shapes=[h_shape])
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CSRC = REPO / "csrc"
METAL = REPO / "metal"

# -fno-gnu-unique: each emulated library keeps its own statics (shared memory, access report), even inline ones
_CXX_FLAGS = ["-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-w", "-fno-gnu-unique"]

#: numpy stand-in for bfloat16 arrays (raw uint16 bits) handed to emulated Metal kernels
BFLOAT16 = np.dtype([("bfloat16", "<u2")])

#: C type per numpy dtype, as MLX's get_type_string writes it
_METAL_TYPES = {
    np.dtype(np.float16): "float16_t",
    BFLOAT16: "bfloat16_t",
    np.dtype(np.float32): "float",
    np.dtype(np.float64): "double",  # not a Metal type; allowed here to test numerics in fp64
    np.dtype(np.int32): "int32_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.uint64): "uint64_t",
    np.dtype(np.bool_): "bool",
}

#: thread-position attributes of mx.fast.metal_kernel (name, type), in MLX's order
METAL_ATTRIBUTES = [
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]

_SCALAR_CTYPES = {
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "uint": ctypes.c_uint,
    "int32_t": ctypes.c_int32,
    "uint32_t": ctypes.c_uint32,
    "int64_t": ctypes.c_int64,
    "void*": ctypes.c_void_p,
    "long long": ctypes.c_longlong,
    "uint64_t": ctypes.c_uint64,
    "float": ctypes.c_float,
    "double": ctypes.c_double,
    "bool": ctypes.c_bool,
}


class EmulationError(RuntimeError):
    """The emulated kernel failed to compile or did not complete (e.g. a barrier deadlock)."""


def have_compiler() -> bool:
    return shutil.which(os.environ.get("CXX", "g++")) is not None


def _cache_dir() -> Path:
    root = os.environ.get("PARARNN_EMU_CACHE") or Path(tempfile.gettempdir()) / f"pararnn_emulation_{os.getuid()}"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sanitizer_flags() -> list[str]:
    """PARARNN_EMU_SANITIZE=thread|address,undefined builds the emulated kernels with those sanitizers (the
    Python process must preload the runtime: see scripts/test.sh)."""
    sanitize = os.environ.get("PARARNN_EMU_SANITIZE", "")
    return [f"-fsanitize={sanitize}", "-g", "-fno-omit-frame-pointer"] if sanitize else []


def _source_digest() -> str:
    """Everything an emulated library may include: the emulator headers and every kernel source."""
    files = sorted(HERE.rglob("*.h")) + sorted(p for root in (CSRC, METAL) for p in root.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def _build(cpp: str, include_dirs: list[Path]) -> ctypes.CDLL:
    """Compile generated C++ into a cached shared library (atomic: tmp + rename)."""
    flags = _CXX_FLAGS + _sanitizer_flags()
    includes = [HERE, HERE / "cuda_include", *include_dirs]
    key = hashlib.sha256((cpp + _source_digest() + " ".join(map(str, includes)) + " ".join(flags)).encode())
    lib = _cache_dir() / f"emu_{key.hexdigest()[:20]}.so"
    if not lib.exists():
        src = lib.with_suffix(f".{os.getpid()}.cpp")
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        src.write_text(cpp)
        cmd = [os.environ.get("CXX", "g++"), *flags, *(f"-I{d}" for d in includes)]
        proc = subprocess.run([*cmd, str(src), "-o", str(tmp)], capture_output=True, text=True)
        src.unlink()
        if proc.returncode != 0:
            raise EmulationError(f"g++ could not compile the emulated kernel:\n{proc.stderr[-6000:]}")
        os.replace(tmp, lib)
    dll = ctypes.CDLL(str(lib))
    dll.emu_stats_entry.restype = ctypes.c_char_p
    dll.emu_stats_entry.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_ulonglong)]
    return dll


def access_report(dll) -> dict[str, tuple[int, int, int]]:
    """Per kernel launched from this library: (warp-wide global accesses, useful bytes, bytes of the distinct
    32-byte sectors touched). Sector efficiency = useful / sector bytes."""
    out = {}
    for i in range(dll.emu_stats_count()):
        values = (ctypes.c_ulonglong * 3)()
        name = dll.emu_stats_entry(i, values).decode()
        out[name] = tuple(int(v) for v in values)
    return out


def reset_access_report(dll) -> None:
    dll.emu_stats_reset()


def compile_cuda_library(source: str, include_dirs=(CSRC / "scan", CSRC / "fused")) -> ctypes.CDLL:
    """Compile CUDA host + device code (e.g. a launcher's extern "C" entry points) for the emulator.

    cudaLaunchKernel runs the kernel in the emulator; call the entry points with :func:`cuda_entry`.
    """
    dll = _build(f'#include "cuda_emu.h"\n{source}\n', [Path(p) for p in include_dirs])
    dll.emu_last_error.restype = ctypes.c_char_p
    return dll


def cuda_entry(dll, name: str, param_types: list[str], restype=ctypes.c_int):
    """A callable for extern "C" function ``name`` of an emulated library: numpy arrays by pointer (None:
    null), scalars by the listed C types; raises EmulationError when it returns a nonzero cudaError_t."""
    function = getattr(dll, name)
    function.restype = restype
    function.argtypes = [ctypes.c_void_p if t.rstrip().endswith("*") else _SCALAR_CTYPES[t] for t in param_types]

    def call(*args):
        values = []
        for value, ctype in zip(args, param_types):
            if ctype.rstrip().endswith("*"):
                if value is not None and not (isinstance(value, np.ndarray) and value.flags.c_contiguous):
                    raise TypeError(f"{name}: argument of type {ctype} must be a C-contiguous numpy array")
                values.append(None if value is None else value.ctypes.data)
            else:
                values.append(value)
        result = function(*values)
        if restype is ctypes.c_int and result != 0:
            raise EmulationError(f"{name} returned cudaError {result}: {dll.emu_last_error().decode()}")
        return result

    return call


def _cast(ctype: str, i: int) -> str:
    """C++ expression reading argument i of the packed argument array as ``ctype``."""
    if ctype.rstrip().endswith("*"):
        return f"reinterpret_cast<{ctype}>(args[{i}])"
    base = ctype.replace("const", "").replace("&", "").strip()
    return f"*reinterpret_cast<{base}*>(args[{i}])"


def _pack(values, ctypes_list):
    """Pointers for the C side; keeps the ctypes objects alive in the returned list."""
    keep, ptrs = [], (ctypes.c_void_p * max(1, len(values)))()
    for i, (value, ctype) in enumerate(zip(values, ctypes_list)):
        if ctype.rstrip().endswith("*"):
            if value is None:
                ptrs[i] = None
                continue
            if not (isinstance(value, np.ndarray) and value.flags.c_contiguous):
                raise TypeError(f"argument {i} ({ctype}) must be a C-contiguous numpy array, got {type(value)}")
            ptrs[i] = value.ctypes.data
            keep.append(value)
        else:
            base = ctype.replace("const", "").replace("&", "").strip()
            if isinstance(value, np.ndarray):
                value = value.item()
            if base not in _SCALAR_CTYPES:
                raise TypeError(f"unsupported scalar parameter type {ctype!r}; known: {sorted(_SCALAR_CTYPES)}")
            obj = _SCALAR_CTYPES[base](value)
            keep.append(obj)
            ptrs[i] = ctypes.addressof(obj)
    return ptrs, keep


def _launch(dll, grid, block, ptrs):
    dll.emu_launch.restype = ctypes.c_char_p
    dll.emu_launch.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint)]
    dims = (ctypes.c_uint * 6)(*grid, *block)
    error = dll.emu_launch(ptrs, dims)
    if error:
        raise EmulationError(error.decode())


# ----------------------------------------------------------------------------- CUDA


class CudaKernel:
    """A CUDA ``__global__`` function compiled for the emulator; call with grid, block and args."""

    def __init__(self, dll, param_types):
        self._dll, self.param_types = dll, list(param_types)

    def __call__(self, grid, block, args) -> None:
        """Run the kernel; numpy array arguments are passed by pointer and written in place."""
        if len(args) != len(self.param_types):
            raise TypeError(f"kernel takes {len(self.param_types)} arguments {self.param_types}, got {len(args)}")
        ptrs, _keep = _pack(args, self.param_types)
        _launch(self._dll, _dim3(grid), _dim3(block), ptrs)


def _dim3(d):
    d = tuple(d) + (1,) * (3 - len(tuple(d)))
    if any(int(x) < 1 for x in d):
        raise ValueError(f"launch dimensions must be positive, got {d}")
    return tuple(int(x) for x in d)


def compile_cuda(
    source: str | Path, kernel: str, param_types: list[str], include_dirs=(CSRC / "scan", CSRC / "fused")
) -> CudaKernel:
    """Compile a CUDA kernel source (path or text) for the emulator.

    kernel: the C++ expression naming the instantiated kernel, e.g.
        ``"pararnn::structured_scan_kernel<float, float, 2, 4>"``.
    param_types: the kernel's parameter types in order (``"const float*"``, ``"int64_t"``, ...).
    """
    text = Path(source).read_text() if isinstance(source, Path) else source
    call = ", ".join(_cast(t, i) for i, t in enumerate(param_types))
    cpp = f"""#include "cuda_emu.h"
{text}
extern "C" const char* emu_launch(void** args, const unsigned* d) {{
  static std::string error;
  error = emu::launch("{kernel}", emu::kCudaLimits, emu::Dim3{{d[0], d[1], d[2]}}, emu::Dim3{{d[3], d[4], d[5]}},
                      [&] {{ {kernel}({call}); }});
  return error.empty() ? nullptr : error.c_str();
}}
"""
    return CudaKernel(_build(cpp, [Path(p) for p in include_dirs]), param_types)


# ----------------------------------------------------------------------------- Metal


def _metal_type(dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _METAL_TYPES:
        raise TypeError(f"no emulated Metal type for dtype {dtype}; supported: {[str(d) for d in _METAL_TYPES]}")
    return _METAL_TYPES[dtype]


def _template_value(value) -> tuple[str, str]:
    """(parameter kind, literal) of one template argument, as MLX writes them."""
    if isinstance(value, bool):
        return "bool", str(int(value))
    if isinstance(value, int):
        return "int", str(value)
    return "typename", _metal_type(value)


def metal_signature(name, source, header, inputs, outputs, template) -> str:
    """Kernel source as mx.fast.metal_kernel generates it (qualifiers become no-ops in metal_emu.h).

    inputs: [(name, example array)] (only ndim and dtype matter); outputs: [(name, dtype)].
    """
    lines = [header]
    if template:
        lines.append("template <" + ", ".join(f"{_template_value(v)[0]} {n}" for n, v in template) + ">")
    params = []
    for in_name, arr in inputs:
        arr = np.asarray(arr)
        ref = "&" if arr.ndim == 0 else "*"
        params.append(f"  const device {_metal_type(arr.dtype)}{ref} {in_name}")
        if arr.ndim > 0:
            if f"{in_name}_shape" in source:
                params.append(f"  const constant int* {in_name}_shape")
            if f"{in_name}_strides" in source:
                params.append(f"  const constant int64_t* {in_name}_strides")
            if f"{in_name}_ndim" in source:
                params.append(f"  const constant int& {in_name}_ndim")
    for out_name, dtype in outputs:
        params.append(f"  device {_metal_type(dtype)}* {out_name}")
    for attr, attr_type in METAL_ATTRIBUTES:
        if attr in source:
            params.append(f"  {attr_type} {attr}")
    lines.append(f"void custom_kernel_{name}(\n" + ",\n".join(params) + ") {")
    lines.append(source)
    lines.append("}")
    return "\n".join(lines)


_ATTRIBUTE_VALUES = """
namespace emu_metal {
inline uint3 u3(const emu::Dim3& d) { return uint3{d.x, d.y, d.z}; }
inline uint3 mul(const emu::Dim3& a, const emu::Dim3& b) { return uint3{a.x * b.x, a.y * b.y, a.z * b.z}; }
}
#define EMU_ST emu::this_thread_state
#define EMU_L (*emu::current_launch())
#define EMU_ATTR_dispatch_threads_per_threadgroup emu_metal::u3(EMU_L.block)
#define EMU_ATTR_grid_origin uint3{0, 0, 0}
#define EMU_ATTR_grid_size emu_metal::mul(EMU_L.grid, EMU_L.block)
#define EMU_ATTR_simdgroup_index_in_threadgroup uint(EMU_ST.linear_tid / emu::kWarpSize)
#define EMU_ATTR_simdgroups_per_threadgroup uint((EMU_L.threads + emu::kWarpSize - 1) / emu::kWarpSize)
#define EMU_ATTR_thread_execution_width uint(emu::kWarpSize)
#define EMU_ATTR_thread_index_in_simdgroup uint(EMU_ST.linear_tid % emu::kWarpSize)
#define EMU_ATTR_thread_index_in_threadgroup uint(EMU_ST.linear_tid)
#define EMU_ATTR_thread_position_in_grid uint3{EMU_ST.block_idx.x * EMU_L.block.x + EMU_ST.thread_idx.x, \\
    EMU_ST.block_idx.y * EMU_L.block.y + EMU_ST.thread_idx.y, EMU_ST.block_idx.z * EMU_L.block.z + EMU_ST.thread_idx.z}
#define EMU_ATTR_thread_position_in_threadgroup emu_metal::u3(EMU_ST.thread_idx)
#define EMU_ATTR_threadgroup_position_in_grid emu_metal::u3(EMU_ST.block_idx)
#define EMU_ATTR_threadgroups_per_grid emu_metal::u3(EMU_L.grid)
#define EMU_ATTR_threads_per_grid emu_metal::mul(EMU_L.grid, EMU_L.block)
#define EMU_ATTR_threads_per_simdgroup uint(emu::kWarpSize)
#define EMU_ATTR_threads_per_threadgroup emu_metal::u3(EMU_L.block)
"""


class MetalKernel:
    """An mx.fast.metal_kernel body compiled for the emulator; called like the MLX kernel object."""

    def __init__(self, dll, param_types, input_names, source, output_dtypes):
        self._dll, self._param_types = dll, param_types
        self._input_names, self._source, self._output_dtypes = input_names, source, output_dtypes

    def __call__(self, inputs, grid, threadgroup, output_shapes, poison=np.nan):
        """Run with MLX's dispatch convention (grid counts threads); returns the outputs.

        Outputs start filled with ``poison`` (NaN for floats, all ones bits for
        integers) so that elements the kernel does not write are visible.
        """
        grid, group = _dim3(grid), _dim3(threadgroup)
        group = tuple(min(g, t) for g, t in zip(grid, group))
        if any(g % t for g, t in zip(grid, group)):
            raise ValueError(f"emulated Metal dispatch needs grid {grid} divisible by threadgroup {group}")
        values = []
        for in_name, arr in zip(self._input_names, inputs):
            arr = np.ascontiguousarray(arr)
            values.append(arr)
            if arr.ndim > 0:
                if f"{in_name}_shape" in self._source:
                    values.append(np.asarray(arr.shape, np.int32))
                if f"{in_name}_strides" in self._source:
                    values.append(np.asarray([s // arr.itemsize for s in arr.strides], np.int64))
                if f"{in_name}_ndim" in self._source:
                    values.append(arr.ndim)
        outs = []
        for shape, dtype in zip(output_shapes, self._output_dtypes):
            out = np.empty(shape, dtype)
            if out.dtype.fields:  # BFLOAT16 bits: all ones is a NaN
                out.view(np.uint8).fill(0xFF)
            else:
                out.fill(poison if np.issubdtype(out.dtype, np.floating) else -1)
            outs.append(out)
        ptrs, _keep = _pack(values + outs, self._param_types)
        _launch(self._dll, tuple(g // t for g, t in zip(grid, group)), group, ptrs)
        return outs


def compile_metal(name, source, inputs, outputs, template=(), header="") -> MetalKernel:
    """Compile a Metal kernel body the way mx.fast.metal_kernel wraps it.

    inputs: [(name, example array)] with the dtypes and ranks of the real call.
    outputs: [(name, dtype)]. template: [(name, dtype | int | bool)].
    """
    text = metal_signature(name, source, header, inputs, outputs, template)
    param_types = []
    for in_name, arr in inputs:
        arr = np.asarray(arr)
        param_types.append(f"const {_metal_type(arr.dtype)}{'&' if arr.ndim == 0 else '*'}")
        if arr.ndim > 0:
            for suffix, ctype in (("_shape", "const int*"), ("_strides", "const int64_t*"), ("_ndim", "int")):
                if f"{in_name}{suffix}" in source:
                    param_types.append(ctype)
    param_types += [f"{_metal_type(dtype)}*" for _, dtype in outputs]
    casts = [_cast(t, i) for i, t in enumerate(param_types)]
    attrs = [f"EMU_ATTR_{attr}" for attr, _ in METAL_ATTRIBUTES if attr in source]
    tmpl = "<" + ", ".join(_template_value(v)[1] for _, v in template) + ">" if template else ""
    cpp = f"""#include "metal_emu.h"
{_ATTRIBUTE_VALUES}
{text}
extern "C" const char* emu_launch(void** args, const unsigned* d) {{
  static std::string error;
  error = emu::launch("{name}", emu::kMetalLimits, emu::Dim3{{d[0], d[1], d[2]}}, emu::Dim3{{d[3], d[4], d[5]}}, [&] {{
    custom_kernel_{name}{tmpl}({", ".join(casts + attrs)});
  }});
  return error.empty() ? nullptr : error.c_str();
}}
"""
    scalar_types = [t.replace("&", "") for t in param_types]
    return MetalKernel(_build(cpp, []), scalar_types, [n for n, _ in inputs], source, [np.dtype(d) for _, d in outputs])
