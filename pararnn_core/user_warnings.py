"""Warnings attributed to the user's line, not to the library frame that raised them."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

#: frames in these packages are skipped (the layer is called through torch/mlx module machinery)
_LIBRARY_PACKAGES = ("pararnn_core", "pararnn_torch", "pararnn_mlx", "pararnn_convert", "torch", "mlx", "mlx_lm")


def _is_library(filename: str) -> bool:
    parts = Path(filename).parts
    return any(package in parts for package in _LIBRARY_PACKAGES) or filename.startswith("<frozen")


def warn_at_caller(message: str, category: type[Warning] = UserWarning):
    """``warnings.warn`` with the stack level of the first frame outside the library."""
    frame, level = sys._getframe(1), 1
    while frame is not None and _is_library(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level + 1)
