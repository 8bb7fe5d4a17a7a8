"""Where each cell's generated device functions live: shipped in the repo or generated into the cache.

Built-in cells ship their generated sources (csrc/generated, metal/generated);
``python -m pararnn_core.codegen`` rewrites them and tests/test_codegen.py
fails when they are stale. Any other cell is generated at first use into
``<cache>/cells/<name>-<definition hash>/``, so an edited cell gets new
kernels and an unchanged one never pays for sympy twice.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pararnn_core.cell import Cell, get_cell
from pararnn_core.codegen.printer import TARGETS, print_cell
from pararnn_core.codegen.symbolic import definition_hash, derive
from pararnn_core.kernel_sources import csrc_dir, metal_dir

CSRC_DIR = csrc_dir()
METAL_DIR = metal_dir()
BUILTIN_CELLS = ("gru", "lstm", "mgu")

#: file name of a cell's generated source per target, and the folder it ships in
_FILE_PATTERN = {"cpp": "{}_cell.h", "cuda": "{}_cell.cuh", "metal": "{}_cell.metal"}
_SHIPPED_DIR = {"cpp": CSRC_DIR / "generated", "cuda": CSRC_DIR / "generated", "metal": METAL_DIR / "generated"}


def cache_dir() -> Path:
    """Root of the on-disk cache: $PARARNN_CACHE_DIR, else $XDG_CACHE_HOME/pararnn_mlx (~/.cache/pararnn_mlx)."""
    if os.environ.get("PARARNN_CACHE_DIR"):
        return Path(os.environ["PARARNN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pararnn_mlx"


def write_atomic(path: Path, text: str | bytes):
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode() if isinstance(text, str) else text
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class CellSources:
    cell_name: str
    definition_hash: str
    paths: dict  # target -> Path

    @property
    def struct_name(self) -> str:
        return f"pr_cell_{self.cell_name}"

    def text(self, target: str) -> str:
        return self.paths[target].read_text()


def shipped_paths(name: str) -> dict:
    return {t: _SHIPPED_DIR[t] / _FILE_PATTERN[t].format(name) for t in TARGETS}


def render(cell) -> dict:
    """Generated source text of ``cell`` per target."""
    derivation = derive(cell)
    return {t: print_cell(derivation, t) for t in TARGETS}


def write_builtin_sources() -> list[Path]:
    """Regenerate the shipped sources of the built-in cells; returns the files written."""
    written = []
    for name in BUILTIN_CELLS:
        for target, text in render(name).items():
            path = shipped_paths(name)[target]
            write_atomic(path, text)
            written.append(path)
    return written


def _hash_in(path: Path) -> str | None:
    try:
        for line in path.read_text().splitlines()[:5]:
            if line.startswith("// definition hash: "):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cell_sources(cell: str | Cell) -> CellSources:
    """The generated sources of ``cell``: the shipped ones when current, else generated into the cache.

    Raises :class:`~pararnn_core.codegen.CodegenError` for a cell that cannot be generated.
    """
    cell = get_cell(cell)
    digest = definition_hash(cell)
    shipped = shipped_paths(cell.name)
    if all(_hash_in(p) == digest for p in shipped.values()):
        return CellSources(cell.name, digest, shipped)
    folder = cache_dir() / "cells" / f"{cell.name}-{digest}"
    paths = {t: folder / _FILE_PATTERN[t].format(cell.name) for t in TARGETS}
    if not all(p.exists() for p in paths.values()):
        for target, text in render(cell).items():
            write_atomic(paths[target], text)
    return CellSources(cell.name, digest, paths)


def metal_kernel_sources(cell: str | Cell) -> tuple[str, str, str, str]:
    """(header, forward body, adjoint body, reduce body) of the fused Metal kernels of ``cell`` for
    mx.fast.metal_kernel.

    The header joins the shared Metal helpers (metal/common/pr_metal_common.metal), the math prelude and the
    generated cell struct (as ``Cell``); the bodies are metal/fused/fused_{forward,adjoint,reduce}.metal
    unchanged.
    """
    sources = cell_sources(cell)
    header = "\n".join(
        [
            (METAL_DIR / "common" / "pr_metal_common.metal").read_text(),
            (METAL_DIR / "fused" / "fused_math.metal").read_text(),
            sources.text("metal"),
            f"typedef {sources.struct_name} Cell;",
        ]
    )
    fused = METAL_DIR / "fused"
    return header, *((fused / f"fused_{kind}.metal").read_text() for kind in ("forward", "adjoint", "reduce"))
