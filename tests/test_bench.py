"""pararnn-bench's machinery on tiny sizes: every subcommand runs, and writes a complete JSON and real PNGs.

Timings are not asserted (tests never assert timings); the structure of what a
user reads is.
"""

from __future__ import annotations

import json

import pytest

from pararnn_bench.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp_path, *argv):
    out = tmp_path / argv[0]
    assert main([*argv, "--preset", "tiny", "--out", str(out)]) == 0
    payload = json.loads((out / f"{argv[0]}.json").read_text())
    for name in payload["files"]:
        if name.endswith(".png"):
            with open(name, "rb") as f:
                assert f.read(8) == PNG_MAGIC
    assert payload["machine"]["cores"] >= 1 and payload["machine"]["cpu"]
    assert payload["machine"]["versions"]["torch"]
    assert not list(out.glob("*.tmp"))  # nothing half-written left behind
    return payload, out


def test_cells_tiny(tmp_path):
    payload, out = _run(tmp_path, "cells", "--cells", "gru", "--backends", "torch-cpu")
    assert (out / "cells_time.png").exists() and (out / "cells_speedup.png").exists()
    points = payload["results"]["points"]
    assert {(p["batch"], p["steps"], p["size"]) for p in points} == {(2, 16, 16), (2, 64, 16), (1, 16, 16),
                                                                     (2, 16, 8)}
    first = points[0]["summary"]
    assert first["matmul_gflops"] > 0 and first["copy_gb_per_s"] > 0
    for pass_name in ("fwd", "fwd+bwd"):
        p = first["passes"][pass_name]
        assert {"parallel", "sequential", "torch.nn.GRU"} <= set(p["ms"])
        assert p["best_mode"] in p["ms"] and p["best_over_floor"] > 0
        products = first["products"]
        backward = products["dx"]["ms"] + products["dw"]["ms"] if pass_name == "fwd+bwd" else 0.0
        assert p["floor_ms"] == pytest.approx(first["matmul_ms"] + backward + first["copy_ms"])
    for product in first["products"].values():  # the floor takes the fastest route of each product
        assert product["ms"] == min(product["routes"].values()) and "matmul" in product["routes"]


def test_memory_tiny(tmp_path):
    payload, out = _run(tmp_path, "memory", "--cells", "gru", "--backends", "torch-cpu")
    rows = payload["results"]["peak_training_memory"]
    assert {r["variant"] for r in rows} >= {"parallel", "sequential", "torch.nn.GRU"}
    assert all(r["peak_bytes"] >= 0 for r in rows)
    assert (out / "memory_vs_T.png").exists()


def test_generate_tiny(tmp_path):
    pytest.importorskip("mlx_lm")
    payload, out = _run(tmp_path, "generate")
    decode = payload["results"]["decode"]
    assert "mlx-lm Mamba2" in decode and "mlx ParaGRU LM" in decode
    models = payload["results"]["mlx_models"]
    # the peer has the closest parameter count its layer granularity allows
    assert abs(models["Mamba2 parameters"] - models["ParaGRU LM parameters"]) < models["ParaGRU LM parameters"]
    assert all(v["tokens_per_s"] > 0 for by_context in decode.values() for v in by_context.values())
    assert [c["context"] for c in payload["results"]["checks"]] == [16, 64]
    assert (out / "generate.png").exists()


def test_generate_torch_times_before_measuring_memory(tmp_path, monkeypatch):
    """The torch CPU peak measurement leaves glibc mmapping every block over 64 KiB (slow); no timing may follow it."""
    import pararnn_bench.generate as generate
    from pararnn_bench.peak_memory import process_peak_supported

    if process_peak_supported():
        pytest.skip(process_peak_supported())
    events = []
    timed, measured = generate.compare, generate.process_peak
    monkeypatch.setattr(generate, "compare", lambda *a, **k: events.append("time") or timed(*a, **k))
    monkeypatch.setattr(generate, "process_peak", lambda fn: events.append("peak") or measured(fn))
    payload, _ = _run(tmp_path, "generate", "--backends", "torch-cpu")
    assert events.count("peak") == 2 and "time" not in events[events.index("peak"):], events
    (torch_rows,) = payload["results"]["decode"].values()
    assert all(row["peak_bytes"] is not None and row["tokens_per_s"] > 0 for row in torch_rows.values())


def test_newton_tiny(tmp_path):
    payload, _ = _run(tmp_path, "newton", "--cells", "gru")
    runs = payload["results"]["runs"]
    assert {(r["weights"], r["dtype"]) for r in runs} == {(w, d) for w in ("random", "trained")
                                                           for d in ("float32", "bfloat16")}
    for r in runs:
        assert len(r["residuals"]) == 5  # the guess and 4 iterations
        assert r["residuals"][-1] < 1e-5 < r["residuals"][0]  # Newton converges on these small problems


def test_unknown_backend_is_one_line_exit_2(tmp_path, capsys):
    assert main(["cells", "--preset", "tiny", "--backends", "torch-tpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch-tpu" in err[0] and "available" in err[0]


@pytest.mark.parametrize("backend_name", ["torch-cpu", "mlx-cpu"])
def test_each_variant_runs_its_own_mode(backend_name):
    """Variants share one layer: a closure made before another mode's closure still runs its own mode."""
    from pararnn_bench import backends

    if backend_name == "mlx-cpu":
        pytest.importorskip("mlx.core")
    (backend,) = backends.present([backend_name])
    layer = backend.layer("gru", 8)
    x = backend.input(2, 16, 8)
    closures = {(mode, backward): backend.run(layer, x, mode, backward) for mode in ("fused", "sequential")
                for backward in (False, True)}  # fmt: skip
    for mode, backward in [("fused", False), ("sequential", True), ("fused", True), ("sequential", False)]:
        closures[mode, backward]()
        assert layer.last_solve.mode == mode


def test_torch_cpu_peak_counts_memory_an_earlier_call_freed():
    """A small training step measured after a large unmeasured one (a warm-up) still shows its own peak:
    glibc kept the large step's freed memory in its arenas and the small one read 0 before."""
    import torch

    from pararnn_bench.peak_memory import process_peak, process_peak_supported

    if process_peak_supported() is not None:
        pytest.skip(process_peak_supported())

    def step(steps):
        torch.manual_seed(0)
        gru = torch.nn.GRU(256, 256, batch_first=True)
        x = torch.randn(4, steps, 256, requires_grad=True)
        return lambda: gru(x)[0].square().mean().backward()

    process_peak(lambda: None)  # glibc set up as after an earlier measurement
    step(2048)()
    small = step(256)
    small()
    assert process_peak(small) > 5 * 2**20
