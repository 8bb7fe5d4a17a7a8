"""Sizes of a ParaRNN LM computed from its config alone (no model is allocated): parameters,
training FLOPs per token, and a per-GPU memory estimate for DDP and FSDP.

FLOPs: every matmul weight costs 2 FLOPs per token forward and 4 backward (the usual 6 per
parameter per token); the cell's Newton iterations and scan are elementwise in the state
(O(N) per token, not O(N^2)) and are left out, as attention-free MFU conventions do. The
embedding lookup is free; the output head (tied or not) is a matmul and counts.

Memory: a documented estimate, not a measurement (README, "Training at scale"). Model
state is fp32 weights + fp32 grads + Adam's two moments = 16 bytes per parameter, all of
it on every GPU with DDP and 1/world of it with FSDP, which in addition holds the bf16
unsharded weights of two blocks at a time (the current one and the prefetched next) and
the root's (embedding, final norm, head). Activations saved for backward are counted per
token from the block's tensors (below), in bf16, plus float32 logits and their gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pararnn_core.lm_config import LMConfig

#: dense bf16 tensor-core peak per GPU, TFLOP/s (vendor data sheets, SXM parts, no sparsity)
PEAK_BF16_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0}
STATE_BYTES_PER_PARAMETER = 16  # fp32 weight, fp32 grad, Adam m and v
BF16 = 2


def parameter_count(config: LMConfig) -> int:
    return sum(math.prod(shape) for shape in config.parameter_shapes().values())


def _block_parameters(config: LMConfig) -> int:
    shapes = config.parameter_shapes()
    return sum(math.prod(s) for name, s in shapes.items() if name.startswith("layers.0."))


def matmul_parameters(config: LMConfig) -> int:
    """Weights used in a matmul per token: projections, MLP, the cell's input projection and the head."""
    shapes = config.parameter_shapes()
    per_layer = sum(
        math.prod(s) for name, s in shapes.items()
        if name.startswith("layers.0.") and name.endswith(("proj.weight", "cell.weight"))
    )
    return config.n_layers * per_layer + config.vocab_size * config.d_model


def training_flops_per_token(config: LMConfig) -> int:
    return 6 * matmul_parameters(config)


def activation_bytes_per_token(config: LMConfig, activation_checkpointing: bool) -> int:
    """Bytes saved for backward per token: bf16 block tensors (norm in/out, projections, conv, cell
    gates and states, MLP branches), float32 residual stream, float32 logits and their gradient."""
    d, n, m = config.d_model, config.cell_size, config.mlp_size
    shapes = config.parameter_shapes()
    # the cell saves about one N-wide tensor per row of its elementwise parameters (gates, recurrent weights)
    cell_rows = sum(
        math.prod(s) for name, s in shapes.items() if name.startswith("layers.0.recurrent.cell.")
        and not name.endswith("cell.weight")
    ) // n
    per_layer = BF16 * (4 * d + (8 + cell_rows) * n + 4 * m) + 4 * 2 * d
    logits = config.vocab_size * (4 + 4)
    if activation_checkpointing:  # each block keeps its fp32 input; one block is recomputed at a time
        return config.n_layers * 4 * d + per_layer + logits
    return config.n_layers * per_layer + logits


@dataclass
class MemoryEstimate:
    model_state: int
    working_weights: int
    activations: int

    @property
    def total(self) -> int:
        return self.model_state + self.working_weights + self.activations


def memory_per_gpu(config: LMConfig, strategy: str, world: int, tokens_per_gpu: int,
                   activation_checkpointing: bool = False) -> MemoryEstimate:
    """Bytes per GPU for ``strategy`` "ddp" or "fsdp" (see the module docstring for what is counted)."""
    total = parameter_count(config)
    activations = tokens_per_gpu * activation_bytes_per_token(config, activation_checkpointing)
    if strategy == "ddp":
        return MemoryEstimate(STATE_BYTES_PER_PARAMETER * total, BF16 * total, activations)
    if strategy != "fsdp":
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', got {strategy!r}")
    root = total - config.n_layers * _block_parameters(config)
    working = BF16 * (2 * _block_parameters(config) + root)
    return MemoryEstimate(math.ceil(STATE_BYTES_PER_PARAMETER * total / world), working, activations)


def peak_tflops_for(device_name: str) -> float | None:
    """The table's bf16 peak for a CUDA device name such as 'NVIDIA H100 80GB HBM3' (None when unknown)."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name.upper():
            return value
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def dry_run_report(config: LMConfig, world: int, batch_size: int, seq_len: int, activation_checkpointing: bool,
                   gpu_memory_gib: float | None = None, reference: float | None = None) -> str:
    """The text ``pararnn-train --dry-run`` prints."""
    params = parameter_count(config)
    tokens = batch_size * seq_len
    lines = [
        f"model: {config.cell} LM, {config.n_layers} layers x d_model {config.d_model}, cell {config.cell_size}, "
        f"{config.num_heads} heads, MLP {config.mlp_size}, vocab {config.vocab_size:,}, "
        f"{'tied' if config.tie_embeddings else 'untied'} head",
        f"parameters: {params:,} ({params / 1e9:.3f}B)"
        + (f"; the paper reports {reference / 1e9:.2f}B ({100 * (params / reference - 1):+.1f}%)" if reference else ""),
        f"tokens per step: {tokens:,} ({batch_size} sequences x {seq_len}); "
        f"{batch_size // world if batch_size % world == 0 else batch_size / world} sequences per GPU at world size "
        f"{world}",
        f"training FLOPs per token: {training_flops_per_token(config):,} "
        f"({training_flops_per_token(config) * tokens / 1e15:,.1f} PFLOP per step)",
        f"memory per GPU at world size {world} (estimate; activation checkpointing "
        f"{'on' if activation_checkpointing else 'off'}):",
    ]
    for strategy in ("ddp", "fsdp"):
        est = memory_per_gpu(config, strategy, world, tokens // world, activation_checkpointing)
        fits = ""
        if gpu_memory_gib:
            fits = "  fits" if est.total <= gpu_memory_gib * 2**30 else "  does NOT fit"
            fits += f" in {gpu_memory_gib:g} GiB"
        lines.append(
            f"  {strategy.upper():4s} {_gib(est.total):>12s} = model state {_gib(est.model_state)} + working weights "
            f"{_gib(est.working_weights)} + activations {_gib(est.activations)}{fits}"
        )
    return "\n".join(lines)
