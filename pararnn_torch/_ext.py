"""Loader of the native extension ``pararnn_torch._C``; importing this never fails.

The extension registers ``torch.ops.pararnn.scan`` (CPU, and CUDA when built
with nvcc). When it is missing, ``missing_reason(device)`` says why and how to
build it, and the ``kernel`` mode reports that instead of failing at import.
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
    spec = importlib.util.find_spec("pararnn_torch._C")
    if spec is None or not spec.origin:
        return "pararnn_torch/_C*.so not found"
    try:
        torch.ops.load_library(spec.origin)
    except OSError as error:  # built against another torch, or a broken build
        return str(error)
    return None


_import_error = _load()


def loaded() -> bool:
    return _import_error is None


def has_kernel_for(device_type: str) -> bool:
    """Whether ``pararnn::scan`` has an implementation for this device type ("cpu", "cuda")."""
    if not loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("pararnn::scan", key)


def missing_reason(device) -> str | None:
    """None when the native scan runs on ``device``; else what is missing and what to do."""
    device_type = torch.device(device).type
    if not loaded():
        return f"the native extension pararnn_torch._C is not built or failed to load ({_import_error}); {BUILD_HINT}"
    if not has_kernel_for(device_type):
        return (
            f"the native extension was built without {device_type.upper()} support; {BUILD_HINT}"
            if device_type == "cuda"
            else f"no native scan kernel for device type {device_type!r} (CPU and CUDA only)"
        )
    return None
