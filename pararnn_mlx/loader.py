"""``pararnn_mlx.load(path) -> (model, tokenizer)``: a checkpoint folder as an mlx-lm model.

The tensors are checked against config.json first (every missing, unexpected or
mis-shaped tensor reported at once, per-layer quantization included); then the
model is built from exactly the weight files that were checked (``model.safetensors``
or the shards its index names; nothing else in the folder is read) and quantized
the way mlx-lm's loader does it (``nn.quantize`` with mlx-lm's per-layer
predicate), so every folder mlx-lm writes (``convert -q`` in every mode and
``--quant-predicate``, ``gptq``, ``dynamic_quant``, ``dwq``, ``fuse``) loads. The
result works with ``mlx_lm.generate``, ``stream_generate`` and ``batch_generate``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pararnn_core import checkpoint
from pararnn_core.lm_config import LMConfig
from pararnn_mlx.lm import Model, ModelArgs


def _config_json(folder: Path) -> dict:
    return json.loads((folder / checkpoint.CONFIG_FILE).read_text())


def quantization_of(raw: dict) -> dict | None:
    """The quantization entry of a config.json as mlx-lm reads it (``quantization``, else the HF-style
    ``quantization_config`` mlx-lm writes next to it); None for a float checkpoint."""
    entry = raw.get("quantization") or raw.get("quantization_config")
    return entry if isinstance(entry, dict) and "bits" in entry else None


def check_checkpoint(path, trust_remote_code: bool = False) -> LMConfig:
    """Validate a checkpoint folder without loading its tensors; returns its config.

    ``trust_remote_code``: allow importing the user cell module named by config.json (``cell_module``)."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = LMConfig.load(folder, trust_remote_code=trust_remote_code)
    checkpoint.check_folder(folder, config.parameter_shapes(), quantization_of(_config_json(folder)))
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


def _quantize_like_mlx_lm(model: Model, quantization: dict, weights: dict):
    """mlx_lm.utils.load_model's quantization: a per-layer config entry decides; otherwise a layer with
    stored scales is quantized with the settings its stored shapes imply (mlx-lm's infer_quant_config)."""
    import mlx.nn as nn
    from mlx_lm.utils import infer_quant_config

    def predicate(path, module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return infer_quant_config(path, module, weights)

    nn.quantize(model, group_size=quantization.get("group_size"), bits=quantization.get("bits"),
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def _load_adapters(model: Model, folder: Path):
    from mlx_lm.tuner.utils import load_adapters

    for name in ("adapter_config.json", "adapters.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"adapter folder {folder} has no {name} (expected the --adapter-path of "
                                    f"mlx_lm.lora)")
    load_adapters(model, str(folder))


def load(path, mode: str = "auto", lazy: bool = False, trust_remote_code: bool = False, adapter_path=None):
    """Load a ParaRNN checkpoint folder (float or quantized) for MLX: returns (Model, mlx-lm TokenizerWrapper).

    ``trust_remote_code``: allow importing the user cell module named by config.json (it runs that
    module's code; as mlx-lm's flag of the same name). ``adapter_path``: a folder written by
    ``mlx_lm.lora`` (LoRA, DoRA or full fine-tuning), applied as ``mlx_lm.generate --adapter-path`` does."""
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    folder = Path(path)
    config = check_checkpoint(folder, trust_remote_code)
    raw = _config_json(folder)
    model = Model(ModelArgs(config), mode=mode)
    weights = {}
    for file in checkpoint.weight_files(folder):  # exactly the files check_checkpoint read
        weights.update(mx.load(str(file)))
    weights = model.sanitize(weights)
    quantization = quantization_of(raw)
    if quantization is not None:
        _quantize_like_mlx_lm(model, quantization, weights)
    model.load_weights(list(weights.items()), strict=True)
    if adapter_path is not None:
        _load_adapters(model, Path(adapter_path))
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    tokenizer = load_tokenizer(folder, eos_token_ids=raw.get("eos_token_id"))
    return model, tokenizer
