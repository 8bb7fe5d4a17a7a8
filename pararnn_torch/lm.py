"""The ParaRNN language model in PyTorch (docs/design.md section 6).

Each block: RMSNorm -> in-projection to (v, gate) -> causal depthwise conv on v
-> SiLU -> ParaRNN cell -> RMSNorm(y) * SiLU(gate) -> out-projection -> residual;
then RMSNorm -> SwiGLU MLP -> residual. Parameter names follow
``LMConfig.parameter_shapes`` (the same in pararnn_mlx).

The generation state of a layer is ``(conv_tail [B, k-1, N], cell_state)``: it does
not grow with the context. ``resets`` [B, T] restart both the conv and the cell
from the given state (zeros by default) at document starts, exactly as if each
document had been run on its own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pararnn_core.lm_config import LMConfig
from pararnn_torch.layer import ParaRNN


def _last_reset(resets: torch.Tensor) -> torch.Tensor:
    """For each position t, the latest t' <= t with resets[t'] (0 when none): [B, T] long."""
    positions = torch.arange(resets.shape[1], device=resets.device).expand_as(resets)
    marked = torch.where(resets, positions, torch.zeros_like(positions))
    return torch.cummax(marked, dim=1).values


class CausalConv(nn.Module):
    """Depthwise causal conv: out_t = bias + sum_j weight[:, j] * x_{t-(k-1)+j}."""

    def __init__(self, channels: int, width: int, device=None, dtype=None):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.empty(channels, width, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(channels, device=device, dtype=dtype))
        bound = 1 / math.sqrt(width)
        nn.init.uniform_(self.weight, -bound, bound)

    def initial_tail(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.width - 1, x.shape[-1])

    def forward(self, x, tail=None, resets=None):
        """x [B, T, N], tail [B, k-1, N] (the inputs before x) -> (out [B, T, N], new tail)."""
        batch, length, channels = x.shape
        k = self.width
        if tail is None:
            tail = self.initial_tail(x)
        # index i holds time i - (k - 1); the zero row at the end stands for the next, unseen token
        extended = torch.cat([tail.to(x.dtype), x, x.new_zeros(batch, 1, channels)], 1)
        if resets is None:
            taps = [extended[:, j : j + length + 1] for j in range(k)]
        else:
            taps = self._taps_with_resets(extended, resets, length, channels)
        # row t of each tap is the input at time t-(k-1)+j; row `length` is the next token's window
        out = self.bias.to(x.dtype) + sum(tap[:, :length] * self.weight[:, j].to(x.dtype) for j, tap in enumerate(taps))
        new_tail = torch.stack([tap[:, length] for tap in taps[:-1]], 1) if k > 1 else tail
        return out, new_tail

    def _taps_with_resets(self, extended, resets, length, channels):
        # a source before the current document's start reads the initial tail instead, shifted so
        # that the document sees the same history a fresh run would
        k = self.width
        last = _last_reset(resets)
        last = torch.cat([last, last[:, -1:]], 1)  # the next token belongs to the last document
        t = torch.arange(length + 1, device=extended.device)
        taps = []
        for j in range(k):
            source = t - (k - 1) + j
            index = (k - 1) + source - torch.where(source < last, last, torch.zeros_like(last))
            taps.append(torch.gather(extended, 1, index.unsqueeze(-1).expand(-1, -1, channels)))
        return taps

    def step(self, x_t, tail):
        """x_t [B, N], tail [B, k-1, N] -> (out [B, N], new tail)."""
        window = torch.cat([tail.to(x_t.dtype), x_t.unsqueeze(1)], 1)
        out = self.bias.to(x_t.dtype) + (window * self.weight.t().to(x_t.dtype)).sum(1)
        return out, window[:, 1:]


class RecurrentBlock(nn.Module):
    def __init__(self, config: LMConfig, mode: str, device=None, dtype=None):
        super().__init__()
        d, n = config.d_model, config.cell_size
        factory = {"device": device, "dtype": dtype}
        self.rnn_norm = nn.RMSNorm(d, eps=config.norm_eps, **factory)
        self.in_proj = nn.Linear(d, 2 * n, bias=False, **factory)
        self.conv = CausalConv(n, config.conv_width, **factory)
        self.cell = ParaRNN(
            config.resolve_cell(), n, n, config.num_heads, mode=mode, newton=config.newton_config(), **factory
        )
        self.out_norm = nn.RMSNorm(n, eps=config.norm_eps, **factory)
        self.out_proj = nn.Linear(n, d, bias=False, **factory)

    def forward(self, x, state=None, resets=None):
        tail, cell_state = state if state is not None else (None, None)
        v, gate = self.in_proj(self.rnn_norm(x)).chunk(2, dim=-1)
        v, tail = self.conv(v, tail, resets)
        y, cell_state = self.cell(F.silu(v), state=cell_state, resets=resets, return_state=True)
        y = self.out_norm(y) * F.silu(gate)
        return x + self.out_proj(y), (tail, cell_state)

    def step(self, x_t, state):
        tail, cell_state = state
        v, gate = self.in_proj(self.rnn_norm(x_t)).chunk(2, dim=-1)
        v, tail = self.conv.step(v, tail)
        y, cell_state = self.cell.step(F.silu(v), cell_state)
        y = self.out_norm(y) * F.silu(gate)
        return x_t + self.out_proj(y), (tail, cell_state)


class SwiGLU(nn.Module):
    def __init__(self, d, m, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.gate_proj = nn.Linear(d, m, bias=False, **factory)
        self.up_proj = nn.Linear(d, m, bias=False, **factory)
        self.down_proj = nn.Linear(m, d, bias=False, **factory)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig, mode: str, device=None, dtype=None):
        super().__init__()
        self.recurrent = RecurrentBlock(config, mode, device, dtype)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLU(config.d_model, config.mlp_size, device, dtype)

    def forward(self, x, state=None, resets=None):
        x, state = self.recurrent(x, state, resets)
        return x + self.mlp(self.mlp_norm(x)), state

    def step(self, x_t, state):
        x_t, state = self.recurrent.step(x_t, state)
        return x_t + self.mlp(self.mlp_norm(x_t)), state


class ParaRNNLM(nn.Module):
    """Token ids [B, T] -> logits [B, T, vocab] (float32).

    ``forward(tokens, state=None, resets=None, return_state=False)``; ``state`` is
    a list with one ``(conv_tail, cell_state)`` per layer (None: zeros), as returned
    with ``return_state=True`` and by ``step`` (so a prompt is prefilled in parallel
    and then decoded token by token, or continued in parallel from any state).
    """

    def __init__(self, config: LMConfig, mode: str = "auto", device=None, dtype=None):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"config must be a pararnn_core.lm_config.LMConfig, got {type(config).__name__}")
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(config.vocab_size, config.d_model, **factory)
        self.layers = nn.ModuleList(Block(config, mode, device, dtype) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps, **factory)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False, **factory)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        # GPT-2-style: small Gaussian projections, residual outputs scaled down with depth
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed.weight, std=0.02)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                last = name.rsplit(".", 1)[-1]
                nn.init.normal_(module.weight, std=residual_std if last in ("out_proj", "down_proj") else 0.02)

    # -- modes ------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        return self.layers[0].recurrent.cell.mode

    @mode.setter
    def mode(self, value: str):
        for block in self.layers:
            block.recurrent.cell.mode = value

    # -- forward -----------------------------------------------------------------------
    def _check_tokens(self, tokens, dims):
        if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"tokens must be an integer torch.Tensor, got {getattr(tokens, 'dtype', type(tokens))}")
        if tokens.dim() != dims:
            want = "[batch, time]" if dims == 2 else "[batch]"
            raise ValueError(f"tokens must have shape {want}, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(
                f"token ids must be in [0, {self.config.vocab_size}) (the model's vocab_size); got ids in "
                f"[{int(tokens.min())}, {int(tokens.max())}]: was the data encoded with another tokenizer?"
            )

    def _check_state(self, state):
        if state is not None and len(state) != len(self.layers):
            raise ValueError(f"state must hold one entry per layer ({len(self.layers)}), got {len(state)}")

    def logits(self, hidden):
        hidden = self.norm(hidden)
        weight = self.embed.weight if self.config.tie_embeddings else self.lm_head.weight
        return F.linear(hidden, weight).float()

    def forward(self, tokens, state=None, resets=None, return_state: bool = False):
        self._check_tokens(tokens, 2)
        self._check_state(state)
        x = self.embed(tokens)
        new_state = []
        for i, block in enumerate(self.layers):
            x, layer_state = block(x, state[i] if state is not None else None, resets)
            new_state.append(layer_state)
        logits = self.logits(x)
        return (logits, new_state) if return_state else logits

    @torch.no_grad()
    def step(self, tokens, state=None):
        """One token per sequence: tokens [B] -> (logits [B, vocab], new state)."""
        self._check_tokens(tokens, 1)
        self._check_state(state)
        x = self.embed(tokens)
        if state is None:
            state = self.initial_state(tokens.shape[0], x)
        new_state = []
        for block, layer_state in zip(self.layers, state):
            x, layer_state = block.step(x, layer_state)
            new_state.append(layer_state)
        return self.logits(x), new_state

    def initial_state(self, batch: int, like: torch.Tensor):
        """Zero state: per layer (conv tail [B, k-1, N], cell state)."""
        n, k = self.config.cell_size, self.config.conv_width
        cell = self.layers[0].recurrent.cell.cell
        zeros = lambda *shape: like.new_zeros(shape)
        parts = tuple(zeros(batch, n) for _ in range(cell.state_size))
        cell_state = parts[0] if len(parts) == 1 else parts
        return [(zeros(batch, k - 1, n), cell_state) for _ in self.layers]

    @torch.no_grad()
    def generate_greedy(self, prompt: torch.Tensor, max_tokens: int) -> list[int]:
        """Greedy decoding of one prompt [T]: parallel prefill, then ``step``."""
        logits, state = self(prompt[None], return_state=True)
        token = logits[0, -1].argmax()
        out = [int(token)]
        for _ in range(max_tokens - 1):
            logits, state = self.step(token[None], state)
            token = logits[0].argmax()
            out.append(int(token))
        return out


# ----------------------------------------------------------------------------
# checkpoint folders (layout and checks in pararnn_core.checkpoint)

_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def _save_shard(tensors, path, metadata):
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)


def save_lm(
    model: ParaRNNLM, out, tokenizer, files=None, force: bool = False, dtype=None, max_shard_bytes=None,
    tool: str = "pararnn_torch.save_lm",
):
    """Write ``model`` and ``tokenizer`` as a checkpoint folder (crash-safe, under the folder's lock,
    see pararnn_core.safe_folder); returns a WriteSummary."""
    from pararnn_core import checkpoint

    tensors = {
        k: (v.detach().to(dtype) if dtype else v.detach()).cpu().contiguous() for k, v in model.state_dict().items()
    }
    config = model.config.to_dict()
    config["torch_dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    extra = {"max_shard_bytes": max_shard_bytes} if max_shard_bytes else {}
    return checkpoint.write_checkpoint(
        out,
        config,
        tensors,
        _save_shard,
        nbytes=lambda t: t.numel() * t.element_size(),
        dtype_name=lambda t: _SAFETENSORS_DTYPES.get(t.dtype, str(t.dtype)),
        files={**tokenizer.files(), **(files or {})},
        force=force,
        tool=tool,
        **extra,
    )


def load_lm(folder, mode: str = "auto", device=None, dtype=None, trust_remote_code: bool = False):
    """Load a checkpoint folder: returns (ParaRNNLM, TextTokenizer). Every mismatch is reported at once.

    Only ``config.json``, the weight files it implies and the tokenizer are read; a user cell's
    ``cell_module`` is imported only with ``trust_remote_code=True``."""
    from safetensors.torch import load_file

    from pararnn_core import checkpoint
    from pararnn_core.tokenizer import TextTokenizer

    config = LMConfig.load(folder, trust_remote_code=trust_remote_code)
    raw = json.loads((Path(folder) / checkpoint.CONFIG_FILE).read_text())
    if raw.get("quantization"):
        raise checkpoint.CheckpointError(
            f"{folder} holds MLX-quantized weights; PyTorch loads float checkpoints (convert from the torch folder)"
        )
    checkpoint.check_folder(folder, config.parameter_shapes())
    tokenizer = TextTokenizer.from_folder(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise checkpoint.CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
            f"{config.vocab_size}; the tokenizer does not belong to this model"
        )
    state = {}
    for path in checkpoint.weight_files(folder):
        state.update(load_file(str(path)))
    dtype = dtype or next(iter(state.values())).dtype
    model = ParaRNNLM(config, mode=mode, device=device, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model, tokenizer
