"""A wheel built from the checkout, installed into a fresh virtual environment and run from another folder:
every mode on both backends, a user cell's fused kernel compiled from the shipped sources, and
train -> convert -> generate through the installed console scripts. Nothing may read the checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import numpy as np

    import pararnn_core, pararnn_torch, pararnn_mlx, pararnn_convert
    for module in (pararnn_core, pararnn_torch, pararnn_mlx, pararnn_convert):
        assert Path(module.__file__).is_relative_to(sys.prefix), (module.__name__, module.__file__)
    from pararnn_core.kernel_sources import kernel_root
    assert kernel_root().is_relative_to(sys.prefix), kernel_root()

    import torch, mlx.core as mx
    from pararnn_core import Cell, Normal

    class ShippedTestCell(Cell):
        name = "wheel_leaky"
        gates = ("a", "c")
        state = ("h",)
        params = {"w": Normal(0.5)}

        def step(self, ops, s, u, p):
            a = ops.sigmoid(u.a)
            return ((1 - a) * s.h + a * ops.tanh(p.w * s.h + u.c),)

    x = np.random.default_rng(0).standard_normal((2, 40, 8)).astype(np.float32)
    for cell in ("gru", "lstm", ShippedTestCell()):
        reference = pararnn_torch.ParaRNN(cell, 8, 8, num_heads=2, mode="sequential")
        want = reference(torch.tensor(x)).detach().numpy()
        for mode in ("auto", "parallel", "kernel", "fused"):
            reference.mode = mode
            got = reference(torch.tensor(x)).detach().numpy()
            assert np.abs(got - want).max() < 1e-5, ("torch", cell, mode)
        layer = pararnn_mlx.ParaRNN(cell, 8, 8, num_heads=2, mode="sequential")
        layer.update({k: mx.array(v.detach().numpy()) for k, v in reference.named_parameters()})
        for mode in ("auto", "parallel", "fused", "sequential"):
            layer.mode = mode
            assert np.abs(np.asarray(layer(mx.array(x))) - want).max() < 1e-5, ("mlx", cell, mode)
    assert pararnn_torch.ParaRNN(ShippedTestCell(), 8, 8).resolved_mode() == "fused"
    print("WHEEL-LAYERS-OK")
    """
)


def _run(cmd, cwd, env, timeout=600):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, bin folder, environment) of a fresh venv holding only the wheel (dependencies come from
    the test environment's site-packages through a plain path entry, which runs none of its .pth hooks)."""
    base = tmp_path_factory.mktemp("wheel")
    wheels = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(wheels),
          str(REPO)], cwd=base, env=os.environ.copy())
    (wheel,) = wheels.glob("pararnn_mlx-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        tops = {name.split("/")[0] for name in archive.namelist()}
        assert "convert" not in tops and "pararnn_convert" in tops, sorted(tops)
        names = set(archive.namelist())
        assert "pararnn_core/kernels/csrc/fused/fused_cpu.h" in names
        assert "pararnn_core/kernels/metal/scan/scan.metal" in names
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base, env=os.environ.copy())
    python = venv / "bin" / "python"
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=base, env=os.environ.copy()).strip())
    (purelib / "test-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PARARNN_CACHE_DIR"] = str(base / "cache")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index",
          str(wheel)], cwd=base, env=env)
    work = base / "elsewhere"
    work.mkdir()
    return python, venv / "bin", env, work


def test_installed_wheel_runs_every_mode_and_a_user_cell(installed):
    python, _, env, work = installed
    assert "WHEEL-LAYERS-OK" in _run([str(python), "-c", SCRIPT], cwd=work, env=env)


def test_installed_console_scripts_train_convert_generate(installed, tmp_path):
    python, bin_dir, env, work = installed
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    _run([str(bin_dir / "pararnn-train"), "--data", str(corpus), "--out", str(tmp_path / "run"), "--steps", "4",
          "--d-model", "32", "--layers", "1", "--heads", "2", "--seq-len", "32", "--batch-size", "4",
          "--eval-every", "4", "--eval-batches", "1", "--no-progress", "--device", "cpu"], cwd=work, env=env)
    _run([str(bin_dir / "pararnn-convert"), "to-mlx", "--model", str(tmp_path / "run"), "--out",
          str(tmp_path / "mlx")], cwd=work, env=env)
    text = _run([str(bin_dir / "pararnn-generate"), "--model", str(tmp_path / "mlx"), "--prompt", "the quick",
                 "--max-tokens", "8", "--temp", "0"], cwd=work, env=env)
    assert "Generation: 8 tokens" in text, text
