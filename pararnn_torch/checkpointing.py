"""A training run's folder: the model checkpoint plus the state that ``--resume`` needs, read without pickle.

Saved next to the checkpoint files (pararnn_core.checkpoint, written crash-safely under the folder lock):

* ``training_state.safetensors``: every tensor of the state (optimizer moments and steps,
  scheduler tensors if any, RNG states);
* ``training_state.json``: everything else (step, history, resolved flags, data position,
  optimizer hyper-parameters, scheduler counters), with ``{"__tensor__": key}`` where a
  tensor of the safetensors file goes, ``{"__tuple__": [...]}`` for tuples and
  ``{"__int_keys__": {...}}`` for dicts keyed by integers (the optimizer's per-parameter state);
* ``metrics.jsonl`` and ``loss_curve.png``.

Neither file can run code when read. The pickle ``training_state.pt`` of older versions is
read only through ``torch.load(weights_only=True)`` (tensors and plain values, nothing else)
and rewritten in the new format at the next save.

API used by ``pararnn-train`` (and by any other trainer, e.g. a sharded one):
``save_run(out, model, tokenizer, state, force)``, ``load_run(out) -> TrainingState``,
``has_run(out)``; ``capture_rng(device)`` / ``restore_rng(rng, device)``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pararnn_core.checkpoint import CheckpointError

STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
LEGACY_STATE = "training_state.pt"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.png"
FORMAT_VERSION = 1


@dataclass
class History:
    train: list = field(default_factory=list)  # (step, loss)
    eval: list = field(default_factory=list)  # (step, loss)


@dataclass
class TrainingState:
    """Everything besides the weights that continues a run exactly."""

    step: int
    args: dict  # the run's resolved flags
    history: History
    optimizer: dict  # optimizer.state_dict()
    scheduler: dict  # scheduler.state_dict()
    rng: dict  # capture_rng()
    data_position: dict = field(default_factory=dict)  # where the data stream continues
    extra: dict = field(default_factory=dict)  # other trainers' own plain values and tensors


def capture_rng(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng(rng: dict, device: torch.device):
    torch.set_rng_state(rng["torch"].cpu())
    if device.type == "cuda" and rng.get("cuda") is not None:
        torch.cuda.set_rng_state(rng["cuda"].cpu(), device)


# ----------------------------------------------------------------------------
# plain values + tensors <-> JSON + safetensors


def encode(value, key: str, tensors: dict):
    """``value`` as JSON-able data; its tensors go into ``tensors`` under dotted keys."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode(v, f"{key}.{k}", tensors) for k, v in value.items()}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {"__int_keys__": {str(k): encode(v, f"{key}.{k}", tensors) for k, v in value.items()}}
        raise TypeError(f"training state {key}: dict keys must be all strings or all integers")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"training state {key}: cannot store a {type(value).__name__} (tensors and plain values only)")


def decode(value, tensors: dict, where: str):
    if isinstance(value, list):
        return [decode(v, tensors, where) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"__tensor__"}:
        try:
            return tensors[value["__tensor__"]]
        except KeyError:
            raise CheckpointError(f"{where}: tensor {value['__tensor__']!r} is missing from {STATE_TENSORS}") from None
    if set(value) == {"__tuple__"}:
        return tuple(decode(v, tensors, where) for v in value["__tuple__"])
    if set(value) == {"__int_keys__"}:
        return {int(k): decode(v, tensors, where) for k, v in value["__int_keys__"].items()}
    return {k: decode(v, tensors, where) for k, v in value.items()}


def _state_files(state: TrainingState) -> dict[str, object]:
    from safetensors.torch import save_file

    tensors: dict = {}
    data = {"format_version": FORMAT_VERSION, **encode(_as_plain(state), "state", tensors)}
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    return {
        STATE_JSON: text.encode(),
        STATE_TENSORS: lambda path: save_file(tensors, str(path), metadata={"format": "pararnn-training-state"}),
    }


