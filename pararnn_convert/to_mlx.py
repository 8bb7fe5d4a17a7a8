"""torch checkpoint folder -> MLX checkpoint folder (dtype cast, optional mlx-lm quantization)."""

from __future__ import annotations

import json
from pathlib import Path

from pararnn_convert.model_file import MODEL_FILE, MODEL_FILE_SOURCE
from pararnn_core import checkpoint, safe_folder
from pararnn_core.lm_config import LMConfig
from pararnn_core.tokenizer import TextTokenizer, load_chat_template

DTYPES = ("float16", "bfloat16", "float32")
Q_BITS = (4, 8)
Q_GROUP_SIZES = (32, 64, 128)
_SAFETENSORS_NAMES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "uint32": "U32"}


def _dtype_name(array) -> str:
    name = str(array.dtype).removeprefix("mlx.core.")
    return _SAFETENSORS_NAMES.get(name, name)


def to_mlx(
    src,
    out,
    dtype: str = "float16",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    tokenizer_file=None,
    force: bool = False,
    trust_remote_code: bool = False,
    chat_template_file=None,
) -> checkpoint.WriteSummary:
    """Convert; every check runs before anything is written, under the lock of ``out``.
    ``trust_remote_code``: allow importing the user cell's ``cell_module`` named by the source.
    ``chat_template_file``: a Jinja template to save as the tokenizer's chat template (mlx_lm.chat, the server's
    /v1/chat/completions), replacing the source's."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if quantize and q_bits not in Q_BITS:
        raise ValueError(f"--q-bits must be one of {Q_BITS}, got {q_bits}")
    if quantize and q_group_size not in Q_GROUP_SIZES:
        raise ValueError(f"--q-group-size must be one of {Q_GROUP_SIZES}, got {q_group_size}")
    src, out = Path(src), Path(out)
    checkpoint.check_separate(out, {"--model": src})
    with safe_folder.FolderLock(out, "pararnn-convert to-mlx"):
        checkpoint.check_writable(out, force)
        LMConfig.load(src, trust_remote_code=trust_remote_code)  # registers a trusted user cell first
        return _convert(src, out, dtype, quantize, q_bits, q_group_size, tokenizer_file, chat_template_file, force)


def _convert(src: Path, out: Path, dtype, quantize, q_bits, q_group_size, tokenizer_file, chat_template_file, force):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from pararnn_mlx.lm import Model, ModelArgs
    from pararnn_mlx.loader import check_checkpoint

    config = check_checkpoint(src)
    raw = json.loads((src / checkpoint.CONFIG_FILE).read_text())
    if raw.get("quantization"):
        raise ValueError(f"{src} is already quantized; convert from the float checkpoint")
    tokenizer = TextTokenizer.from_file(tokenizer_file) if tokenizer_file else TextTokenizer.from_folder(src)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is {config.vocab_size}"
        )
    if chat_template_file:
        tokenizer = tokenizer.with_chat_template(load_chat_template(chat_template_file, tokenizer.special_tokens()))

    model = Model(ModelArgs(config))
    weights = {}
    for path in checkpoint.weight_files(src):
        weights.update(mx.load(str(path)))
    model.load_weights(list(model.sanitize(weights).items()), strict=True)
    target = getattr(mx, dtype)
    model.update(_cast_tree(model.parameters(), target))
    out_config = config.to_dict()
    out_config["model_file"] = MODEL_FILE
    out_config["torch_dtype"] = dtype
    if quantize:
        skipped = []

        def quantizable(path, module):
            if not hasattr(module, "to_quantized"):
                return False
            if module.weight.shape[-1] % q_group_size:
                skipped.append(path)
                return False
            return True

        nn.quantize(model, group_size=q_group_size, bits=q_bits, class_predicate=quantizable)
        if skipped:
            print(f"note: left in {dtype} (input size not a multiple of {q_group_size}): {', '.join(skipped)}")
        quantization = {"group_size": q_group_size, "bits": q_bits, "mode": "affine"}
        out_config["quantization"] = quantization
        out_config["quantization_config"] = quantization
    tensors = dict(tree_flatten(model.parameters()))
    mx.eval(tensors)
    files = {**tokenizer.files(), MODEL_FILE: MODEL_FILE_SOURCE.encode()}
    return checkpoint.write_checkpoint(
        out,
        out_config,
        tensors,
        save_shard=lambda t, path, metadata: mx.save_safetensors(path, t, metadata=metadata),
        nbytes=lambda a: a.nbytes,
        dtype_name=_dtype_name,
        files=files,
        force=force,
        tool="pararnn-convert to-mlx",
    )


def _cast_tree(tree, dtype):
    import mlx.core as mx
    from mlx.utils import tree_map

    return tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, tree)
