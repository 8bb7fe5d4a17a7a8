"""The ParaRNN language model in MLX, following mlx-lm's model conventions.

``ModelArgs.from_dict(config_json)``, ``Model(args)``, ``Model.__call__(inputs, cache=None)``
returning logits, ``make_cache()`` with one mlx-lm ``ArraysCache`` per layer holding
``[conv_tail [B, k-1, N], cell_state [B, K, N]]``, ``layers`` and ``sanitize``.
Parameter names match pararnn_torch (``LMConfig.parameter_shapes``).

With a cache, a prompt of several tokens runs the parallel solve from the cached
state, ``prefill_chunk`` tokens at a time; a single token runs the cell's ``step``.
Memory does not depend on how many tokens came before.

Batches of prompts of different lengths follow mlx-lm's cache protocol, as its
recurrent models (mamba2, lfm2) do: the first layer's ``ArraysCache`` says which
tokens of each row are padding (``lengths``: right padding, mlx-lm >= 0.32;
``left_padding``: older releases), and every layer calls ``advance`` after each
chunk. Padding never reaches a row's state; see :class:`Padding`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from pararnn_core.lm_config import MODEL_TYPE, LMConfig
from pararnn_mlx.layer import ParaRNN

#: tokens per parallel solve during prefill (bounds prefill memory independently of the prompt length)
PREFILL_CHUNK = 1024


@dataclass
class ModelArgs:
    """mlx-lm's model arguments: the shared LMConfig (validated) read from config.json.

    mlx-lm imports this class only from the folder's ``model_file`` and only under its
    ``--trust-remote-code``, so a user cell named by ``cell_module`` may be imported here."""

    config: LMConfig
    model_type: str = MODEL_TYPE

    @classmethod
    def from_dict(cls, params: dict) -> ModelArgs:
        return cls(LMConfig.from_dict(params, trust_remote_code=True))


def register_with_transformers():
    """Make model_type ``pararnn`` known to transformers (when it is loaded): mlx-lm's tokenizer loading
    reads config.json through ``AutoConfig``, which otherwise warns about an unknown model type."""
    transformers = sys.modules.get("transformers")  # mlx-lm imports it before building the model
    if transformers is None:
        return
    from transformers import AutoConfig, PretrainedConfig

    class ParaRNNConfig(PretrainedConfig):
        model_type = MODEL_TYPE

    AutoConfig.register(MODEL_TYPE, ParaRNNConfig, exist_ok=True)


@dataclass
class Padding:
    """Where the real tokens of each row of one chunk are, in the layout the blocks run on.

    The blocks see every row with its real tokens at the END of the chunk (left-aligned
    padding, moved there from wherever mlx-lm put it). Then the cell restarts from the
    cached state at the row's first real token (``resets``), its final state is the one
    after the row's last real token, and the conv reads the cached tail right before the
    first real token, so a padded row ends in exactly the state it would reach alone.
    (Masking the inputs, as mamba2 does, is not enough for a cell whose zero input still
    moves the state.)

    count: real tokens per row [B] (0: the whole chunk is padding, the state is kept).
    pad: padding tokens per row before the real ones in the blocks' layout, ``T - count``.
    shift: how far each row moves right into that layout, ``T - end`` (None: rows stay put).
    """

    count: mx.array
    pad: mx.array
    shift: mx.array | None

    @classmethod
    def from_cache(cls, cache, length: int) -> Padding | None:
        """The padding of one chunk of ``length`` tokens from mlx-lm's cache metadata; None when none."""
        left = getattr(cache, "left_padding", None)
        lengths = getattr(cache, "lengths", None)
        if left is None and lengths is None:
            return None
        start = mx.clip(left, 0, length) if left is not None else 0
        end = mx.clip(lengths, 0, length) if lengths is not None else length
        count = mx.maximum(end - start, 0)
        return cls(count=count, pad=length - count, shift=None if lengths is None else length - end)

    def _move(self, x, sign: int):
        if self.shift is None:
            return x
        index = mx.arange(x.shape[1])[None] - sign * self.shift[:, None]
        return mx.take_along_axis(x, mx.clip(index, 0, x.shape[1] - 1)[..., None], axis=1)

    def to_blocks(self, x):
        """[B, T, D] caller's positions -> the blocks' layout (real tokens last)."""
        return self._move(x, 1)

    def from_blocks(self, x):
        """The blocks' layout -> the caller's positions (padding positions hold some real row output)."""
        return self._move(x, -1)

    def resets(self, length: int) -> mx.array:
        """[B, T]: the cell restarts from the cached state at each row's first real token."""
        return mx.arange(length)[None] == self.pad[:, None]

    def keep_rows(self, new, old):
        """The new state where a row had real tokens, the old one where the chunk was all padding."""
        return mx.where((self.count > 0).reshape(-1, *([1] * (new.ndim - 1))), new, old)