def _as_plain(state: TrainingState) -> dict:
    plain = {k: getattr(state, k) for k in state.__dataclass_fields__}
    plain["history"] = asdict(state.history)
    return plain


# ----------------------------------------------------------------------------
# saving and loading a run folder


def save_run(out, model, tokenizer, state: TrainingState, force: bool, tool: str = "pararnn-train"):
    """Write the checkpoint and the training state of ``model`` to ``out`` in one crash-safe swap."""
    from pararnn_torch.lm import save_lm

    history = state.history
    metrics = "".join(json.dumps({"step": s, "train_loss": v}) + "\n" for s, v in history.train)
    metrics += "".join(json.dumps({"step": s, "eval_loss": v}) + "\n" for s, v in history.eval)
    files = {
        **_state_files(state),
        METRICS: metrics.encode(),
        LOSS_CURVE: lambda path: write_loss_curve(history, path),
    }
    return save_lm(model, out, tokenizer, files=files, force=force, tool=tool)


def has_run(out) -> bool:
    out = Path(out)
    return (out / STATE_JSON).is_file() or (out / LEGACY_STATE).is_file()


def load_run(out) -> TrainingState:
    """The training state saved in ``out`` (tensors on the CPU); no pickle is executed."""
    out = Path(out)
    if (out / STATE_JSON).is_file():
        return _load_state(out)
    if (out / LEGACY_STATE).is_file():
        return _load_legacy_state(out / LEGACY_STATE)
    raise FileNotFoundError(f"{out} has no {STATE_JSON}: it is not a pararnn-train run folder (or it was not saved)")


def _load_state(out: Path) -> TrainingState:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = str(out / STATE_JSON)
    try:
        data = json.loads((out / STATE_JSON).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{where} is corrupt ({e}); the run folder cannot be resumed") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: unknown format (expected format_version {FORMAT_VERSION})")
    try:
        tensors = load_file(str(out / STATE_TENSORS)) if (out / STATE_TENSORS).is_file() else {}
    except SafetensorError as e:
        raise CheckpointError(f"{out / STATE_TENSORS} is corrupt ({e}); the run folder cannot be resumed") from None
    plain = decode({k: v for k, v in data.items() if k != "format_version"}, tensors, where)
    return _from_plain(plain, where)


def _from_plain(plain: dict, where: str) -> TrainingState:
    names = set(TrainingState.__dataclass_fields__)
    required = {"step", "args", "history", "optimizer", "scheduler", "rng"}
    missing = required - set(plain)
    if missing:
        raise CheckpointError(f"{where} lacks {sorted(missing)}; the run folder cannot be resumed")
    if not isinstance(plain["step"], int) or plain["step"] < 0:
        raise CheckpointError(f"{where}: step must be a non-negative integer, got {plain['step']!r}")
    history = plain["history"]
    plain = {k: v for k, v in plain.items() if k in names}
    plain["history"] = History(
        [tuple(x) for x in history.get("train", [])], [tuple(x) for x in history.get("eval", [])]
    )
    return TrainingState(**plain)


def _load_legacy_state(path: Path) -> TrainingState:
    import pickle

    try:
        # weights_only: the restricted unpickler that builds tensors and plain containers, never other objects
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path} (the pickle format of older versions) holds objects other than tensors and plain values, "
            f"so it is not loaded ({reason}); it may be a crafted file. Start a new run, or delete it and "
            f"keep only the weights"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, expected the training state dict")
    print(f"note: read {path.name} (older format) safely; the next save writes {STATE_JSON}", file=sys.stderr)
    state.setdefault("history", {})
    return _from_plain(state, str(path))


def write_loss_curve(history: History, path: Path):
    """Train and eval loss per step as a PNG (skipped with a note when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, no loss curve written", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history.train:
        ax.plot(*zip(*history.train), label="train", lw=1)
    if history.eval:
        ax.plot(*zip(*history.eval), "o-", label="eval")
    ax.axhline(math.log(256), color="gray", ls="--", lw=0.8, label="uniform bytes (ln 256)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
