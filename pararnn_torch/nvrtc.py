"""Fused CUDA kernels of any cell, compiled at first use with NVRTC: no CUDA toolkit needed.

The translation unit is csrc/fused/fused_kernels.cuh plus the cell's generated
CUDA source (``pararnn_core.codegen.cell_sources(cell).text("cuda")``); the
kernels to instantiate are named by the extension's own name expressions
(``pararnn::fused_cuda_kernel_names``), so their template arguments (block
size, chunk) are the ones the built-in cells are compiled with, and the C++ op
launches them with the same geometry code. NVRTC is the library PyTorch's CUDA
wheels ship (``nvidia/cu13/lib/libnvrtc.so.13``), driven through NVIDIA's
``cuda-bindings`` (``pip install 'pararnn-mlx[cuda]'``). Compiling needs no
GPU; the image (cubin for the device's architecture, or PTX when the GPU is
newer than NVRTC knows) is cached under ``<cache>/cuda/`` by a hash of
everything that goes into it, and loaded with ``cuModuleLoadData`` into the
device's primary context (the one torch uses).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import threading
from functools import lru_cache
from pathlib import Path

from pararnn_core.cell import Cell, get_cell
from pararnn_core.codegen.sources import CSRC_DIR, cache_dir, cell_sources, write_atomic

#: folders of csrc/ whose headers the fused kernels include (all of them feed the cache key)
_HEADER_DIRS = ("fused", "common")
_OPTIONS = ("--std=c++17",)


class NvrtcError(RuntimeError):
    """A user cell's fused CUDA kernels could not be compiled or loaded (other modes still work)."""


def _check(result, what: str):
    """cuda-bindings calls return (status, *values); raise with the status name unless it is success."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if int(status) != 0:
        raise NvrtcError(f"{what} failed: {getattr(status, 'name', status)}")
    return values[0] if len(values) == 1 else values


def _nvidia_lib_dirs() -> list[Path]:
    """lib folders of the nvidia-* wheels next to torch (nvidia/cu13/lib for CUDA 13, nvidia/cuda_nvrtc/lib for 12)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in map(Path, nvidia.__path__):
        found += [p.parent for p in sorted(root.glob("*/lib/libnvrtc.so*"))]
    return found


@lru_cache(maxsize=1)
def bindings():
    """(nvrtc, driver, NVRTC version) of cuda-bindings, with libnvrtc and its builtins library loaded first.

    libnvrtc dlopens libnvrtc-builtins by its soname at compile time; the wheel's lib folder is not on the
    loader path, so both are preloaded from there (RTLD_GLOBAL: the later dlopen finds them by soname).
    """
    for folder in _nvidia_lib_dirs():
        for pattern in ("libnvrtc-builtins.so*", "libnvrtc.so*"):
            for lib in sorted(folder.glob(pattern)):
                try:
                    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    continue
    try:
        from cuda.bindings import driver, nvrtc
    except ImportError as error:
        raise NvrtcError(
            f"compiling a custom cell's fused CUDA kernels needs NVIDIA's cuda-bindings ({error}); install it with "
            f"`pip install 'pararnn-mlx[cuda]'` (cuda-bindings of your CUDA major version)"
        ) from None
    try:
        version = _check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except (RuntimeError, OSError) as error:
        raise NvrtcError(
            f"NVRTC could not be loaded ({error}); it ships with PyTorch's CUDA wheels (nvidia/cu13/lib) and must "
            f"match the major version of cuda-bindings"
        ) from None
    return nvrtc, driver, tuple(version)


