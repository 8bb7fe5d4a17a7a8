"""``pararnn-bench generate``: language-model decoding and prefill, ours (MLX and torch) vs mlx-lm's Mamba2.

Models have random weights (no downloads): the ParaGRU LM of the preset's size
and, on MLX, mlx-lm's own Mamba2 (mlx_lm.models.mamba2) with the layer count
that brings its parameter count closest to ours. For every context length the
context is prefilled (parallel solve, 1024-token chunks), then peak memory is
reset and tokens are decoded greedily one at a time; the MLX models' decode
timings are interleaved in one comparison per context. Prefill tokens/s is
measured against the prompt length, the parallel prefill beside feeding the
prompt token by token.
"""

from __future__ import annotations

from dataclasses import dataclass

from pararnn_bench.peak_memory import mlx_peak, process_peak, process_peak_supported
from pararnn_bench.report import Report, new_figure
from pararnn_bench.timing import compare

PREFILL_CHUNK = 1024


@dataclass
class Preset:
    d_model: int
    n_layers: int
    contexts: tuple[int, ...]
    prompts: tuple[int, ...]  # parallel prefill lengths
    stepwise_prompt: int  # prompt fed token by token
    decode: int  # tokens per decode measurement
    repeats: int
    vocab: int = 258


PRESETS = {
    "quick": Preset(d_model=256, n_layers=4, contexts=(256, 4096), prompts=(256, 1024), stepwise_prompt=64,
                    decode=64, repeats=3),
    "full": Preset(d_model=512, n_layers=8, contexts=(256, 1024, 4096, 16384, 65536), prompts=(256, 1024, 4096),
                   stepwise_prompt=256, decode=128, repeats=5),
    "tiny": Preset(d_model=32, n_layers=1, contexts=(16, 64), prompts=(16, 32), stepwise_prompt=8, decode=4,
                   repeats=1),
}


def _tokens(rng_seed, length, vocab, framework):
    import numpy as np

    ids = np.random.default_rng(rng_seed).integers(0, vocab, (1, length))
    if framework == "mlx":
        import mlx.core as mx

        return mx.array(ids)
    import torch

    return torch.from_numpy(ids)


# -- MLX models ---------------------------------------------------------------------------
def _parameter_count(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.parameters()))


def mlx_pararnn(preset: Preset, cell: str, folder: str | None):
    import mlx.core as mx

    if folder:
        from pararnn_mlx.loader import load

        return load(folder)[0]
    from pararnn_core.lm_config import LMConfig
    from pararnn_mlx.lm import Model

    mx.random.seed(0)
    model = Model(LMConfig(cell=cell, vocab_size=preset.vocab, d_model=preset.d_model, n_layers=preset.n_layers))
    mx.eval(model.parameters())
    return model


def mamba2_args(d_model: int, layers: int, vocab: int):
    from mlx_lm.models.mamba2 import ModelArgs

    head_dim = 64 if d_model >= 128 else 16
    return ModelArgs(model_type="mamba2", num_heads=2 * d_model // head_dim, head_dim=head_dim, vocab_size=vocab,
                     hidden_size=d_model, intermediate_size=2 * d_model, state_size=128 if d_model >= 128 else 16,
                     num_hidden_layers=layers, layer_norm_epsilon=1e-5, conv_kernel=4, n_groups=1, use_bias=False,
                     use_conv_bias=True, tie_word_embeddings=True, time_step_limit=(0.0, float("inf")),
                     time_step_rank="auto")


def mamba2_of_equal_size(target_params: int, d_model: int, vocab: int):
    """mlx-lm's Mamba2 at width d_model with the layer count whose parameter count is closest to the target."""
    import mlx.core as mx
    from mlx_lm.models.mamba2 import Model

    one, two = (_parameter_count(Model(mamba2_args(d_model, n, vocab))) for n in (1, 2))
    per_layer, base = two - one, 2 * one - two
    layers = max(1, round((target_params - base) / per_layer))
    mx.random.seed(0)
    model = Model(mamba2_args(d_model, layers, vocab))
    mx.eval(model.parameters())
    return model, layers


def mlx_prefill(model, tokens):
    """Run the prompt through ``model`` into a fresh cache, 1024 tokens per call; returns (cache, next token)."""
    import mlx.core as mx

    cache = model.make_cache()
    for start in range(0, tokens.shape[1], PREFILL_CHUNK):
        logits = model(tokens[:, start : start + PREFILL_CHUNK], cache=cache)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(token, [c.state for c in cache])
    return cache, token


def mlx_stepwise(model, tokens):
    import mlx.core as mx

    cache = model.make_cache()
    for t in range(tokens.shape[1]):
        logits = model(tokens[:, t : t + 1], cache=cache)
        mx.eval(logits, [c.state for c in cache])


