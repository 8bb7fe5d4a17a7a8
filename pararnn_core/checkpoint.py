"""Checkpoint folders in the mlx-lm layout, written atomically and checked before loading.

A folder holds ``config.json``, ``model.safetensors`` (or ``model-0000k-of-0000n.safetensors``
shards plus ``model.safetensors.index.json`` above a size) and the tokenizer files.
This module is backend-free: tensors are written by a backend's ``save_shard``
callback and checked by reading the safetensors headers (no tensor data is loaded).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pararnn_core import safe_folder

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: shard size of mlx-lm's own writer
DEFAULT_MAX_SHARD_BYTES = 5 << 30
FLOAT_DTYPES = ("F32", "F16", "BF16")
#: modules that mlx ``nn.quantize`` turns into quantized ones (linear and embedding layers)
QUANTIZABLE_SUFFIXES = ("embed", "in_proj", "out_proj", "gate_proj", "up_proj", "down_proj", "lm_head")


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, corrupt or does not match its config."""


@dataclass
class WriteSummary:
    path: Path
    tensors: int = 0
    bytes: int = 0
    dtypes: set = field(default_factory=set)
    files: list = field(default_factory=list)

    def describe(self) -> str:
        dtypes = ", ".join(sorted(self.dtypes)) or "-"
        return (
            f"wrote {self.path}: {self.tensors} tensors, {self.bytes / 1e6:.2f} MB of weights ({dtypes}); "
            f"files: {', '.join(sorted(self.files))}"
        )


def _shards(names, sizes, max_shard_bytes):
    shards, current, used = [], [], 0
    for name in names:
        if current and used + sizes[name] > max_shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    if current:
        shards.append(current)
    return shards


def check_writable(out, force: bool):
    """Refuse to replace an existing folder unless ``force``; called before any work is done
    (and checked again, atomically, when the new folder is moved into place)."""
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force (force=True) to overwrite it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")


def check_separate(out, inputs: Mapping[str, object]):
    """Refuse an output folder that is, contains or lies inside an input (``--flag -> path``):
    replacing it would delete the input, or the output would be read back as input."""
    target = Path(out).resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if source == target or target in source.parents or source in target.parents:
            raise ValueError(
                f"--out {out} overlaps {flag} {path}: writing the checkpoint would replace or mix with the input; "
                f"choose an --out outside it"
            )


