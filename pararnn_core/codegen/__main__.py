"""Regenerate the shipped kernel sources of the built-in cells: ``python -m pararnn_core.codegen``."""

from pararnn_core.codegen.sources import write_builtin_sources

if __name__ == "__main__":
    for path in write_builtin_sources():
        print(f"wrote {path}")
