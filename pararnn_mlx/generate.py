"""``pararnn-generate``: stream text from a ParaRNN checkpoint folder with MLX (the flags of mlx_lm.generate).

    pararnn-generate --model runs/tiny-mlx --prompt "def main(" --max-tokens 200 --temp 0.8 --top-p 0.95

The prompt is prefilled with the parallel solve, then tokens are decoded one by
one with the cell's ``step``; the state is a fixed-size conv tail and cell state
per layer, so memory does not grow with the context.
"""

from __future__ import annotations

import argparse
import math
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pararnn-generate", description="Generate text with a ParaRNN model on MLX.")
    p.add_argument("--model", required=True, help="checkpoint folder (from pararnn-train or pararnn-convert)")
    p.add_argument("--prompt", "-p", required=True, help='prompt text ("-" reads it from stdin)')
    p.add_argument("--max-tokens", "-m", type=int, default=100, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="random seed of the sampler")
    p.add_argument("--mode", default="auto", help="solver mode of the prefill (auto, parallel, sequential)")
    p.add_argument("--adapter-path", default=None,
                   help="folder of adapters from mlx_lm.lora (adapter_config.json + adapters.safetensors)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow importing the user cell module named by config.json (runs its code)")
    p.add_argument("--verbose", type=lambda s: s.lower() in ("1", "true", "yes"), default=True,
                   help="print the statistics after the text (default true)")
    return p


def check_request(prompt: str, max_tokens: int, temp: float, top_p: float):
    """Reject requests that cannot produce anything, with what to do instead."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one character of text to continue (--prompt)")
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {max_tokens}")
    if not math.isfinite(temp) or temp < 0:
        raise ValueError(f"--temp must be a finite number >= 0 (0 is greedy), got {temp}")
    if not 0 < top_p <= 1:  # also false for NaN
        raise ValueError(f"--top-p must be in (0, 1], got {top_p}")


def stream(model, tokenizer, prompt: str, max_tokens: int, temp: float = 0.0, top_p: float = 1.0, seed=None):
    """Yield mlx-lm GenerationResponse objects (text pieces and statistics)."""
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    check_request(prompt, max_tokens, temp, top_p)
    if seed is not None:
        mx.random.seed(seed)
    sampler = make_sampler(temp=temp, top_p=top_p)
    yield from stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    try:
        check_request(prompt, args.max_tokens, args.temp, args.top_p)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from pararnn_mlx.loader import load

    try:
        model, tokenizer = load(args.model, mode=args.mode, trust_remote_code=args.trust_remote_code,
                                adapter_path=args.adapter_path)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    last, interrupted = None, False
    try:
        for response in stream(model, tokenizer, prompt, args.max_tokens, args.temp, args.top_p, args.seed):
            print(response.text, end="", flush=True)
            last = response
    except KeyboardInterrupt:  # Ctrl-C: stop, keep what was generated, report it
        interrupted = True
    print()
    if interrupted:
        print("[interrupted]", file=sys.stderr)
    if args.verbose and last is not None:
        print("=" * 10)
        print(f"Prompt: {last.prompt_tokens} tokens, {last.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {last.generation_tokens} tokens, {last.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {last.peak_memory:.3f} GB")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
