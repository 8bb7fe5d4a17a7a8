"""MLX decoding after a short and a long context: memory and tokens/s must not depend on the context.

    python -m bench.bench_decode                      # random tiny-ish model (d_model 256, 4 layers)
    python -m bench.bench_decode --model runs/demo/mlx

For each context length the prompt is prefilled (parallel solve, in chunks) into
the mlx-lm cache; then peak memory is reset and ``--decode`` tokens are generated
greedily, one ``step`` each. Pass: peak memory after 16,384 tokens within 5% of
that after 256, and tokens/s at 16,384 at least 90% of that at 256 (timings
interleaved in one run; see bench/timing.py).
"""

from __future__ import annotations

import argparse
import sys

import mlx.core as mx
import numpy as np

from bench.timing import compare, machine_description, print_table


def build_model(args):
    if args.model:
        from pararnn_mlx.loader import load

        return load(args.model)[0]
    from pararnn_core.lm_config import LMConfig
    from pararnn_mlx.lm import Model

    mx.random.seed(0)
    model = Model(LMConfig(cell=args.cell, vocab_size=258, d_model=args.d_model, n_layers=args.layers))
    mx.eval(model.parameters())
    return model


def prefill(model, length, vocab):
    cache = model.make_cache()
    tokens = mx.array(np.random.default_rng(length).integers(0, vocab, (1, length)))
    logits = model(tokens, cache=cache)
    token = mx.argmax(logits[:, -1], axis=-1)
    mx.eval(token, [c.state for c in cache])  # nothing lazy may keep the prompt's logits alive
    return cache, token


def decode(model, cache, token, n):
    from mlx_lm.models.cache import ArraysCache

    local = []
    for c in cache:  # decode from a copy, so every repeat starts from the same context
        copy = ArraysCache(2)
        copy[0], copy[1] = c[0], c[1]
        local.append(copy)
    for _ in range(n):
        logits = model(token[:, None], cache=local)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(token)
    return token


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="MLX checkpoint folder (default: a random model)")
    p.add_argument("--cell", default="gru")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--contexts", type=int, nargs=2, default=(256, 16384))
    p.add_argument("--decode", type=int, default=200, help="tokens decoded per measurement")
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    model = build_model(args)
    vocab = model.config.vocab_size
    short, long = args.contexts
    prefilled = {n: prefill(model, n, vocab) for n in (short, long)}

    peak = {}
    for n, (cache, token) in list(prefilled.items()) * 2:  # the second round counts: compilation is done
        mx.clear_cache()
        mx.reset_peak_memory()
        decode(model, cache, token, args.decode)
        peak[n] = mx.get_peak_memory()

    timings = compare(
        {f"after {n:,} tokens": (lambda n=n: decode(model, *prefilled[n], args.decode)) for n in (short, long)},
        repeats=args.repeats,
    )
    print(f"MLX decoding, {machine_description()}, device {mx.default_device()}")
    print_table(timings, baseline=f"after {short:,} tokens", title=f"{args.decode} decoded tokens")
    tps = {n: args.decode / (timings[f"after {n:,} tokens"].median_ms / 1000) for n in (short, long)}
    for n in (short, long):
        print(f"context {n:>6,}: {tps[n]:8.1f} tokens/s, peak memory {peak[n] / 1e6:8.2f} MB")
    memory_ratio = peak[long] / peak[short]
    speed_ratio = tps[long] / tps[short]
    memory_ok, speed_ok = abs(memory_ratio - 1) <= 0.05, speed_ratio >= 0.9
    verdict = {True: "PASS", False: "FAIL"}
    print(f"peak memory {long:,} / {short:,}: {memory_ratio:.3f} (must be within 5%): {verdict[memory_ok]}")
    print(f"tokens/s   {long:,} / {short:,}: {speed_ratio:.3f} (must be >= 0.90): {verdict[speed_ok]}")
    return 0 if memory_ok and speed_ok else 1


if __name__ == "__main__":
    sys.exit(main())
