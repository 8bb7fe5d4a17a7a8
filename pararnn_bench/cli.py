"""pararnn-bench: speed, memory and convergence of ParaGRU / ParaLSTM, side by side with what users would pick instead.

    pararnn-bench cells --quick        # every mode per backend vs torch.nn.GRU/LSTM, a compiled loop, the floor
    pararnn-bench memory --quick       # peak training memory vs T: adjoint vs backprop through the loop
    pararnn-bench generate --quick     # LM decode/prefill tokens/s and memory vs context, vs mlx-lm's Mamba2
    pararnn-bench newton --quick       # Newton residual vs iteration: random/trained weights, fp32/bf16

Each prints tables, writes <out>/<command>.json (every figure and the machine) and PNG plots.
--quick takes under two minutes on 2 cores; without it, the full sweeps of the README.
"""

from __future__ import annotations

import argparse
import sys

from pararnn_bench.timing import ESTIMATORS

COMMANDS = ("cells", "memory", "generate", "newton")


def _runner(command: str):
    if command == "cells":
        from pararnn_bench import cells

        return cells.run
    if command == "memory":
        from pararnn_bench import memory

        return memory.run
    if command == "generate":
        from pararnn_bench import generate

        return generate.run
    from pararnn_bench import newton

    return newton.run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pararnn-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for command in COMMANDS:
        p = sub.add_parser(command, help=f"run the {command} benchmark")
        size = p.add_mutually_exclusive_group()
        size.add_argument("--quick", dest="preset", action="store_const", const="quick",
                          help="small sweep, under two minutes on 2 cores")
        size.add_argument("--preset", choices=("quick", "full", "tiny"), default="full",
                          help="sweep size (tiny: seconds, for tests)")
        p.add_argument("--out", default="bench-results", help="folder of the JSON and PNGs (default: %(default)s)")
        p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per figure (default: preset's)")
        p.add_argument("--estimator", choices=ESTIMATORS, default="min",
                       help="figure per variant over the rounds (default: %(default)s, the least disturbed by load)")
        p.add_argument("--backends", nargs="+", default=None,
                       help="torch-cpu, torch-cuda, mlx-cpu, mlx-gpu (default: every one present)")
        p.add_argument("--cells", nargs="+", choices=("gru", "lstm"), default=["gru", "lstm"])
        if command == "cells":
            p.add_argument("--steps", type=int, nargs="+", default=None,
                           help="only these sequence lengths T, at the preset's batch and size (no B/N sweep)")
            p.add_argument("--modes", nargs="+", choices=("fused", "kernel", "parallel", "sequential"), default=None,
                           help="only these modes (default: every mode available); the peers are always run")
        if command == "generate":
            p.add_argument("--mlx-model", default=None, help="an MLX checkpoint folder instead of a random model")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    from pararnn_bench.report import Report

    settings = {k: v for k, v in vars(args).items()}
    try:
        report = Report(args.command, args.out, settings)
        status = _runner(args.command)(args, report)
        report.save()
    except ValueError as error:  # bad choices found at run time (e.g. a backend not installed)
        print(f"pararnn-bench {args.command}: {error}", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
