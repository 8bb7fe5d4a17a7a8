"""The single-layer models of the synthetic tasks: one mixer (a recurrent layer or causal attention).

Full layer (MQAR, k-hop, keep-nth)::

    x = embed(tokens)  [+ learned positions, Transformer only]
    x = x + mixer(norm(x))
    x = x + mlp(norm(x))
    logits = head(norm(x))

Mixer only (parity, as in the paper): ``logits = head(mixer(embed(tokens)))``: no MLP,
no residual, so whatever the model computes beyond a linear read-out happens in the mixer.

The paper uses one layer; ``layers`` > 1 repeats the mixer (and MLP) block, e.g. to see
whether a task one layer cannot learn needs a second one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pararnn_core.cell import get_cell, registered_cells
from pararnn_torch import ParaGRU, ParaLSTM, ParaRNN
from pararnn_torch.tasks.linear_cell import LINEAR_CELL, LinearGatedCell

#: model name -> the cell of its recurrent mixer (user cells: their registered name)
_RECURRENT = {"paragru": "gru", "paralstm": "lstm", "mgu": "mgu", "linear": LinearGatedCell}
_LAYERS = {"gru": ParaGRU, "lstm": ParaLSTM}
#: torch's own cuDNN-style layers (dense recurrence matrix, trained step by step): the classic RNNs as a peer
_TORCH_RNNS = {"nn_gru": nn.GRU, "nn_lstm": nn.LSTM}
BUILTIN_MODELS = (*_RECURRENT, *_TORCH_RNNS, "transformer")


def known_models() -> list[str]:
    """Built-in model names plus every registered user cell (imported through --cell-module)."""
    builtin_cells = {"gru", "lstm", "mgu", LINEAR_CELL}
    return [*BUILTIN_MODELS, *(c for c in registered_cells() if c not in builtin_cells)]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (the Transformer baseline's mixer)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).flatten(-2))


class TorchRNN(nn.Module):
    """``torch.nn.GRU`` / ``LSTM`` returning the hidden state of every step."""

    def __init__(self, kind: type[nn.RNNBase], d_in: int, state_size: int):
        super().__init__()
        self.rnn = kind(d_in, state_size, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


def _mixer(model: str, d_in: int, state_size: int, num_heads: int, mode: str) -> nn.Module:
    if model == "transformer":
        return CausalSelfAttention(d_in, num_heads)
    if model in _TORCH_RNNS:
        return TorchRNN(_TORCH_RNNS[model], d_in, state_size)
    cell = _RECURRENT.get(model, model)
    if cell in _LAYERS:
        return _LAYERS[cell](d_in, state_size, num_heads=num_heads, mode=mode)
    return ParaRNN(get_cell(cell), d_in, state_size, num_heads=num_heads, mode=mode)


class _Block(nn.Module):
    """Pre-norm mixer and MLP, both residual."""

    def __init__(self, mixer: nn.Module, d_model: int):
        super().__init__()
        self.norm_mixer = nn.RMSNorm(d_model)
        self.mixer = mixer
        self.norm_mlp = nn.RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.mixer(self.norm_mixer(x))
        return x + self.mlp(self.norm_mlp(x))


class TaskModel(nn.Module):
    def __init__(self, model: str, vocab_size: int, num_classes: int, seq_len: int, d_model: int = 64,
                 state_size: int = 64, num_heads: int = 4, mixer_only: bool = False, mode: str = "auto",
                 layers: int = 1):
        super().__init__()
        if model not in known_models():
            raise ValueError(f"unknown model {model!r}; expected one of {', '.join(known_models())} "
                             f"(a user cell is registered by importing its module: --cell-module)")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        self.model_name = model
        self.mixer_only = mixer_only
        self.embed = nn.Embedding(vocab_size, d_model)
        # attention alone cannot tell positions apart: learned absolute positions
        self.positions = nn.Parameter(torch.randn(seq_len, d_model) * 0.02) if model == "transformer" else None
        width = d_model if model == "transformer" else state_size
        if mixer_only:
            # each mixer reads the previous one's output: only the first reads d_model features
            self.mixers = nn.ModuleList(_mixer(model, d_model if i == 0 else width, state_size, num_heads, mode)
                                        for i in range(layers))
            self.head = nn.Linear(width, num_classes)
        else:
            if width != d_model:
                raise ValueError(f"the full layer adds the mixer to the residual stream: state_size ({state_size}) "
                                 f"must equal d_model ({d_model})")
            self.blocks = nn.ModuleList(_Block(_mixer(model, d_model, state_size, num_heads, mode), d_model)
                                        for _ in range(layers))
            self.norm_out = nn.RMSNorm(d_model)
            self.head = nn.Linear(d_model, num_classes)

    @property
    def mixer(self) -> nn.Module:
        """The first layer's mixer."""
        return self.mixers[0] if self.mixer_only else self.blocks[0].mixer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        if self.positions is not None:
            if tokens.shape[1] > self.positions.shape[0]:
                raise ValueError(f"the Transformer learned {self.positions.shape[0]} positions; "
                                 f"got a sequence of {tokens.shape[1]}")
            x = x + self.positions[: tokens.shape[1]]
        if self.mixer_only:
            for mixer in self.mixers:
                x = mixer(x)
            return self.head(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_out(x))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
