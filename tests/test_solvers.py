"""The solver table (pararnn_core.solvers), backend-free: auto's order, fallback on a kernel that fails to
build, one probe per (cell, device), traced graphs, and settings a mode would ignore."""

from __future__ import annotations

import warnings

import pytest

from pararnn_core import NewtonConfig, get_cell
from pararnn_core.solvers import NEWTON_FIELDS, SolverEntry, SolverTable

ALL = frozenset(NEWTON_FIELDS)


def make_table(probes, fused_error=None):
    def probe(mode, reason=None):
        def unavailable(cell, device):
            probes.append((mode, device))
            if mode == "fused" and fused_error is not None:
                raise fused_error
            return reason

        return unavailable

    solve = lambda *args: None  # noqa: E731
    return SolverTable(
        "test",
        [
            SolverEntry("sequential", solve, probe("sequential"), exact=True),
            SolverEntry("parallel", solve, probe("parallel"), honours=ALL),
            SolverEntry("kernel", solve, probe("kernel", "no kernel here"), honours=ALL - {"chunk"}),
            SolverEntry("fused", solve, probe("fused"), exact=True, traceable=False, device_types=("cpu",)),
            SolverEntry("fused", solve, probe("fused"), honours=frozenset({"max_its", "tol"}), device_types=("gpu",)),
        ],
        device_type=lambda device: device,
    )


def test_auto_takes_the_first_available_mode_and_probes_once():
    probes = []
    table = make_table(probes)
    cell = get_cell("gru")
    assert table.choose("auto", cell, "cpu").mode == "fused"
    assert table.choose("auto", cell, "gpu").mode == "fused"
    assert table.choose("auto", cell, "gpu") is not table.choose("auto", cell, "cpu")  # one entry per device type
    count = len(probes)
    for _ in range(5):
        table.choose("auto", cell, "cpu")
        table.choose("parallel", cell, "cpu")
    assert len(probes) == count  # decided once
    assert table.unavailable_modes("cpu", cell) == {"kernel": "no kernel here"}


def test_a_kernel_that_fails_to_build_is_skipped_with_its_reason():
    table = make_table([], fused_error=OSError("libfoo.so: cannot open shared object file"))
    cell = get_cell("lstm")
    assert table.choose("auto", cell, "cpu").mode == "parallel"
    assert "OSError: libfoo.so" in table.unavailable_modes("cpu", cell)["fused"]
    with pytest.raises(ValueError, match="mode 'fused' is not available: OSError"):
        table.choose("fused", cell, "cpu")


def test_inside_a_traced_graph_auto_avoids_host_round_trips():
    table = make_table([])
    cell = get_cell("gru")
    assert table.choose("auto", cell, "cpu", traced=True).mode == "parallel"
    with pytest.raises(ValueError, match="cannot run inside a compiled graph"):
        table.choose("fused", cell, "cpu", traced=True)


def test_settings_a_mode_ignores():
    from pararnn_core.solvers import check_settings

    table = make_table([])
    cell = get_cell("gru")
    kernel = table.entries[2]
    with pytest.raises(ValueError, match=r"mode 'kernel' ignores NewtonConfig chunk=8"):
        check_settings(kernel, NewtonConfig(chunk=8), "kernel")
    fused_gpu = table.choose("fused", cell, "gpu")
    with pytest.warns(UserWarning, match=r"mode 'fused' ignores NewtonConfig damping=0.5"):
        check_settings(fused_gpu, NewtonConfig(damping=0.5), "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_settings(table.choose("fused", cell, "cpu"), NewtonConfig(chunk=8, damping=0.5), "fused")  # exact
        check_settings(table.choose("parallel", cell, "cpu"), NewtonConfig(chunk=8, damping=0.5), "parallel")


def test_a_table_must_cover_every_mode():
    with pytest.raises(ValueError, match="lacks modes"):
        SolverTable("broken", [SolverEntry("sequential", None, None)], device_type=str)
