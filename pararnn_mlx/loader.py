"""``pararnn_mlx.load(path) -> (model, tokenizer)``: a checkpoint folder as an mlx-lm model.

The tensors are checked against config.json first (every missing, unexpected or
mis-shaped tensor reported at once); then mlx-lm's own loader builds the model
(quantized layers included) and the tokenizer, so the result works with
``mlx_lm.generate`` and ``mlx_lm.stream_generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pararnn_core import checkpoint
from pararnn_core.lm_config import LMConfig
from pararnn_mlx.lm import Model, ModelArgs


def check_checkpoint(path) -> LMConfig:
    """Validate a checkpoint folder without loading its tensors; returns its config."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = LMConfig.load(folder)
    raw = json.loads((folder / checkpoint.CONFIG_FILE).read_text())
    checkpoint.check_folder(folder, config.parameter_shapes(), raw.get("quantization"))
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.json (a checkpoint folder carries its tokenizer)")
    from pararnn_core.tokenizer import TextTokenizer

    vocab = TextTokenizer.from_file(tokenizer_file).vocab_size
    if vocab > config.vocab_size:
        raise checkpoint.CheckpointError(
            f"{folder}: the tokenizer has {vocab} tokens but the model's vocab_size is {config.vocab_size}; "
            f"the tokenizer does not belong to this model"
        )
    return config


def set_mode(model: Model, mode: str):
    """Solver mode of every cell (auto, parallel, sequential, ...)."""
    for block in model.layers:
        block.recurrent.cell.mode = mode


def load(path, mode: str = "auto", lazy: bool = False):
    """Load a ParaRNN checkpoint folder (float or quantized) for MLX: returns (Model, mlx-lm TokenizerWrapper)."""
    from mlx_lm.utils import load_model, load_tokenizer

    _quiet_transformers()
    folder = Path(path)
    check_checkpoint(folder)
    model, config = load_model(
        folder,
        lazy=lazy,
        model_config={"model_file": None},  # our own classes, no trust_remote_code needed
        get_model_classes=lambda config: (Model, ModelArgs),
    )
    set_mode(model, mode)
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    return model, tokenizer


def _quiet_transformers():
    # transformers warns that config.json's model_type "pararnn" is not one of its own models: expected here
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.set_verbosity_error()
