"""``pararnn-bench cells``: every mode of ParaGRU / ParaLSTM per backend, the peers, and the physical floor.

At every point (B, T, D=N) of the sweep, one interleaved comparison times, for
the forward alone and for forward+backward of mean(y^2): each available mode,
torch.nn.GRU / LSTM, the torch.compile'd sequential loop of the same cell (torch
backends), and the floor's parts on the same backend: the input projection's
products, forward rows [B*T, D] x W [D, 3N], dx = du W^T and dW = rows^T du,
each by every fp32 route the backend has (torch: the dense matmul and oneDNN),
and one copy of the gates [B*T, 3N]. The floor of a forward is the fastest
forward product plus the copy (read the gates, write the states); of a
forward+backward, the fastest of each of the three products plus the copy.
Nothing can be faster than its floor: the ratio best-mode / floor is what is
left to win.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pararnn_bench import backends as backend_registry
from pararnn_bench.report import Report, new_figure
from pararnn_bench.timing import compare

PASSES = {"fwd": False, "fwd+bwd": True}
#: the shape of the claims in the issue and the README
TARGET = (4, 2048, 256)
CLAIMS = {"gru": 8.0, "lstm": 2.5}  # best mode's speed-up over torch.nn.<CELL>, forward+backward
FLOOR_CLAIM = 1.25


@dataclass
class Preset:
    steps: tuple[int, ...]  # T swept at (batch, size)
    batch: int
    size: int
    batches: tuple[int, ...]  # B swept at (target T, size)
    sizes: tuple[int, ...]  # N swept at (batch, target T)
    sweep_at: int  # T of the batch and size sweeps
    repeats: int
    #: longest T per variant kind (the slow ones stop early)
    max_steps: dict = field(default_factory=dict)
    only_modes: tuple[str, ...] = ()  # empty: every available mode
    #: longest T per backend (every variant): MLX's CPU matmul in mlx[cpu] on Linux runs at about
    #: 1 GFLOP/s, so a T=2048 point there takes a minute of a quick run
    backend_max_steps: dict = field(default_factory=dict)

    def points(self) -> list[tuple[int, int, int]]:
        points = [(self.batch, t, self.size) for t in self.steps]
        points += [(b, self.sweep_at, self.size) for b in self.batches]
        points += [(self.batch, self.sweep_at, n) for n in self.sizes]
        return list(dict.fromkeys(points))


PRESETS = {
    # the batch and size sweeps are in "full"; here the slow variants stop at T=256
    "quick": Preset(steps=(256, 2048), batch=4, size=256, batches=(), sizes=(), sweep_at=256, repeats=5,
                    max_steps={"sequential": 256, "compiled loop": 256, "parallel": 256, "kernel": 256},
                    backend_max_steps={"mlx-cpu": 256}),
    "full": Preset(steps=tuple(2**k for k in range(6, 16)), batch=4, size=256, batches=(1, 16, 64), sizes=(64, 1024),
                   sweep_at=2048, repeats=7,
                   max_steps={"sequential": 4096, "compiled loop": 4096, "parallel": 2**15, "kernel": 2**15}),
    # seconds: the test of the machinery
    "tiny": Preset(steps=(16, 64), batch=2, size=16, batches=(1,), sizes=(8,), sweep_at=16, repeats=2,
                   max_steps={"sequential": 16, "compiled loop": 0}),
}


def _allowed(preset: Preset, kind: str, steps: int) -> bool:
    return steps <= preset.max_steps.get(kind, 2**62)


def measure_point(backend, cell: str, point, preset: Preset, compiled_loops: dict) -> dict:
    """Timings (ms) of every variant at one (B, T, N), forward and forward+backward, in one interleaved run."""
    batch, steps, size = point
    layer = backend.layer(cell, size)
    x = backend.input(batch, steps, size)
    variants, kinds = {}, {}
    for mode in backend.modes(layer):
        if _allowed(preset, mode, steps) and (not preset.only_modes or mode in preset.only_modes):
            for pass_name, backward in PASSES.items():
                variants[f"{mode}|{pass_name}"] = backend.run(layer, x, mode, backward)
                kinds[mode] = "mode"
    for peer_name, peer in backend.peers(cell, size).items():
        for pass_name, backward in PASSES.items():
            variants[f"{peer_name}|{pass_name}"] = backend.run(peer, x, None, backward)
            kinds[peer_name] = "peer"
    if _allowed(preset, "compiled loop", steps):
        key = (cell, batch, size)
        if key not in compiled_loops:  # one compiled step per cell and shape: compile once
            compiled_loops[key] = backend.compiled_loop(layer, batch)
        loop = compiled_loops[key]
        if loop is not None:
            loop.layer = layer
            for pass_name, backward in PASSES.items():
                variants[f"compiled loop|{pass_name}"] = backend.run(loop, x, None, backward)
                kinds["compiled loop"] = "peer"
    for part, fn in backend.floor_parts(batch, steps, size, layer.cell.num_gates).items():
        variants[f"{part}|floor"] = fn
    timings = compare(variants, repeats=preset.repeats)
    return {"timings": timings, "kinds": kinds, "gates": layer.cell.num_gates}


def best_products(timings: dict, estimator: str) -> dict:
    """Per product of the floor (forward, dx, dw): the fastest route's ms, that route, and every route's ms."""
    routes: dict = {}
    for name, timing in timings.items():
        part, _, kind = name.partition("|")
        if kind == "floor" and "@" in part:
            product, route = part.split("@")
            routes.setdefault(product, {})[route] = timing.ms(estimator)
    return {product: {"ms": min(by_route.values()), "route": min(by_route, key=by_route.get), "routes": by_route}
            for product, by_route in routes.items()}


def summarise(measured: dict, estimator: str, point, cell: str) -> dict:
    """Per pass: every variant's ms, the floor, the best mode, its ratio to the floor and speed-ups over peers."""
    batch, steps, size = point
    timings, gates = measured["timings"], measured["gates"]
    products = best_products(timings, estimator)
    matmul, copy = products["forward"]["ms"], timings["copy|floor"].ms(estimator)
    flops = 2 * batch * steps * size * gates * size
    copied = 2 * batch * steps * gates * size * 4
    out = {"matmul_ms": matmul, "copy_ms": copy, "matmul_gflops": flops / matmul / 1e6,
           "copy_gb_per_s": copied / copy / 1e6, "products": products, "passes": {}}
    backward_products = sum(products.get(p, products["forward"])["ms"] for p in ("dx", "dw"))
    for pass_name in PASSES:
        times = {name.split("|")[0]: t.ms(estimator) for name, t in timings.items() if name.endswith(f"|{pass_name}")}
        floor = matmul + copy + (backward_products if pass_name == "fwd+bwd" else 0.0)
        modes = {n: v for n, v in times.items() if measured["kinds"].get(n) == "mode"}
        best = min(modes, key=modes.get) if modes else None
        entry = {"ms": times, "floor_ms": floor, "best_mode": best}
        if best:
            entry["best_over_floor"] = modes[best] / floor
            entry["speedup_over"] = {n: v / modes[best] for n, v in times.items() if n not in modes}
            if "sequential" in modes:
                entry["speedup_over"]["sequential mode"] = modes["sequential"] / modes[best]
        out["passes"][pass_name] = entry
    return out


