"""``pararnn-tasks``: the paper's synthetic tasks for any cell, beside a linear recurrence and a Transformer.

    pararnn-tasks parity --preset cpu --seeds 0 1 2 --json parity.json
    pararnn-tasks mqar --preset cpu --models paragru linear transformer
    pararnn-tasks khop --models paragru my_cell --cell-module my_cells    # a user cell

Prints a table (per model and seed: held-out accuracy, steps to reach it, parameters,
wall time), and with ``--json`` writes the results with the settings, seeds and
machine, plus a PNG of held-out accuracy against training step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import platform
import sys
import time
from pathlib import Path

import torch

from pararnn_core.solvers import MODES
from pararnn_torch.tasks.data import TASKS
from pararnn_torch.tasks.models import known_models
from pararnn_torch.tasks.presets import PRESETS, RunSettings, preset_settings
from pararnn_torch.tasks.trainer import make_data, train_run

DEFAULT_MODELS = ("paragru", "paralstm", "linear", "transformer")
#: settings a flag may override, with the flag's type
_OVERRIDES = {
    "seq_len": int, "train_samples": int, "test_samples": int, "batch_size": int, "steps": int, "lr": float,
    "eval_every": int, "eval_samples": int, "stop_at": float, "data_seed": int, "mode": str,
    "vocab_size": int, "task_param": int, "layers": int,
}
_OVERRIDE_HELP = {"task_param": "override the preset's task parameter: kappa (mqar), k (khop), n (keepnth)",
                  "layers": "mixer (+ MLP) blocks stacked (the paper's models: 1)"}


class UsageError(Exception):
    """Bad command line: one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pararnn-tasks", description=__doc__.split("\n\n")[0])
    p.add_argument("task", choices=TASKS)
    p.add_argument("--preset", choices=PRESETS, default="paper",
                   help="paper: the paper's settings (L=100, 10k/100k samples, ...); cpu: finishes on 2 CPU cores")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help=f"models to train (default: {' '.join(DEFAULT_MODELS)}; also mgu, nn_gru and nn_lstm "
                        f"(torch.nn's), or a user cell's name)")
    p.add_argument("--cell-module", action="append", default=[],
                   help="module to import that registers a user cell (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (init and batch order)")
    for name, kind in _OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=_OVERRIDE_HELP.get(name, f"override the preset's {name}"))
    p.add_argument("--json", type=Path, help="write the results here (and a PNG next to it unless --png)")
    p.add_argument("--png", type=Path, help="accuracy-vs-step plot (default: the --json path with .png)")
    p.add_argument("--jobs", type=int, default=None,
                   help="runs trained at once, one process each (default: CPU cores, at most the number of runs)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per run (default 1: small models; more threads only contend)")
    p.add_argument("--quiet", action="store_true", help="no per-evaluation progress lines")
    return p


def settings_from_args(args) -> RunSettings:
    settings = preset_settings(args.task, args.preset)
    changes = {k: getattr(args, k) for k in _OVERRIDES if getattr(args, k) is not None}
    if "lr" in changes:
        changes["model_lr"] = ()  # --lr sets every model's learning rate
    try:
        return settings.replace(**changes) if changes else settings
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def import_cell_modules(modules):
    # a console script's sys.path lacks the current folder, where a user's cell file usually is
    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UsageError(f"--cell-module {name!r} cannot be imported ({exc}); "
                             f"pass an importable module name (on sys.path) that defines the cell") from None


def check_args(args, settings: RunSettings):
    known = known_models()
    unknown = [m for m in args.models if m not in known]
    if unknown:
        raise UsageError(f"unknown model(s) {', '.join(unknown)}; expected some of {', '.join(known)} "
                         f"(register a user cell with --cell-module)")
    if len(set(args.models)) != len(args.models) or len(set(args.seeds)) != len(args.seeds):
        raise UsageError("--models and --seeds must not repeat a value")
    for name in ("jobs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    for name in ("train_samples", "test_samples", "batch_size", "steps", "eval_every", "eval_samples", "layers"):
        if getattr(settings, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(settings, name)}")
    if settings.mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {settings.mode!r}")
    for path in (args.json, args.png):
        if path is not None and not path.parent.exists():
            raise UsageError(f"the folder of {path} does not exist; create it or pick another path")


# -- running ------------------------------------------------------------------------------
def _run_one(job):
    """One (model, seed) run in a worker process: its own data copy, its own thread count."""
    model, seed, settings, threads, modules, quiet = job
    torch.set_num_threads(threads)
    for name in modules:
        importlib.import_module(name)
    data = make_data(settings)

    def report(step, accuracy):
        if not quiet:
            print(f"  {model} seed {seed}: step {step:>6}  held-out accuracy {accuracy:.4f}", flush=True)

    return model, seed, train_run(model, settings, seed, data, on_eval=report)


def run_all(args, settings: RunSettings) -> dict:
    common = (settings, args.threads, tuple(args.cell_module), args.quiet)
    jobs = [(m, s, *common) for m in args.models for s in args.seeds]
    workers = min(args.jobs or os.cpu_count() or 1, len(jobs))
    results = {m: {} for m in args.models}
    if workers == 1:
        outcomes = map(_run_one, jobs)
        for model, seed, record in outcomes:
            results[model][str(seed)] = record
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for model, seed, record in pool.imap_unordered(_run_one, jobs):
                results[model][str(seed)] = record
    # runs finish in any order; report them in the order asked
    return {m: {str(s): results[m][str(s)] for s in args.seeds} for m in args.models}


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": list(os.getloadavg()),
    }


