"""examples/custom_cell.py: a cell written in a user's own file runs fused on the CPU, equal to sequential."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import torch

from pararnn_torch import ParaRNN

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "custom_cell.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("custom_cell_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_cell_fused_outputs_and_gradients_equal_sequential():
    cell = _load_example().LeakyTanhCell()
    torch.manual_seed(0)
    fused = ParaRNN(cell, 16, 32, num_heads=2, mode="fused")
    reference = ParaRNN(cell, 16, 32, num_heads=2, mode="sequential")
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(2, 64, 16)
    results = []
    for layer in (fused, reference):
        xs = x.clone().requires_grad_()
        y = layer(xs)
        results.append([y, *torch.autograd.grad(y.square().sum(), [xs, *layer.parameters()])])
    assert fused.last_solve.mode == "fused"
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_example_script_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout.rsplit(":", 1)[1]) < 1e-5
