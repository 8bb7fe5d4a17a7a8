"""``pararnn-convert``: to-mlx (torch folder -> MLX folder, optional quantization), to-coreml, from-apple."""

from __future__ import annotations

import argparse
import os
import sys

from pararnn_core.cli_args import Parser, positive_int, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pararnn-convert", description="Convert ParaRNN checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("to-mlx", help="torch checkpoint folder -> MLX checkpoint folder (mlx-lm layout)")
    m.add_argument("--model", required=True, help="source checkpoint folder (from pararnn-train)")
    m.add_argument("--out", required=True, help="destination folder")
    m.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), default="float16")
    m.add_argument("-q", "--quantize", action="store_true", help="quantize linear and embedding layers")
    m.add_argument("--q-bits", type=int, choices=(4, 8), default=4)
    m.add_argument("--q-group-size", type=int, choices=(32, 64, 128), default=64)
    m.add_argument("--tokenizer", help="a Hugging Face tokenizer.json to ship instead of the source's")
    m.add_argument("--chat-template", metavar="FILE",
                   help="a Jinja chat template for mlx_lm.chat and the server (replaces the tokenizer's)")
    m.add_argument("--force", action="store_true", help="overwrite --out")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="allow importing the user cell's module named in the source's config.json (runs its code)")
    _add_coreml_parser(sub)
    a = sub.add_parser("from-apple", help="Apple ml-pararnn cell tensors (.pt/.safetensors) -> our layer weights")
    a.add_argument("--checkpoint", required=True, help="file with A/B/b (and C for the LSTM) tensors")
    a.add_argument("--out", required=True, help="destination folder")
    a.add_argument("--num-heads", type=positive_int, default=1, help="heads of the cells' input projection")
    a.add_argument("--cell", choices=("gru", "lstm"), help="cell type (default: lstm when C is present, else gru)")
    a.add_argument("--force", action="store_true", help="overwrite --out")
    return p


def _add_coreml_parser(sub):
    from pararnn_convert.coreml_options import COMPRESSIONS, COMPUTE_UNITS, PRECISIONS, TARGETS, CoreMLOptions

    default = CoreMLOptions()
    c = sub.add_parser(
        "to-coreml", help="checkpoint folder (torch or MLX) -> stateful Core ML package (decode + prefill functions)"
    )
    c.add_argument("--model", required=True, help="source checkpoint folder (torch or MLX layout)")
    c.add_argument("--out", required=True, help="destination NAME.mlpackage (tokenizer files go to NAME.tokenizer/)")
    # no argparse choices: CoreMLOptions.validate reports a bad value in one line, like every other bad input
    c.add_argument("--precision", default=default.precision, help=f"compute precision: {', '.join(PRECISIONS)}")
    c.add_argument("--target", default=default.target, help=f"minimum deployment target: {', '.join(TARGETS)}")
    c.add_argument("--compute-units", default=default.compute_units, help=", ".join(COMPUTE_UNITS))
    c.add_argument(
        "--compress", default=default.compress,
        help=f"weight compression (coremltools.optimize): {', '.join(COMPRESSIONS)} "
        "(int8/int4: linear quantization; palettize8/4: k-means lookup tables)",
    )
    c.add_argument("--prefill-length", type=int, default=default.prefill_length, help="tokens per prefill call")
    c.add_argument("--parity-steps", type=int, default=default.parity_steps, help="decode steps of the parity check")
    c.add_argument("--author", default=default.author)
    c.add_argument("--license", default=default.license)
    c.add_argument("--model-version", default=default.version, help="version string in the package metadata")
    c.add_argument("--force", action="store_true", help="overwrite --out")
    c.add_argument("--trust-remote-code", action="store_true",
                   help="allow importing the user cell's module named in the source's config.json (runs its code)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    hint = "--out is unchanged (nothing half-written is left); "
    return run_cli("pararnn-convert", lambda: _convert(args), disk_full_hint=hint)


def _convert(args) -> int:
    if args.command == "to-mlx":
        from pararnn_convert.to_mlx import to_mlx

        summary = to_mlx(
            args.model, args.out, args.dtype, args.quantize, args.q_bits, args.q_group_size,
            args.tokenizer, args.force, trust_remote_code=args.trust_remote_code,
            chat_template_file=args.chat_template,
        )
        quant = f", {args.q_bits}-bit quantized (group {args.q_group_size})" if args.quantize else ""
        print(f"converted {args.model} -> MLX ({args.dtype}{quant})")
    elif args.command == "to-coreml":
        os.environ.setdefault("TQDM_DISABLE", "1")  # coremltools' per-pass progress bars would bury the report
        from pararnn_convert.coreml import to_coreml
        from pararnn_convert.coreml_options import CoreMLOptions

        options = CoreMLOptions(
            precision=args.precision, target=args.target, compute_units=args.compute_units,
            compress=args.compress, prefill_length=args.prefill_length, parity_steps=args.parity_steps,
            author=args.author, license=args.license, version=args.model_version,
        )
        summary = to_coreml(args.model, args.out, options, args.force, trust_remote_code=args.trust_remote_code)
        print(f"converted {args.model} -> Core ML")
    else:
        from pararnn_convert.from_apple import from_apple

        summary = from_apple(args.checkpoint, args.out, args.num_heads, args.cell, args.force)
        print(f"imported Apple ml-pararnn cells from {args.checkpoint}")
    print(summary.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