def summarize(results: dict) -> dict:
    """Per model: best and worst seed's held-out accuracy (the paper reports the best of 3 seeds)."""
    out = {}
    for model, runs in results.items():
        accs = [r["test_accuracy"] for r in runs.values()]
        out[model] = {"best_test_accuracy": max(accs), "worst_test_accuracy": min(accs)}
    return out


def format_table(results: dict) -> str:
    header = f"{'model':<14}{'seed':>5}{'test acc':>10}{'seq acc':>9}{'steps to acc':>14}{'steps':>7}" \
             f"{'params':>9}{'wall s':>9}"
    lines = [header, "-" * len(header)]
    for model, runs in results.items():
        for seed, r in runs.items():
            lines.append(f"{model:<14}{seed:>5}{100 * r['test_accuracy']:>9.2f}%"
                         f"{100 * r['test_sequence_accuracy']:>8.1f}%{r['steps_to_accuracy']:>14}"
                         f"{r['steps_trained']:>7}{r['parameters']:>9}{r['wall_seconds']:>9.1f}")
    return "\n".join(lines)


def write_json(path: Path, document: dict):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(tmp, path)


def write_png(path: Path, document: dict):
    """Held-out accuracy against step, one line per (model, seed); skipped with a note without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no plot written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (model, runs) in enumerate(document["results"].items()):
        for j, r in enumerate(runs.values()):
            steps = [h["step"] for h in r["history"]]
            accs = [100 * h["accuracy"] for h in r["history"]]
            ax.plot(steps, accs, color=colors[i % len(colors)], alpha=0.85, label=model if j == 0 else None)
    s = document["settings"]
    ax.set(xlabel="training step", ylabel="held-out accuracy (%)",
           title=f"{document['task']} (L={s['seq_len']}, preset {document['preset']}, seeds {document['seeds']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
        import_cell_modules(args.cell_module)
        check_args(args, settings)
    except UsageError as exc:
        print(f"pararnn-tasks: error: {exc}", file=sys.stderr)
        return 2
    machine = machine_info()
    print(f"{args.task}: preset {args.preset}, L={settings.seq_len}, {settings.train_samples} train / "
          f"{settings.test_samples} test sequences, up to {settings.steps} steps, models {' '.join(args.models)}, "
          f"seeds {' '.join(map(str, args.seeds))}; load average {machine['load_average_at_start'][0]:.1f} "
          f"on {machine['cpu_count']} cores", flush=True)
    started = time.perf_counter()
    results = run_all(args, settings)
    machine["load_average_at_end"] = list(os.getloadavg())
    document = {
        "task": args.task,
        "preset": args.preset,
        "command": "pararnn-tasks " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings.to_dict(),
        "seeds": args.seeds,
        "machine": machine,
        "total_wall_seconds": time.perf_counter() - started,
        "total_cpu_seconds": sum(r["cpu_seconds"] for runs in results.values() for r in runs.values()),
        "results": results,
        "summary": summarize(results),
    }
    print(format_table(results))
    cpu = document["total_cpu_seconds"]
    print(f"total {document['total_wall_seconds']:.0f} s wall, {cpu:.0f} s CPU in the runs "
          f"(~{cpu / machine['cpu_count']:.0f} s on {machine['cpu_count']} idle cores); load average "
          f"{machine['load_average_at_end'][0]:.1f} at the end")
    if args.json is not None:
        write_json(args.json, document)
        png = args.png or args.json.with_suffix(".png")
        write_png(png, document)
        print(f"wrote {args.json} and {png}")
    elif args.png is not None:
        write_png(args.png, document)
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
