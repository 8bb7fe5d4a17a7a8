"""Builds the native extension ``pararnn_torch._C`` (metadata lives in pyproject.toml).

- CPU ops ``torch.ops.pararnn.scan`` and ``fused_forward``/``fused_backward``: always, when
  torch and a C++ compiler are present.
- CUDA dispatch of the same ops (the fused kernels of the built-in cells compiled in, other
  cells through NVRTC at run time): when nvcc (CUDA_HOME) and a CUDA build of torch are
  present, with code for sm_80 and sm_90 and PTX for sm_90, which newer GPUs JIT-compile
  (TORCH_CUDA_ARCH_LIST overrides; "+PTX" on the newest entry keeps later GPUs working).
- Anything missing: a printed message and an install without the extension; the
  ``kernel`` mode then reports what is missing (pararnn_torch/_ext.py).
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

#: kernel source folders shipped as package data (read through pararnn_core.kernel_sources)
KERNEL_SOURCE_DIRS = ("csrc", "metal")

CPU_SOURCES = ["csrc/scan/scan_ops.cpp", "csrc/scan/scan_cpu.cpp", "csrc/fused/fused_glue.cpp"]
CUDA_SOURCES = [
    "csrc/scan/scan_cuda_glue.cpp",
    "csrc/scan/scan_cuda.cu",
    "csrc/fused/fused_cuda_glue.cpp",
    "csrc/fused/fused_cuda.cu",
    "csrc/fused/fused_driver_glue.cu",
]
#: machine code for A100 and H100/H200, and PTX of the newest so any later GPU can JIT it
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
CXX_FLAGS = ["-O3"]  # the C++ standard is the one torch requires (C++17 or 20), set by cpp_extension


def _say(message: str) -> None:
    print(f"[pararnn setup] {message}", file=sys.stderr)


def _extension_build():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not installed: building without the native extension (mode='kernel' unavailable).")
        return [], {}

    want_cuda = os.environ.get("PARARNN_NO_CUDA", "0") != "1"
    if want_cuda and torch.version.cuda and cpp_extension.CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
        _say(
            f"building CPU + CUDA extension (CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"arch {os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
        ext = cpp_extension.CUDAExtension(
            "pararnn_torch._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3"]},
        )
    else:
        reason = "torch is a CPU build" if not torch.version.cuda else "CUDA_HOME/nvcc not found"
        if want_cuda:
            _say(f"building the CPU extension only ({reason}).")
        ext = cpp_extension.CppExtension("pararnn_torch._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS})

    class LenientBuild(cpp_extension.BuildExtension):
        """A failed native build must not fail the install: the pure-Python modes still work."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler missing or broken
                if os.environ.get("PARARNN_REQUIRE_EXTENSION") == "1":
                    raise
                _say(
                    f"could not build the native extension ({type(error).__name__}: {error}).\n"
                    "  Installing without it: modes 'parallel' and 'sequential' work, 'kernel' does not.\n"
                    "  To build it: install a C++ compiler (g++ or clang++) and rerun "
                    "`pip install --no-build-isolation -e .`"
                )

    return [ext], {"build_ext": LenientBuild.with_options(use_ninja=True)}


class BuildPyWithKernelSources(build_py):
    """Copy csrc/ and metal/ into pararnn_core/kernels/ of the build, so a wheel carries every kernel source
    (the fused CPU kernels, NVRTC and Metal compile them at run time)."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads the checkout's folders
            return
        here = os.path.dirname(os.path.abspath(__file__))
        for folder in KERNEL_SOURCE_DIRS:
            for root, _, files in os.walk(os.path.join(here, folder)):
                rel = os.path.relpath(root, here)
                for name in files:
                    target = os.path.join(self.build_lib, "pararnn_core", "kernels", rel)
                    self.mkpath(target)
                    self.copy_file(os.path.join(root, name), os.path.join(target, name))


ext_modules, cmdclass = _extension_build()
setup(ext_modules=ext_modules, cmdclass={**cmdclass, "build_py": BuildPyWithKernelSources})
