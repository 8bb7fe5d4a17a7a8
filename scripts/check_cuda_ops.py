"""Checks of a CUDA build of pararnn_torch._C that need no GPU (run by scripts/check_cuda.sh in the CUDA venv).

    python scripts/check_cuda_ops.py LIB ARCH_LIST

1. the library registers CPU and CUDA kernels for pararnn::scan, fused_forward and fused_backward;
2. it holds machine code for every architecture of ARCH_LIST and PTX for those marked +PTX (read from the
   fatbinary headers, so the toolkit's cuobjdump is not needed);
3. a cell defined outside the package (a module in a temporary folder) compiles for CUDA through the
   runtime NVRTC path a user takes (pararnn_torch.nvrtc.compile_cell with the extension's name expressions),
   for a GPU NVRTC knows (a cubin) and for one newer than it (PTX).

Exit status 0 when all hold; otherwise one line per failure and status 1.
"""

from __future__ import annotations

import importlib.util
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

OPS = ("scan", "fused_forward", "fused_backward")
FATBIN_MAGIC = 0xBA55ED50
PTX, ELF = 1, 2

USER_CELL = '''
from pararnn_core.cell import Cell, Normal


class CheckCudaCell(Cell):
    """Defined outside the package: a K=2 cell with softplus and exp."""

    name = "check_cuda_user_cell"
    gates = ("i", "c", "o")
    state = ("r", "h")
    params = {"a": Normal(0.2), "b": Normal(0.2), "d": Normal(0.2)}

    def step(self, ops, s, u, p):
        keep = ops.exp(-ops.softplus(u.i + p.a * s.h))
        r = keep * s.r + (1 - keep) * ops.tanh(u.c + p.b * s.r)
        return r, ops.sigmoid(u.o + p.d * r) * ops.tanh(r)
'''


def fatbin_entries(lib: str) -> set[tuple[int, int]]:
    """(kind, sm) of every image in the library's .nv_fatbin section (kind 1 = PTX, 2 = cubin)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "fatbin")
        subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", lib, out], check=True)
        data = Path(out).read_bytes()
    entries, offset = set(), 0
    while offset + 16 <= len(data):
        magic, _, header_size, fat_size = struct.unpack_from("<IHHQ", data, offset)
        if magic != FATBIN_MAGIC:
            offset += 8  # fatbinaries are 8-byte aligned in the section
            continue
        position, end = offset + header_size, offset + header_size + fat_size
        while position < end:
            kind, _, entry_header, padded_payload = struct.unpack_from("<HHII", data, position)
            entries.add((kind, struct.unpack_from("<I", data, position + 28)[0]))
            position += entry_header + padded_payload
        offset = end
    return entries


def arch_targets(arch_list: str) -> tuple[list[int], list[int]]:
    """(architectures with machine code, architectures with PTX) of a TORCH_CUDA_ARCH_LIST value."""
    sass, ptx = [], []
    for item in arch_list.replace(",", ";").replace(" ", ";").split(";"):
        if item.strip():
            number = int(item.split("+")[0].replace(".", ""))
            sass.append(number)
            if item.endswith("+PTX"):
                ptx.append(number)
    return sass, ptx


def check_registration(lib: str) -> list[str]:
    torch.ops.load_library(lib)
    return [
        f"no {key} kernel for pararnn::{op} in {lib}"
        for op in OPS
        for key in ("CPU", "CUDA")
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"pararnn::{op}", key)
    ]


def check_images(lib: str, arch_list: str) -> list[str]:
    entries = fatbin_entries(lib)
    sass, ptx = arch_targets(arch_list)
    failures = [f"{lib} holds no machine code for sm_{a}" for a in sass if (ELF, a) not in entries]
    failures += [f"{lib} holds no PTX for compute_{a}" for a in ptx if (PTX, a) not in entries]
    print(f"check_cuda: images in {Path(lib).name}: " + ", ".join(
        f"{'PTX' if kind == PTX else 'sm'}_{sm}" for kind, sm in sorted(entries)))
    return failures


def check_user_cell_compiles() -> list[str]:
    from pararnn_torch import nvrtc

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PARARNN_CACHE_DIR"] = tmp  # compile for real, not from an earlier run's cache
        module_path = Path(tmp) / "check_cuda_user_cell.py"
        module_path.write_text(textwrap.dedent(USER_CELL))
        spec = importlib.util.spec_from_file_location("check_cuda_user_cell", module_path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        cell = module.CheckCudaCell()
        from pararnn_core.codegen import cell_sources

        names = list(torch.ops.pararnn.fused_cuda_kernel_names(cell_sources(cell).struct_name))
        failures = []
        archs = nvrtc.supported_archs()
        newest = archs[-1]
        for capability in ((9, 0), (newest // 10 + 1, 0)):  # an H100, and a GPU newer than this NVRTC
            target = nvrtc.target_for(capability)
            start = time.perf_counter()
            image, lowered = nvrtc.compile_cell(cell, target, names)
            seconds = time.perf_counter() - start
            is_ptx = target.startswith("compute_")
            looks_right = (b".target" in image) if is_ptx else image[:4] == b"\x7fELF"
            if not looks_right or len(lowered) != len(names) or not all(lowered):
                failures.append(f"NVRTC output for {target} is not a {'PTX module' if is_ptx else 'cubin'} "
                                f"with {len(names)} kernels")
            else:
                version = ".".join(map(str, nvrtc.bindings()[2]))
                print(f"check_cuda: user cell from {module_path.name} compiled by NVRTC {version} for "
                      f"sm_{capability[0]}{capability[1]} as {target}: {len(image)} bytes, {len(lowered)} kernels, "
                      f"{seconds:.1f} s")
            cached_image, _ = nvrtc.compile_cell(cell, target, names)
            if cached_image != image:
                failures.append(f"the cached {target} image differs from the compiled one")
    return failures


def main(argv: list[str]) -> int:
    lib, arch_list = argv
    failures = check_registration(lib)
    failures += check_images(lib, arch_list)
    if not failures:
        failures += check_user_cell_compiles()
    for failure in failures:
        print(f"check_cuda: FAILED - {failure}")
    if not failures:
        print(f"check_cuda: OK - {Path(lib).name} registers CPU and CUDA kernels for pararnn::{', '.join(OPS)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
