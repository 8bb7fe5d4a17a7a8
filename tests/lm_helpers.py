"""Tiny LM checkpoints shared by the tests/test_lm_*.py files."""

from __future__ import annotations

import torch

from pararnn_core.lm_config import LMConfig
from pararnn_core.tokenizer import TextTokenizer
from pararnn_torch.lm import ParaRNNLM, save_lm

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n"


def tiny_config(cell="gru", **kw) -> LMConfig:
    base = dict(cell=cell, vocab_size=258, d_model=32, n_layers=2, num_heads=2, mlp_size=64, eos_token_id=256)
    base.update(kw)
    return LMConfig(**base)


def tiny_checkpoint(folder, cell="gru", seed=0, **kw):
    """A random tiny model saved as a checkpoint folder; returns the torch model."""
    torch.manual_seed(seed)
    model = ParaRNNLM(tiny_config(cell, **kw), mode="parallel")
    with torch.no_grad():  # larger recurrent weights than the init, so the state matters
        for block in model.layers:
            block.recurrent.cell.recurrent.normal_(0, 0.5)
    save_lm(model, folder, TextTokenizer.bytes())
    return model.eval()