def run(args, report: Report) -> int:
    preset = PRESETS[args.preset]
    if args.repeats:
        preset.repeats = args.repeats
    if args.steps:  # only these T, at the preset's batch and size
        preset.steps, preset.batches, preset.sizes = tuple(args.steps), (), ()
    if args.modes:
        preset.only_modes = tuple(args.modes)
    cells = args.cells
    chosen = backend_registry.present(args.backends)
    results = []
    for backend in chosen:
        compiled_loops: dict = {}
        for cell in cells:
            for point in preset.points():
                if point[1] > preset.backend_max_steps.get(backend.name, 2**62):
                    continue
                report.console.print(f"[dim]{backend.name} {cell} B={point[0]} T={point[1]} N={point[2]} ...[/dim]")
                measured = measure_point(backend, cell, point, preset, compiled_loops)
                summary = summarise(measured, args.estimator, point, cell)
                results.append({"backend": backend.name, "cell": cell, "batch": point[0], "steps": point[1],
                                "size": point[2], "summary": summary,
                                "timings": {k: vars(v) for k, v in measured["timings"].items()}})
    report.record("points", results)
    _tables(report, results)
    checks = _checks(report, results)
    report.record("checks", checks)
    _plots(report, results, preset)
    return 0


def _tables(report: Report, results: list[dict]):
    groups = {}
    for r in results:
        groups.setdefault((r["backend"], r["cell"]), []).append(r)
    for (backend, cell), rows in groups.items():
        variants = list(dict.fromkeys(n for r in rows for p in r["summary"]["passes"].values() for n in p["ms"]))
        peer = f"torch.nn.{cell.upper()}"
        columns = ["B T N", "pass", *variants, "floor", "best", "best/floor", f"speed-up vs {peer}"]
        table_rows = []
        for r in rows:
            for pass_name, p in r["summary"]["passes"].items():
                speedup = p.get("speedup_over", {}).get(peer)
                table_rows.append([f"{r['batch']} {r['steps']} {r['size']}", pass_name,
                                   *(p["ms"].get(v) for v in variants), p["floor_ms"], p["best_mode"],
                                   p.get("best_over_floor"), None if speedup is None else f"{speedup:.1f}x"])
        report.table(f"{backend} Para{cell.upper()}: ms ({report.payload['settings']['estimator']} of interleaved "
                     f"rounds), float32", columns, table_rows)


