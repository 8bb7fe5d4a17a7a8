"""Barrier mutation check: delete one barrier of a shipped GPU kernel at a time and confirm the tests fail.

    python -m tests.emulation.delete_barriers            # a random sample of 2 barriers
    python -m tests.emulation.delete_barriers --all      # every barrier
    python -m tests.emulation.delete_barriers --sample 5 --seed 3
    python -m tests.emulation.delete_barriers --all --kernel metal/

Each mutant is a copy of csrc/, metal/, tests/ and the packages in a temporary folder with one barrier
statement removed; the emulation tests of that kernel run there (the emulator's serial random-order schedule
makes a missing barrier read a poisoned or stale value). A barrier whose deletion leaves the tests passing is
reported as redundant (exit status 1): it must either go or get a test that needs it.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

#: shipped kernel source -> the tests that run it
KERNELS = {
    "csrc/scan/scan_kernel.cuh": ["tests/test_emulation.py", "-k", "cuda_scan_launcher"],
    "csrc/fused/fused_kernels.cuh": [
        "tests/test_fused_emulation.py",
        "-k",
        "reproducible or (equals_sequential and f32)",
    ],
    "metal/scan/scan.metal": ["tests/test_emulation.py", "-k", "metal_scan_kernel"],
    "metal/fused/fused_forward.metal": ["tests/test_fused_metal_emulation.py", "-k", "reproducible or equals"],
    "metal/fused/fused_adjoint.metal": ["tests/test_fused_metal_emulation.py", "-k", "reproducible or equals"],
}
# a barrier statement, with the condition guarding it when there is one
_BARRIER = re.compile(r"(?:if \([^;]*\) )?(?:__syncthreads\(\)|threadgroup_barrier\([^;]*\));")


def barriers() -> list[tuple[str, int]]:
    """(file, character offset) of every deletable barrier statement (a vote such as __syncthreads_and is
    a value, not a statement, so it is not listed)."""
    out = []
    for rel in KERNELS:
        text = (REPO / rel).read_text()
        out += [(rel, m.start()) for m in _BARRIER.finditer(text)]
    return out


def run_mutant(rel: str, offset: int) -> bool:
    """True when the tests fail with this barrier deleted."""
    with tempfile.TemporaryDirectory(prefix="pararnn_mutant_") as tmp:
        root = Path(tmp)
        # the packages too: the loaders read the kernel sources next to pararnn_core (the mutant's copy)
        for folder in ("csrc", "metal", "tests", "pararnn_core", "pararnn_mlx", "pararnn_torch"):
            shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
        path = root / rel
        text = path.read_text()
        match = _BARRIER.match(text, offset)
        path.write_text(text[:offset] + "/* barrier deleted */" + text[match.end() :])
        env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *KERNELS[rel]]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        return proc.returncode != 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="delete every barrier in turn")
    parser.add_argument("--sample", type=int, default=2, help="barriers drawn at random (default 2)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--kernel", default="", help="only kernel sources whose path contains this")
    args = parser.parse_args(argv)
    found = [(rel, offset) for rel, offset in barriers() if args.kernel in rel]
    chosen = found if args.all else random.Random(args.seed).sample(found, min(args.sample, len(found)))
    missed = []
    for rel, offset in chosen:
        line = (REPO / rel).read_text()[:offset].count("\n") + 1
        caught = run_mutant(rel, offset)
        print(f"{'caught ' if caught else 'MISSED '} {rel}:{line}", flush=True)
        if not caught:
            missed.append(f"{rel}:{line}")
    print(f"{len(chosen) - len(missed)} of {len(chosen)} deleted barriers made the tests fail ({len(found)} in all)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