class CausalConv(nn.Module):
    """Depthwise causal conv: out_t = bias + sum_j weight[:, j] * x_{t-(k-1)+j} (as pararnn_torch)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        bound = 1 / width**0.5
        self.weight = mx.random.uniform(-bound, bound, (channels, width))
        self.bias = mx.zeros((channels,))

    def __call__(self, x, tail, padding: Padding | None = None):
        """x [B, T, N], tail [B, k-1, N] -> (out [B, T, N], new tail).

        With ``padding`` the tail is moved to just before each row's first real token, so
        real tokens see their true history and the new tail is the last k-1 real inputs
        (the old tail when the row had none)."""
        k, length = self.weight.shape[1], x.shape[1]
        extended = mx.concatenate([tail.astype(x.dtype), x], axis=1)
        if padding is not None:
            e, pad = mx.arange(length + k - 1)[None], padding.pad[:, None]
            # entries before pad + k - 1 take the tail (padding entries the tail's first row: never read)
            index = mx.where(e < pad + k - 1, mx.maximum(e - pad, 0), e)
            extended = mx.take_along_axis(extended, index[..., None], axis=1)
        w = self.weight.astype(x.dtype)
        out = self.bias.astype(x.dtype)
        for j in range(k):
            out = out + extended[:, j : j + length] * w[:, j]
        return out, extended[:, extended.shape[1] - (k - 1) :]


class RecurrentBlock(nn.Module):
    def __init__(self, config: LMConfig, mode: str):
        super().__init__()
        d, n = config.d_model, config.cell_size
        self.rnn_norm = nn.RMSNorm(d, eps=config.norm_eps)
        self.in_proj = nn.Linear(d, 2 * n, bias=False)
        self.conv = CausalConv(n, config.conv_width)
        self.cell = ParaRNN(config.resolve_cell(), n, n, config.num_heads, mode=mode, newton=config.newton_config())
        self.out_norm = nn.RMSNorm(n, eps=config.norm_eps)
        self.out_proj = nn.Linear(n, d, bias=False)

    def __call__(self, x, tail, cell_state, padding: Padding | None = None):
        """x [B, T, D] from the state (tail, cell_state [B, K, N]) -> (out, tail, cell_state)."""
        v, gate = mx.split(self.in_proj(self.rnn_norm(x)), 2, axis=-1)
        v, tail = self.conv(v, tail, padding)
        v = nn.silu(v)
        state = tuple(cell_state[:, k] for k in range(cell_state.shape[1]))
        state = state[0] if len(state) == 1 else state
        if x.shape[1] == 1:
            y, state = self.cell.step(v[:, 0], state)
            y = y[:, None]
        else:
            resets = padding.resets(x.shape[1]) if padding is not None else None
            y, state = self.cell(v, state=state, resets=resets, return_state=True)
        new_state = mx.stack(list(state) if isinstance(state, tuple) else [state], 1)
        cell_state = padding.keep_rows(new_state, cell_state) if padding is not None else new_state
        y = self.out_norm(y) * nn.silu(gate)
        return x + self.out_proj(y), tail, cell_state


class MLP(nn.Module):
    def __init__(self, d, m):
        super().__init__()
        self.gate_proj = nn.Linear(d, m, bias=False)
        self.up_proj = nn.Linear(d, m, bias=False)
        self.down_proj = nn.Linear(m, d, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LMConfig, mode: str):
        super().__init__()
        self.recurrent = RecurrentBlock(config, mode)
        self.mlp_norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        self.mlp = MLP(config.d_model, config.mlp_size)

    def __call__(self, x, tail, cell_state, padding: Padding | None = None):
        x, tail, cell_state = self.recurrent(x, tail, cell_state, padding)
        return x + self.mlp(self.mlp_norm(x)), tail, cell_state


def _unpadded_and_filled(cache) -> bool:
    """The cache holds states and no padding metadata: a plain decoding step."""
    first = cache[0]
    return (first[0] is not None and getattr(first, "lengths", None) is None
            and getattr(first, "left_padding", None) is None)


class Model(nn.Module):
    def __init__(self, args: ModelArgs, mode: str = "auto"):
        super().__init__()
        register_with_transformers()
        if isinstance(args, LMConfig):
            args = ModelArgs(args)
        self.args = args
        self.model_type = MODEL_TYPE
        config = args.config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = [Block(config, mode) for _ in range(config.n_layers)]
        self.norm = nn.RMSNorm(config.d_model, eps=config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self._compiled_decode = None

    @property
    def mode(self) -> str:
        """Solver mode of every recurrent layer (auto, parallel, sequential, ...), as ParaRNNLM.mode in torch."""
        return self.layers[0].recurrent.cell.mode

    @mode.setter
    def mode(self, value: str):
        for block in self.layers:
            block.recurrent.cell.mode = value

    @property
    def config(self) -> LMConfig:
        return self.args.config

    def make_cache(self):
        """One mlx-lm ArraysCache per layer: [conv tail, cell state], filled on first use."""
        from mlx_lm.models.cache import ArraysCache

        return [ArraysCache(2) for _ in self.layers]

    def _zero_state(self, batch, dtype):
        c = self.config
        k = self.layers[0].recurrent.cell.cell.state_size
        return mx.zeros((batch, c.conv_width - 1, c.cell_size), dtype), mx.zeros((batch, k, c.cell_size), mx.float32)

    def _run_layers(self, x, states, cache):
        """One chunk through every block; with a cache, padding-aware and ``advance``d (mlx-lm's protocol)."""
        padding = Padding.from_cache(cache[0], x.shape[1]) if cache is not None else None
        if padding is not None:
            x = padding.to_blocks(x)
        new = []
        for block, (tail, cell_state) in zip(self.layers, states):
            x, tail, cell_state = block(x, tail, cell_state, padding)
            new.append((tail, cell_state))
        if padding is not None:
            x = padding.from_blocks(x)
        if cache is not None:
            for c in cache:
                c.advance(x.shape[1])
        return x, new

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        if inputs.ndim != 2:
            raise ValueError(f"inputs must be token ids of shape [batch, time], got shape {tuple(inputs.shape)}")
        if inputs.shape[1] < 1:
            raise ValueError("inputs is empty: give at least one token")
        if inputs.shape[1] == 1 and cache is not None and _unpadded_and_filled(cache):
            logits, states = self._decode_step(inputs, [(c[0], c[1]) for c in cache])
            for c, (tail, cell_state) in zip(cache, states):
                c[0], c[1] = tail, cell_state
            return logits
        x = self.embed(inputs)
        batch = inputs.shape[0]
        if cache is None:
            states = [self._zero_state(batch, x.dtype) for _ in self.layers]
        else:
            states = [
                (c[0], c[1]) if c[0] is not None else self._zero_state(batch, x.dtype) for c in cache
            ]
        outputs = []
        for start in range(0, inputs.shape[1], PREFILL_CHUNK):
            hidden, states = self._run_layers(x[:, start : start + PREFILL_CHUNK], states, cache)
            outputs.append(hidden)
            if cache is not None and inputs.shape[1] > PREFILL_CHUNK:
                mx.eval(hidden, states)  # keep one chunk's graph alive at a time
        if cache is not None:
            for c, (tail, cell_state) in zip(cache, states):
                c[0], c[1] = tail, cell_state.astype(mx.float32)
        hidden = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=1)
        return self.logits(hidden)

    def _decode_step(self, inputs, states):
        """One token for every row as one compiled graph (no per-op Python work per token); the parameters
        are implicit inputs, so updated, quantized or LoRA weights are used without recompiling by hand."""
        if self._compiled_decode is None:

            def step(inputs, states):
                hidden, new = self._run_layers(self.embed(inputs), states, None)
                return self.logits(hidden), [(tail, cell_state.astype(mx.float32)) for tail, cell_state in new]

            self._compiled_decode = mx.compile(step, inputs=[self.state])
        return self._compiled_decode(inputs, states)

    def logits(self, hidden):
        hidden = self.norm(hidden)
        if self.config.tie_embeddings:
            return self.embed.as_linear(hidden)
        return self.lm_head(hidden)

    def sanitize(self, weights: dict) -> dict:
        """Checkpoints of tied models carry no lm_head; drop a stray one so strict loading passes."""
        if self.config.tie_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights
