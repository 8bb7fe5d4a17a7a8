"""Options of ``pararnn-convert to-coreml`` (no coremltools or torch import: the CLI parser uses them)."""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("float16", "float32")
TARGETS = ("iOS18", "macOS15")
#: --compute-units value -> coremltools.ComputeUnit member
COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "cpu-gpu": "CPU_AND_GPU", "cpu-ne": "CPU_AND_NE"}
#: weight compression through coremltools.optimize: linear quantization or k-means palettization
COMPRESSIONS = ("none", "int8", "int4", "palettize8", "palettize4")


@dataclass(frozen=True)
class CoreMLOptions:
    """What ``to_coreml`` builds; every field is checked by ``validate`` before any work."""

    precision: str = "float16"
    target: str = "iOS18"
    compute_units: str = "all"
    compress: str = "none"
    prefill_length: int = 32
    parity_steps: int = 50
    author: str = "pararnn-convert"
    license: str = "unspecified"
    version: str = "1.0"

    def validate(self):
        for name, allowed in (
            ("precision", PRECISIONS),
            ("target", TARGETS),
            ("compute_units", tuple(COMPUTE_UNITS)),
            ("compress", COMPRESSIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be one of {', '.join(allowed)}, got {value!r}")
        for name in ("prefill_length", "parity_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
