"""``pararnn-demo``: the whole flow on a CPU in a few minutes, with no network.

1. train a small ParaGRU language model with PyTorch on the embedded corpus
   (the Python standard library's own sources, byte-level tokens);
2. convert the checkpoint to an MLX folder (mlx-lm layout);
3. generate a sample with MLX (parallel prefill, constant-memory decoding);
4. print the numbers: eval loss against the entropy of uniform bytes (ln 256).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from pararnn_core.cli_args import (
    CLIError,
    Parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)

UNIFORM_BYTES = math.log(256)


def build_parser():
    p = Parser(prog="pararnn-demo", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="folder for the torch and MLX checkpoints")
    p.add_argument("--steps", type=positive_int, default=1000, help="training steps")
    p.add_argument("--cell", default="gru")
    p.add_argument("--d-model", type=positive_int, default=128)
    p.add_argument("--layers", type=positive_int, default=2)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--prompt", default="import os\n")
    p.add_argument("--max-tokens", type=positive_int, default=300)
    p.add_argument("--temp", type=non_negative_float, default=0.8)
    p.add_argument("--top-p", type=positive_float, default=0.95)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("pararnn-demo", lambda: _demo(args))


def _demo(args) -> int:
    out = Path(args.out)
    torch_dir, mlx_dir = out / "torch", out / "mlx"
    if out.exists() and any(out.iterdir()) and not args.force:
        raise CLIError(f"{out} already exists; pass --force to replace it or --out for another folder")
    begin = time.perf_counter()

    print(f"== 1/3 train ({args.steps} steps, {args.cell}, d_model {args.d_model}, {args.layers} layers) ==")
    from pararnn_torch.train import run as train

    result = train([
        "--out", str(torch_dir), "--force", "--cell", args.cell, "--d-model", str(args.d_model),
        "--layers", str(args.layers), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
        "--steps", str(args.steps), "--lr", "4e-3", "--eval-every", str(max(1, args.steps // 4)),
        "--save-every", str(args.steps), "--seed", str(args.seed), "--device", "cpu",
        "--corpus-bytes", "3000000",
    ])

    print("\n== 2/3 convert to MLX ==")
    from pararnn_convert.to_mlx import to_mlx

    summary = to_mlx(torch_dir, mlx_dir, dtype="float32", force=True)
    print(summary.describe())

    print(f"\n== 3/3 generate with MLX (temp {args.temp}) ==")
    from pararnn_mlx.generate import stream
    from pararnn_mlx.loader import load

    model, tokenizer = load(mlx_dir)
    print(args.prompt, end="", flush=True)
    last = None
    for last in stream(model, tokenizer, args.prompt, args.max_tokens, args.temp, args.top_p, args.seed):
        print(last.text, end="", flush=True)
    print("\n")

    ev = result["eval_loss"]
    print("== numbers ==")
    print(f"eval loss           {ev:.3f} nats/token (perplexity {math.exp(ev):.2f}); "
          f"uniform bytes: ln 256 = {UNIFORM_BYTES:.3f} ({UNIFORM_BYTES - ev:.2f} nats better)")
    print(f"training            {result['seconds']:.0f} s, {result['tokens_per_sec']:,.0f} tokens/s (PyTorch, CPU)")
    print(f"generation          {last.generation_tps:.1f} tokens/s, prompt {last.prompt_tps:.1f} tokens/s, "
          f"peak memory {last.peak_memory:.3f} GB (MLX)")
    print(f"total               {time.perf_counter() - begin:.0f} s")
    print(f"checkpoints         {torch_dir} (torch, with loss_curve.png), {mlx_dir} (MLX)")
    print(f"try                 pararnn-generate --model {mlx_dir} --prompt 'import ' --max-tokens 200 --temp 0.7")
    return 0


if __name__ == "__main__":
    sys.exit(main())