def mlx_decode(model, cache, token, n):
    """Greedy decoding of ``n`` tokens, one model call and one evaluation each (the cache advances)."""
    import mlx.core as mx

    for _ in range(n):
        logits = model(token[:, None], cache=cache)
        token = mx.argmax(logits[:, -1], axis=-1)
        mx.eval(token)
    return token


# -- torch model ----------------------------------------------------------------------------
def torch_pararnn(preset: Preset, cell: str):
    import torch

    from pararnn_core.lm_config import LMConfig
    from pararnn_torch.lm import ParaRNNLM

    torch.manual_seed(0)
    return ParaRNNLM(LMConfig(cell=cell, vocab_size=preset.vocab, d_model=preset.d_model,
                              n_layers=preset.n_layers)).eval()


def torch_prefill(model, tokens, chunk: int = 4096):
    import torch

    state = None
    with torch.no_grad():
        for start in range(0, tokens.shape[1], chunk):
            logits, state = model(tokens[:, start : start + chunk], state=state, return_state=True)
    return state, logits[:, -1].argmax(-1)


def torch_stepwise(model, tokens):
    state = None
    for t in range(tokens.shape[1]):
        _, state = model.step(tokens[:, t], state)


def torch_decode(model, state, token, n):
    for _ in range(n):
        logits, state = model.step(token, state)
        token = logits.argmax(-1)
    return token


# -- the run ----------------------------------------------------------------------------------
def run(args, report: Report) -> int:
    import importlib.util

    preset = PRESETS[args.preset]
    if args.repeats:
        preset.repeats = args.repeats
    cell = args.cells[0]
    report.record("preset", vars(preset))
    figures = {"decode": {}, "prefill": {}}
    if importlib.util.find_spec("mlx") is not None and (not args.backends or "mlx-cpu" in args.backends
                                                        or "mlx-gpu" in args.backends):
        figures = _run_mlx(args, report, preset, cell, figures)
    if importlib.util.find_spec("torch") is not None and (not args.backends or "torch-cpu" in args.backends):
        figures = _run_torch(report, preset, cell, figures)
    report.record("decode", figures["decode"])
    report.record("prefill", figures["prefill"])
    _tables(report, figures, preset)
    _plots(report, figures, preset)
    return 0


def _run_mlx(args, report, preset, cell, figures):
    import mlx.core as mx

    device = "gpu" if mx.metal.is_available() and (not args.backends or "mlx-gpu" in args.backends) else "cpu"
    mx.set_default_device(mx.Device(mx.gpu if device == "gpu" else mx.cpu))
    ours = mlx_pararnn(preset, cell, args.mlx_model)
    params = _parameter_count(ours)
    mamba, layers = mamba2_of_equal_size(params, ours.config.d_model, ours.config.vocab_size)
    models = {f"mlx Para{cell.upper()} LM": ours, "mlx-lm Mamba2": mamba}
    report.record("mlx_models", {"device": device, f"Para{cell.upper()} LM parameters": params,
                                 "Mamba2 parameters": _parameter_count(mamba), "Mamba2 layers": layers,
                                 "d_model": ours.config.d_model})
    report.note(f"MLX ({device}): Para{cell.upper()} LM {params / 1e6:.2f}M parameters, mlx-lm Mamba2 "
                f"{_parameter_count(mamba) / 1e6:.2f}M ({layers} layers, d_model {ours.config.d_model})")
    vocab = ours.config.vocab_size
    for context in preset.contexts:
        report.console.print(f"[dim]MLX decode after {context} tokens ...[/dim]")
        prompt = _tokens(context, context, vocab, "mlx")
        prefilled = {name: mlx_prefill(model, prompt) for name, model in models.items()}
        peaks = {name: mlx_peak(lambda m=model, p=prefilled[name]: mlx_decode(m, *p, preset.decode))
                 for name, model in models.items()}
        timings = compare({name: (lambda m=model, p=prefilled[name]: mlx_decode(m, *p, preset.decode))
                           for name, model in models.items()}, repeats=preset.repeats)
        for name in models:
            figures["decode"].setdefault(name, {})[context] = {
                "tokens_per_s": preset.decode / (timings[name].ms(args.estimator) / 1e3),
                "peak_bytes": peaks[name], "timing": vars(timings[name])}
    for length in preset.prompts:
        report.console.print(f"[dim]MLX prefill of {length} tokens ...[/dim]")
        prompt = _tokens(length, length, vocab, "mlx")
        timings = compare({name: (lambda m=model, p=prompt: mlx_prefill(m, p)) for name, model in models.items()},
                          repeats=preset.repeats)
        for name in models:
            figures["prefill"].setdefault(f"{name} parallel", {})[length] = \
                length / (timings[name].ms(args.estimator) / 1e3)
    prompt = _tokens(1, preset.stepwise_prompt, vocab, "mlx")
    timings = compare({name: (lambda m=model: mlx_stepwise(m, prompt)) for name, model in models.items()},
                      repeats=preset.repeats)
    for name in models:
        figures["prefill"].setdefault(f"{name} token by token", {})[preset.stepwise_prompt] = \
            preset.stepwise_prompt / (timings[name].ms(args.estimator) / 1e3)
    return figures


