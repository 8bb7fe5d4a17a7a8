"""The torch module that is exported to Core ML: the LM with its recurrent state held in buffers.

Core ML (iOS 18 / macOS 15) keeps a model's state on the device between predictions
(``ct.StateType``); coremltools turns torch buffers that the graph updates in place into
such states. ``StatefulLM`` is a ``pararnn_torch`` ``ParaRNNLM`` built from the same config and
weights, whose per-layer generation state (conv tail and cell state, docs/design.md section 6)
lives in buffers of fixed shape, so nothing grows with the context:

* ``conv_state_{i}`` [1, conv_width - 1, cell_size]: the conv's last inputs,
* ``cell_state_{i}`` [1, K, cell_size]: the cell's K state components (GRU: h; LSTM: c, h).

Two graphs are exported from it: ``decode`` (one token in, logits out) runs each block's
``step``; ``prefill`` (a fixed chunk of tokens in, the last logits out) runs each block's
``forward`` with the cell unrolled over the chunk through the same ``step``. The recurrence is
thus always the cell's sequential step from pararnn_core; Core ML has no custom kernels, and the
unrolled chunk keeps the graph free of data-dependent loops.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pararnn_core import checkpoint
from pararnn_core.lm_config import LMConfig
from pararnn_core.newton import step_fn
from pararnn_torch.lm import ParaRNNLM
from pararnn_torch.ops import ops


class UnrolledCell(nn.Module):
    """A ``ParaRNN`` layer whose ``forward`` runs the cell's sequential step once per position.

    ``forward`` of the layer validates its input with data-dependent checks and picks a
    solver (Newton, native kernels) that an exported graph cannot contain. Here the input
    projection runs once for the whole chunk (the layer's own ``project``), then the cell's
    step from pararnn_core (``step_fn`` over the torch ops, the definition every backend
    uses) is applied position by position: the graph a fixed-length Core ML function unrolls.
    ``step`` is the layer's own.
    """

    def __init__(self, layer):
        super().__init__()
        self.layer = layer
        self.cell_step = step_fn(layer.cell, ops)

    def forward(self, x, state=None, resets=None, return_state: bool = False):
        if resets is not None:
            raise ValueError("the exported model has no resets: start a new document with a fresh Core ML state")
        cell = self.layer.cell
        # positions folded into the batch: the projection's einsum then stays within Core ML's rank limit of 5
        batch, length = x.shape[:2]
        gates = self.layer.project(x.flatten(0, 1)).unflatten(0, (batch, length))  # [B, T, G, N]
        params = list(self.layer.recurrent)
        h = [state] if isinstance(state, torch.Tensor) else list(state)
        ys = []
        for u_t in gates.unbind(1):
            h = list(self.cell_step(h, list(u_t.unbind(1)), params))
            ys.append(h[cell.output_index])
        y = torch.stack(ys, 1)
        if not return_state:
            return y
        return y, (h[0] if len(h) == 1 else tuple(h))

    def step(self, x_t, state=None):
        return self.layer.step(x_t, state)


@dataclass(frozen=True)
class StateSpec:
    """One Core ML state: its name and shape (batch 1)."""

    name: str
    shape: tuple[int, ...]


def state_specs(config: LMConfig) -> list[StateSpec]:
    """The Core ML states of a model, in the order the graphs declare them."""
    cell = config.resolve_cell()
    specs = []
    for i in range(config.n_layers):
        specs.append(StateSpec(f"conv_state_{i}", (1, config.conv_width - 1, config.cell_size)))
        specs.append(StateSpec(f"cell_state_{i}", (1, cell.state_size, config.cell_size)))
    return specs


class StatefulLM(nn.Module):
    """``ParaRNNLM`` with its generation state in buffers, exported as ``decode`` or ``prefill``.

    ``forward(input_ids)`` takes int32 token ids [1, length] (length 1 for decode, the chunk
    length for prefill), reads the state buffers, writes the new state back into them in place
    and returns the logits of the last position [1, vocab_size] (float32).
    """

    def __init__(self, model: ParaRNNLM, length: int):
        super().__init__()
        if length < 1:
            raise ValueError(f"the exported chunk length must be a positive integer, got {length}")
        if model.config.conv_width < 2:
            raise ValueError(
                f"conv_width={model.config.conv_width} leaves no conv tail, and a Core ML state cannot be empty; "
                f"the Core ML export needs conv_width >= 2"
            )
        self.length = length
        self.config = model.config
        self.model = copy.deepcopy(model).float().eval()
        for block in self.model.layers:
            block.recurrent.cell = UnrolledCell(block.recurrent.cell)
        self.cell_state_size = self.config.resolve_cell().state_size
        for spec in state_specs(self.config):
            self.register_buffer(spec.name, torch.zeros(spec.shape))

    # -- state --------------------------------------------------------------------------
    def layer_state(self, i: int):
        """Layer i's state in the form ``ParaRNNLM`` takes: (conv tail, cell state tensor or tuple)."""
        cell = getattr(self, f"cell_state_{i}")
        parts = tuple(cell.unbind(1))
        return getattr(self, f"conv_state_{i}"), parts[0] if len(parts) == 1 else parts

    def _write_state(self, i: int, state):
        tail, cell_state = state
        parts = (cell_state,) if isinstance(cell_state, torch.Tensor) else tuple(cell_state)
        # in-place updates of registered buffers are what coremltools turns into Core ML state writes
        getattr(self, f"conv_state_{i}").copy_(tail)
        getattr(self, f"cell_state_{i}").copy_(torch.stack(parts, 1))

    @torch.no_grad()
    def reset_state(self):
        for spec in state_specs(self.config):
            getattr(self, spec.name).zero_()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {spec.name: getattr(self, spec.name).clone() for spec in state_specs(self.config)}

    # -- graph --------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed(input_ids)
        for i, block in enumerate(self.model.layers):
            if self.length == 1:
                x_t, state = block.step(x[:, 0], self.layer_state(i))
                x = x_t.unsqueeze(1)
            else:
                x, state = block(x, self.layer_state(i))
            self._write_state(i, state)
        return self.model.logits(x[:, -1])

    def example_input(self) -> torch.Tensor:
        return torch.zeros(1, self.length, dtype=torch.int32)

    def export(self) -> torch.export.ExportedProgram:
        """``torch.export`` with the buffers as mutated state, for coremltools.

        Only ``einsum`` (the cell's block-diagonal input projection) is decomposed, into
        matmuls: coremltools' own einsum lowering mishandles the ``...hi,higj->...ghj`` form;
        every other op stays as exported, which is what coremltools' torch frontend expects.
        """
        with torch.no_grad():
            program = torch.export.export(self, (self.example_input(),), strict=False)
        einsum = torch.ops.aten.einsum.default
        return program.run_decompositions({einsum: torch.export.default_decompositions()[einsum]})


# ----------------------------------------------------------------------------
# loading a checkpoint folder (torch, or MLX with or without mlx-lm quantization)


def load_reference(folder, trust_remote_code: bool = False) -> tuple[ParaRNNLM, dict]:
    """The float32 ``ParaRNNLM`` of a checkpoint folder (sequential mode) and its raw config.json.

    Float folders (written by pararnn-train or to-mlx) load directly; an MLX folder with
    quantized layers is dequantized with mlx (the exported weights are then exactly what the
    MLX model computes with).
    """
    from pararnn_torch.lm import load_lm

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (expected a ParaRNN checkpoint folder)")
    config_path = folder / checkpoint.CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: a ParaRNN checkpoint folder needs a config.json")
    raw = json.loads(config_path.read_text())
    if not raw.get("quantization"):
        model, _ = load_lm(folder, mode="sequential", dtype=torch.float32, trust_remote_code=trust_remote_code)
        return model.eval(), raw
    return _load_dequantized(folder, raw, trust_remote_code), raw


def _load_dequantized(folder: Path, raw: dict, trust_remote_code: bool) -> ParaRNNLM:
    try:
        import mlx.core as mx
    except ImportError:
        raise ValueError(
            f"{folder} holds MLX-quantized weights; dequantizing them needs mlx (pip install 'pararnn-mlx[mlx]'), "
            f"or convert from the float checkpoint"
        ) from None
    import numpy as np

    config = LMConfig.from_dict(raw, trust_remote_code)
    quantization = raw["quantization"]
    checkpoint.check_folder(folder, config.parameter_shapes(), quantization)
    arrays = {}
    for path in checkpoint.weight_files(folder):
        arrays.update(mx.load(str(path)))
    state = {}
    for name in config.parameter_shapes():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and f"{module}.scales" in arrays:
            value = mx.dequantize(
                arrays[name],
                arrays[f"{module}.scales"],
                arrays.get(f"{module}.biases"),
                group_size=quantization["group_size"],
                bits=quantization["bits"],
                mode=quantization.get("mode", "affine"),
            )
        else:
            value = arrays[name]
        state[name] = torch.from_numpy(np.array(value.astype(mx.float32)))
    model = ParaRNNLM(config, mode="sequential", dtype=torch.float32)
    model.load_state_dict(state)
    return model.eval()


# ----------------------------------------------------------------------------
# parity of the export module with the reference model


@dataclass
class ParityReport:
    """Largest differences between the export modules and the reference ``ParaRNNLM``."""

    prefill_logits: float
    decode_logits: float
    state: float
    decode_steps: int
    prefill_length: int
    greedy_tokens_agree: bool

    def describe(self) -> str:
        agree = "same" if self.greedy_tokens_agree else "DIFFERENT"
        return (
            f"parity (torch export module vs pararnn_torch reference, float32): prefill of {self.prefill_length} "
            f"tokens max |dlogits| {self.prefill_logits:.2e}; {self.decode_steps} decode steps max |dlogits| "
            f"{self.decode_logits:.2e}, max |dstate| {self.state:.2e}; greedy tokens {agree}"
        )

    def within(self, tolerance: float) -> bool:
        worst = max(self.prefill_logits, self.decode_logits, self.state)
        return worst <= tolerance and self.greedy_tokens_agree


def reference_state_tensors(model: ParaRNNLM, state) -> dict[str, torch.Tensor]:
    """``ParaRNNLM``'s per-layer state in the export module's buffer layout."""
    out = {}
    for i, (tail, cell_state) in enumerate(state):
        parts = (cell_state,) if isinstance(cell_state, torch.Tensor) else tuple(cell_state)
        out[f"conv_state_{i}"] = tail
        out[f"cell_state_{i}"] = torch.stack(parts, 1)
    return out


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@torch.no_grad()
def check_parity(reference: ParaRNNLM, prefill: StatefulLM, decode: StatefulLM, prompt, steps: int) -> ParityReport:
    """Run ``prompt`` (one prefill chunk) then ``steps`` greedy decode steps through both the export
    modules (sharing one state, as the Core ML functions do) and the reference; the reference
    prefills with its parallel forward and decodes with ``step``."""
    prompt = torch.as_tensor(prompt, dtype=torch.int64).reshape(1, -1)
    if prompt.shape[1] != prefill.length:
        raise ValueError(f"the parity prompt must have the prefill length {prefill.length}, got {prompt.shape[1]}")
    mode = reference.mode
    reference.mode = "parallel"
    try:
        ref_logits, ref_state = reference(prompt, return_state=True)
    finally:
        reference.mode = mode
    prefill.reset_state()
    logits = prefill(prompt.to(torch.int32))
    prefill_diff = float((logits - ref_logits[:, -1]).abs().max())
    state_diff = _max_diff(prefill.state_tensors(), reference_state_tensors(reference, ref_state))
    for name, value in prefill.state_tensors().items():  # hand the state over, as the Core ML functions share it
        getattr(decode, name).copy_(value)
    token, ref_token = logits.argmax(-1), ref_logits[:, -1].argmax(-1)
    agree, decode_diff = bool(token == ref_token), 0.0
    for _ in range(steps):
        ref_logits, ref_state = reference.step(ref_token, ref_state)
        logits = decode(ref_token.to(torch.int32).reshape(1, 1))
        decode_diff = max(decode_diff, float((logits - ref_logits).abs().max()))
        state_diff = max(state_diff, _max_diff(decode.state_tensors(), reference_state_tensors(reference, ref_state)))
        token, ref_token = logits.argmax(-1), ref_logits.argmax(-1)
        agree = agree and bool(token == ref_token)
    return ParityReport(prefill_diff, decode_diff, state_diff, steps, prefill.length, agree)