def _checks(report: Report, results: list[dict]) -> list[dict]:
    """The issue's claims at B=4, T=2048, D=N=256 on the torch CPU backend, when that point was measured."""
    checks = []
    for r in results:
        if r["backend"] != "torch-cpu" or (r["batch"], r["steps"], r["size"]) != TARGET:
            continue
        p = r["summary"]["passes"]["fwd+bwd"]
        peer = f"torch.nn.{r['cell'].upper()}"
        speedup = p.get("speedup_over", {}).get(peer)
        if speedup is not None:
            need = CLAIMS[r["cell"]]
            checks.append({"claim": f"best Para{r['cell'].upper()} fwd+bwd vs {peer}", "value": speedup,
                           "required": f">= {need}x", "pass": speedup >= need})
        if p.get("best_over_floor") is not None:
            checks.append({"claim": f"best Para{r['cell'].upper()} fwd+bwd / floor", "value": p["best_over_floor"],
                           "required": f"<= {FLOOR_CLAIM}", "pass": p["best_over_floor"] <= FLOOR_CLAIM})
    if checks:
        report.table("checks at B=4 T=2048 D=N=256 (torch CPU, fwd+bwd)", ["claim", "value", "required", "result"],
                     [[c["claim"], c["value"], c["required"], "PASS" if c["pass"] else "FAIL"] for c in checks])
    return checks


def _plots(report: Report, results: list[dict], preset: Preset):
    sweep = [r for r in results if r["batch"] == preset.batch and r["size"] == preset.size]
    groups = {}
    for r in sweep:
        groups.setdefault((r["backend"], r["cell"]), []).append(r)
    if not groups:
        return
    fig, axes = new_figure(len(groups), len(PASSES), "time vs T (log-log), floor dashed: "
                           f"B={preset.batch}, D=N={preset.size}, float32")
    for row, ((backend, cell), rows) in enumerate(groups.items()):
        for col, pass_name in enumerate(PASSES):
            ax = axes[row][col]
            variants = dict.fromkeys(n for r in rows for n in r["summary"]["passes"][pass_name]["ms"])
            for v in variants:
                pts = [(r["steps"], r["summary"]["passes"][pass_name]["ms"][v]) for r in rows
                       if v in r["summary"]["passes"][pass_name]["ms"]]
                ax.loglog(*zip(*pts), marker="o", label=v)
            floor = [(r["steps"], r["summary"]["passes"][pass_name]["floor_ms"]) for r in rows]
            ax.loglog(*zip(*floor), "k--", label="floor")
            ax.set_title(f"{backend} Para{cell.upper()} {pass_name}", fontsize=9)
            ax.set_xlabel("T")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
    fig.tight_layout()
    report.plot("cells_time", fig)

    fig, axes = new_figure(1, len(groups), "speed-up of the best mode vs T (forward+backward)")
    for col, ((backend, cell), rows) in enumerate(groups.items()):
        ax = axes[0][col]
        over = dict.fromkeys(n for r in rows for n in r["summary"]["passes"]["fwd+bwd"].get("speedup_over", {}))
        for name in over:
            pts = [(r["steps"], r["summary"]["passes"]["fwd+bwd"]["speedup_over"][name]) for r in rows
                   if name in r["summary"]["passes"]["fwd+bwd"].get("speedup_over", {})]
            ax.semilogx(*zip(*pts), marker="o", label=f"vs {name}")
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_title(f"{backend} Para{cell.upper()}" + ("" if over else " (no peer on this backend)"), fontsize=9)
        ax.set_xlabel("T")
        ax.set_ylabel("speed-up (x)")
        if over:
            ax.legend(fontsize=7)
    fig.tight_layout()
    report.plot("cells_speedup", fig)
