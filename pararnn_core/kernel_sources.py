"""Where the kernel sources are: ``csrc/`` (C++ and CUDA) and ``metal/``, grouped by op.

A wheel ships them as package data under ``pararnn_core/kernels/`` (setup.py
copies the checkout's top-level folders there at build time); an editable
install or a plain checkout reads the top-level folders themselves. Either way
callers get real paths, since the C++ compiler and NVRTC include by path.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from pathlib import Path


@lru_cache(maxsize=1)
def kernel_root() -> Path:
    """The folder holding ``csrc/`` and ``metal/``."""
    shipped = Path(str(resources.files("pararnn_core") / "kernels"))
    if (shipped / "csrc").is_dir():
        return shipped
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "csrc").is_dir():
        return checkout
    raise FileNotFoundError(
        f"the kernel sources are missing: neither {shipped}/csrc (installed package) nor {checkout}/csrc "
        f"(checkout) exists; reinstall pararnn-mlx"
    )


def csrc_dir() -> Path:
    return kernel_root() / "csrc"


def metal_dir() -> Path:
    return kernel_root() / "metal"