def write_checkpoint(
    out,
    config: dict,
    tensors: Mapping,
    save_shard: Callable[[dict, str, dict], None],
    nbytes: Callable[[object], int],
    dtype_name: Callable[[object], str],
    files: Mapping[str, bytes | Callable[[Path], None]] = (),
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    force: bool = False,
    tool: str = "pararnn",
) -> WriteSummary:
    """Write a checkpoint folder crash-safely under the folder's lock (pararnn_core.safe_folder):
    everything goes to a staging sibling that replaces ``out`` in one atomic step, so ``out``
    always holds a complete checkpoint (the old or the new one) and a failure leaves nothing behind.

    ``save_shard(tensors, path, metadata)`` writes one safetensors file (the backend's
    writer); ``files`` maps extra file names to their bytes or to a function writing the file.
    """
    out = Path(out)
    summary = WriteSummary(out)
    with safe_folder.FolderLock(out, tool):
        check_writable(out, force)
        with safe_folder.staging(out, replace=force) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            safe_folder.fault_point("staging-partial")
            names = list(tensors)
            sizes = {k: int(nbytes(tensors[k])) for k in names}
            shards = _shards(names, sizes, max_shard_bytes)
            metadata = {"format": "mlx" if config.get("quantization") else "pt"}
            if len(shards) == 1:
                save_shard({k: tensors[k] for k in shards[0]}, str(tmp / WEIGHTS_FILE), metadata)
            else:
                weight_map = {}
                for i, shard in enumerate(shards):
                    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                    save_shard({k: tensors[k] for k in shard}, str(tmp / fname), metadata)
                    weight_map.update({k: fname for k in shard})
                index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
                (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            for name, content in dict(files).items():
                if callable(content):
                    content(tmp / name)
                else:
                    (tmp / name).write_bytes(content)
            summary.tensors, summary.bytes = len(names), sum(sizes.values())
            summary.dtypes = {dtype_name(tensors[k]) for k in names}
            summary.files = [p.name for p in tmp.iterdir()]
            safe_folder.fault_point("staging-written")
    return summary


# ----------------------------------------------------------------------------
# reading


def read_safetensors_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file, from its JSON header only."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path} is truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            size = path.stat().st_size
            if length > size - 8:
                raise CheckpointError(f"{path} is corrupt: header length {length} exceeds the file size {size}")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: its safetensors header is not valid JSON ({e})") from None
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        out[name] = (info["dtype"], tuple(info["shape"]))
        end = max(end, info["data_offsets"][1])
    if 8 + length + end > size:
        raise CheckpointError(f"{path} is truncated: its tensors need {8 + length + end} bytes, the file has {size}")
    return out


def weight_files(folder) -> list[Path]:
    """The safetensors files of a checkpoint folder (one file, or the shards its index names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist{safe_folder.missing_hint(folder)}")
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is corrupt ({e!r}); expected a JSON object with 'weight_map'") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards named in {INDEX_FILE} are missing: {missing}")
        return [folder / f for f in files]
    single = folder / WEIGHTS_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_FILE} (nor {INDEX_FILE} with shards)")
    return [single]


def read_tensor_table(folder) -> dict[str, tuple[str, tuple[int, ...]]]:
    table = {}
    for path in weight_files(folder):
        table.update(read_safetensors_header(path))
    return table


#: group size and bits of each mlx quantization mode when a config leaves them out (mlx.nn's defaults)
QUANT_MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4), "mxfp8": (32, 8)}
#: safetensors dtype of the scales of the microscaling modes (every mode but affine; they have no biases)
MX_SCALES_DTYPE = "U8"


def layer_quantization(module: str, cols: int, quantization: dict, found: Mapping) -> dict | None:
    """How mlx-lm's loader (mlx_lm.utils.load_model) quantizes ``module``: None (it stays float) or
    ``{"group_size", "bits", "mode"}``. A per-layer entry in the config wins (``false``: float; ``true``:
    the top-level settings); otherwise the layer is quantized when its scales are stored, with the
    settings the stored shapes and scale dtype imply (as mlx-lm's ``infer_quant_config``)."""
    if module in quantization:
        entry = quantization[module]
        if entry is False:
            return None
        params = dict(quantization if entry is True else entry)
    elif f"{module}.scales" not in found:
        return None
    else:
        params = _inferred_quantization(module, cols, found)
    mode = params.get("mode") or "affine"
    if mode not in QUANT_MODE_DEFAULTS:
        raise CheckpointError(
            f"{module}: quantization mode {mode!r} is not one of mlx's ({', '.join(QUANT_MODE_DEFAULTS)})"
        )
    group, bits = QUANT_MODE_DEFAULTS[mode]
    return {"group_size": params.get("group_size") or group, "bits": params.get("bits") or bits, "mode": mode}


def _inferred_quantization(module: str, cols: int, found: Mapping) -> dict:
    scales_dtype, scales_shape = found[f"{module}.scales"]
    weight = found.get(f"{module}.weight")
    if not scales_shape or not scales_shape[-1] or weight is None or not weight[1]:
        raise CheckpointError(f"{module}: stored scales {list(scales_shape)} without a packed weight")
    group, bits = cols // scales_shape[-1], weight[1][-1] * 32 // cols
    if scales_dtype != MX_SCALES_DTYPE:
        return {"group_size": group, "bits": bits, "mode": "affine"}
    for mode, defaults in QUANT_MODE_DEFAULTS.items():
        if mode != "affine" and defaults == (group, bits):
            return {"group_size": group, "bits": bits, "mode": mode}
    raise CheckpointError(
        f"{module}: uint8 scales with {bits} bits and group size {group} match no mlx quantization mode "
        f"(mxfp4: 4 bits / 32, nvfp4: 4 bits / 16, mxfp8: 8 bits / 32)"
    )


def expected_table(shapes: Mapping[str, tuple], quantization: dict | None, found: Mapping) -> dict[str, tuple]:
    """name -> (dtype or None for "any float", shape); quantized layers as mlx stores them, layer by layer."""
    expected = {}
    for name, shape in shapes.items():
        module = name.rsplit(".", 1)[0]
        params = None
        if quantization is not None and name.endswith(".weight") and module.rsplit(".", 1)[-1] in QUANTIZABLE_SUFFIXES:
            params = layer_quantization(module, shape[-1], quantization, found)
        if params is None:
            expected[name] = (None, tuple(shape))
            continue
        bits, group = params["bits"], params["group_size"]
        rows, cols = shape
        if cols % group:
            raise CheckpointError(f"{module}: input size {cols} is not a multiple of its group size {group}")
        expected[name] = ("U32", (rows, cols * bits // 32))
        affine = params["mode"] == "affine"
        expected[f"{module}.scales"] = (None if affine else MX_SCALES_DTYPE, (rows, cols // group))
        if affine:
            expected[f"{module}.biases"] = (None, (rows, cols // group))
    return expected


def check_tensor_table(found: Mapping, shapes: Mapping, quantization: dict | None = None, where: str = "checkpoint"):
    """Compare a checkpoint's tensors with the model's schema; raise one error listing every mismatch."""
    expected = expected_table(shapes, quantization, found)
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    float_dtypes = set()
    for name in sorted(set(expected) & set(found)):
        want_dtype, want_shape = expected[name]
        dtype, shape = found[name]
        if tuple(shape) != want_shape:
            problems.append(f"{name}: shape {list(shape)}, expected {list(want_shape)}")
        if want_dtype is None:
            if dtype not in FLOAT_DTYPES:
                problems.append(f"{name}: dtype {dtype}, expected a float dtype ({'/'.join(FLOAT_DTYPES)})")
            float_dtypes.add(dtype)
        elif dtype != want_dtype:
            problems.append(f"{name}: dtype {dtype}, expected {want_dtype}")
    if len(float_dtypes) > 1:
        problems.append(f"mixed float dtypes {sorted(float_dtypes)}; a checkpoint stores one float dtype")
    if problems:
        raise CheckpointError(
            f"{where} does not match its config.json ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems)
        )


def check_folder(folder, shapes: Mapping, quantization: dict | None = None):
    """Check a checkpoint folder's tensors against ``shapes`` (from LMConfig.parameter_shapes)."""
    check_tensor_table(read_tensor_table(folder), shapes, quantization, where=str(folder))
