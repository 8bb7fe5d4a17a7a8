"""Which ``pararnn-train`` flags a resumed run inherits, may change, or must keep.

Flags of the three groups below default to ``None`` in the parser, meaning "not given":
a fresh run fills them from ``DEFAULTS``; ``--resume`` fills them from the run's saved flags.

* ``FIXED_ON_RESUME``: they define the model or the data stream (the batch of a step is a
  function of data, tokenizer, seq-len, batch size and seed). Given with ``--resume`` and
  different from the run: an error listing every difference.
* ``CHANGEABLE_ON_RESUME``: optimisation and bookkeeping. ``--steps`` may grow (not go below
  the saved step); the learning-rate schedule (``--lr``, ``--min-lr-ratio``, ``--warmup``,
  ``--steps``) and ``--weight-decay`` are re-applied from the new values at the saved step.
* Every other flag (``--out``, ``--device``, ``--stop-after``, ``--no-progress``,
  ``--trust-remote-code``, ...) belongs to one invocation and is never inherited.
"""

from __future__ import annotations

from pathlib import Path

from pararnn_core.cli_args import CLIError

FIXED_ON_RESUME = (
    "data", "tokenizer", "corpus_bytes", "eval_fraction", "seq_len", "batch_size", "seed",
    "cell", "cell_module", "d_model", "layers", "heads", "cell_size", "mlp_size", "untied",
)
CHANGEABLE_ON_RESUME = (
    "steps", "lr", "min_lr_ratio", "warmup", "weight_decay", "grad_clip", "z_loss", "mode", "dtype",
    "eval_every", "eval_batches", "save_every",
)
#: values of a fresh run for flags not given (warmup None: 5% of --steps)
DEFAULTS = {
    "data": None, "tokenizer": None, "corpus_bytes": 4_000_000, "eval_fraction": 0.02, "seq_len": 256,
    "batch_size": 16, "seed": 0, "cell": "gru", "cell_module": None, "d_model": 256, "layers": 4, "heads": 1,
    "cell_size": 0, "mlp_size": 0, "untied": False, "steps": 1000, "lr": 3e-3, "min_lr_ratio": 0.1,
    "warmup": None, "weight_decay": 0.1, "grad_clip": 1.0, "z_loss": 0.0, "mode": "auto", "dtype": "auto",
    "eval_every": 100, "eval_batches": 8, "save_every": 200,
}
_PATH_FLAGS = ("data", "tokenizer")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _absolute(args):
    for name in _PATH_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            setattr(args, name, str(Path(value).absolute()))


def _fill_warmup(args):
    if args.warmup is None:
        args.warmup = max(1, args.steps // 20)


def resolve_fresh(args):
    """Fill the flags not given with their defaults (in place)."""
    for name, value in DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    _absolute(args)
    _fill_warmup(args)


def resolve_resume(args, saved: dict, saved_step: int, out) -> list[str]:
    """Fill the flags not given from the run's saved flags (in place); refuse changed model/data flags
    and a ``--steps`` below the saved step. Returns notes on the changed optimisation flags."""
    _absolute(args)
    differences, notes = [], []
    for name in FIXED_ON_RESUME:
        given, before = getattr(args, name, None), saved.get(name, DEFAULTS[name])
        if given is None or (name == "untied" and given is False):
            setattr(args, name, before)
        elif given != before:
            differences.append(f"{flag(name)} {given} (the run has {before})")
    if differences:
        raise CLIError(
            f"--resume: {out} was trained with other model/data flags, which cannot change within a run: "
            f"{'; '.join(differences)}. Drop these flags to continue it, or start a new run in another --out"
        )
    for name in CHANGEABLE_ON_RESUME:
        given, before = getattr(args, name, None), saved.get(name, DEFAULTS[name])
        if given is None:
            setattr(args, name, before)
        elif given != before:
            notes.append(f"{flag(name)} {before} -> {given}")
    if args.steps < saved_step:
        raise CLIError(
            f"--steps {args.steps} is below the step {saved_step} the run in {out} has reached; "
            f"pass --steps {saved_step} or more to continue it"
        )
    _fill_warmup(args)
    return notes
