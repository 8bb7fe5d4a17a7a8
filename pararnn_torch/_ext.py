"""Loader of the native extension ``pararnn_torch._C``; importing this never fails.

The extension registers ``torch.ops.pararnn.scan`` and the fused ops (CPU, and
CUDA when built with nvcc). When it is missing, ``missing_reason(device)`` says
why and how to build it, and the modes that need it report that instead of
failing at import. On a GPU, "registered for CUDA" is not enough: the build
may hold no code this GPU can run, so the first check per device launches a
tiny scan and keeps the verdict.
"""

from __future__ import annotations

import importlib.util

import torch

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` in the repository (needs a C++ compiler; "
    "for CUDA also nvcc with CUDA_HOME set and a CUDA build of torch)"
)


def _load() -> str | None:
    """Load the ops library ; returns None or why it could not."""
    if hasattr(torch.ops.pararnn, "scan"):  # a build already loaded by path (torch.ops.load_library): use it
        return None
    spec = importlib.util.find_spec("pararnn_torch._C")
    if spec is None or not spec.origin:
        return "pararnn_torch/_C*.so not found"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:  # built against another torch, or a broken build
        return str(error)
    return None


_import_error = _load()
# device -> None or why the extension's CUDA code does not run there (from one tiny launch)
_probed: dict = {}


def loaded() -> bool:
    return _import_error is None


def has_op(name: str) -> bool:
    """Whether the loaded extension defines ``pararnn::<name>`` (an older build may lack the fused ops)."""
    return loaded() and hasattr(torch.ops.pararnn, name)


def has_kernel_for(device_type: str, op: str = "scan") -> bool:
    """Whether ``pararnn::<op>`` has an implementation for this device type ("cpu", "cuda")."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"pararnn::{op}", key)


def _rebuild_hint(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return (
        f"the extension holds no code this GPU runs ({torch.cuda.get_device_name(device)}, sm_{major}{minor}); "
        f'rebuild it for this GPU: TORCH_CUDA_ARCH_LIST="{major}.{minor}" pip install --no-build-isolation -e . '
        f"(the default list embeds PTX for the newest architecture, which needs a driver that can JIT it)"
    )


def cuda_probe_failure(device) -> str | None:
    """None when the extension's CUDA kernels run on ``device``; else why not. One tiny launch per device."""
    device = torch.device(device)
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _probed:
        try:
            A = torch.zeros(1, 2, 1, 1, 1, device=device)
            b = torch.ones(1, 2, 1, 1, device=device)
            h = torch.ops.pararnn.scan(A, b, None, False)
            torch.cuda.synchronize(device)
            ok = h.cpu().eq(1).all().item()
            _probed[device] = None if ok else f"the native scan computed a wrong result on {device}; {BUILD_HINT}"
        except RuntimeError as error:
            message = str(error)
            if "no kernel image" in message or "invalid device function" in message:
                _probed[device] = _rebuild_hint(device)
            else:
                _probed[device] = f"the native CUDA scan failed on {device}: {message.splitlines()[0]}"
    return _probed[device]


def missing_reason(device, op: str = "scan") -> str | None:
    """None when the native ``op`` runs on ``device``; else what is missing and what to do."""
    device = torch.device(device)
    if not loaded():
        return f"the native extension pararnn_torch._C is not built or failed to load ({_import_error}); {BUILD_HINT}"
    if not has_op(op):
        return f"the native extension is older than this package (it lacks pararnn::{op}); {BUILD_HINT}"
    if not has_kernel_for(device.type, op):
        return (
            f"the native extension was built without CUDA support; {BUILD_HINT}"
            if device.type == "cuda"
            else f"no native {op} kernel for device type {device.type!r} (CPU and CUDA only)"
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is available to torch"
        return cuda_probe_failure(device)
    return None
