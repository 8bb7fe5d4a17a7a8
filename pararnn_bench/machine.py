"""What the figures were measured on: CPU model, cores, load, GPU, library versions."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> list[str]:
    found = []
    try:
        import torch

        if torch.cuda.is_available():
            found += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    try:
        import mlx.core as mx

        if mx.metal.is_available():
            info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
            found.append(f"metal {info.get('device_name', 'GPU')}")
    except ImportError:
        pass
    return found


def describe() -> dict:
    """The machine and software of this run, for the JSON and the table headers."""
    info = {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "cores": usable_cores(),
        "os": f"{platform.system()} {platform.release()}",
        "load_average_1_5_15min": load_average(),
        "gpus": gpus(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name) for name in ("pararnn-mlx", "torch", "mlx", "mlx-lm", "numpy", "matplotlib", "rich")
        },
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def one_line(info: dict) -> str:
    load = info.get("load_average_1_5_15min")
    load_text = f", load {load[0]:.1f}" if load else ""
    gpu = ", " + "; ".join(info["gpus"]) if info["gpus"] else ", no GPU"
    return f"{info['cpu']}, {info['cores']} cores{load_text}{gpu}"
