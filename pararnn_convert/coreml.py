"""checkpoint folder -> stateful Core ML ML Program (``pararnn-convert to-coreml``).

The package holds two functions that share their weights and their state (Core ML
multifunction model, iOS 18 / macOS 15):

* ``decode`` (the default): ``input_ids`` int32 [1, 1] -> ``logits`` [1, vocab]; the state
  advances by one token.
* ``prefill``: ``input_ids`` int32 [1, chunk] -> ``logits`` of the last token [1, vocab];
  the state advances by the chunk. A prompt is fed as whole chunks, the rest token by token.

The state (per layer ``conv_state_{i}`` and ``cell_state_{i}``, see ``coreml_module``) is
Core ML state (``ct.StateType``) of fixed shape: nothing grows with the context. Each graph
is ``torch.export``-ed from ``StatefulLM``, which is checked against the reference
``pararnn_torch`` model before anything is written (Core ML cannot predict on Linux).
The tokenizer files and config.json are copied beside the package into ``NAME.tokenizer/``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pararnn_convert.coreml_module import ParityReport, StatefulLM, check_parity, load_reference, state_specs
from pararnn_convert.coreml_options import COMPUTE_UNITS, CoreMLOptions
from pararnn_core import checkpoint
from pararnn_core.tokenizer import TextTokenizer

#: ops whose constant inputs are the weight matrices (embedding lookup, linear layers, the cell's projection)
COMPRESSED_OP_TYPES = ("gather", "linear", "matmul")
#: weight matrices with at most this many elements stay uncompressed (scales would eat the saving)
COMPRESS_WEIGHT_THRESHOLD = 512
INT4_BLOCK_SIZE = 32
PARITY_TOLERANCE = 1e-4
METADATA_PREFIX = "pararnn."
FUNCTIONS = ("decode", "prefill")
DEFAULT_FUNCTION = "decode"
INPUT_NAME, OUTPUT_NAME = "input_ids", "logits"


@dataclass
class CoreMLSummary:
    path: Path
    tokenizer_dir: Path
    options: CoreMLOptions
    parity: ParityReport
    bytes: int

    def describe(self) -> str:
        o = self.options
        return (
            f"wrote {self.path} ({self.bytes / 1e6:.2f} MB; functions decode, prefill[{o.prefill_length}]; "
            f"{o.precision}, {o.target}, compute units {o.compute_units}, compression {o.compress}) and "
            f"{self.tokenizer_dir}\n{self.parity.describe()}"
        )


def tokenizer_dir_for(out: Path) -> Path:
    """Where the tokenizer files go: ``NAME.tokenizer`` beside ``NAME.mlpackage``."""
    return out.with_suffix(".tokenizer")


def tokenizer_files(src: Path, tokenizer: TextTokenizer) -> list[str]:
    """The checkpoint's files copied beside the package: the tokenizer's (those present) and config.json."""
    return sorted(name for name in [*tokenizer.files(), checkpoint.CONFIG_FILE] if (src / name).is_file())


def package_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def _check_paths(src: Path, out: Path, force: bool):
    if not src.is_dir():
        raise FileNotFoundError(f"model folder {src} does not exist (expected a ParaRNN checkpoint folder)")
    if out.suffix != ".mlpackage":
        raise ValueError(f"--out must name a .mlpackage (Core ML ML Program package), got {out}")
    for path in (out, tokenizer_dir_for(out)):
        if path.exists() and not force:
            raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a folder; remove it or pick another --out")


def to_coreml(src, out, options: CoreMLOptions | None = None, force: bool = False,
              trust_remote_code: bool = False) -> CoreMLSummary:
    """Convert a checkpoint folder; checks, parity and conversion all run before anything is written.
    ``trust_remote_code``: allow importing the user cell's module named in the folder's config.json."""
    options = options or CoreMLOptions()
    options.validate()
    src, out = Path(src), Path(out)
    _check_paths(src, out, force)
    try:
        import coremltools  # noqa: F401
    except ImportError:
        raise ValueError("to-coreml needs coremltools: pip install 'pararnn-mlx[coreml]'") from None

    reference, raw_config = load_reference(src, trust_remote_code)
    tokenizer = TextTokenizer.from_folder(src)
    decode = StatefulLM(reference, 1)
    prefill = StatefulLM(reference, options.prefill_length)
    # a fixed pseudo-random prompt of one chunk, then greedy decoding
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, reference.config.vocab_size, (options.prefill_length,), generator=generator)
    parity = check_parity(reference, prefill, decode, prompt, options.parity_steps)
    if not parity.within(PARITY_TOLERANCE):
        raise ValueError(f"the export module does not match the reference model; nothing written. {parity.describe()}")

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as work:
        work = Path(work)
        paths = {}
        for name, module in (("decode", decode), ("prefill", prefill)):
            mlmodel = convert_module(module, options)
            describe_function(mlmodel, module, name)
            paths[name] = work / f"{name}.mlpackage"
            mlmodel.save(str(paths[name]))
        merged = work / "merged.mlpackage"
        merge_functions(paths, merged)
        package = work / out.name
        tok_dir = work / tokenizer_dir_for(out).name
        tok_dir.mkdir()
        files = tokenizer_files(src, tokenizer)
        for fname in files:
            shutil.copyfile(src / fname, tok_dir / fname)
        write_metadata(merged, package, reference.config, raw_config, tokenizer, tok_dir.name, files, options)
        _replace(tok_dir, tokenizer_dir_for(out))
        _replace(package, out)
    return CoreMLSummary(out, tokenizer_dir_for(out), options, parity, package_bytes(out))


def _replace(tmp: Path, dest: Path):
    """Move a finished folder into place; an existing one (allowed by --force) is removed only after."""
    if not dest.exists():
        tmp.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------
# conversion steps


def convert_module(module: StatefulLM, options: CoreMLOptions):
    """One function's ML Program, converted from the module's ``torch.export`` program."""
    import coremltools as ct
    import numpy as np

    program = module.export()
    # Core ML keeps state in float16 (coremltools casts float32 buffers and warns); said here, not by a warning
    states = [
        ct.StateType(wrapped_type=ct.TensorType(shape=spec.shape, dtype=np.float16), name=spec.name)
        for spec in state_specs(module.config)
    ]
    precision = ct.precision.FLOAT16 if options.precision == "float16" else ct.precision.FLOAT32
    pipeline = ct.PassPipeline.DEFAULT
    # A single-component cell's step stacks its state and unbinds it again (expand_dims -> squeeze); in float16
    # coremltools 9 fuses that pair into an op that its canonicalize_inplace_pattern pass then rejects ("scope
    # cannot have len > 1"). Without the fusion the pair stays: one no-op reshape per layer and token.
    pipeline.remove_passes({"common::fuse_squeeze_expand_dims"})
    mlmodel = ct.convert(
        program,
        inputs=[ct.TensorType(name=INPUT_NAME, shape=(1, module.length), dtype=np.int32)],
        outputs=[ct.TensorType(name=OUTPUT_NAME, dtype=np.float32)],
        states=states,
        minimum_deployment_target=getattr(ct.target, options.target),
        compute_precision=precision,
        compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[options.compute_units]),
        convert_to="mlprogram",
        pass_pipeline=pipeline,
        skip_model_load=True,
    )
    return compress(mlmodel, options.compress)


def compress(mlmodel, kind: str):
    """Weight compression with coremltools.optimize: per-channel int8, per-block int4 or k-means lookup tables.

    Only the weight matrices are compressed (the consumers in COMPRESSED_OP_TYPES: embedding,
    projections, MLP, the cell's input projection); the cell's per-channel recurrent vectors,
    biases and norms stay in full precision: they act on every step of the recurrence.
    """
    if kind == "none":
        return mlmodel
    from coremltools.optimize import coreml as cto

    if kind == "int8":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=COMPRESS_WEIGHT_THRESHOLD
        )
    elif kind == "int4":
        op = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int4", granularity="per_block", block_size=INT4_BLOCK_SIZE,
            weight_threshold=COMPRESS_WEIGHT_THRESHOLD,
        )
    else:
        _require_kmeans()
        op = cto.OpPalettizerConfig(
            mode="kmeans", nbits=int(kind.removeprefix("palettize")), weight_threshold=COMPRESS_WEIGHT_THRESHOLD
        )
    config = cto.OptimizationConfig(op_type_configs={op_type: op for op_type in COMPRESSED_OP_TYPES})
    if kind.startswith("int"):
        return cto.linear_quantize_weights(mlmodel, config)
    return cto.palettize_weights(mlmodel, config)


def _require_kmeans():
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ValueError(
            "--compress palettize4/palettize8 clusters weights with k-means, which coremltools runs with "
            "scikit-learn: pip install 'pararnn-mlx[coreml]' (or use --compress int8/int4)"
        ) from None


def describe_function(mlmodel, module: StatefulLM, name: str):
    """Input, output and state descriptions of one function (shown in Xcode and by MLModelDescription)."""
    length = module.length
    what = "one token" if length == 1 else f"a chunk of exactly {length} tokens"
    mlmodel.input_description[INPUT_NAME] = f"{name}: token ids, int32 [1, {length}] ({what})"
    mlmodel.output_description[OUTPUT_NAME] = (
        f"next-token logits after the last input token, [1, {module.config.vocab_size}]"
    )
    spec = mlmodel.get_spec()
    for state in spec.description.state:
        kind = "conv tail (last inputs of the causal conv)" if "conv" in state.name else "cell state components"
        state.shortDescription = f"layer {state.name.rsplit('_', 1)[-1]} {kind}; zeros start a new sequence"
    mlmodel._spec = spec


def merge_functions(paths: dict, out: Path):
    """One multifunction package (weights deduplicated) with ``decode`` as its default function."""
    import coremltools as ct

    desc = ct.utils.MultiFunctionDescriptor()
    for name in FUNCTIONS:
        desc.add_function(str(paths[name]), src_function_name="main", target_function_name=name)
    desc.default_function_name = DEFAULT_FUNCTION
    ct.utils.save_multifunction(desc, str(out))


def model_metadata(
    config, raw_config: dict, tokenizer: TextTokenizer, tokenizer_dir: str, files: list[str], options: CoreMLOptions
) -> dict[str, str]:
    """``user_defined_metadata`` of the package (strings only, as Core ML stores them)."""
    states = {spec.name: list(spec.shape) for spec in state_specs(config)}
    return {
        METADATA_PREFIX + "config": json.dumps(config.to_dict(), sort_keys=True),
        METADATA_PREFIX + "source_config": json.dumps(raw_config, sort_keys=True),
        METADATA_PREFIX + "tokenizer_kind": "bytes" if tokenizer.is_bytes else "huggingface",
        METADATA_PREFIX + "tokenizer_files": json.dumps(files),
        METADATA_PREFIX + "tokenizer_dir": tokenizer_dir,
        METADATA_PREFIX + "states": json.dumps(states),
        METADATA_PREFIX + "state_dtype": "float16",
        METADATA_PREFIX + "functions": json.dumps({"decode": 1, "prefill": options.prefill_length}),
        METADATA_PREFIX + "default_function": DEFAULT_FUNCTION,
        METADATA_PREFIX + "compute_precision": options.precision,
        METADATA_PREFIX + "compression": options.compress,
        METADATA_PREFIX + "eos_token_id": "" if config.eos_token_id is None else str(config.eos_token_id),
    }


def write_metadata(
    src: Path,
    out: Path,
    config,
    raw_config: dict,
    tokenizer: TextTokenizer,
    tokenizer_dir: str,
    files: list[str],
    options: CoreMLOptions,
):
    """Copy the package ``src`` to ``out`` with package-level description and metadata added
    (a multifunction model keeps them once for all its functions)."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(src), skip_model_load=True)
    spec = mlmodel.get_spec()
    meta = spec.description.metadata
    meta.author = options.author
    meta.license = options.license
    meta.versionString = options.version
    meta.shortDescription = (
        f"ParaRNN language model ({config.cell} cell, {config.n_layers} layers, d_model {config.d_model}); "
        f"stateful: make one state per sequence, run 'prefill' on chunks of {options.prefill_length} tokens "
        f"and 'decode' one token at a time"
    )
    meta.userDefined.update(model_metadata(config, raw_config, tokenizer, tokenizer_dir, files, options))
    ct.models.utils.save_spec(spec, str(out), weights_dir=mlmodel.weights_dir)