def _run_torch(report, preset, cell, figures):
    model = torch_pararnn(preset, cell)
    name = f"torch Para{cell.upper()} LM (mode {model.layers[0].recurrent.cell.resolved_mode()})"
    vocab = preset.vocab
    prefilled = {}
    for context in preset.contexts:
        report.console.print(f"[dim]torch decode after {context} tokens ...[/dim]")
        prefilled[context] = state, token = torch_prefill(model, _tokens(context, context, vocab, "torch"))
        timing = compare({name: lambda s=state, t=token: torch_decode(model, s, t, preset.decode)},
                         repeats=preset.repeats)[name]
        figures["decode"].setdefault(name, {})[context] = {
            "tokens_per_s": preset.decode / (timing.min_ms / 1e3), "peak_bytes": None, "timing": vars(timing)}
    for length in preset.prompts:
        prompt = _tokens(length, length, vocab, "torch")
        timing = compare({name: lambda p=prompt: torch_prefill(model, p)}, repeats=preset.repeats)[name]
        figures["prefill"].setdefault(f"{name} parallel", {})[length] = length / (timing.min_ms / 1e3)
    prompt = _tokens(1, preset.stepwise_prompt, vocab, "torch")
    timing = compare({name: lambda: torch_stepwise(model, prompt)}, repeats=preset.repeats)[name]
    figures["prefill"].setdefault(f"{name} token by token", {})[preset.stepwise_prompt] = \
        preset.stepwise_prompt / (timing.min_ms / 1e3)
    # after every timing: the measurement reconfigures glibc's allocator for the rest of the process
    memory_reason = process_peak_supported()
    if memory_reason:
        report.note(f"torch decode memory not measured: {memory_reason}")
        return figures
    for context, (state, token) in prefilled.items():
        figures["decode"][name][context]["peak_bytes"] = process_peak(
            lambda s=state, t=token: torch_decode(model, s, t, preset.decode))
    return figures


def _tables(report, figures, preset):
    contexts = list(preset.contexts)
    rows = []
    for name, by_context in figures["decode"].items():
        rows.append([name, "tokens/s", *(by_context[c]["tokens_per_s"] for c in contexts)])
        rows.append([name, "peak MB", *(_mb(by_context[c]["peak_bytes"]) for c in contexts)])
    report.table(f"decode ({preset.decode} tokens after a context of ...)", ["model", "figure",
                 *(f"{c:,}" for c in contexts)], rows)
    lengths = sorted({n for v in figures["prefill"].values() for n in v})
    report.table("prefill tokens/s vs prompt length", ["model", *(f"{n:,}" for n in lengths)],
                 [[name, *(v.get(n) for n in lengths)] for name, v in figures["prefill"].items()])
    ours = next((n for n in figures["decode"] if n.startswith("mlx Para")), None)
    if ours and "mlx-lm Mamba2" in figures["decode"]:
        checks = []
        for c in contexts:
            a = figures["decode"][ours][c]["tokens_per_s"]
            b = figures["decode"]["mlx-lm Mamba2"][c]["tokens_per_s"]
            checks.append({"context": c, "ours_tokens_per_s": a, "mamba2_tokens_per_s": b, "ratio": a / b,
                           "pass": a >= b})
        report.record("checks", checks)
        report.table(f"check: {ours} decodes at least as fast as mlx-lm Mamba2 of equal size",
                     ["context", "ours tok/s", "Mamba2 tok/s", "ratio", "result"],
                     [[f"{c['context']:,}", c["ours_tokens_per_s"], c["mamba2_tokens_per_s"], c["ratio"],
                       "PASS" if c["pass"] else "FAIL"] for c in checks])


def _mb(value):
    return None if value is None else value / 1e6


def _plots(report, figures, preset):
    fig, axes = new_figure(1, 3, f"decoding ({preset.decode} tokens) and prefill, random weights")
    for name, by_context in figures["decode"].items():
        contexts = list(by_context)
        axes[0][0].semilogx(contexts, [by_context[c]["tokens_per_s"] for c in contexts], marker="o", label=name)
        peaks = [by_context[c]["peak_bytes"] for c in contexts]
        if all(p is not None for p in peaks):
            axes[0][1].semilogx(contexts, [max(p, 1) / 1e6 for p in peaks], marker="o", label=name)
    for name, by_length in figures["prefill"].items():
        lengths = list(by_length)
        axes[0][2].loglog(lengths, list(by_length.values()), marker="o" if len(lengths) > 1 else "s", label=name)
    titles = ("decode tokens/s vs context", "decode peak memory (MB) vs context", "prefill tokens/s vs prompt")
    for ax, title in zip(axes[0], titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens")
        ax.legend(fontsize=6)
    fig.tight_layout()
    report.plot("generate", fig)
