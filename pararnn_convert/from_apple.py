"""Apple ml-pararnn cell tensors (``A``, ``B``, ``b``, LSTM ``C``) -> our layer weights.

The input is a ``.pt``/``.pth`` state dict or a ``.safetensors`` file; it may hold
several cells under module prefixes (``layers.0.cell.A`` ...). The output folder
holds ``model.safetensors`` with ``<prefix>weight``/``bias``/``recurrent`` per cell
and ``config.json`` describing each layer, loadable by ``ParaRNN.load_state_dict``
(torch) or ``ParaRNN.load_weights`` (MLX).
"""

from __future__ import annotations

from pathlib import Path

from pararnn_core import checkpoint
from pararnn_core.layer_spec import from_apple_tensors

APPLE_LEAVES = ("A", "B", "b", "C")


def _read(path: Path) -> dict:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"Apple checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict of tensors")
    return state


def _group_cells(state: dict) -> dict[str, dict]:
    """prefix -> {leaf: tensor} for every Apple cell in the file; other tensors are ignored."""
    import torch

    groups: dict[str, dict] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".") if isinstance(key, str) else ("", "", None)
        if leaf in APPLE_LEAVES:
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{key!r} holds a {type(value).__name__}, expected a tensor (an Apple cell parameter)")
            if not value.is_floating_point():
                raise ValueError(f"{key!r} is a {value.dtype} tensor, expected a float tensor")
            groups.setdefault(prefix + "." if prefix else "", {})[leaf] = value
    if not groups:
        raise ValueError(
            f"no Apple ml-pararnn cell tensors found (expected keys ending in {', '.join(APPLE_LEAVES)})"
        )
    return groups


def from_apple(src, out, num_heads: int = 1, cell: str | None = None, force: bool = False):
    import torch
    from safetensors.torch import save_file

    src, out = Path(src), Path(out)
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"--num-heads must be a positive integer, got {num_heads!r}")
    checkpoint.check_separate(out, {"--checkpoint": src})
    checkpoint.check_writable(out, force)
    tensors, layers = {}, {}
    for prefix, group in _group_cells(_read(src)).items():
        name = cell or ("lstm" if "C" in group else "gru")
        mapped = from_apple_tensors(name, group, num_heads, lambda xs, axis: torch.cat(xs, axis))
        for k in ("weight", "bias", "recurrent"):
            tensors[prefix + k] = mapped[k].detach().contiguous()
        layers[prefix or "."] = {
            "cell": name,
            "input_size": int(mapped["input_size"]),
            "hidden_size": int(mapped["hidden_size"]),
            "num_heads": num_heads,
        }
    config = {"format": "pararnn-layers", "source": f"Apple ml-pararnn ({src.name})", "layers": layers}
    return checkpoint.write_checkpoint(
        out,
        config,
        tensors,
        save_shard=lambda t, path, metadata: save_file(t, path, metadata=metadata),
        nbytes=lambda t: t.numel() * t.element_size(),
        dtype_name=lambda t: str(t.dtype).removeprefix("torch."),
        force=force,
        tool="pararnn-convert from-apple",
    )