def supported_archs() -> list[int]:
    """Compute capabilities (e.g. 90) this NVRTC compiles for."""
    nvrtc, _, _ = bindings()
    return sorted(int(a) for a in _check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs"))


def target_for(capability: tuple[int, int]) -> str:
    """``sm_XY`` (a cubin) for a GPU NVRTC knows, else ``compute_XY`` (PTX the driver JITs) of the newest below it."""
    wanted = capability[0] * 10 + capability[1]
    archs = supported_archs()
    if wanted in archs:
        return f"sm_{wanted}"
    older = [a for a in archs if a < wanted]
    if not older:
        raise NvrtcError(f"this NVRTC compiles for sm_{archs[0]} and newer; the GPU is sm_{wanted}")
    return f"compute_{older[-1]}"


def _headers() -> list[Path]:
    return sorted(p for d in _HEADER_DIRS if (CSRC_DIR / d).is_dir() for p in (CSRC_DIR / d).glob("*.cuh"))


def _translation_unit(cell_source: str) -> str:
    return f'#include "fused/fused_kernels.cuh"\n{cell_source}\n'


def _include_options() -> list[str]:
    options = [f"-I{CSRC_DIR}"]
    # cuda_fp16.h / cuda_bf16.h: the headers of the wheel's CUDA runtime, where NVRTC does not carry them
    for folder in _nvidia_lib_dirs():
        include = folder.parent / "include"
        if (include / "cuda_fp16.h").exists():
            options.append(f"-I{include}")
    return options


def compile_cell(cell: Cell, target: str, names: list[str]) -> tuple[bytes, list[str]]:
    """(image, lowered names) of the kernels ``names`` for ``cell``; ``target`` ``sm_XY`` or ``compute_XY``.

    Cached on disk by a hash of the sources, headers, names, options, target and NVRTC version.
    """
    nvrtc, _, version = bindings()
    cell = get_cell(cell)
    sources = cell_sources(cell)
    unit = _translation_unit(sources.text("cuda"))
    options = [*_OPTIONS, f"-arch={target}", *_include_options()]
    fingerprint = [unit, *names, *options, str(version)] + [p.read_text() for p in _headers()]
    key = hashlib.sha256("\0".join(fingerprint).encode()).hexdigest()[:16]
    image_path = cache_dir() / "cuda" / f"{cell.name}-{key}-{target}.bin"
    names_path = image_path.with_suffix(".json")
    if image_path.exists() and names_path.exists():
        return image_path.read_bytes(), json.loads(names_path.read_text())
    image, lowered = _compile(nvrtc, unit, cell.name, names, options, ptx=target.startswith("compute_"))
    write_atomic(image_path, image)
    write_atomic(names_path, json.dumps(lowered))  # written last: an image without it is recompiled
    return image, lowered


def _compile(nvrtc, unit: str, name: str, names: list[str], options: list[str], ptx: bool):
    program = _check(nvrtc.nvrtcCreateProgram(unit.encode(), f"{name}_fused.cu".encode(), 0, [], []),
                     "nvrtcCreateProgram")
    try:
        for expression in names:
            _check(nvrtc.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
        status = nvrtc.nvrtcCompileProgram(program, len(options), [o.encode() for o in options])[0]
        if int(status) != 0:
            size = _check(nvrtc.nvrtcGetProgramLogSize(program), "nvrtcGetProgramLogSize")
            log = b" " * size
            _check(nvrtc.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
            raise NvrtcError(
                f"NVRTC could not compile the fused CUDA kernels of cell {name!r} ({status.name}):\n"
                f"{log.decode(errors='replace').strip()[-4000:]}"
            )
        get_size, get = (nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if ptx else (nvrtc.nvrtcGetCUBINSize,
                                                                                 nvrtc.nvrtcGetCUBIN)
        image = b" " * _check(get_size(program), "nvrtc image size")
        _check(get(program, image), "nvrtc image")
        lowered = [_check(nvrtc.nvrtcGetLoweredName(program, e.encode()), "nvrtcGetLoweredName").decode()
                   for e in names]
        return bytes(image), lowered
    finally:
        _check(nvrtc.nvrtcDestroyProgram(program), "nvrtcDestroyProgram")


# loaded modules stay loaded for the process: the registered CUfunction handles point into them
_modules: list = []
_lock = threading.Lock()


def cell_kernels(cell: Cell, device) -> list[int]:
    """CUfunction handles (ints) of ``cell``'s fused kernels on ``device``, in the order the extension expects."""
    import torch

    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    cell = get_cell(cell)
    names = list(torch.ops.pararnn.fused_cuda_kernel_names(cell_sources(cell).struct_name))
    image, lowered = compile_cell(cell, target_for(torch.cuda.get_device_capability(index)), names)
    _, driver, _ = bindings()
    torch.cuda.init()
    with _lock:
        _check(driver.cuInit(0), "cuInit")
        cu_device = _check(driver.cuDeviceGet(index), "cuDeviceGet")
        context = _check(driver.cuDevicePrimaryCtxRetain(cu_device), "cuDevicePrimaryCtxRetain")
        _check(driver.cuCtxPushCurrent(context), "cuCtxPushCurrent")
        try:
            module = _check(driver.cuModuleLoadData(image), f"loading the fused kernels of cell {cell.name!r}")
            functions = [_check(driver.cuModuleGetFunction(module, n.encode()), f"kernel {n}") for n in lowered]
        finally:
            _check(driver.cuCtxPopCurrent(), "cuCtxPopCurrent")
        _modules.append(module)
    return [int(f) for f in functions]
